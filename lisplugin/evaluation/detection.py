"""Cell-detection metrics (COCO-style mAP, recall, count accuracy) and the evaluate command.

The metric functions are pure numpy so that they can be checked by hand and against
faster-coco-eval. AP follows the COCO definition: greedy matching of score-sorted detections to
the unmatched ground truth of highest IoU, a monotone precision envelope sampled at 101 recall
points, at most 100 detections per image and class, classes without ground truth left out.
Count accuracy follows Alam & Islam (2019): the mean over images of 1 - |pred - true| / true,
not clipped at 0; an image with true = 0 for a class is skipped for that class (the ratio is
undefined there), and the number of images used is reported. ``count_regression_accuracy``
scores the model's image-level count head the same way; ``count_crosscheck_apart_p90`` is how
far detected and regressed counts lie apart over specimens of 10 fields, as the COUNT_XCHECK
review rule (minimum count 10) sees them. ``detect_ms_median`` is the median
time of one ``detect`` call at the operating thresholds, masks included, on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lisplugin.core.rules import count_disagreement
from lisplugin.core.types import CELL_KINDS
from lisplugin.progress import progress

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100
#: Fields per specimen when the count cross-check is scored (a differential takes 10 or more).
SPECIMEN_FIELDS = 10


@dataclass(frozen=True)
class Boxes:
    """Boxes of one image: (N, 4) x0, y0, x1, y1; kind indices; scores (1 for ground truth)."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None

    def of(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and scores of one class, highest score first (stable, as COCO sorts)."""
        sel = self.labels == label
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)[sel]
        scores = np.ones(len(boxes)) if self.scores is None else np.asarray(self.scores)[sel]
        order = np.argsort(-scores, kind="mergesort")
        return boxes[order], scores[order]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x0, y0, x1, y1 boxes (continuous coordinates, as COCO)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match(det: np.ndarray, gt: np.ndarray, iou_threshold: float) -> np.ndarray:
    """For score-sorted detections, whether each one matches a still unmatched ground truth."""
    ious = box_iou(det, gt)
    taken = np.zeros(len(gt), dtype=bool)
    hit = np.zeros(len(det), dtype=bool)
    for i in range(len(det)):
        cand = np.where(~taken & (ious[i] >= min(iou_threshold, 1 - 1e-10)), ious[i], -1.0)
        if len(gt) and cand.max() >= 0:
            j = int(cand.argmax())
            taken[j] = True
            hit[i] = True
    return hit


def ranked_hits(
    gts: Sequence[Boxes], preds: Sequence[Boxes], label: int, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Whether each detection of one class matches, in descending score order over all images,
    with those scores and the number of ground-truth cells: what AP and PR curves are made of."""
    hits, scores, n_gt = [], [], 0
    for gt, pred in zip(gts, preds, strict=True):
        g, _ = gt.of(label)
        d, s = pred.of(label)
        d, s = d[:MAX_DETS], s[:MAX_DETS]
        n_gt += len(g)
        hits.append(match(d, g, iou_threshold))
        scores.append(s)
    if not scores or sum(len(s) for s in scores) == 0:
        return np.zeros(0, dtype=bool), np.zeros(0), n_gt
    all_scores = np.concatenate(scores)
    order = np.argsort(-all_scores, kind="mergesort")
    return np.concatenate(hits)[order], all_scores[order], n_gt


def pr_curve(
    gts: Sequence[Boxes], preds: Sequence[Boxes], label: int, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, float]:
    """Recall and (raw, not enveloped) precision after each detection of one class, by
    descending score, and its COCO AP; empty curves and NaN when the class has no ground truth."""
    hit, _, n_gt = ranked_hits(gts, preds, label, iou_threshold)
    if n_gt == 0:
        return np.zeros(0), np.zeros(0), float("nan")
    tp = np.cumsum(hit)
    precision = tp / np.arange(1, len(hit) + 1)
    return tp / n_gt, precision, average_precision(gts, preds, label, iou_threshold)


def kind_curves(
    gts: Sequence[Boxes], preds: Sequence[Boxes], iou_threshold: float = 0.5
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """:func:`pr_curve` of every cell kind that has ground truth (for the card's figure)."""
    curves = {kind: pr_curve(gts, preds, i, iou_threshold) for i, kind in enumerate(CELL_KINDS)}
    return {kind: curve for kind, curve in curves.items() if len(curve[0])}


def candidate_curves(
    detector: Any, pairs: Iterable[tuple[np.ndarray, Boxes]], desc: str = "fields"
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """:func:`kind_curves` of ``detector``'s every candidate (score >= its card's candidate
    threshold, as mAP is scored) on ``(image, ground truth)`` pairs."""
    gts, preds = [], []
    for image, truth in progress(pairs, desc=desc, unit="img"):
        found = detector.detect(image, score_threshold=detector.candidate_threshold, masks=False)
        gts.append(truth)
        preds.append(_as_boxes(found.cells))
    return kind_curves(gts, preds)


def average_precision(
    gts: Sequence[Boxes], preds: Sequence[Boxes], label: int, iou_threshold: float
) -> float:
    """COCO AP of one class at one IoU threshold; NaN when the class has no ground truth."""
    hit, _, n_gt = ranked_hits(gts, preds, label, iou_threshold)
    if n_gt == 0:
        return float("nan")
    if not len(hit):
        return 0.0
    tp = np.cumsum(hit)
    fp = np.cumsum(~hit)
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def mean_ap(
    gts: Sequence[Boxes], preds: Sequence[Boxes], iou_thresholds: Sequence[float] = (0.5,)
) -> float:
    """Mean over classes (with ground truth) and IoU thresholds of the COCO AP."""
    aps = [
        average_precision(gts, preds, c, t) for c in range(len(CELL_KINDS)) for t in iou_thresholds
    ]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


def recall_at(
    gts: Sequence[Boxes], preds: Sequence[Boxes], label: int, iou_threshold: float = 0.5
) -> float:
    """Share of ground-truth cells of one class matched by a detection (NaN without any)."""
    found = total = 0
    for gt, pred in zip(gts, preds, strict=True):
        g, _ = gt.of(label)
        d, _ = pred.of(label)
        total += len(g)
        if len(g) and len(d):
            found += int(match(g, d, iou_threshold).sum())  # each truth takes one detection
    return found / total if total else float("nan")


def missed_cells(
    names: Sequence[str], gts: Sequence[Boxes], preds: Sequence[Boxes], iou_threshold: float = 0.5
) -> list[dict]:
    """Every ground-truth cell that ``recall_at`` counts as missed, with what the detector put
    there instead (the detection of any kind overlapping it most), for looking at the images.
    """
    missed = []
    for name, gt, pred in zip(names, gts, preds, strict=True):
        all_boxes = np.asarray(pred.boxes, dtype=np.float64).reshape(-1, 4)
        for label, kind in enumerate(CELL_KINDS):
            g, _ = gt.of(label)
            d, _ = pred.of(label)
            hit = match(g, d, iou_threshold) if len(d) else np.zeros(len(g), dtype=bool)
            for box in g[~hit]:
                ious = box_iou(box[None], all_boxes)[0]
                best = int(ious.argmax()) if ious.size and ious.max() > 0 else None
                missed.append(
                    {
                        "image": name,
                        "kind": kind,
                        "box": [round(float(v), 1) for v in box],
                        "instead": None
                        if best is None
                        else {
                            "kind": CELL_KINDS[int(pred.labels[best])],
                            "score": round(float(np.asarray(pred.scores)[best]), 3),
                            "iou": round(float(ious[best]), 3),
                        },
                    }
                )
    return missed


def count_accuracy(true: Sequence[int], pred: Sequence[float]) -> tuple[float, int]:
    """Mean of 1 - |pred - true| / true over the images with true > 0, and how many those are."""
    t = np.asarray(true, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    used = t > 0
    if not used.any():
        return float("nan"), 0
    return float(np.mean(1 - np.abs(p[used] - t[used]) / t[used])), int(used.sum())


def threshold(pred: Boxes, thresholds: dict[str, float]) -> Boxes:
    """Keep the detections at or above the per-kind operating score threshold."""
    cut = np.array([thresholds[k] for k in CELL_KINDS])[pred.labels]
    keep = np.asarray(pred.scores) >= cut
    return Boxes(pred.boxes[keep], pred.labels[keep], np.asarray(pred.scores)[keep])


def detection_report(
    gts: Sequence[Boxes],
    preds: Sequence[Boxes],
    thresholds: dict[str, float],
    operating: Sequence[Boxes] | None = None,
) -> dict:
    """All reported metrics. ``preds`` hold every candidate (for AP); counts and recall use
    the detections at the operating thresholds, as the daemon reports them (``operating``,
    else ``preds`` cut at ``thresholds``)."""
    if operating is None:
        operating = [threshold(p, thresholds) for p in preds]
    report: dict = {
        "n_images": len(gts),
        "map50": mean_ap(gts, preds, (0.5,)),
        "map50_95": mean_ap(gts, preds, tuple(IOU_THRESHOLDS)),
        "ap": {},
        "recall": {},
        "count_accuracy": {},
        "count_images": {},
    }
    for i, kind in enumerate(CELL_KINDS):
        report["ap"][kind] = average_precision(gts, preds, i, 0.5)
        report["recall"][kind] = recall_at(gts, operating, i, 0.5)
        acc, n = count_accuracy(
            [int((g.labels == i).sum()) for g in gts],
            [int((p.labels == i).sum()) for p in operating],
        )
        report["count_accuracy"][kind] = acc
        report["count_images"][kind] = n
    return report


def crosscheck_apart_p90(
    detected: Sequence[int], regressed: Sequence[float], fields: int = SPECIMEN_FIELDS
) -> float:
    """90th percentile, over specimens of ``fields`` consecutive fields, of how far the detected
    count is from the count head's, as the COUNT_XCHECK review rule measures it (NaN when there
    are fewer fields than one specimen)."""
    groups = range(0, len(detected) - fields + 1, fields)
    apart = [
        count_disagreement(sum(detected[i : i + fields]), sum(regressed[i : i + fields]), 10.0)
        for i in groups
    ]
    return float(np.percentile(apart, 90)) if apart else float("nan")


def _as_boxes(dets: Sequence) -> Boxes:
    return Boxes(
        np.array([d.box for d in dets], dtype=np.float64).reshape(-1, 4),
        np.array([CELL_KINDS.index(d.kind) for d in dets], dtype=np.int64),
        np.array([d.score for d in dets], dtype=np.float64),
    )


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def cli(argv: list[str]) -> int:
    """``lisplugin evaluate detection``: run the shipped detector over an annotated folder."""
    from lisplugin.config import DEFAULT_MODELS_DIR
    from lisplugin.datasets.fields import mosaics, read_fields
    from lisplugin.inference.detector import OnnxCellDetector

    parser = argparse.ArgumentParser(prog="lisplugin evaluate detection", description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--format", choices=("voc", "yolo"), required=True)
    parser.add_argument("--split-file", type=Path)
    parser.add_argument("--split")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--name", default="cell-detector", help="model card name")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation + WBF")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--misses", type=Path, help="write every missed ground-truth cell to this JSON file"
    )
    parser.add_argument(
        "--mosaic",
        type=int,
        default=1,
        help="evaluate N x N fields of one size joined into one image (large fields)",
    )
    parser.add_argument(
        "--figures",
        type=Path,
        metavar="DIR",
        help="also draw the precision-recall curves per cell kind (PNG) into DIR",
    )
    args = parser.parse_args(argv)

    fields = read_fields(args.data, args.format, args.split_file, args.split)
    if args.mosaic > 1:
        fields = mosaics(fields, args.mosaic)
    if not fields:
        print(f"no annotated images found in {args.data}", file=sys.stderr)
        return 1
    detector = OnnxCellDetector.from_models_dir(args.models, args.name, tta=args.tta)
    gts, preds, operating, seconds = [], [], [], []
    # the count head's estimates and the truth, of the fields it is used on (not rescaled ones)
    regressed: dict[str, list[float]] = {k: [] for k in CELL_KINDS}
    regressed_truth: dict[str, list[int]] = {k: [] for k in CELL_KINDS}
    regressed_detected: dict[str, list[int]] = {k: [] for k in CELL_KINDS}
    for f in progress(fields, desc="fields", unit="img"):
        image = f.load_image()
        gts.append(Boxes(f.boxes, f.labels))
        candidates = detector.detect(
            image, score_threshold=detector.candidate_threshold, masks=False
        ).cells
        preds.append(_as_boxes(candidates))
        start = time.perf_counter()
        found = detector.detect(image)  # what the daemon runs, masks included
        seconds.append(time.perf_counter() - start)
        operating.append(_as_boxes(found.cells))
        for kind, value in (found.regressed_counts or {}).items():
            regressed[kind].append(value)
            regressed_truth[kind].append(int((f.labels == CELL_KINDS.index(kind)).sum()))
            regressed_detected[kind].append(sum(c.kind == kind for c in found.cells))
    report = detection_report(gts, preds, detector.thresholds, operating)
    report["count_regression_accuracy"] = {
        kind: count_accuracy(regressed_truth[kind], regressed[kind])[0] for kind in CELL_KINDS
    }
    report["count_crosscheck_apart_p90"] = {
        kind: crosscheck_apart_p90(regressed_detected[kind], regressed[kind]) for kind in CELL_KINDS
    }
    report.update(
        model=f"{args.name} {detector.version}",
        tta=args.tta,
        mosaic=args.mosaic,
        detect_ms_median=1000 * float(np.median(seconds)),
        field_size_median=[
            int(np.median([f.width for f in fields])),
            int(np.median([f.height for f in fields])),
        ],
    )
    report = _nan_to_none(report)
    if args.figures is not None:
        from lisplugin.evaluation.figures import detector_figures

        name = args.split or args.data.name
        drawn = detector_figures(args.figures, args.name, {name: kind_curves(gts, preds)})
        report["figures"] = [str(path) for _, path in drawn]
    if args.misses is not None:
        missed = missed_cells([f.name for f in fields], gts, operating)
        args.misses.write_text(json.dumps(missed, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0
