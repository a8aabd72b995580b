"""The labelled leukocyte sources as *sites*: one lab's stain, microscope and magnification each.

A model that must work at labs it has never seen is trained on every source together and
measured leave-one-site-out: trained without site S, scored on all of S. Each site yields
``train``/``val``/``test`` crops cut the way the daemon cuts them (the PBC-scale window of
:mod:`lisplugin.core.crops`), optionally white-balanced as the adapter does:

- ``pbc``: CellaVision DM96 crops, May-Grünwald-Giemsa, 8 classes; ``split.csv`` of the set.
- ``bccd``: 640 x 480 fields of another microscope (a red cell ~100 px), 5 classes; the main
  leukocyte's ground-truth box, scaled by the field's red cells; ``cbc_split.csv``.
- ``wbc-seg``: Zheng et al. 2018 Dataset 1, 120 px crops of a third lab (yellowish light,
  saturated glass, no whole red cells), 5 classes; cut through the detector like a lab's
  images in ``adapt``; split by image number (every 5th test, the next val).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lisplugin.core.crops import classifier_input as prepare
from lisplugin.core.types import CellDetector, Field
from lisplugin.datasets import Sample

SITES: tuple[str, ...] = ("pbc", "bccd", "wbc-seg")
#: Folder of each site under the shared data root.
SITE_FOLDERS = {"pbc": "pbc", "bccd": "bccd", "wbc-seg": "wbc-seg"}
#: Zheng et al.'s class numbers.
WBC_SEG_CLASSES = {1: "neutrophil", 2: "lymphocyte", 3: "monocyte", 4: "eosinophil", 5: "basophil"}

Split = tuple[np.ndarray, np.ndarray]


def _stack(crops: list[np.ndarray], labels: list[int], size: int) -> Split:
    if not crops:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack(crops), np.asarray(labels, dtype=np.int64)


def wbc_seg_split(image_id: int) -> str:
    return {0: "test", 1: "val"}.get(image_id % 5, "train")


def wbc_seg_samples(folder: Path) -> list[tuple[Path, str, str]]:
    """(image, class, split) of Zheng et al.'s Dataset 1."""
    out = []
    with (folder / "Class Labels of Dataset 1.csv").open(newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            image_id = int(row["image ID"])
            path = folder / "Dataset 1" / f"{image_id:03d}.bmp"
            label = WBC_SEG_CLASSES.get(int(row["class label"]))
            if label and path.is_file():
                out.append((path, label, wbc_seg_split(image_id)))
    return out


def detector_crops(
    items: Sequence[tuple[Path, str]],
    detector: CellDetector,
    classes: Sequence[str],
    size: int,
    centre: float,
    colour: str | None,
) -> tuple[Split, int]:
    """Crops of the most confident leukocyte of each image (the daemon's cut), and how many
    images had none."""
    from lisplugin.core.analysis import most_confident_leukocyte
    from lisplugin.datasets import load_rgb

    crops, labels, missed = [], [], 0
    for path, label in items:
        found = most_confident_leukocyte(Field(load_rgb(path), str(path)), detector, label)
        if found is None or label not in classes:
            missed += found is None
            continue
        crops.append(prepare(found[1], size, centre, colour))
        labels.append(list(classes).index(label))
    return _stack(crops, labels, size), missed


def load_site(
    name: str,
    root: Path,
    classes: Sequence[str],
    size: int,
    centre: float,
    colour: str | None,
    detector: CellDetector | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
    splits: Sequence[str] = ("train", "val", "test"),
) -> dict[str, Split]:
    """The ``splits`` (``train``/``val``/``test``) of one site as crops (``limit``: at most N
    per split, tests)."""
    folder = Path(root) / SITE_FOLDERS[name]
    out: dict[str, Split] = {}
    if name == "pbc":
        from lisplugin.datasets import load_rgb, read_samples, select

        samples = read_samples(folder, classes=classes)
        for split in splits:
            part = _limited(select(samples, split), limit)
            crops = [prepare(load_rgb(s.path), size, centre, colour) for s in part]
            out[split] = _stack(crops, [list(classes).index(s.label) for s in part], size)
    elif name == "bccd":
        from lisplugin.datasets.bccd_wbc import main_leukocyte_crop, read_field_samples

        samples = read_field_samples(folder)
        for split in splits:
            crops, labels = [], []
            for s in _limited([s for s in samples if s.split == split], limit):
                crop = main_leukocyte_crop(s)
                if crop is not None and s.label in classes:
                    crops.append(prepare(crop, size, centre, colour))
                    labels.append(list(classes).index(s.label))
            out[split] = _stack(crops, labels, size)
    elif name == "wbc-seg":
        if detector is None:
            raise ValueError("the wbc-seg site is cut through the detector: pass one")
        samples = wbc_seg_samples(folder)
        for split in splits:
            items = [(p, c) for p, c, s in _limited([x for x in samples if x[2] == split], limit)]
            out[split], missed = detector_crops(items, detector, classes, size, centre, colour)
            if missed:
                log(f"wbc-seg {split}: no leukocyte found in {missed} of {len(items)} images")
    else:
        raise ValueError(f"unknown site {name!r}; known: {', '.join(SITES)}")
    for split, (_, y) in out.items():
        log(f"loaded {name} {split}: {len(y)} crops")
    return out


def _limited(items: list, limit: int | None) -> list:
    """Every k-th item, at most ``limit`` (spread over the classes, which are sorted)."""
    if limit is None or len(items) <= limit:
        return items
    return items[:: max(len(items) // limit, 1)][:limit]


def site_samples(name: str, folder: Path) -> list[Sample]:
    """Every labelled image of a site as (path, class, split): what a lab would hand to
    ``evaluate cells``, for leave-one-site-out scoring through the daemon's whole path."""
    folder = Path(folder)
    if name == "pbc":
        from lisplugin.datasets import read_samples

        return read_samples(folder)
    if name == "bccd":
        from lisplugin.datasets.bccd_wbc import read_field_samples

        return [Sample(s.image, s.label, s.split) for s in read_field_samples(folder)]
    if name == "wbc-seg":
        return [Sample(p, c, s) for p, c, s in wbc_seg_samples(folder)]
    raise ValueError(f"unknown site {name!r}; known: {', '.join(SITES)}")
