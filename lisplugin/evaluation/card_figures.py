"""``lisplugin evaluate card-figures``: redraw the figures of the models in a folder.

The shipped models were trained before their cards had figures, and a lab may want them for a
model it adapted. This re-scores each model on the test sets its card reports, with the
evaluate commands' own code, writes the PNGs beside the card and links them from its
"Figures" section (the front matter, SHA-256 included, is left as it is):

- leukocyte classifier: PBC's test split as ``evaluate differential`` scores it, and the BCCD
  and Zheng et al. (wbc-seg) test crops as ``train classifier`` cuts them (BCCD's labelled box;
  wbc-seg through the detector), each as a confusion matrix; one reliability diagram and one
  precision-recall figure over the three; leave-one-site-out bars from the card's
  ``leave_out_*_accuracy`` metrics (those take one training run per site: not redone here).
- cell detector: every candidate on BCCD cbc test, TXL-PBC val and draaslan (a site never
  trained on), as ``evaluate detection`` scores them, as precision-recall per cell kind; and
  the card's mAP@0.5 per evaluation set.

A site whose folder is missing under ``--data-root`` is left out (and said so).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lisplugin.config import DEFAULT_MODELS_DIR
from lisplugin.progress import progress

CLASSIFIER = "leukocyte-classifier"
DETECTOR = "cell-detector"
#: Detection sets of the detector card: (label, folder, format, split file, split).
DETECTION_SETS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("BCCD cbc test", "bccd", "voc", "bccd/cbc_split.csv", "test"),
    ("TXL-PBC val", "txl-pbc", "yolo", None, "val"),
    ("draaslan (unseen site)", "draaslan", "yolo", None, None),
)


def classifier_test_sets(
    models: Path, root: Path, log: Callable[[str], None] = print
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """``site -> (true class indices, probabilities)`` of the classifier on each site's test
    split, and its classes."""
    from lisplugin.core.crops import PBC_CROP_PX
    from lisplugin.evaluation.differential import score_folder
    from lisplugin.inference.classifier import OnnxLeukocyteClassifier
    from lisplugin.inference.registry import load_card

    classifier = OnnxLeukocyteClassifier(load_card(models, CLASSIFIER))
    classes = list(classifier.classes)
    tests: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pbc = root / "pbc"
    if (pbc / "split.csv").is_file():
        scored = score_folder(pbc, models, pbc / "split.csv", "test")
        tests["pbc"] = (scored.y_true, scored.probabilities)
    else:
        log(f"no {pbc / 'split.csv'}: pbc left out")
    raw: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    if (root / "bccd" / "cbc_split.csv").is_file():
        from lisplugin.datasets.bccd_wbc import main_leukocyte_crop, read_field_samples

        crops, labels = [], []
        samples = [s for s in read_field_samples(root / "bccd") if s.split == "test"]
        for sample in progress(samples, desc="bccd test", unit="img"):
            crop = main_leukocyte_crop(sample)
            if crop is not None and sample.label in classes:
                crops.append(crop)
                labels.append(classes.index(sample.label))
        raw["bccd"] = (crops, labels)
    else:
        log(f"no {root / 'bccd'}: bccd left out")
    if (root / "wbc-seg").is_dir():
        from lisplugin.datasets.sites import detector_crops, wbc_seg_samples
        from lisplugin.service.models import load_models

        detector = _detector(models, load_models)
        items = [(p, c) for p, c, s in wbc_seg_samples(root / "wbc-seg") if s == "test"]
        # the raw PBC-scale window (160 px, no colour change): the adapter prepares it itself
        (x, y), missed = detector_crops(
            progress(items, desc="wbc-seg test", unit="img"),  # type: ignore[arg-type]
            detector, classes, PBC_CROP_PX, 1.0, None,
        )  # fmt: skip
        if missed:
            log(f"wbc-seg test: no leukocyte found in {missed} of {len(items)} images")
        raw["wbc-seg"] = (list(x), list(y))
    else:
        log(f"no {root / 'wbc-seg'}: wbc-seg left out")
    for site, (crops, labels) in raw.items():
        if crops:
            tests[site] = (np.asarray(labels, dtype=int), classifier.classify(crops))
    return tests, classes


def _detector(models: Path, load_models: Callable[..., Any]) -> Any:
    """The folder's detector, loaded as the daemon loads it."""
    from lisplugin.config import load_settings

    settings = load_settings()
    settings.analysis.models_dir = models
    return load_models(settings)[0]


