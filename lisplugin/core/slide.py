"""Whole slides in bounded memory: the monolayer first, then overlapping windows, then stop.

A whole-slide level is far too large to decode at once (an 80k x 60k level is 14 GB of RGB).
It is read tile by tile: the low-resolution pieces of the slide give each tile's coverage
(:mod:`lisplugin.core.monolayer`), and only the monolayer tiles are analysed at full
resolution, best first, until the leukocyte target is reached.

Each tile is analysed in a window that adds a margin of its neighbours' pixels on every side,
so that a cell on a tile border is seen whole. A cell belongs to the tile that holds the centre
of its box: tiles partition the slide, so every cell is counted exactly once, by one tile, and
its box is given in that tile's pixel coordinates (it may reach over the tile's edges). Memory
is one window and a few cached tiles, whatever the slide size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Protocol

import numpy as np

from lisplugin.config import AnalysisSettings
from lisplugin.core.monolayer import coverage_of, rank_tiles
from lisplugin.core.types import (
    CellDetector,
    Field,
    FieldResult,
    LeukocyteClassifier,
)

#: ``core.analysis.analyse_field``, passed in (it imports this module).
FieldAnalyser = Callable[
    [
        int,
        Field,
        CellDetector,
        LeukocyteClassifier,
        AnalysisSettings,
        tuple[float, float, float, float] | None,
    ],
    FieldResult,
]
#: Decoded tiles kept for the windows of neighbouring tiles (about 0.8 MB each at 512 px).
TILE_CACHE = 24
#: Window margin when the pixel spacing is unknown (a large leukocyte's radius at 0.25 um/px
#: is about 40 px; at BCCD's magnification about 100 px).
DEFAULT_MARGIN_PX = 128


class TiledImage(Protocol):
    """One resolution level of a whole slide, read a tile at a time (the DICOM adapter)."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    pixel_spacing_um: float | None

    def tile(self, column: int, row: int) -> np.ndarray | None:
        """RGB uint8 pixels of a tile, cropped to the image; None where no tile was scanned."""
        ...

    def tile_source(self, column: int, row: int) -> str:
        """The field source of a tile, e.g. ``"<SOPInstanceUID>#frame=<n>"``."""
        ...

    def low_resolution(self) -> Iterator[tuple[float, float, float, np.ndarray]]:
        """The whole image at low resolution, in pieces ``(x0, y0, scale, pixels)``."""
        ...


def tile_grid(image: TiledImage) -> tuple[int, int]:
    """(across, down): tiles per row and per column."""
    return -(-image.width // image.tile_width), -(-image.height // image.tile_height)


def margin_px(image: TiledImage, settings: AnalysisSettings) -> int:
    """The window margin: a large leukocyte's radius, at most half a tile."""
    spacing = image.pixel_spacing_um
    wanted = (
        int(np.ceil(settings.slide_window_margin_um / spacing)) if spacing else DEFAULT_MARGIN_PX
    )
    return max(8, min(wanted, image.tile_width // 2, image.tile_height // 2))


class TileCache:
    """The last decoded tiles (least recently used dropped): neighbours share their pixels."""

    def __init__(self, image: TiledImage, size: int = TILE_CACHE) -> None:
        self.image = image
        self.size = size
        self._tiles: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self.decoded = 0

    def get(self, column: int, row: int) -> np.ndarray | None:
        key = (column, row)
        if key in self._tiles:
            self._tiles.move_to_end(key)
            return self._tiles[key]
        tile = self.image.tile(column, row)
        self.decoded += 1
        self._tiles[key] = tile
        while len(self._tiles) > self.size:
            self._tiles.popitem(last=False)
        return tile


def window(cache: TileCache, column: int, row: int, margin: int) -> tuple[np.ndarray, int, int]:
    """The tile with ``margin`` pixels of its neighbours around it (clipped to the image, glass
    white where no tile was scanned), and the tile's top left corner in the window."""
    image = cache.image
    tw, th = image.tile_width, image.tile_height
    x0, y0 = column * tw, row * th
    left, top = max(0, x0 - margin), max(0, y0 - margin)
    right, bottom = min(image.width, x0 + tw + margin), min(image.height, y0 + th + margin)
    out = np.full((bottom - top, right - left, 3), 255, dtype=np.uint8)
    for r in range(top // th, (bottom - 1) // th + 1):
        for c in range(left // tw, (right - 1) // tw + 1):
            tile = cache.get(c, r)
            if tile is None:
                continue
            tx, ty = c * tw, r * th
            sx0, sy0 = max(left, tx), max(top, ty)
            sx1 = min(right, tx + tile.shape[1])
            sy1 = min(bottom, ty + tile.shape[0])
            if sx1 > sx0 and sy1 > sy0:
                out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = tile[
                    sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx
                ]
    return out, x0 - left, y0 - top


def owned_by_tile(result: FieldResult, dx: int, dy: int, tw: int, th: int) -> FieldResult:
    """The cells of a window whose box centre lies in the tile at ``(dx, dy)`` of the window,
    moved to the tile's coordinates; the count regression scaled to the tile's share."""
    cells = []
    for cell in result.cells:
        x0, y0, x1, y1 = cell.box
        cx, cy = (x0 + x1) / 2 - dx, (y0 + y1) / 2 - dy
        if 0 <= cx < tw and 0 <= cy < th:
            cells.append(replace(cell, box=(x0 - dx, y0 - dy, x1 - dx, y1 - dy)))
    share = (tw * th) / max(result.width * result.height, 1)
    regressed = (
        None
        if result.regressed_counts is None
        else {k: v * share for k, v in result.regressed_counts.items()}
    )
    return replace(result, cells=tuple(cells), regressed_counts=regressed)


def analyse_slide(
    image: TiledImage,
    first_index: int,
    detector: CellDetector,
    classifier: LeukocyteClassifier,
    settings: AnalysisSettings,
    analyse_field: FieldAnalyser,
) -> list[FieldResult]:
    """Analyse the monolayer of a slide level, best tiles first, until
    ``settings.slide_leukocyte_target`` leukocytes are counted; one field per analysed tile."""
    across, down = tile_grid(image)
    tw, th = image.tile_width, image.tile_height
    coverage = coverage_of(image.low_resolution(), across, down, tw, th)
    margin = margin_px(image, settings)
    cache = TileCache(image)
    results: list[FieldResult] = []
    leukocytes = 0
    for column, row in rank_tiles(coverage):
        if leukocytes >= settings.slide_leukocyte_target:
            break
        tile = cache.get(column, row)
        if tile is None:
            continue
        height, width = tile.shape[:2]
        pixels, dx, dy = window(cache, column, row, margin)
        index = first_index + len(results)
        field = Field(pixels, image.tile_source(column, row), image.pixel_spacing_um)
        # only the tile's own cells are classified: the margin's belong to its neighbours
        core = (float(dx), float(dy), float(dx + width), float(dy + height))
        found = analyse_field(index, field, detector, classifier, settings, core)
        owned = owned_by_tile(found, dx, dy, width, height)
        results.append(replace(owned, width=width, height=height))
        leukocytes += sum(1 for c in owned.cells if c.kind == "WBC")
    return results


def is_slide(item: object) -> bool:
    """A tiled whole-slide level rather than a field (the analysis takes both)."""
    return not isinstance(item, Field) and hasattr(item, "low_resolution")
