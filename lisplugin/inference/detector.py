"""ONNX cell detector: field in, RBC/WBC/platelet detections with instance masks out.

The network (``lisplugin.training.detector``) outputs, at stride 4 of a field scaled to a fixed
long side: per-class centre heatmaps, distances from each cell to the four box sides, a
cell-foreground map and image-level counts. Everything after the network is numpy here, so the
runtime needs only onnxruntime, and the same decoding serves training-time validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from lisplugin.core.types import CELL_KINDS, Detection, FieldDetections
from lisplugin.inference.registry import ModelCard, load_card

PAD_MULTIPLE = 32  # the network downsamples five times


def prepare(image: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    """Scale an RGB uint8 field to ``long_side`` and pad to a multiple of 32 with its mean colour.

    Returns the (1, 3, H, W) float32 [0, 1] network input and the scale (input px per field px).
    """
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    pad_h, pad_w = (-new_h) % PAD_MULTIPLE, (-new_w) % PAD_MULTIPLE
    out = np.empty((new_h + pad_h, new_w + pad_w, 3), dtype=np.float32)
    out[...] = resized.reshape(-1, 3).mean(axis=0, dtype=np.float32) / 255.0
    np.multiply(resized, np.float32(1 / 255.0), out=out[:new_h, :new_w])
    return out.transpose(2, 0, 1)[None].copy(), scale


def cell_centres(h: int, w: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Input-pixel coordinates of the output cells' centres (rows, columns)."""
    offset = (stride - 1) / 2
    return np.arange(h) * stride + offset, np.arange(w) * stride + offset


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[overlap < iou]
    return np.array(keep, dtype=np.int64)


