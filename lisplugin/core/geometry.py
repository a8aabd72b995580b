"""Cell outlines as polygons, for annotations, overlays and reports."""

from __future__ import annotations

import numpy as np
from skimage import measure

#: Largest distance (mask pixels) between the traced boundary and its simplified polygon.
OUTLINE_TOLERANCE = 0.6


def mask_outline(
    mask: np.ndarray, box: tuple[float, float, float, float], points: int = 24
) -> list[tuple[float, float]]:
    """Polygon around a cell mask, in field pixel coordinates.

    The boundary is traced on the mask (scikit-image ``find_contours``, marching squares at the
    half level: between the cell's edge pixels and the background), the largest piece kept, and
    simplified within ``OUTLINE_TOLERANCE``: it follows dents and flat sides that rays from the
    centroid would turn into star points. An empty mask falls back to the ellipse inscribed in
    the box with ``points`` vertices.
    """
    x0, y0, x1, y1 = box
    if not mask.any():
        return ellipse_outline(box, points)
    padded = np.pad(mask.astype(np.float32), 1)  # a cell touching the box edge still closes
    contours = measure.find_contours(padded, 0.5)
    contour = max(contours, key=lambda c: polygon_area(c[:, 1], c[:, 0]))
    # a closed contour repeats its first point at the end
    simplified = measure.approximate_polygon(contour, OUTLINE_TOLERANCE)[:-1]
    scale_x = (x1 - x0) / mask.shape[1]
    scale_y = (y1 - y0) / mask.shape[0]
    # contour coordinates are pixel indices of the padded mask; pixel i spans [i, i + 1)
    return [
        (round(x0 + (col - 0.5) * scale_x, 1), round(y0 + (row - 0.5) * scale_y, 1))
        for row, col in simplified
    ]


def polygon_area(xs: np.ndarray, ys: np.ndarray) -> float:
    """Area of a polygon by the shoelace formula (absolute value)."""
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2.0)


def ellipse_outline(
    box: tuple[float, float, float, float], points: int = 24
) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    theta = -np.pi + (np.arange(points) + 0.5) * 2 * np.pi / points
    return [
        (round(float(cx + rx * np.cos(t)), 1), round(float(cy + ry * np.sin(t)), 1)) for t in theta
    ]
