"""Labelled BCCD leukocyte crops, cut exactly as the daemon cuts them, for domain adaptation.

PBC alone does not transfer to other microscopes and stains, so the classifier also learns
from BCCD fields. ``wbc_labels.csv`` names the type of each field's main leukocyte (the
largest ground-truth WBC box); the crop goes through the daemon's own path: the median
ground-truth red-cell diameter sets :func:`pbc_scale`, then :func:`leukocyte_crop`. The split is
``cbc_split.csv``; labelled fields missing from it are training fields, so its ``test`` fields
never reach training.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lisplugin.core.analysis import median_rbc_diameter
from lisplugin.core.crops import centre_window, leukocyte_crop, pbc_scale, resize_rgb
from lisplugin.core.types import Detection
from lisplugin.datasets.pbc import load_rgb

#: Split of labelled fields that ``cbc_split.csv`` does not list.
UNLISTED_SPLIT = "train"


LABELS = {
    "NEUTROPHIL": "neutrophil",
    "LYMPHOCYTE": "lymphocyte",
    "MONOCYTE": "monocyte",
    "EOSINOPHIL": "eosinophil",
    "BASOPHIL": "basophil",
}


def read_labels(path: Path) -> dict[str, str]:
    """Image stem -> class, for rows naming exactly one known type."""
    labels = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            names = [n.strip().upper() for n in (row.get("category") or "").split(",")]
            if len(names) == 1 and names[0] in LABELS:
                labels[row["image"].strip()] = LABELS[names[0]]
    return labels


def read_split(path: Path) -> dict[str, str]:
    """Image stem -> split name, from a ``image,split`` CSV such as BCCD's ``cbc_split.csv``."""
    with path.open(newline="") as fh:
        return {row["image"].strip(): row["split"].strip() for row in csv.DictReader(fh)}


@dataclass(frozen=True)
class FieldSample:
    image: Path
    annotation: Path
    label: str
    split: str


def read_field_samples(data_dir: Path) -> list[FieldSample]:
    """Fields with one labelled leukocyte type, an image and an annotation, with their split."""
    data_dir = Path(data_dir)
    labels = read_labels(data_dir / "wbc_labels.csv")
    splits = read_split(data_dir / "cbc_split.csv")
    samples = []
    for stem, label in sorted(labels.items()):
        image = data_dir / "JPEGImages" / f"{stem}.jpg"
        annotation = data_dir / "Annotations" / f"{stem}.xml"
        if image.is_file() and annotation.is_file():
            samples.append(FieldSample(image, annotation, label, splits.get(stem, UNLISTED_SPLIT)))
    return samples


def read_boxes(annotation: Path) -> list[Detection]:
    """Ground-truth VOC boxes as detections (score 1), in field pixels."""
    root = ET.parse(annotation).getroot()
    out = []
    for obj in root.iter("object"):
        kind = (obj.findtext("name") or "").strip()
        kind = "PLT" if kind.lower().startswith("platelet") else kind
        box = obj.find("bndbox")
        if box is None:
            continue
        x0, y0, x1, y1 = (float(box.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        out.append(Detection(kind, 1.0, (x0, y0, x1, y1)))  # type: ignore[arg-type]
    return out


def main_leukocyte_crop(sample: FieldSample) -> np.ndarray | None:
    """The PBC-scale crop of the field's largest WBC box, as the daemon would cut it."""
    image = load_rgb(sample.image)
    boxes = read_boxes(sample.annotation)
    wbcs = [d.box for d in boxes if d.kind == "WBC"]
    if not wbcs:
        return None
    box = max(wbcs, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    diameter = median_rbc_diameter(boxes, image.shape[1], image.shape[0])
    return leukocyte_crop(image, box, pbc_scale(None, diameter, box))


def load_field_crops(
    samples: Sequence[FieldSample], classes: Sequence[str], size: int, centre: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 crops and class indices; fields without a WBC box are dropped.

    ``centre`` is the card's ``centre_crop``: the adapter's central window, cut the same way here.
    """
    crops, labels = [], []
    for sample in samples:
        crop = main_leukocyte_crop(sample)
        if crop is not None and sample.label in classes:
            crops.append(resize_rgb(centre_window(crop, centre), size))
            labels.append(list(classes).index(sample.label))
    if not crops:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack(crops), np.asarray(labels, dtype=np.int64)
