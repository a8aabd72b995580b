"""Readers for annotated microscope fields: VOC XML and YOLO txt boxes, with an optional split CSV.

Public blood-smear sets come in both layouts and spell the classes differently ("Platelets",
"Platelet", "PLT"); everything here maps them onto the three kinds of ``CELL_KINDS`` so that
training and evaluation never see dataset-specific names.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from lisplugin.core.types import CELL_KINDS, CellKind

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_ALIASES: dict[str, CellKind] = {
    "rbc": "RBC",
    "wbc": "WBC",
    "platelets": "PLT",
    "platelet": "PLT",
    "plt": "PLT",
}


def kind_of(name: str) -> CellKind | None:
    """The cell kind a dataset class name stands for (case-insensitive), None if not a cell."""
    return _ALIASES.get(name.strip().lower())


@dataclass(frozen=True)
class AnnotatedField:
    """One annotated image: boxes in its own pixel coordinates and kind indices into CELL_KINDS."""

    name: str  # file stem, the key used by split files
    image_path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32, x0, y0, x1, y1
    labels: np.ndarray  # (N,) int64, index into CELL_KINDS

    def load_image(self) -> np.ndarray:
        """The image as H x W x 3 uint8 RGB."""
        return load_rgb(self.image_path)

    def counts(self) -> dict[str, int]:
        return {k: int((self.labels == i).sum()) for i, k in enumerate(CELL_KINDS)}


@dataclass(frozen=True)
class MosaicField:
    """``n`` x ``n`` annotated fields of one size side by side: one larger field at the same
    magnification, as a bigger sensor or a slide-scanner frame sees it."""

    parts: tuple[AnnotatedField, ...]
    n: int

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def width(self) -> int:
        return self.parts[0].width * self.n

    @property
    def height(self) -> int:
        return self.parts[0].height * self.n

    @property
    def boxes(self) -> np.ndarray:
        w, h = self.parts[0].width, self.parts[0].height
        return np.concatenate(
            [
                p.boxes + np.array([k % self.n * w, k // self.n * h] * 2, np.float32)
                for k, p in enumerate(self.parts)
            ]
        )

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([p.labels for p in self.parts])

    def load_image(self) -> np.ndarray:
        images = [p.load_image() for p in self.parts]
        n = self.n
        return np.concatenate(
            [np.concatenate(images[r * n : (r + 1) * n], axis=1) for r in range(n)], axis=0
        )


def mosaics(fields: list[AnnotatedField], n: int) -> list[MosaicField]:
    """Consecutive fields of the same size in groups of ``n`` x ``n`` (a remainder is left out)."""
    by_size: dict[tuple[int, int], list[AnnotatedField]] = {}
    for f in fields:
        by_size.setdefault((f.width, f.height), []).append(f)
    return [
        MosaicField(tuple(group[i : i + n * n]), n)
        for group in by_size.values()
        for i in range(0, len(group) - n * n + 1, n * n)
    ]


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_split_csv(path: Path) -> dict[str, str]:
    """``image,split`` rows -> {image stem: split}; extensions in the image column are ignored."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return {Path(row["image"]).stem: row["split"].strip() for row in csv.DictReader(fh)}


