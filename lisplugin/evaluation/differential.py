"""``lisplugin evaluate differential``: leukocyte classifier metrics on a class-folder image set.

The folder holds one sub-folder per class named as in PBC; images are PBC-scale crops, so they
go to the classifier as they are (it only resizes them to its input size). With a split file,
only the chosen split is scored, which keeps test images out of model selection.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lisplugin.config import DEFAULT_MODELS_DIR
from lisplugin.progress import bar


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: mean |accuracy - confidence| weighted by bin size."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if len(y_true) == 0:
        return 0.0
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def differential_metrics(
    y_true: Sequence[int] | np.ndarray, y_prob: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class recall/precision, confusion matrix and ECE.

    ``y_true`` holds indices into ``classes``; ``y_prob`` is (N, len(classes)). Confusion rows
    are the true class, columns the predicted class. A class that is never predicted has
    precision 0 (and F1 0) so that a model ignoring a class is not rewarded.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    k = len(classes)
    if y_prob.shape != (len(y_true), k):
        raise ValueError(f"y_prob has shape {y_prob.shape}, expected ({len(y_true)}, {k})")
    y_pred = y_prob.argmax(axis=1) if len(y_true) else np.zeros(0, dtype=int)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (y_true, y_pred), 1)
    per_class: dict[str, dict[str, float | int]] = {}
    f1s = []
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        support = confusion[i].sum()
        predicted = confusion[:, i].sum()
        recall = tp / support if support else 0.0
        precision = tp / predicted if predicted else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "recall": float(recall),
            "precision": float(precision),
            "f1": float(f1),
            "support": int(support),
        }
        if support:
            f1s.append(f1)
    n = len(y_true)
    return {
        "n": n,
        "accuracy": float(np.trace(confusion) / n) if n else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "ece": expected_calibration_error(y_true, y_prob),
        "per_class": per_class,
        "confusion": {"labels": list(classes), "matrix": confusion.tolist()},
    }


def score_crops(
    classifier: Any,
    crops: Sequence[np.ndarray],
    labels: Sequence[str],
    nuclei: Sequence[np.ndarray | None] | None = None,
) -> dict[str, Any]:
    """Accuracy and per-class recall of a classifier adapter on PBC-scale crops (``nuclei``:
    each crop's specimen chromatin density, its stain reference; None: each crop's own)."""
    if not len(crops):
        return {"n": 0, "accuracy": None, "per_class_recall": {}}
    probs = classify_each(classifier, crops, nuclei)
    predicted = np.asarray([classifier.classes[i] for i in probs.argmax(axis=1)])
    truth = np.asarray(labels)
    return {
        "n": len(truth),
        "accuracy": round(float((predicted == truth).mean()), 4),
        "per_class_recall": {
            c: round(float((predicted[truth == c] == c).mean()), 4) for c in sorted(set(labels))
        },
    }


def classify_each(
    classifier: Any,
    crops: Sequence[np.ndarray],
    nuclei: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """Probabilities of crops that may come from several specimens: one batch per specimen
    stain reference (crops in their order)."""
    if nuclei is None:
        return np.asarray(classifier.classify(list(crops)))
    groups: dict[bytes | None, list[int]] = {}
    for i, n in enumerate(nuclei):
        groups.setdefault(None if n is None else np.asarray(n, np.float32).tobytes(), []).append(i)
    out = np.zeros((len(crops), len(classifier.classes)))
    for idx in groups.values():
        out[idx] = classifier.classify([crops[i] for i in idx], nuclei[idx[0]])
    return out


@dataclass(frozen=True)
class Scored:
    """A classifier's probabilities for labelled crops: what metrics and figures are made of."""

    y_true: np.ndarray  # class indices into ``classes``
    probabilities: np.ndarray  # (N, len(classes)), calibrated
    classes: list[str]
    version: str


def score_folder(
    data_dir: Path,
    models_dir: Path,
    split_file: Path | None = None,
    split: str | None = None,
    model_name: str = "leukocyte-classifier",
) -> Scored:
    """Classify every image of the chosen split with the folder's model."""
    from lisplugin.datasets import load_rgb, read_samples, select
    from lisplugin.inference.classifier import OnnxLeukocyteClassifier
    from lisplugin.inference.registry import load_card

    classifier = OnnxLeukocyteClassifier(load_card(models_dir, model_name))
    classes = list(classifier.classes)
    samples = select(read_samples(data_dir, split_file, classes), split)
    if not samples:
        raise SystemExit(f"no images of classes {classes} found in {data_dir} (split={split})")
    probs = []
    chunk = 256  # bounds memory: decoded crops are dropped after each chunk
    with bar(len(samples), desc="crops", unit="img") as shown:
        for start in range(0, len(samples), chunk):
            crops = [load_rgb(s.path) for s in samples[start : start + chunk]]
            probs.append(classifier.classify(crops))
            shown.update(len(crops))
    y_true = np.asarray([classes.index(s.label) for s in samples], dtype=int)
    return Scored(y_true, np.concatenate(probs), classes, classifier.version)


def evaluate_folder(
    data_dir: Path,
    models_dir: Path,
    split_file: Path | None = None,
    split: str | None = None,
    model_name: str = "leukocyte-classifier",
    figures: Path | None = None,
) -> dict[str, Any]:
    """Classify every image of the chosen split with the shipped model and score it; with
    ``figures``, also draw its confusion matrix, reliability diagram and PR curves there."""
    scored = score_folder(data_dir, models_dir, split_file, split, model_name)
    result = differential_metrics(scored.y_true, scored.probabilities, scored.classes)
    result["model"] = {"name": model_name, "version": scored.version}
    result["split"] = split
    if figures is not None:
        from lisplugin.evaluation.figures import classifier_figures

        name = Path(data_dir).name
        drawn = classifier_figures(
            figures,
            model_name,
            {name: (scored.y_true, scored.probabilities)},
            scored.classes,
            label=split or "all",
        )
        result["figures"] = [str(path) for _, path in drawn]
    return result


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin evaluate differential",
        description="Score the leukocyte classifier on a class-folder image set.",
    )
    parser.add_argument("--data", type=Path, required=True, help="folder of class sub-folders")
    parser.add_argument("--split-file", type=Path, help="CSV path,label,split (paths rel. DIR)")
    parser.add_argument("--split", help="split to score, e.g. test (default: all images)")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--json", action="store_true", help="print the full JSON result")
    parser.add_argument(
        "--figures", type=Path, metavar="DIR", help="also draw the figures (PNG) into DIR"
    )
    args = parser.parse_args(argv)
    split_file = args.split_file
    if split_file is None and args.split is not None and (args.data / "split.csv").is_file():
        split_file = args.data / "split.csv"
    if args.split is not None and split_file is None:
        parser.error("--split needs a split file (--split-file or DIR/split.csv)")
    result = evaluate_folder(args.data, args.models, split_file, args.split, figures=args.figures)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(
            f"n={result['n']} accuracy={result['accuracy']:.4f} "
            f"macro_f1={result['macro_f1']:.4f} ece={result['ece']:.4f}"
        )
    return 0
