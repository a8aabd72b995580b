"""Occlusion sensitivity: which parts of a leukocyte crop the classifier's answer rests on.

A patch of slide background is slid over the scale-normalised crop the classifier saw, and at
each position the drop of the top class's probability is measured (Zeiler and Fergus, 2014,
"Visualizing and understanding convolutional networks"). Model-agnostic and honest: it shows
what changes the answer, not what a gradient happens to light up.

Only the part of the crop the classifier looks at (its ``centre`` fraction, when it has one)
is occluded and mapped, and every occluded view goes to the classifier in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from lisplugin.core.crops import background_colour, centre_window, resize_rgb
from lisplugin.core.types import LeukocyteClassifier

#: Side of the occluding patch and the step between positions, in PBC pixels (crop is 160):
#: a patch about the size of a nuclear lobe, so covering one lobe moves the answer; over the
#: 112 px the classifier sees (centre 0.7) that is 5 x 5 overlapping views, in one batch with the
#: unoccluded window (occlusion costs one classifier run per view).
PATCH_PX = 32
STRIDE_PX = 20


@runtime_checkable
class ViewClassifier(Protocol):
    """A classifier that can score the window it looks at directly, one view per window
    (:class:`lisplugin.inference.classifier.OnnxLeukocyteClassifier`)."""

    centre: float
    input_size: int

    def classify(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> np.ndarray: ...

    def seen_colours(self, crop: np.ndarray, nucleus: np.ndarray | None = None) -> np.ndarray: ...

    def classify_seen(self, windows: Sequence[np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class Saliency:
    heat: np.ndarray  # over ``window``: mean drop of the top-class probability (may be < 0)
    top_class: str
    probability: float  # of the top class on the whole crop
    window: tuple[int, int, int]  # top, left, side: the part of the crop the classifier sees

    def seen(self, crop: np.ndarray) -> np.ndarray:
        """The part of ``crop`` the heat map covers."""
        top, left, side = self.window
        return crop[top : top + side, left : left + side]


def _positions(size: int, patch: int, stride: int) -> list[int]:
    """Patch offsets that cover the whole side, the last one flush with the edge."""
    return sorted({*range(0, max(size - patch, 0) + 1, stride), max(size - patch, 0)})


def occlusion_sensitivity(
    crop: np.ndarray,
    classifier: LeukocyteClassifier,
    patch: int = PATCH_PX,
    stride: int = STRIDE_PX,
    nucleus: np.ndarray | None = None,
) -> Saliency:
    """Heat map of the top-class probability drop when each part the classifier sees of
    ``crop`` is hidden.

    The top class and its probability are the classifier's answer for the crop (what the
    result reports). With a :class:`ViewClassifier` the occluded windows are scored in one
    batch, one view each, at the model's input size and in the colours of the unoccluded crop;
    any other classifier gets occluded copies of the whole crop. ``nucleus``: the stain
    reference the crop was classified against (the specimen's chromatin), so that the answer
    explained is the one the result reports.
    """
    height, width = crop.shape[:2]
    fast = isinstance(classifier, ViewClassifier)
    coloured = classifier.seen_colours(crop, nucleus) if fast else crop[..., :3]
    seen = centre_window(coloured, float(getattr(classifier, "centre", 1.0)))
    side = seen.shape[0]
    top, left = (height - side) // 2, (width - side) // 2
    patch = min(patch, side)
    fill = background_colour(coloured)
    offsets = [
        (y, x) for y in _positions(side, patch, stride) for x in _positions(side, patch, stride)
    ]
    if fast:
        # Occluded at the model's input size: the window is resized once, not once per view.
        size = int(classifier.input_size)  # type: ignore[attr-defined]
        base = resize_rgb(seen, size)
        at = [round(v * size / side) for v in range(side + 1)]
        windows = []
        for y, x in offsets:
            window = base.copy()
            window[at[y] : at[y + patch], at[x] : at[x + patch]] = fill
            windows.append(window)
        answer = np.asarray(classifier.classify([crop], nucleus))[0]
        scored = np.asarray(classifier.classify_seen([base, *windows]))  # type: ignore[attr-defined]
    else:
        occluded = []
        for y, x in offsets:
            image = crop[..., :3].copy()
            image[top + y : top + y + patch, left + x : left + x + patch] = fill
            occluded.append(image)
        scored = np.asarray(classifier.classify([crop, *occluded], nucleus))
        answer = scored[0]
    best = int(np.argmax(answer))
    drops = scored[0, best] - scored[1:, best]
    total = np.zeros((side, side))
    covered = np.zeros((side, side))
    for (y, x), drop in zip(offsets, drops, strict=True):
        total[y : y + patch, x : x + patch] += drop
        covered[y : y + patch, x : x + patch] += 1
    # Smoothed over about a stride, so the patch grid does not show as blocks.
    heat = ndimage.gaussian_filter(total / np.maximum(covered, 1), sigma=stride / 2)
    return Saliency(
        heat=heat,
        top_class=str(classifier.classes[best]),
        probability=float(answer[best]),
        window=(top, left, side),
    )


#: Colour ramp of the overlay, from "no effect" to "the answer rests on this".
_RAMP = np.array([[255, 255, 178], [254, 204, 92], [253, 141, 60], [240, 59, 32], [189, 0, 38]])


def heat_overlay(crop: np.ndarray, heat: np.ndarray, max_alpha: float = 0.65) -> np.ndarray:
    """``crop`` with the positive part of ``heat`` laid over it in warm colours (RGB uint8).

    Scaled to the largest drop, so the map shows where the evidence is, not how much; a
    crop where hiding nothing lowers the answer stays as it is.
    """
    positive = np.clip(heat, 0.0, None)
    peak = float(positive.max())
    level = positive / peak if peak > 1e-6 else np.zeros_like(positive)
    position = level * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    colours = _RAMP[low] * (1.0 - frac) + _RAMP[low + 1] * frac
    alpha = (max_alpha * level)[..., None]
    out = crop[..., :3].astype(np.float64) * (1.0 - alpha) + colours * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
