"""Cell outlines as polygons, for annotations, overlays and reports."""

from __future__ import annotations

import numpy as np


def mask_outline(
    mask: np.ndarray, box: tuple[float, float, float, float], points: int = 24
) -> list[tuple[float, float]]:
    """Polygon around a cell mask, in field pixel coordinates.

    Blood cells are star-shaped around their centroid, so the outline is sampled along ``points``
    rays from the centroid: each vertex is the farthest mask pixel on its ray. An empty mask
    falls back to the ellipse inscribed in the box.
    """
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return ellipse_outline(box, points)
    cy, cx = ys.mean(), xs.mean()
    angles = np.arctan2(ys - cy, xs - cx)
    radii = np.hypot(ys - cy, xs - cx)
    bins = ((angles + np.pi) / (2 * np.pi) * points).astype(int) % points
    outline = []
    scale_x = (x1 - x0) / mask.shape[1]
    scale_y = (y1 - y0) / mask.shape[0]
    for b in range(points):
        theta = -np.pi + (b + 0.5) * 2 * np.pi / points
        in_bin = radii[bins == b]
        r = float(in_bin.max()) + 0.5 if len(in_bin) else 0.5
        outline.append(
            (
                round(x0 + (cx + 0.5 + r * np.cos(theta)) * scale_x, 1),
                round(y0 + (cy + 0.5 + r * np.sin(theta)) * scale_y, 1),
            )
        )
    return outline


def ellipse_outline(
    box: tuple[float, float, float, float], points: int = 24
) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    theta = -np.pi + (np.arange(points) + 0.5) * 2 * np.pi / points
    return [
        (round(float(cx + rx * np.cos(t)), 1), round(float(cy + ry * np.sin(t)), 1)) for t in theta
    ]
