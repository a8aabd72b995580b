"""``lisplugin evaluate field-differential``: the whole path on labelled fields.

PBC measures the classifier on CellaVision crops; a lab's fields come from other microscopes and
stains. BCCD's ``wbc_labels.csv`` names the type of the main leukocyte of each field, so the
daemon's own path (detect -> scale-normalise -> classify) is measured on fields it was never
trained on: for each labelled field, the detected leukocyte with the largest box is compared
with the label (fields with no or two labels are skipped; a field where no leukocyte was found
counts as a miss).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from lisplugin.config import load_settings
from lisplugin.core.analysis import analyse_field
from lisplugin.core.types import UNIDENTIFIED
from lisplugin.datasets.bccd_wbc import LABELS, read_labels, read_split
from lisplugin.dicom.decode import field_from_image_file
from lisplugin.progress import progress
from lisplugin.service.models import lab_classifier, load_models


def evaluate(
    data: Path,
    models_dir: Path | None,
    limit: int | None,
    split_file: Path | None = None,
    split: str | None = None,
    classifier_dir: Path | None = None,
) -> dict[str, Any]:
    settings = load_settings()
    if models_dir is not None:
        settings.analysis.models_dir = models_dir
    # Every leukocyte gets its top class here: the question is whether that class is right.
    analysis = settings.analysis.model_copy(update={"min_class_probability": 0.0})
    detector, classifier = load_models(settings)
    if classifier_dir is not None:  # a freshly trained classifier with the shipped detector
        classifier = lab_classifier(classifier_dir, analysis)
    labels = read_labels(data / "wbc_labels.csv")
    images = sorted(p for p in (data / "JPEGImages").glob("*.jpg") if p.stem in labels)
    if split is not None:  # only fields of one split, e.g. those never used in training
        splits = read_split(split_file or data / "cbc_split.csv")
        images = [p for p in images if splits.get(p.stem) == split]
    if limit:
        images = images[:limit]
    pairs: list[tuple[str, str]] = []
    for index, path in enumerate(progress(images, desc="fields", unit="img")):
        result = analyse_field(index, field_from_image_file(path), detector, classifier, analysis)
        wbcs = [c for c in result.cells if c.kind == "WBC"]
        if not wbcs:
            pairs.append((labels[path.stem], "none"))
            continue
        main = max(wbcs, key=lambda c: (c.box[2] - c.box[0]) * (c.box[3] - c.box[1]))
        pairs.append((labels[path.stem], main.label))
    truth = np.array([t for t, _ in pairs])
    predicted = np.array([p for _, p in pairs])
    classes = sorted(set(LABELS.values()))
    return {
        "n": len(pairs),
        "accuracy": round(float((truth == predicted).mean()), 4) if pairs else None,
        "no_leukocyte_found": int((predicted == "none").sum()),
        "unidentified": int((predicted == UNIDENTIFIED).sum()),
        "per_class_recall": {
            c: round(float((predicted[truth == c] == c).mean()), 4)
            for c in classes
            if (truth == c).any()
        },
        "predicted": {p: int((predicted == p).sum()) for p in sorted(set(predicted))},
        "model_versions": {"detector": detector.version, "classifier": classifier.version},
    }


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin evaluate field-differential", description=__doc__
    )
    parser.add_argument("--data", type=Path, required=True, help="BCCD folder with wbc_labels.csv")
    parser.add_argument("--models", type=Path, help="models folder (default: shipped)")
    parser.add_argument("--limit", type=int, help="first N labelled fields only")
    parser.add_argument("--split-file", type=Path, help="image,split CSV (default cbc_split.csv)")
    parser.add_argument("--split", help="evaluate only the fields of this split, e.g. test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = evaluate(args.data, args.models, args.limit, args.split_file, args.split)
    print(json.dumps(report, indent=2 if args.json else None))
    return 0
