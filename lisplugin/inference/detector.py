"""ONNX cell detector: field in, RBC/WBC/platelet detections with instance masks out.

The network (``lisplugin.training.detector``) outputs, at stride 4 of a field scaled to a fixed
long side: per-class centre heatmaps, distances from each cell to the four box sides, a
cell-foreground map and image-level counts. Everything after the network is numpy here, so the
runtime needs only onnxruntime, and the same decoding serves training-time validation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from lisplugin.core.analysis import median_rbc_diameter
from lisplugin.core.crops import RBC_DIAMETER_UM, usable_spacing
from lisplugin.core.types import CELL_KINDS, Detection, FieldDetections
from lisplugin.inference.registry import ModelCard, load_card

PAD_MULTIPLE = 32  # the network downsamples five times
#: Red-cell diameter at the network input that the detector was trained around: the median red
#: cell of a training field scaled to the 320 px long side is 52 px in BCCD and 70 px in
#: TXL-PBC (5th to 95th percentile of fields 47 to 83 px).
TARGET_RBC_PX = 60.0
#: A field whose red cells come out smaller or larger than this at the card's long side (low
#: magnification, a large sensor, a slide-scanner frame; or a close-up) is rescaled to the target.
RBC_PX_RANGE = (40.0, 100.0)
#: Largest network input side; a larger rescaled field is cut into overlapping tiles (a pass of
#: 1024 x 1024 costs the same per pixel as 512 x 512 and ~70 MB more memory, and overlaps less).
TILE_PX = 1024
#: Overlap of neighbouring tiles: wider than a large leukocyte at the target scale.
TILE_OVERLAP_PX = 160


def prepare(image: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    """Scale an RGB uint8 field to ``long_side`` and pad to a multiple of 32 with its mean colour.

    Returns the (1, 3, H, W) float32 [0, 1] network input and the scale (input px per field px).
    """
    scale = long_side / max(image.shape[:2])
    return pad_input(resize(image, scale)), scale


def resize(image: np.ndarray, scale: float) -> np.ndarray:
    """The field resized by ``scale`` (bilinear, antialiased when shrinking), uint8 RGB."""
    h, w = image.shape[:2]
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def pad_input(resized: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) float32 [0, 1], padded bottom/right to a multiple of 32 with the mean colour."""
    new_h, new_w = resized.shape[:2]
    pad_h, pad_w = (-new_h) % PAD_MULTIPLE, (-new_w) % PAD_MULTIPLE
    out = np.empty((1, 3, new_h + pad_h, new_w + pad_w), dtype=np.float32)
    # Plane by plane, written where the network reads it: a mean over an axis of three and a
    # transposing copy took seven times as long on a 1024 px window.
    for channel in range(3):
        plane = resized[..., channel]
        out[0, channel] = float(plane.sum(dtype=np.uint64)) / plane.size / 255.0
        np.multiply(plane, np.float32(1 / 255.0), out=out[0, channel, :new_h, :new_w])
    return out


def tiles(
    length: int, tile: int, overlap: int, align: int = 1
) -> list[tuple[int, int, float, float]]:
    """Windows covering ``length`` px: (start, end, keep_from, keep_to) each.

    Neighbouring windows overlap by at least ``overlap`` px, are spread evenly and start at
    multiples of ``align`` (the network's output stride, so their maps line up); each keeps the
    cells whose centre lies between the midpoints of its overlaps, so every cell is kept once,
    by a window that holds it whole when it is smaller than the overlap.
    """
    if length <= tile:
        return [(0, length, 0.0, float(length))]
    count = math.ceil((length - tile) / (tile - overlap - align)) + 1
    starts = [i * (length - tile) // (count - 1) // align * align for i in range(count)]
    ends = [start + tile for start in starts[:-1]] + [length]  # the last one reaches the edge
    cuts = [0.0] + [(starts[i + 1] + ends[i]) / 2 for i in range(count - 1)] + [float(length)]
    return [(starts[i], ends[i], cuts[i], cuts[i + 1]) for i in range(count)]


def cell_centres(h: int, w: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Input-pixel coordinates of the output cells' centres (rows, columns)."""
    offset = (stride - 1) / 2
    return np.arange(h) * stride + offset, np.arange(w) * stride + offset


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-scores, kind="stable")
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    # All pairwise overlaps at once (a field has at most a few hundred candidates), then the
    # greedy pass only reads rows: one small array operation per kept box.
    width = np.clip(
        np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None
    )
    height = np.clip(
        np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None
    )
    inter = width * height
    suppresses = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9) >= iou
    removed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(order[i])
            removed |= suppresses[i]
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
    return suppress(boxes, c, scores, nms_iou, cross_class_iou)


