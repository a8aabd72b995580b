"""Box-aware geometric augmentation of whole fields: random scale and crop, flips, 90° turns.

Smears have no preferred orientation, so flips and quarter turns are free extra data. Random
scale covers magnification differences between microscopes, and random crops cut cells at the
field border the way real fields do: a cut cell keeps the visible part of its box, as the
public annotations do, and is dropped once too little of it is left to recognise.

Flips and turns are torchvision's transforms v2, which move an image's boxes (and masks) with
its pixels. Scale-and-crop stays PIL's extent transform: its window starts and ends between
pixels and may reach past the field, filled with the field's mean colour, which none of
torchvision's crops reproduce pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF


def clip_boxes(
    boxes: np.ndarray, labels: np.ndarray, width: int, height: int, min_visible: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the frame; drop those with under ``min_visible`` of their area inside."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    w = clipped[:, 2] - clipped[:, 0]
    h = clipped[:, 3] - clipped[:, 1]
    keep = (w >= 2) & (h >= 2) & (w * h >= min_visible * np.maximum(area, 1e-6))
    return clipped[keep], labels[keep]


def scale_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    size: tuple[int, int],
    scale: float,
    rng: np.random.Generator,
    min_visible: float = 0.35,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample ``image`` by ``scale`` and cut a random (h, w) window; fill outside with its mean.

    A window larger than the scaled image places the image at a random offset inside it.
    """
    out_h, out_w = size
    src_h, src_w = image.shape[:2]
    win_w, win_h = out_w / scale, out_h / scale
    x0 = rng.uniform(min(0.0, src_w - win_w), max(0.0, src_w - win_w))
    y0 = rng.uniform(min(0.0, src_h - win_h), max(0.0, src_h - win_h))
    fill = tuple(int(v) for v in image.reshape(-1, 3).mean(axis=0))
    crop = Image.fromarray(image).transform(
        (out_w, out_h),
        Image.Transform.EXTENT,
        (x0, y0, x0 + win_w, y0 + win_h),
        resample=Image.Resampling.BILINEAR,
        fillcolor=fill,
    )
    moved = (boxes - np.array([x0, y0, x0, y0], dtype=np.float32)) * scale
    b, lab = clip_boxes(moved.astype(np.float32), labels, out_w, out_h, min_visible)
    return np.asarray(crop), b, lab


def flip_rotate(
    image: np.ndarray, boxes: np.ndarray, k: int, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Optionally mirror left-right, then turn ``k`` quarter turns counter-clockwise."""
    h, w = image.shape[:2]
    img = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))  # a copy
    b = tv_tensors.BoundingBoxes(
        torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)),
        format=tv_tensors.BoundingBoxFormat.XYXY,
        canvas_size=(h, w),
    )
    if flip:
        img, b = TF.horizontal_flip(img), TF.horizontal_flip(b)
    for _ in range(k % 4):
        # A quarter turn moves the pixels by torch.rot90 and the boxes by a rotation matrix,
        # applied in float64 and rounded once per turn: the float32 values of (y, w - x).
        img = TF.rotate(img, 90.0, expand=True)
        b = TF.rotate(b.to(torch.float64), 90.0, expand=True).to(torch.float32)
    return np.ascontiguousarray(img.permute(1, 2, 0).numpy()), b.numpy().astype(np.float32)


def random_geometric(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    size: int,
    base_scale: float,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.7, 1.4),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A square training crop: log-uniform scale around ``base_scale``, crop, flip and turn."""
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    scale = base_scale * float(np.exp(rng.uniform(lo, hi)))
    img, b, lab = scale_crop(image, boxes, labels, (size, size), scale, rng)
    img, b = flip_rotate(img, b, int(rng.integers(4)), bool(rng.integers(2)))
    return img, b, lab