def decode(
    heat: np.ndarray,
    ltrb: np.ndarray,
    thresholds: np.ndarray,
    stride: int,
    nms_iou: float = 0.5,
    cross_class_iou: float = 0.7,
    max_dets: int = 500,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmap peaks (3x3 local maxima over the per-class threshold) to boxes in input pixels.

    Per-class NMS removes double peaks on one cell; a looser class-agnostic NMS then keeps one
    label for a cell that two classes both claim. Returns boxes (N, 4), labels, scores.
    """
    peaks = (heat == ndimage.maximum_filter(heat, size=(1, 3, 3))) & (
        heat >= thresholds[:, None, None]
    )
    c, i, j = np.nonzero(peaks)
    scores = heat[c, i, j]
    if scores.size > max_dets:
        top = np.argsort(-scores)[:max_dets]
        c, i, j, scores = c[top], i[top], j[top], scores[top]
    ys, xs = cell_centres(heat.shape[1], heat.shape[2], stride)
    d = ltrb[:, i, j]
    boxes = np.stack([xs[j] - d[0], ys[i] - d[1], xs[j] + d[2], ys[i] + d[3]], axis=1)
    keep = np.concatenate(
        [np.flatnonzero(c == k)[nms(boxes[c == k], scores[c == k], nms_iou)] for k in range(3)]
    ).astype(np.int64)
    keep = keep[nms(boxes[keep], scores[keep], cross_class_iou)]
    return boxes[keep].astype(np.float64), c[keep].astype(np.int64), scores[keep].astype(np.float64)


def foreground_in_field(fg: np.ndarray, scale: float, stride: int, h: int, w: int) -> np.ndarray:
    """Bilinear resize of the stride-``stride`` foreground map to field pixels (h, w).

    PIL maps output pixel centres as (x + 0.5) * in / out - 0.5, which is exactly field pixel
    -> output cell here, so one C-level resize replaces per-pixel interpolation.
    """
    size = (round(fg.shape[1] * stride / scale), round(fg.shape[0] * stride / scale))
    full = np.asarray(
        Image.fromarray(fg.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    )
    out = np.zeros((h, w), np.float32)
    hh, ww = min(h, full.shape[0]), min(w, full.shape[1])
    out[:hh, :ww] = full[:hh, :ww]
    return out


def instance_masks(
    boxes: np.ndarray, fg_field: np.ndarray, fg_threshold: float = 0.5
) -> list[np.ndarray]:
    """Per-box boolean masks (shape of the rounded box) from the field-resolution foreground.

    A pixel belongs to a cell when the foreground map says cell, it lies inside the box's
    inscribed ellipse (slightly widened) and, among the boxes covering it, this cell's centre
    is the nearest in box-size units, which splits touching cells along their contact line.
    """
    masks = []
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = np.maximum((boxes[:, 2:] - boxes[:, :2]) / 2, 0.5)
    rounded = np.round(boxes).astype(int)
    for k, (x0, y0, x1, y1) in enumerate(rounded):
        h, w = max(y1 - y0, 1), max(x1 - x0, 1)
        xx = np.arange(x0, x0 + w) + 0.5
        yy = (np.arange(y0, y0 + h) + 0.5)[:, None]

        def dist(r: int, xx: np.ndarray = xx, yy: np.ndarray = yy) -> np.ndarray:
            return ((xx - centres[r, 0]) / half[r, 0]) ** 2 + (
                (yy - centres[r, 1]) / half[r, 1]
            ) ** 2

        mine = dist(k)
        mask = np.zeros((h, w), bool)
        sub = fg_field[max(y0, 0) : y0 + h, max(x0, 0) : x0 + w] >= fg_threshold
        mask[max(0, -y0) : max(0, -y0) + sub.shape[0], max(0, -x0) : max(0, -x0) + sub.shape[1]] = (
            sub
        )
        mask &= mine <= 1.1**2
        rivals = np.flatnonzero(
            (rounded[:, 0] < x0 + w)
            & (rounded[:, 2] > x0)
            & (rounded[:, 1] < y0 + h)
            & (rounded[:, 3] > y0)
        )
        for r in rivals[rivals != k]:
            mask &= mine <= dist(r)
        masks.append(mask)
    return masks


class OnnxCellDetector:
    """The ``CellDetector`` of the daemon, configured entirely by its model card."""

    def __init__(self, card: ModelCard, tta: bool = False, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(card.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.card = card
        self.version = card.version
        self.tta = tta
        self.long_side = int(card["input"]["long_side"])
        self.stride = int(card["output_stride"])
        self.thresholds = {k: float(card["score_thresholds"][k]) for k in CELL_KINDS}
        self.candidate_threshold = float(card.get("candidate_threshold", 0.05))
        self.nms_iou = float(card.get("nms_iou", 0.5))
        self.fg_threshold = float(card.get("mask_threshold", 0.5))
        self.wbf_iou = float(card.get("wbf_iou", 0.55))

    @classmethod
    def from_models_dir(
        cls, models_dir: Path, name: str = "cell-detector", tta: bool = False
    ) -> OnnxCellDetector:
        return cls(load_card(Path(models_dir), name), tta=tta)

    def _run(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        x, scale = prepare(image, self.long_side)
        if self.tta:
            x = np.concatenate([x, x[..., ::-1]], axis=0)
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {"image": x}), strict=True)), scale

    def detect(
        self, image: np.ndarray, score_threshold: float | None = None, masks: bool = True
    ) -> FieldDetections:
        """Cells at the card's per-class operating thresholds (or one ``score_threshold``) and
        the count head's image-level estimate (cells whose centre lies in the field), from one
        run of the network.
        """
        if score_threshold is None:
            cut = np.array([self.thresholds[k] for k in CELL_KINDS])
        else:
            cut = np.full(len(CELL_KINDS), score_threshold)
        out, scale = self._run(image)
        boxes, labels, scores = decode(
            out["heat"][0], out["ltrb"][0], cut, self.stride, self.nms_iou
        )
        fg = out["mask"][0, 0]
        if self.tta:
            from lisplugin.inference.fusion import weighted_boxes_fusion

            # the padded width is a multiple of the stride, so mirrored maps align cell for cell
            heat2, ltrb2 = out["heat"][1][..., ::-1], out["ltrb"][1][[2, 1, 0, 3]][..., ::-1]
            b2, l2, s2 = decode(heat2, ltrb2, cut, self.stride, self.nms_iou)
            boxes, labels, scores = weighted_boxes_fusion(
                [boxes, b2], [labels, l2], [scores, s2], iou_threshold=self.wbf_iou
            )
            fg = (fg + out["mask"][1, 0][:, ::-1]) / 2
        h, w = image.shape[:2]
        boxes = boxes / scale
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, labels, scores = boxes[ok], labels[ok], scores[ok]
        cell_masks = (
            instance_masks(
                boxes, foreground_in_field(fg, scale, self.stride, h, w), self.fg_threshold
            )
            if masks
            else [None] * len(boxes)
        )
        cells = tuple(
            Detection(
                CELL_KINDS[int(c)],
                float(s),
                (float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                m,
            )
            for b, c, s, m in zip(boxes, labels, scores, cell_masks, strict=True)
        )
        counts = out["counts"].mean(axis=0)
        return FieldDetections(cells, {k: float(counts[i]) for i, k in enumerate(CELL_KINDS)})
