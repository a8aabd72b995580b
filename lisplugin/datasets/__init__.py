"""Readers for labelled image sets laid out as class folders: ``DIR/<class>/<image>``.

PBC ships one sub-folder per leukocyte class; a lab that wants to measure or adapt the
classifier lays its cells out the same way. ``split.csv`` (``path,label,split``, paths relative
to ``DIR``) fixes a train/val/test split where there is one; without it every image in a known
class folder belongs to one split, "all". Training, evaluation and adaptation all read through
here, so none of them imports another.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lisplugin.core.types import LEUKOCYTE_CLASSES, Field

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
#: What an image that cannot be read stands in as: an empty field, in which nothing is found.
UNREADABLE_STAND_IN = np.full((32, 32, 3), 255, dtype=np.uint8)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    split: str


def read_samples(
    data_dir: Path,
    split_file: Path | None = None,
    classes: Sequence[str] = LEUKOCYTE_CLASSES,
) -> list[Sample]:
    """Samples of the known classes; from ``split_file`` (default ``DIR/split.csv``) if present.

    Folders and labels outside ``classes`` are ignored, so extra folders do no harm.
    """
    data_dir = Path(data_dir)
    known = set(classes)
    if split_file is None and (data_dir / "split.csv").is_file():
        split_file = data_dir / "split.csv"
    if split_file is not None:
        with Path(split_file).open(newline="", encoding="utf-8") as fh:
            return [
                Sample(data_dir / row["path"], row["label"], row["split"])
                for row in csv.DictReader(fh)
                if row["label"] in known
            ]
    samples = []
    folders = class_folders(data_dir, classes)
    for label in classes:
        for folder in folders.get(label, []):
            samples += [
                Sample(p, label, "all")
                for p in sorted(folder.rglob("*"))
                if p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                and p.is_file()
            ]
    return samples


def class_folders(data_dir: Path, classes: Sequence[str]) -> dict[str, list[Path]]:
    """The sub-folders of ``data_dir`` that name a class, by class: the name in any case, and
    in the plural too (``Neutrophil``, ``lymphocytes``), as labs name them; images in their
    sub-folders count."""
    named = {c.lower(): c for c in classes} | {f"{c.lower()}s": c for c in classes}
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in Path(data_dir).iterdir() if p.is_dir()):
        label = named.get(folder.name.lower())
        if label is not None:
            found.setdefault(label, []).append(folder)
    return found


def ignored_folders(data_dir: Path, classes: Sequence[str]) -> list[str]:
    """The sub-folders of ``data_dir`` that name no class (their images are not read)."""
    kept = {p for paths in class_folders(data_dir, classes).values() for p in paths}
    return sorted(
        p.name
        for p in Path(data_dir).iterdir()
        if p.is_dir() and p not in kept and not p.name.startswith(".")
    )


class TolerantReader:
    """Reads a lab's images one by one; one that cannot be read (not an image, truncated,
    empty) stands in as an empty field (:data:`UNREADABLE_STAND_IN`: nothing is found in it, so
    it counts as a missed cell) and is remembered with the reason, so that one bad file costs
    its own cell, not the run."""

    def __init__(self, read: Callable[[Path], np.ndarray] | None = None) -> None:
        self.read = read or load_rgb
        self.unreadable: dict[str, str] = {}

    def __call__(self, path: Path) -> np.ndarray:
        try:
            return self.read(path)
        except Exception as exc:  # Pillow raises many kinds; any of them is this one file's
            self.unreadable[str(path)] = f"{type(exc).__name__}: {exc}"[:300]
            return UNREADABLE_STAND_IN


def select(samples: Sequence[Sample], split: str | None) -> list[Sample]:
    """Samples of one split (all of them when ``split`` is None)."""
    return [s for s in samples if split is None or s.split == split]


def load_rgb(path: Path) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def folder_fields(
    samples: Sequence[Sample],
    first: Iterable[Sample] | None = None,
    read: Callable[[Path], np.ndarray] | None = None,
) -> Callable[[], Iterator[Field]]:
    """The samples' images as fields, once per call: what ``core.analysis.detect_folder`` reads
    a folder through, pass by pass, image by image. ``first``: the first pass's samples
    (the same, wrapped in a progress bar); ``read``: path -> RGB image (default
    :func:`load_rgb`)."""
    passes = iter([first if first is not None else samples])
    load = read or load_rgb

    def fields() -> Iterator[Field]:
        for sample in next(passes, samples):
            yield Field(load(sample.path), str(sample.path))

    return fields