def suppress(
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    nms_iou: float = 0.5,
    cross_class_iou: float = 0.7,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class NMS, then a looser class-agnostic NMS (one label per cell)."""
    keep = np.concatenate(
        [np.flatnonzero(labels == k)[nms(boxes[labels == k], scores[labels == k], nms_iou)]
         for k in range(len(CELL_KINDS))]
    ).astype(np.int64)  # fmt: skip
    keep = keep[nms(boxes[keep], scores[keep], cross_class_iou)]
    return (
        boxes[keep].astype(np.float64),
        labels[keep].astype(np.int64),
        scores[keep].astype(np.float64),
    )


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


class Pass(NamedTuple):
    """What one look at a field gives, in network-input pixels."""

    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1
    labels: np.ndarray  # (N,) index into CELL_KINDS
    scores: np.ndarray
    fg: np.ndarray  # cell-foreground probability at the output stride
    counts: np.ndarray | None  # the count head: cells centred in the input (None: rescaled)


def _rbc_size(boxes: np.ndarray, labels: np.ndarray, width: float, height: float) -> float | None:
    """Red-cell diameter in input pixels, measured as the analysis measures fields."""
    cells = [
        Detection(CELL_KINDS[int(k)], 1.0, (float(b[0]), float(b[1]), float(b[2]), float(b[3])))
        for b, k in zip(boxes, labels, strict=True)
    ]
    return median_rbc_diameter(cells, round(width), round(height))


def _near(base: float, scale: float) -> float:
    """``base`` when ``scale`` is within 25 % of it (one run instead of a rescaled one)."""
    return base if abs(math.log(scale / base)) < math.log(1.25) else scale


class OnnxCellDetector:
    """The ``CellDetector`` of the daemon, configured entirely by its model card."""

    def __init__(self, card: ModelCard, tta: bool = False, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Idle pool threads sleep instead of spinning: on a CPU shared with ingest, the web
        # server and other work, spinning threads took the cores the computation needed.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(card.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.card = card
        self.version = card.version
        self.tta = tta
        self.long_side = int(card["input"]["long_side"])
        self.stride = int(card["output_stride"])
        self.thresholds = {k: float(card["score_thresholds"][k]) for k in CELL_KINDS}
        # red cells at their operating cut, nothing else (scores never exceed 1)
        self.red_cells_only = np.array([self.thresholds["RBC"], 1.1, 1.1])
        self.candidate_threshold = float(card.get("candidate_threshold", 0.05))
        self.nms_iou = float(card.get("nms_iou", 0.5))
        self.fg_threshold = float(card.get("mask_threshold", 0.5))
        self.wbf_iou = float(card.get("wbf_iou", 0.55))

    @classmethod
    def from_models_dir(
        cls, models_dir: Path, name: str = "cell-detector", tta: bool = False
    ) -> OnnxCellDetector:
        return cls(load_card(Path(models_dir), name), tta=tta)

    def _infer(self, x: np.ndarray, cut: np.ndarray) -> Pass:
        """One padded network input: cells in input pixels, foreground map and counts; with
        flip test-time augmentation fused by weighted boxes fusion when enabled."""
        if self.tta:
            x = np.concatenate([x, x[..., ::-1]], axis=0)
        out = dict(zip(self.outputs, self.session.run(None, {"image": x}), strict=True))
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
        return Pass(boxes, labels, scores, fg, out["counts"].mean(axis=0))

    def input_scale(self, image: np.ndarray, pixel_spacing_um: float | None = None) -> float:
        """Network input pixels per field pixel: the card's long side, unless the red cells
        would come out outside the size the network was trained on (see ``RBC_PX_RANGE``)."""
        return self._plan(image, pixel_spacing_um)[0]

    def _plan(
        self, image: np.ndarray, pixel_spacing_um: float | None, cut: np.ndarray | None = None
    ) -> tuple[float, Pass | None]:
        """The input scale, and the pass at the card's long side when that scale is kept
        (None when the field is to be rescaled).

        With the physical pixel spacing the red-cell size is known (7.5 um). Otherwise the red
        cells found at the long side measure it; when too few are found in a large field they
        may be too small to see, so ever smaller central windows are looked at more closely.
        """
        base = self.long_side / max(image.shape[:2])
        cut = self.red_cells_only if cut is None else cut
        spacing = usable_spacing(pixel_spacing_um)
        first = None
        if spacing is not None:
            scale = _near(base, TARGET_RBC_PX * spacing / RBC_DIAMETER_UM)
        else:
            first = self._infer(pad_input(resize(image, base)), cut)
            scale = _near(base, self._measured_scale(image, first, base))
        if scale != base:
            return scale, None
        if first is None:
            first = self._infer(pad_input(resize(image, base)), cut)
        return base, first

    def _measured_scale(self, image: np.ndarray, first: Pass, base: float) -> float:
        """The scale at which the field's red cells come out ``TARGET_RBC_PX`` wide (``base``
        when they already lie in ``RBC_PX_RANGE`` there, or cannot be measured)."""
        h, w = image.shape[:2]
        sure = first.scores >= self.thresholds["RBC"]
        size = _rbc_size(first.boxes[sure], first.labels[sure], w * base, h * base)
        if size is not None:
            in_range = RBC_PX_RANGE[0] <= size <= RBC_PX_RANGE[1]
            return base if in_range else base * TARGET_RBC_PX / size
        zoom = 2
        while max(h, w) / zoom >= self.long_side / 2:
            ch, cw = h // zoom, w // zoom
            window = image[(h - ch) // 2 : (h + ch) // 2, (w - cw) // 2 : (w + cw) // 2]
            scale = base * zoom
            probe = self._infer(pad_input(resize(window, scale)), self.red_cells_only)
            size = _rbc_size(probe.boxes, probe.labels, cw * scale, ch * scale)
            if size is not None:
                return scale * TARGET_RBC_PX / size
            zoom *= 2
        return base

    def _tiled(self, image: np.ndarray, scale: float, cut: np.ndarray) -> Pass:
        """The field at ``scale``, in overlapping tiles of at most ``TILE_PX``: cells in input
        pixels of the whole rescaled field and its foreground map. No counts: the count head is
        trained and measured on whole fields at the card's scale, and its estimates of rescaled
        tiles do not add up to the field (so no cross-check there)."""
        resized = resize(image, scale)
        height, width = resized.shape[:2]
        s = self.stride
        fg = np.zeros((math.ceil(height / s), math.ceil(width / s)), np.float32)
        boxes, labels, scores = [], [], []
        margin = s * 4  # a centre predicted just across the seam still counts: NMS decides
        for y0, y1, top, bottom in tiles(height, TILE_PX, TILE_OVERLAP_PX, s):
            for x0, x1, left, right in tiles(width, TILE_PX, TILE_OVERLAP_PX, s):
                part = self._infer(pad_input(resized[y0:y1, x0:x1]), cut)
                placed = part.boxes + np.array([x0, y0, x0, y0], np.float64)
                cx, cy = (placed[:, 0] + placed[:, 2]) / 2, (placed[:, 1] + placed[:, 3]) / 2
                keep = (
                    (cx >= left - margin)
                    & (cx < right + margin)
                    & (cy >= top - margin)
                    & (cy < bottom + margin)
                )
                boxes.append(placed[keep])
                labels.append(part.labels[keep])
                scores.append(part.scores[keep])
                r0, r1 = int(top) // s, math.ceil(bottom / s)
                c0, c1 = int(left) // s, math.ceil(right / s)
                fg[r0:r1, c0:c1] = part.fg[r0 - y0 // s : r1 - y0 // s, c0 - x0 // s : c1 - x0 // s]
        merged = suppress(np.concatenate(boxes), np.concatenate(labels), np.concatenate(scores))
        return Pass(*merged, fg, None)

    def detect(
        self,
        image: np.ndarray,
        score_threshold: float | None = None,
        masks: bool = True,
        pixel_spacing_um: float | None = None,
    ) -> FieldDetections:
        """Cells at the card's per-class operating thresholds (or one ``score_threshold``) and
        the count head's image-level estimate (cells whose centre lies in the field).

        A field at the magnification the network was trained on takes one run at the card's
        long side; other magnifications are rescaled (and tiled when large), see ``_plan``.
        """
        if score_threshold is None:
            cut = np.array([self.thresholds[k] for k in CELL_KINDS])
        else:
            cut = np.full(len(CELL_KINDS), score_threshold)
        scale, found = self._plan(image, pixel_spacing_um, cut)
        if found is None:
            found = self._tiled(image, scale, cut)
        boxes, labels, scores = found.boxes, found.labels, found.scores
        h, w = image.shape[:2]
        boxes = boxes / scale
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, labels, scores = boxes[ok], labels[ok], scores[ok]
        cell_masks = (
            instance_masks(
                boxes, foreground_in_field(found.fg, scale, self.stride, h, w), self.fg_threshold
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
        counts = found.counts
        if counts is None:
            return FieldDetections(cells, None)
        return FieldDetections(cells, {k: float(counts[i]) for i, k in enumerate(CELL_KINDS)})
