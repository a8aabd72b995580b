"""Whole slides in bounded memory: the monolayer first, then overlapping windows, then stop.

A whole-slide level is far too large to decode at once (an 80k x 60k level is 14 GB of RGB).
It is read tile by tile: the low-resolution pieces of the slide give each tile's coverage
(:mod:`lisplugin.core.monolayer`), and only the monolayer tiles are analysed at full
resolution, best first, until the leukocyte target is reached.

Neighbouring tiles are analysed together, a block of them (2 x 2 at 512 px) in one window that
adds a margin of the surrounding pixels on every side, so that a cell on a block border is seen
whole. A cell belongs to the tile that holds the centre of its box: tiles partition the slide,
so every cell is counted exactly once, by one tile, and its box is given in that tile's pixel
coordinates (it may reach over the tile's edges). Memory is one window and a bounded cache of
decoded tiles, whatever the slide size.
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
#: Decoded tiles kept for the windows of neighbouring tiles (about 0.8 MB each at 512 px):
#: at least this many, at most ``TILE_CACHE_BYTES`` of them.
TILE_CACHE = 24
TILE_CACHE_BYTES = 48 * 2**20
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


def cache_size(image: TiledImage, block: int) -> int:
    """Tiles to keep decoded: a row of blocks and its margins, so that the next row of blocks
    finds the tiles it shares with this one (bounded by ``TILE_CACHE_BYTES``)."""
    across, _ = tile_grid(image)
    wanted = 2 * across + (block + 2) ** 2
    most = TILE_CACHE_BYTES // max(1, image.tile_width * image.tile_height * 3)
    return max(TILE_CACHE, min(wanted, most))


def block_side(image: TiledImage, margin: int, settings: AnalysisSettings) -> int:
    """Tiles per side of a block analysed in one window: as many as fit in
    ``settings.slide_window_px`` with the margin around them (at least one)."""
    side = max(image.tile_width, image.tile_height)
    return max(1, (settings.slide_window_px - 2 * margin) // side)


def blocks(ranked: list[tuple[int, int]], side: int) -> list[list[tuple[int, int]]]:
    """The ranked tiles grouped into ``side`` x ``side`` blocks of the tile grid, each block in
    the rank of its best tile; only ranked tiles are listed (the others are not analysable)."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for column, row in ranked:
        groups.setdefault((column // side, row // side), []).append((column, row))
    return list(groups.values())


def window(
    cache: TileCache, area: tuple[int, int, int, int], margin: int
) -> tuple[np.ndarray, int, int]:
    """The slide's pixels of ``area`` (x0, y0, x1, y1) with ``margin`` pixels around it (clipped
    to the image, glass white where no tile was scanned), and the window's top left corner."""
    image = cache.image
    tw, th = image.tile_width, image.tile_height
    left, top = max(0, area[0] - margin), max(0, area[1] - margin)
    right, bottom = min(image.width, area[2] + margin), min(image.height, area[3] + margin)
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
    return out, left, top


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
    ``settings.slide_leukocyte_target`` leukocytes are counted; one field per analysed tile.

    Neighbouring tiles are analysed together, a block at a time in one window, so that the
    margin around a window (and the detector's fixed cost) is paid once for several tiles."""
    tw, th = image.tile_width, image.tile_height
    coverage = coverage_of(image.low_resolution(), *tile_grid(image), tw, th)
    margin = margin_px(image, settings)
    side = block_side(image, margin, settings)
    cache = TileCache(image, cache_size(image, side))
    results: list[FieldResult] = []
    leukocytes = 0
    for group in blocks(rank_tiles(coverage), side):
        if leukocytes >= settings.slide_leukocyte_target:
            break
        tiles = [(c, r, tile) for c, r in group if (tile := cache.get(c, r)) is not None]
        if not tiles:
            continue
        area = (
            min(c * tw for c, _, _ in tiles),
            min(r * th for _, r, _ in tiles),
            max(c * tw + t.shape[1] for c, _, t in tiles),
            max(r * th + t.shape[0] for _, r, t in tiles),
        )
        pixels, left, top = window(cache, area, margin)
        field = Field(pixels, image.tile_source(*group[0]), image.pixel_spacing_um)
        # only the block's own cells are classified: the margin's belong to its neighbours
        core = (
            float(area[0] - left),
            float(area[1] - top),
            float(area[2] - left),
            float(area[3] - top),
        )
        found = analyse_field(
            first_index + len(results), field, detector, classifier, settings, core
        )
        for column, row, tile in tiles:
            height, width = tile.shape[:2]
            owned = owned_by_tile(found, column * tw - left, row * th - top, width, height)
            index = first_index + len(results)
            cells = tuple(replace(c, field_index=index) for c in owned.cells)
            source = image.tile_source(column, row)
            results.append(
                replace(owned, index=index, source=source, width=width, height=height, cells=cells)
            )
            leukocytes += sum(1 for c in owned.cells if c.kind == "WBC")
    return results


def is_slide(item: object) -> bool:
    """A tiled whole-slide level rather than a field (the analysis takes both)."""
    return not isinstance(item, Field) and hasattr(item, "low_resolution")
