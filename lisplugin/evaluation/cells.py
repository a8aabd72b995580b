"""``lisplugin evaluate cells``: the whole daemon path on any lab's labelled leukocytes.

The folder is laid out as for ``lisplugin adapt``: one sub-folder per class (``neutrophil,
lymphocyte, monocyte, eosinophil, basophil, ig, erythroblast, platelet``; other folders are
ignored), each image showing one labelled leukocyte, as a whole field or a crop at any
magnification. Each image goes through the daemon's own path (quality control, detector, scale
normalisation by the field's red cells, classifier); the most confident leukocyte of the image
is the labelled one. The folder is one lab's microscope, so the images are analysed as the
fields of one specimen are: those without red cells or Pixel Spacing (crops of single cells)
share the scale of the folder's leukocytes, the median one taken as 60 PBC px
(``--per-image-scale``: each such image on its own, as a one-field case), and the crops share
the folder's chromatin density as their stain reference (``--per-crop-stain``: each its own).
An image where none is found (or that fails quality control) counts as wrong, under the column
``none`` of the confusion matrix: a lab sees that cell as missed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lisplugin.config import DEFAULT_MODELS_DIR, load_settings
from lisplugin.core.analysis import analyse_field, detect_folder
from lisplugin.core.crops import resize_rgb
from lisplugin.core.types import LEUKOCYTE_CLASSES, UNIDENTIFIED, Field
from lisplugin.datasets import (
    Sample,
    TolerantReader,
    folder_fields,
    ignored_folders,
    load_rgb,
    read_samples,
    select,
)
from lisplugin.progress import progress as progress_bar
from lisplugin.service.models import lab_classifier, load_models

log = logging.getLogger(__name__)

#: Column of the confusion matrix for images where no leukocyte was found.
NONE = "none"
#: Unreadable files named in the report (all are counted).
UNREADABLE_LISTED = 20


def rescaled(image: np.ndarray, factor: float) -> np.ndarray:
    """The image resampled by ``factor`` (x0.5, x2: another magnification of the same cells)."""
    if factor == 1.0:
        return image
    h, w = image.shape[:2]
    size_h, size_w = max(round(h * factor), 1), max(round(w * factor), 1)
    if size_h == size_w and h == w:
        return resize_rgb(image, size_h)
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size_w, size_h), Image.Resampling.BILINEAR))


def cell_metrics(truth: list[str], predicted: list[str], classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present, per-class recall/precision, confusion."""
    t = np.asarray(truth)
    p = np.asarray(predicted)
    present = [c for c in classes if (t == c).any()]
    per_class: dict[str, dict[str, float | int]] = {}
    f1s = []
    for c in present:
        tp = int(((t == c) & (p == c)).sum())
        support = int((t == c).sum())
        called = int((p == c).sum())
        recall = tp / support
        precision = tp / called if called else 0.0
        f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
        f1s.append(f1)
        per_class[c] = {
            "recall": round(recall, 4),
            "precision": round(precision, 4),
            "f1": round(f1, 4),
            "n": support,
        }
    columns = [*classes, UNIDENTIFIED, NONE]
    matrix = [[int(((t == r) & (p == c)).sum()) for c in columns] for r in present]
    return {
        "n": len(truth),
        "accuracy": round(float((t == p).mean()), 4) if len(truth) else None,
        "macro_f1": round(float(np.mean(f1s)), 4) if f1s else None,
        "per_class": per_class,
        "confusion": {"rows": present, "columns": columns, "matrix": matrix},
    }


def evaluate_cells(
    data: Path,
    models_dir: Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    magnification: float = 1.0,
    progress: bool = False,
    per_image_scale: bool = False,
    per_crop_stain: bool = False,
    per_crop_norms: bool = False,
) -> dict[str, Any]:
    """Score the most confident leukocyte of each labelled image in ``data``'s class folders."""
    samples = select(read_samples(data, classes=LEUKOCYTE_CLASSES), split)
    if not samples:
        raise SystemExit(f"no images in class folders {list(LEUKOCYTE_CLASSES)} under {data}")
    ignored = ignored_folders(data, LEUKOCYTE_CLASSES) if data.is_dir() else []
    if ignored:
        log.warning("evaluate cells: folders that name no class are not read: %s", ignored)
    classifier_dir = None
    detector_card = f"{load_settings().analysis.detector}.md"
    if models_dir is not None and not (models_dir / detector_card).is_file():
        # A training run's folder holds only the classifier: the shipped detector finds cells.
        models_dir, classifier_dir = None, models_dir
    report = evaluate_samples(
        samples,
        models_dir,
        classifier_dir,
        limit,
        magnification,
        progress,
        per_image_scale,
        per_crop_stain,
        per_crop_norms,
    )
    report["data"] = str(data)
    report["ignored_folders"] = ignored
    return report