def _clean(boxes: list[list[float]], labels: list[int], width: int, height: int) -> tuple:
    """Clip boxes to the image and drop degenerate ones (annotation slips happen in public sets)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    lab = np.asarray(labels, dtype=np.int64)
    b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    keep = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
    return b[keep], lab[keep]


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _split_filter(names: Iterable[str], split_file: Path | None, split: str | None) -> set[str]:
    names = set(names)
    if split_file is None or split is None:
        return names
    wanted = read_split_csv(split_file)
    return {n for n in names if wanted.get(n) == split}


def read_voc(
    root: Path, split_file: Path | None = None, split: str | None = None
) -> list[AnnotatedField]:
    """``root/Annotations/*.xml`` + ``root/JPEGImages``; split from the CSV, else ImageSets/Main."""
    root = Path(root)
    xmls = {p.stem: p for p in sorted((root / "Annotations").glob("*.xml"))}
    names = _split_filter(xmls, split_file, split)
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if split is not None and split_file is None:
        if not list_file.is_file():
            raise FileNotFoundError(f"no split '{split}': {list_file} missing and no split file")
        names &= {line.strip() for line in list_file.read_text().splitlines() if line.strip()}
    fields = []
    for stem in sorted(names):
        tree = ET.parse(xmls[stem]).getroot()
        filename = tree.findtext("filename") or ""
        image_path = root / "JPEGImages" / filename
        if not filename or not image_path.is_file():
            image_path = _find_image(root / "JPEGImages", stem)
        if image_path is None:
            continue
        with Image.open(image_path) as im:
            width, height = im.size
        boxes, labels = [], []
        for obj in tree.iter("object"):
            kind = kind_of(obj.findtext("name") or "")
            bb = obj.find("bndbox")
            if kind is None or bb is None:
                continue
            boxes.append([float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(CELL_KINDS.index(kind))
        b, lab = _clean(boxes, labels, width, height)
        fields.append(AnnotatedField(stem, image_path, width, height, b, lab))
    return fields


def yolo_class_names(root: Path) -> list[str]:
    """Class names of a YOLO set from ``data.yaml`` (list or id map) or ``classes.txt``."""
    root = Path(root)
    for yaml_path in (root / "data.yaml", root / "dataset.yaml"):
        if yaml_path.is_file():
            names = (yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}).get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
    for txt in (root / "classes.txt", root / "labels" / "classes.txt"):
        if txt.is_file():
            return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"{root}: no data.yaml or classes.txt with class names")


def _yolo_image_dirs(root: Path, split: str | None, by_csv: bool) -> list[Path]:
    """``images/<split>`` if present, else ``images`` itself, else all its sub-folders (when no
    split is asked for, or a split CSV picks the images)."""
    images = root / "images"
    if split is not None and (images / split).is_dir():
        return [images / split]
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir()):
        return [images]
    if split is None or by_csv:
        return sorted(p for p in images.iterdir() if p.is_dir())
    raise FileNotFoundError(f"{images}: no split folder '{split}' and no split file")


def read_yolo(
    root: Path, split_file: Path | None = None, split: str | None = None
) -> list[AnnotatedField]:
    """``root/images[/<split>]`` + ``root/labels[/<split>]``; a missing label file = no cells."""
    root = Path(root)
    kinds = [kind_of(n) for n in yolo_class_names(root)]
    dirs = _yolo_image_dirs(root, split, split_file is not None)
    fields = []
    for image_dir in dirs:
        label_dir = root / "labels" / image_dir.relative_to(root / "images")
        paths = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        names = _split_filter(paths, split_file, split)
        for stem in sorted(names):
            with Image.open(paths[stem]) as im:
                width, height = im.size
            boxes, labels = [], []
            label_path = label_dir / f"{stem}.txt"
            rows = label_path.read_text().splitlines() if label_path.is_file() else []
            for row in rows:
                parts = row.split()
                if len(parts) < 5 or not 0 <= int(parts[0]) < len(kinds):
                    continue
                kind = kinds[int(parts[0])]
                if kind is None:
                    continue
                values = [float(v) for v in parts[1:]]
                if len(values) >= 6 and len(values) % 2 == 0:  # YOLO-seg polygon x1 y1 x2 y2 ...
                    xs, ys = values[0::2], values[1::2]
                    boxes.append(
                        [min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height]
                    )
                else:  # cx cy w h, possibly followed by a score
                    cx, cy, w, h = values[:4]
                    boxes.append(
                        [(cx - w / 2) * width, (cy - h / 2) * height,
                         (cx + w / 2) * width, (cy + h / 2) * height]
                    )  # fmt: skip
                labels.append(CELL_KINDS.index(kind))
            b, lab = _clean(boxes, labels, width, height)
            fields.append(AnnotatedField(stem, paths[stem], width, height, b, lab))
    return fields


def read_fields(
    root: Path, fmt: str, split_file: Path | None = None, split: str | None = None
) -> list[AnnotatedField]:
    """Dispatch on ``fmt`` ('voc' or 'yolo')."""
    if fmt == "voc":
        return read_voc(root, split_file, split)
    if fmt == "yolo":
        return read_yolo(root, split_file, split)
    raise ValueError(f"unknown annotation format '{fmt}' (voc or yolo)")
