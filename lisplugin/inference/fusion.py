"""Weighted boxes fusion (Solovyev, Wang & Gabruseva 2021) for test-time augmentation.

NMS keeps one of several overlapping boxes and throws the others' evidence away; WBF averages
the boxes that several passes agree on, weighted by confidence, and lowers the confidence of
a box that only some passes found. That suits flip TTA: a cell seen in both passes gets a
better box, a spurious peak seen in one pass gets half its score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_boxes_fusion(
    boxes: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    iou_threshold: float = 0.55,
    skip_threshold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse the detections of several passes (one list entry per pass).

    Per label, boxes are taken by falling score; each joins the first cluster whose fused box
    it overlaps by more than ``iou_threshold``, else starts one. A cluster's box is the
    score-weighted mean of its boxes, its score the mean score times min(passes in it, T) / T,
    with T the total pass weight (the paper's 'avg' confidence).
    """
    weights = [1.0] * len(boxes) if weights is None else list(weights)
    total_weight = float(sum(weights))
    all_b = np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in boxes])
    all_l = np.concatenate([np.asarray(lab, np.int64).reshape(-1) for lab in labels])
    all_s = np.concatenate(
        [np.asarray(s, np.float64).reshape(-1) * w for s, w in zip(scores, weights, strict=True)]
    )
    all_w = np.concatenate(
        [np.full(len(np.asarray(s).reshape(-1)), w) for s, w in zip(scores, weights, strict=True)]
    )
    keep = all_s >= skip_threshold
    all_b, all_l, all_s, all_w = all_b[keep], all_l[keep], all_s[keep], all_w[keep]
    out_b, out_l, out_s = [], [], []
    for label in np.unique(all_l):
        sel = np.flatnonzero(all_l == label)
        sel = sel[np.argsort(-all_s[sel], kind="stable")]
        fused: list[np.ndarray] = []
        members: list[list[int]] = []
        for i in sel:
            if fused:
                ious = _iou(all_b[i], np.stack(fused))
                j = int(ious.argmax())
                if ious[j] > iou_threshold:
                    members[j].append(i)
                    s = all_s[members[j]]
                    fused[j] = (all_b[members[j]] * s[:, None]).sum(axis=0) / s.sum()
                    continue
            fused.append(all_b[i].copy())
            members.append([i])
        for box, m in zip(fused, members, strict=True):
            out_b.append(box)
            out_l.append(label)
            out_s.append(all_s[m].mean() * min(all_w[m].sum(), total_weight) / total_weight)
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0)
    order = np.argsort(-np.array(out_s), kind="stable")
    return np.stack(out_b)[order], np.array(out_l, np.int64)[order], np.array(out_s)[order]