def evaluate_samples(
    samples: list[Sample],
    models_dir: Path | None = None,
    classifier_dir: Path | None = None,
    limit: int | None = None,
    magnification: float = 1.0,
    progress: bool = False,
    per_image_scale: bool = False,
    per_crop_stain: bool = False,
    per_crop_norms: bool = False,
) -> dict[str, Any]:
    """Score the most confident leukocyte of each labelled image, through the daemon's path.

    ``classifier_dir`` takes the classifier from another folder (a freshly trained or adapted
    one) with the detector of ``models_dir`` (default: the shipped models). The images are one
    specimen to the analysis: those without a scale of their own share the folder's
    (``shared_scale``), unless ``per_image_scale`` (each image a case of its own), and every
    crop takes the folder's chromatin density as its stain reference (``shared_nucleus``),
    unless ``per_crop_stain``; the classifier's features are normalised on the folder's
    leukocytes where its card ships ``specimen_norms``, unless ``per_crop_norms``.
    """
    settings = load_settings()
    if models_dir is not None:
        settings.analysis.models_dir = models_dir
    # Every leukocyte gets its top class here: the question is whether that class is right.
    analysis = settings.analysis.model_copy(update={"min_class_probability": 0.0})
    detector, classifier = load_models(settings)
    if classifier_dir is not None:
        classifier = lab_classifier(classifier_dir, analysis)
    classes = list(LEUKOCYTE_CLASSES)
    if limit:
        samples = _spread(samples, limit)
    shown = progress_bar(samples, desc="cells", unit="img") if progress else samples
    # Detected first: the folder is one lab, and its images share a scale (those without one
    # of their own) and a stain reference, as a specimen's fields do.
    reader = TolerantReader(lambda path: rescaled(load_rgb(path), magnification))
    fields = folder_fields(samples, shown, reader)
    folder = detect_folder(
        fields,
        detector,
        not per_image_scale,
        not per_crop_stain,
        None if per_crop_norms else classifier,
    )
    found, shared, nucleus = folder.found, folder.scale, folder.nucleus
    specimen = folder.classifier or classifier
    truth, predicted = [], []
    detected = qc_failed = 0
    for index, sample in enumerate(samples):
        field = Field(reader(sample.path), str(sample.path))
        result = analyse_field(
            index,
            field,
            detector,
            specimen,
            analysis,
            found=found[index],
            shared_scale=shared,
            nucleus=nucleus,
        )
        wbcs = [c for c in result.cells if c.kind == "WBC"]
        qc_failed += not result.quality.passed
        truth.append(sample.label)
        if not wbcs:
            predicted.append(NONE)
            continue
        detected += 1
        predicted.append(max(wbcs, key=lambda c: c.score).label)
    report = cell_metrics(truth, predicted, classes)
    report.update(
        {
            "found": detected,
            "quality_failed": qc_failed,
            # counted as missed cells (column ``none``), each with why it could not be read
            "unreadable": len(reader.unreadable),
            "unreadable_files": dict(list(reader.unreadable.items())[:UNREADABLE_LISTED]),
            "magnification": magnification,
            "shared_scale": None if shared is None else round(shared, 5),
            "shared_nucleus": None if nucleus is None else [round(float(v), 4) for v in nucleus],
            "specimen_norms": specimen is not classifier,
            "model_versions": {"detector": detector.version, "classifier": classifier.version},
        }
    )
    return report


def _spread(samples: list[Sample], limit: int) -> list[Sample]:
    """At most ``limit`` samples, taken evenly from every class (quick runs and tests)."""
    labels = sorted({s.label for s in samples})
    per_class = max(limit // len(labels), 1)
    return [s for label in labels for s in [x for x in samples if x.label == label][:per_class]]


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin evaluate cells",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="folder of class sub-folders")
    parser.add_argument(
        "--models",
        type=Path,
        help=f"models folder (default: the models in use, {DEFAULT_MODELS_DIR} as shipped); "
        "a folder with only a classifier is used with the shipped detector",
    )
    parser.add_argument("--split", help="score only this split of DIR/split.csv (e.g. test)")
    parser.add_argument("--limit", type=int, help="at most N images, spread over the classes")
    parser.add_argument(
        "--magnification",
        type=float,
        default=1.0,
        help="resample every image by this factor first (0.5, 2: robustness to magnification)",
    )
    parser.add_argument(
        "--per-image-scale",
        action="store_true",
        help="images without red cells or Pixel Spacing each take their leukocyte as 60 PBC px "
        "(as a one-field case would) instead of sharing the folder's scale",
    )
    parser.add_argument(
        "--per-crop-stain",
        action="store_true",
        help="normalise each crop's stain to its own chromatin instead of the folder's",
    )
    parser.add_argument(
        "--per-crop-norms",
        action="store_true",
        help="keep the classifier's training-site feature statistics instead of normalising "
        "its features on the folder's leukocytes (card field specimen_norms)",
    )
    parser.add_argument("--json", action="store_true", help="print the whole JSON report")
    parser.add_argument(
        "--figures", type=Path, metavar="DIR", help="also draw the confusion matrix (PNG) into DIR"
    )
    args = parser.parse_args(argv)
    report = evaluate_cells(
        args.data,
        args.models,
        args.split,
        args.limit,
        args.magnification,
        progress=True,
        per_image_scale=args.per_image_scale,
        per_crop_stain=args.per_crop_stain,
        per_crop_norms=args.per_crop_norms,
    )
    if args.figures is not None:
        from lisplugin.evaluation.figures import confusion_figure

        confusion = report["confusion"]
        name = f"cells-{args.data.name}" + (f"-{args.split}" if args.split else "")
        path = confusion_figure(
            confusion["matrix"],
            confusion["rows"],
            confusion["columns"],
            args.figures / f"{name}.confusion.png",
            f"classifier {report['model_versions']['classifier']}: {args.data.name}, whole path",
        )
        report["figures"] = [str(path)]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"n={report['n']} accuracy={report['accuracy']} macro_f1={report['macro_f1']} "
            f"found={report['found']} unreadable={report['unreadable']}"
        )
    return 0
