"""Where on a smear to count: the monolayer, found at low resolution before any cell is detected.

A blood smear runs from the thick area (cells piled on each other: shapes and classes
unreliable) through the monolayer (red cells just touching, the counting area) to the feathered
edge (cells sparse, flattened and broken). How much of the glass the cells cover tells the three
apart, and it can be measured on a low-resolution image where a red cell is a few pixels across.

Stained cells are coloured and the glass is grey, so a pixel counts as covered when its
saturation, ``(max - min) / max`` of its RGB, exceeds :data:`STAIN_SATURATION`: that does not
depend on how bright the illumination or the scanner's white balance is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Saturation above which a pixel shows stain (glass is grey: about 0.02 on BCCD; a red cell
#: 0.13-0.2, its central pallor less; a nucleus far more).
STAIN_SATURATION = 0.07
#: Covered fraction of a monolayer tile: red cells touching, few piled up.
MONOLAYER_COVERAGE = (0.3, 0.85)
#: The middle of the monolayer, where counting is best: tiles nearest it go first.
IDEAL_COVERAGE = 0.55
#: Tiles covering less than this show hardly anything (glass, feathered edge tips).
MIN_COVERAGE = 0.02
#: Tiles this close in coverage are equally good: among them the slide is read row by row, so
#: that neighbouring tiles are analysed one after another and decoded once.
COVERAGE_STEP = 0.05


def stained(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels that show stain (see the module docstring)."""
    rgb = image[..., :3].astype(np.float32)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    return (high - low) > STAIN_SATURATION * np.maximum(high, 1.0)


@dataclass
class CoverageMap:
    """Covered fraction of every tile of a tiled image, accumulated from low-resolution pieces
    of it (in any order, so that they can be streamed)."""

    across: int
    down: int
    tile_width: int
    tile_height: int

    def __post_init__(self) -> None:
        self._covered = np.zeros(self.across * self.down, dtype=np.float64)
        self._seen = np.zeros(self.across * self.down, dtype=np.float64)

    def add(self, x0: float, y0: float, scale: float, piece: np.ndarray) -> None:
        """A low-resolution piece whose top left pixel is at ``(x0, y0)`` of the full image and
        whose pixels are ``scale`` full-resolution pixels wide."""
        rows, columns = piece.shape[:2]
        xs = ((x0 + (np.arange(columns) + 0.5) * scale) // self.tile_width).astype(np.int64)
        ys = ((y0 + (np.arange(rows) + 0.5) * scale) // self.tile_height).astype(np.int64)
        inside_x, inside_y = (xs >= 0) & (xs < self.across), (ys >= 0) & (ys < self.down)
        mask = stained(piece)[np.ix_(inside_y, inside_x)]
        index = ys[inside_y][:, None] * self.across + xs[inside_x][None, :]
        size = self.across * self.down
        self._covered += np.bincount(index.ravel(), mask.ravel(), minlength=size)
        self._seen += np.bincount(index.ravel(), minlength=size)

    def fractions(self) -> np.ndarray:
        """(down, across) covered fraction; 0 for tiles no piece reached."""
        return (self._covered / np.maximum(self._seen, 1.0)).reshape(self.down, self.across)


def rank_tiles(coverage: np.ndarray) -> list[tuple[int, int]]:
    """``(column, row)`` of the tiles to analyse, best first: the monolayer tiles by closeness
    to the ideal coverage. A slide without any (a single field scanned, a thick smear) has all
    its tiles that show cells ranked the same way, so something is still counted."""
    rows, columns = np.nonzero(coverage >= MIN_COVERAGE)
    values = coverage[rows, columns]
    low, high = MONOLAYER_COVERAGE
    band = (values >= low) & (values <= high)
    if band.any():
        rows, columns, values = rows[band], columns[band], values[band]
    closeness = np.floor(np.abs(values - IDEAL_COVERAGE) / COVERAGE_STEP)
    order = np.lexsort((columns, rows, closeness))
    return [(int(columns[i]), int(rows[i])) for i in order]


def coverage_of(
    pieces: Iterable[tuple[float, float, float, np.ndarray]],
    across: int,
    down: int,
    tile_width: int,
    tile_height: int,
) -> np.ndarray:
    """Covered fraction per tile from streamed ``(x0, y0, scale, piece)`` low-resolution pieces."""
    found = CoverageMap(across, down, tile_width, tile_height)
    for x0, y0, scale, piece in pieces:
        found.add(x0, y0, scale, piece)
    return found.fractions()
