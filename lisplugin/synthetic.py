"""Synthetic blood-smear fields for the demo and the load tests (the public data cannot ship).

The fields imitate BCCD: 640 x 480, Wright/Giemsa stain, a red cell about 100 px across. The
image is built the way transmitted light forms it: a pale, slightly uneven background
attenuated by the stain each cell holds (Beer-Lambert, absorbances add where cells overlap),
then the optics' blur and the camera's noise. Red cells have the biconcave thickness profile of
Evans and Fung (1972), which gives the central pallor by itself. Colours and sizes were measured
on BCCD (background about RGB 204/206/201, red cell 180/156/150, nucleus 120/105/200).

Ground truth is one ``(kind, box)`` per cell, box ``(x0, y0, x1, y1)`` clipped to the field;
the leukocytes come first, in the order of ``wbc_types``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from lisplugin.core.types import CellKind

Box = tuple[float, float, float, float]
GroundTruth = list[tuple[CellKind, Box]]

#: Leukocyte types the generator draws, with their adult share (picked when none are given).
WBC_TYPES: dict[str, float] = {
    "neutrophil": 0.60,
    "lymphocyte": 0.28,
    "monocyte": 0.07,
    "eosinophil": 0.04,
    "basophil": 0.01,
}
#: Background light (RGB) under no stain, as measured on BCCD.
_BACKGROUND = np.array([204.0, 206.0, 201.0])
#: Absorbance per unit stain, RGB: -ln(colour / background) of the measured colours.
_RBC_ABS = np.array([0.09, 0.2, 0.21])
_NUCLEUS_ABS = np.array([0.52, 0.66, 0.0])
_EOSIN_GRANULE_ABS = np.array([0.04, 0.62, 0.36])
_BASO_GRANULE_ABS = np.array([0.95, 1.05, 0.35])
_PLATELET_ABS = np.array([0.40, 0.50, 0.06])
#: Leukocyte diameter in red-cell diameters (lymphocytes small, monocytes large).
_WBC_SIZE = {
    "neutrophil": (1.35, 1.65),
    "lymphocyte": (0.95, 1.2),
    "monocyte": (1.6, 1.95),
    "eosinophil": (1.4, 1.7),
    "basophil": (1.2, 1.45),
}
#: Cytoplasm absorbance: neutrophil lilac, lymphocyte pale blue, monocyte grey-blue...
_CYTOPLASM_ABS = {
    "neutrophil": np.array([0.03, 0.10, 0.01]),
    "lymphocyte": np.array([0.16, 0.09, 0.0]),
    "monocyte": np.array([0.14, 0.13, 0.03]),
    "eosinophil": np.array([0.03, 0.10, 0.04]),
    "basophil": np.array([0.10, 0.14, 0.02]),
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-sd noise with features about ``scale`` px across."""
    step = max(int(scale // 2), 1)
    small = rng.normal(size=(shape[0] // step + 2, shape[1] // step + 2))
    small = ndimage.gaussian_filter(small, 1.0)
    big = ndimage.zoom(small, step, order=1)[: shape[0], : shape[1]]
    return (big - big.mean()) / (big.std() + 1e-9)


class _Canvas:
    """Absorbance (H x W x 3) that cells add their stain to, each in its own small window."""

    def __init__(self, height: int, width: int) -> None:
        self.absorbance = np.zeros((height, width, 3), dtype=np.float32)
        self.height, self.width = height, width

    def window(
        self, cx: float, cy: float, radius: float
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        """Slices of the window around (cx, cy) and its pixel-centre coordinates dx, dy."""
        x0, x1 = max(int(cx - radius) - 2, 0), min(int(cx + radius) + 3, self.width)
        y0, y1 = max(int(cy - radius) - 2, 0), min(int(cy + radius) + 3, self.height)
        if x1 <= x0 or y1 <= y0:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        return (slice(y0, y1), slice(x0, x1)), xx - cx, yy - cy

    def add(self, where: tuple[slice, slice], amount: np.ndarray, colour: np.ndarray) -> None:
        self.absorbance[where] += amount[..., None] * colour


def _ellipse_rho(dx: np.ndarray, dy: np.ndarray, a: float, b: float, theta: float) -> np.ndarray:
    """Normalised elliptic radius (1 on the outline) of semi-axes a, b turned by theta."""
    c, s = np.cos(theta), np.sin(theta)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _soft(rho: np.ndarray, radius_px: float, edge_px: float = 1.2) -> np.ndarray:
    """Anti-aliased inside-ness (0..1) of a shape with normalised radius ``rho``."""
    return np.clip(0.5 + (1.0 - rho) * radius_px / edge_px, 0.0, 1.0)


def _mask_box(where: tuple[slice, slice], inside: np.ndarray) -> Box | None:
    """Field box (x0, y0, x1, y1) of the pixels at least half inside; None when none are."""
    rows, cols = np.nonzero(inside >= 0.5)
    if rows.size == 0:
        return None
    y0, x0 = where[0].start, where[1].start
    return (
        float(x0 + cols.min()),
        float(y0 + rows.min()),
        float(x0 + cols.max() + 1),
        float(y0 + rows.max() + 1),
    )


def _outline_wobble(rng: np.random.Generator, angle: np.ndarray, amplitude: float) -> np.ndarray:
    """1 plus a few random low harmonics: the irregular outline of a smeared cell."""
    return 1 + sum(
        rng.uniform(0, amplitude) * np.sin(k * angle + rng.uniform(0, 2 * np.pi))
        for k in (2, 3, 4, 5)
    )


def _draw_rbc(
    canvas: _Canvas,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    diameter: float,
    stain: np.ndarray,
) -> Box | None:
    a = diameter / 2 * rng.uniform(0.97, 1.03)
    b = a * rng.uniform(0.86, 1.0)
    win = canvas.window(cx, cy, a * 1.15 + 2)
    if win is None:
        return None
    where, dx, dy = win
    rho = _ellipse_rho(dx, dy, a, b, rng.uniform(0, np.pi))
    rho /= _outline_wobble(rng, np.arctan2(dy, dx), 0.03)
    r2 = np.clip(rho, 0, 1) ** 2
    # Evans-Fung biconcave thickness; a thicker centre (c0) means less pallor
    c0 = rng.uniform(0.3, 1.6)
    thickness = np.sqrt(np.clip(1 - r2, 0, None)) * (c0 + 7.83 * r2 - 4.39 * r2**2) / 1.96
    inside = _soft(rho, a)
    canvas.add(where, thickness * inside * rng.uniform(0.85, 1.15), stain)
    if rng.random() < 0.15:  # a refractile bright spot in the pallor, as often in BCCD
        spot = np.exp(-(dx**2 + dy**2) / (2 * (a * rng.uniform(0.06, 0.12)) ** 2))
        canvas.add(where, -0.12 * spot, np.ones(3))
    return _mask_box(where, inside)


def _lobes(
    rng: np.random.Generator, n: int, radius: float, spread: float
) -> list[tuple[float, float, float, float, float]]:
    """Lobes (x, y, a, b, theta) along an arc: the segmented nucleus of a granulocyte."""
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.linspace(0, spread, n) + rng.normal(0, 0.12, n)
    path = radius * rng.uniform(0.3, 0.4)
    size = radius * (0.4 if n <= 2 else 0.34)
    return [
        (
            path * np.cos(t),
            path * np.sin(t),
            size * rng.uniform(0.9, 1.15),
            size * rng.uniform(0.65, 0.85),
            t + np.pi / 2 + rng.normal(0, 0.3),
        )
        for t in angles
    ]


def _nucleus(
    kind: str, rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray, r: float
) -> np.ndarray:
    """Inside-ness (0..1) of the nucleus of a leukocyte of radius r centred at dx = dy = 0."""
    if kind == "lymphocyte":
        ox, oy = rng.normal(0, 0.05 * r, 2)
        nr = r * rng.uniform(0.74, 0.84)
        return _soft(_ellipse_rho(dx - ox, dy - oy, nr, nr * rng.uniform(0.9, 1.0), 0.3), nr)
    if kind == "monocyte":
        theta = rng.uniform(0, 2 * np.pi)
        a, b = r * 0.62, r * 0.48
        body = _soft(_ellipse_rho(dx, dy, a, b, theta), a)
        # the indentation that makes it kidney- or horseshoe-shaped
        ix, iy = -np.sin(theta) * b * 1.05, np.cos(theta) * b * 1.05
        notch = _soft(_ellipse_rho(dx - ix, dy - iy, b * 0.75, b * 0.6, theta), b * 0.6)
        return np.clip(body - notch, 0, 1)
    if kind == "neutrophil":
        lobes = _lobes(rng, int(rng.integers(3, 6)), r, rng.uniform(3.2, 4.4))
    elif kind == "eosinophil":
        lobes = _lobes(rng, 2, r, rng.uniform(1.8, 2.4))
    else:  # basophil: lobed, mostly hidden under its granules
        lobes = _lobes(rng, int(rng.integers(2, 4)), r, rng.uniform(2.0, 3.0))
    mask = np.zeros_like(dx)
    for (x, y, a, b, t), nxt in zip(lobes, [*lobes[1:], None], strict=True):
        mask = np.maximum(mask, _soft(_ellipse_rho(dx - x, dy - y, a, b, t), b))
        if nxt is not None:  # the thin strand between two lobes
            mx, my = (x + nxt[0]) / 2, (y + nxt[1]) / 2
            length = np.hypot(nxt[0] - x, nxt[1] - y) / 2
            angle = np.arctan2(nxt[1] - y, nxt[0] - x)
            strand = max(r * 0.05, 2.0)
            mask = np.maximum(
                mask, _soft(_ellipse_rho(dx - mx, dy - my, length, strand, angle), strand)
            )
    return mask


def _granules(
    rng: np.random.Generator,
    shape: tuple[int, int],
    centre: tuple[float, float],
    r: float,
    n: int,
    size: float,
) -> np.ndarray:
    """Many small round granules scattered over a cell of radius r (0..1 per pixel)."""
    radii = r * np.sqrt(rng.uniform(0, 0.9, n))
    angles = rng.uniform(0, 2 * np.pi, n)
    rows = np.clip(np.rint(centre[1] + radii * np.sin(angles)), 0, shape[0] - 1).astype(int)
    cols = np.clip(np.rint(centre[0] + radii * np.cos(angles)), 0, shape[1] - 1).astype(int)
    seeds = np.zeros(shape)
    np.add.at(seeds, (rows, cols), rng.uniform(0.8, 1.25, n))
    # a Gaussian of sd size/4 per granule, scaled to peak at about 1
    sigma = size / 4
    return np.clip(ndimage.gaussian_filter(seeds, sigma) * 2 * np.pi * sigma**2, 0, 1)


def _draw_wbc(
    canvas: _Canvas, rng: np.random.Generator, kind: str, cx: float, cy: float, diameter: float
) -> Box | None:
    r = diameter / 2
    a, b = r * rng.uniform(0.97, 1.04), r * rng.uniform(0.9, 1.0)
    win = canvas.window(cx, cy, a * 1.1 + 3)
    if win is None:
        return None
    where, dx, dy = win
    centre = (-dx[0, 0] - 0.5, -dy[0, 0] - 0.5)  # the cell centre in window pixels
    rho = _ellipse_rho(dx, dy, a, b, rng.uniform(0, np.pi))
    cell = _soft(rho / _outline_wobble(rng, np.arctan2(dy, dx), 0.015), r)
    texture = 1 + 0.25 * _smooth_noise(rng, dx.shape, 6)
    canvas.add(where, cell * np.clip(texture, 0.5, 1.5), _CYTOPLASM_ABS[kind])
    nucleus = _nucleus(kind, rng, dx, dy, r) * cell
    chromatin = 1 + 0.15 * _smooth_noise(rng, dx.shape, 5)
    density = {"lymphocyte": 1.0, "monocyte": 0.75}.get(kind, 0.9) * rng.uniform(0.85, 1.1)
    canvas.add(where, nucleus * density * np.clip(chromatin, 0.4, 1.6), _NUCLEUS_ABS)
    if kind == "eosinophil":
        grains = _granules(rng, dx.shape, centre, r, int(r * 4), r * 0.1)
        canvas.add(where, grains * cell * 0.9 * (1 - 0.6 * nucleus), _EOSIN_GRANULE_ABS)
    elif kind == "basophil":
        grains = _granules(rng, dx.shape, centre, r, int(r * 1.6), r * 0.16)
        canvas.add(where, grains * cell * 0.8, _BASO_GRANULE_ABS)
    elif kind == "neutrophil":
        grains = _granules(rng, dx.shape, centre, r, int(r * 3), r * 0.06)
        canvas.add(where, grains * cell * 0.25, np.array([0.05, 0.25, 0.05]))
    return _mask_box(where, cell)


def _draw_platelet(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float) -> Box | None:
    r = rng.uniform(12, 19)
    win = canvas.window(cx, cy, r * 1.3)
    if win is None:
        return None
    where, dx, dy = win
    theta = rng.uniform(0, np.pi)
    rho = _ellipse_rho(dx, dy, r, r * rng.uniform(0.7, 0.9), theta)
    body = _soft(rho / _outline_wobble(rng, np.arctan2(dy, dx), 0.08), r)
    # a pale rim (hyalomere) around a granular purple centre (granulomere)
    centre = _soft(_ellipse_rho(dx, dy, r * 0.6, r * 0.5, theta), r * 0.5, 3.0)
    texture = np.clip(1 + 0.3 * _smooth_noise(rng, dx.shape, 4), 0.4, 1.6)
    canvas.add(where, body * (0.25 + 0.6 * centre * texture), _PLATELET_ABS)
    return _mask_box(where, body)


def _place(
    rng: np.random.Generator,
    taken: list[tuple[float, float, float]],
    radius: float,
    w: int,
    h: int,
    overlap: float,
    margin: float,
) -> tuple[float, float]:
    """A centre whose disc overlaps the discs placed so far by at most ``overlap`` of a radius.

    ``margin`` (in radii) lets cells hang over the field edge; after many tries the last
    candidate is taken, as crowded smears do overlap.
    """
    for _ in range(200):
        x = rng.uniform(-margin * radius, w + margin * radius)
        y = rng.uniform(-margin * radius, h + margin * radius)
        if all(np.hypot(x - tx, y - ty) >= (radius + tr) * (1 - overlap) for tx, ty, tr in taken):
            break
    taken.append((x, y, radius))
    return x, y


def _visible(box: Box, diameter: float) -> bool:
    """Enough of a cell inside the field to be annotated (BCCD annotates cut cells too)."""
    return box[2] - box[0] >= 0.3 * diameter and box[3] - box[1] >= 0.3 * diameter


def synthetic_field(
    seed: int,
    width: int = 640,
    height: int = 480,
    n_rbc: int | None = None,
    n_wbc: int | None = None,
    n_plt: int | None = None,
    wbc_types: Sequence[str] | None = None,
) -> tuple[np.ndarray, GroundTruth]:
    """A smear field (H x W x 3 uint8 RGB) and its ground truth, the same for the same seed.

    Counts left as None are drawn like BCCD fields: 14-26 red cells, 1-2 leukocytes, 0-3
    platelets. ``wbc_types`` fixes the leukocyte types (and their number); otherwise they are
    drawn with adult shares (:data:`WBC_TYPES`).
    """
    rng = np.random.default_rng(seed)
    if wbc_types is None:
        count = int(rng.integers(1, 3)) if n_wbc is None else n_wbc
        names, shares = list(WBC_TYPES), np.array(list(WBC_TYPES.values()))
        wbc_types = [str(t) for t in rng.choice(names, size=count, p=shares / shares.sum())]
    unknown = [t for t in wbc_types if t not in WBC_TYPES]
    if unknown:
        raise ValueError(f"unknown leukocyte types {unknown}; known: {', '.join(WBC_TYPES)}")
    n_rbc = int(rng.integers(14, 27)) if n_rbc is None else n_rbc
    n_plt = int(rng.integers(0, 4)) if n_plt is None else n_plt
    rbc_diameter = rng.uniform(92, 108)

    canvas = _Canvas(height, width)
    stain = _RBC_ABS * rng.normal(1.0, 0.04, 3).clip(0.9, 1.1)
    taken: list[tuple[float, float, float]] = []
    truth: GroundTruth = []
    for kind in wbc_types:
        lo, hi = _WBC_SIZE[kind]
        diameter = rbc_diameter * rng.uniform(lo, hi)
        x, y = _place(rng, taken, diameter / 2, width, height, 0.1, -1.0)
        box = _draw_wbc(canvas, rng, kind, x, y, diameter)
        if box is not None:
            truth.append(("WBC", box))
    for _ in range(n_rbc):
        diameter = rbc_diameter * rng.normal(1.0, 0.06)
        x, y = _place(rng, taken, diameter / 2, width, height, 0.3, 0.4)
        box = _draw_rbc(canvas, rng, x, y, diameter, stain)
        if box is not None and _visible(box, diameter):
            truth.append(("RBC", box))
    for _ in range(n_plt):
        x, y = _place(rng, taken, 18.0, width, height, 0.0, -1.0)
        box = _draw_platelet(canvas, rng, x, y)
        if box is not None:
            truth.append(("PLT", box))
    for _ in range(int(rng.integers(2, 8))):  # tiny refractile debris rings, as in BCCD
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        win = canvas.window(x, y, 6)
        if win is not None:
            where, dx, dy = win
            ring = np.exp(-((np.hypot(dx, dy) - 3.0) ** 2) / 1.5)
            canvas.add(where, 0.12 * ring, np.ones(3))

    yy, xx = np.mgrid[0:height, 0:width]
    r2 = ((xx - width / 2) ** 2 + (yy - height / 2) ** 2) / ((width / 2) ** 2 + (height / 2) ** 2)
    light = (1.0 - 0.05 * r2) * (1 + 0.012 * _smooth_noise(rng, (height, width), 40))
    background = _BACKGROUND * rng.normal(1.0, 0.015, 3) * rng.uniform(0.98, 1.04)
    image = (light[..., None] * background).astype(np.float32) * np.exp(-canvas.absorbance)
    image = ndimage.gaussian_filter(image, (rng.uniform(1.1, 1.7),) * 2 + (0,))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32([2.5, 2.3, 4.5])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), truth


def save_synthetic(path: Path | str, seed: int, quality: int = 90) -> GroundTruth:
    """Write a synthetic field as an image file (JPEG unless the suffix says otherwise)."""
    image, truth = synthetic_field(seed)
    target = Path(path)
    if target.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(image).save(target, quality=quality)
    else:
        Image.fromarray(image).save(target)
    return truth