def detection_curves(
    models: Path, root: Path, log: Callable[[str], None] = print
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """``set -> kind -> (recall, precision, AP)`` of the detector's candidates on each set."""
    from lisplugin.datasets.fields import read_fields
    from lisplugin.evaluation.detection import Boxes, candidate_curves
    from lisplugin.inference.detector import OnnxCellDetector

    detector = OnnxCellDetector.from_models_dir(models, DETECTOR)
    curves = {}
    for label, folder, fmt, split_file, split in DETECTION_SETS:
        if not (root / folder).is_dir():
            log(f"no {root / folder}: {label} left out")
            continue
        fields = read_fields(root / folder, fmt, root / split_file if split_file else None, split)
        pairs = ((f.load_image(), Boxes(f.boxes, f.labels)) for f in fields)
        curves[label] = candidate_curves(detector, pairs, desc=label)
    return curves


def redraw(
    models: Path, root: Path, which: tuple[str, ...], log: Callable[[str], None] = print
) -> dict[str, list[Path]]:
    """Re-score, draw and link the figures of the ``which`` models of ``models``."""
    from lisplugin.evaluation.figures import classifier_figures, detector_figures, update_card
    from lisplugin.inference.registry import read_front_matter

    drawn: dict[str, list[Path]] = {}
    if CLASSIFIER in which:
        started = time.perf_counter()
        card = models / f"{CLASSIFIER}.md"
        tests, classes = classifier_test_sets(models, root, log)
        metrics = read_front_matter(card).get("metrics") or {}
        figures = classifier_figures(models, CLASSIFIER, tests, classes, metrics)
        update_card(card, figures, _note(tests, "test split"))
        drawn[CLASSIFIER] = [path for _, path in figures]
        log(f"{CLASSIFIER}: {len(figures)} figures in {time.perf_counter() - started:.0f} s")
    if DETECTOR in which:
        started = time.perf_counter()
        card = models / f"{DETECTOR}.md"
        curves = detection_curves(models, root, log)
        metrics = read_front_matter(card).get("metrics") or {}
        figures = detector_figures(models, DETECTOR, curves, metrics)
        update_card(card, figures, _note(curves, "set"))
        drawn[DETECTOR] = [path for _, path in figures]
        log(f"{DETECTOR}: {len(figures)} figures in {time.perf_counter() - started:.0f} s")
    return drawn


def _note(sets: dict[str, Any], what: str) -> str:
    return (
        f"Drawn by `lisplugin evaluate card-figures` from the shipped files, re-scored on each "
        f"{what} ({', '.join(sets)}); bars from the metrics above."
    )


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin evaluate card-figures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models", type=Path, default=DEFAULT_MODELS_DIR, help="folder of the cards and models"
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("../shared/data"),
        help="folder holding pbc/, bccd/, wbc-seg/, txl-pbc/, draaslan/",
    )
    parser.add_argument(
        "--only", choices=(CLASSIFIER, DETECTOR), help="redraw one model's figures only"
    )
    args = parser.parse_args(argv)
    which = (args.only,) if args.only else (CLASSIFIER, DETECTOR)
    from lisplugin.evaluation.figures import FiguresUnavailable

    try:
        drawn = redraw(args.models, args.data_root, which, log=lambda t: print(t, flush=True))
    except FiguresUnavailable as exc:
        print(f"lisplugin evaluate card-figures: {exc}", file=sys.stderr)
        return 2
    for name, paths in drawn.items():
        for path in paths:
            print(f"{name}: {path} ({path.stat().st_size // 1024} KB)")
    return 0
