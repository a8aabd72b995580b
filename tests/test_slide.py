"""Whole slides: streamed in bounded memory, the monolayer chosen first, border cells once.

Slides are synthetic VL Whole Slide Microscopy pyramids (:mod:`lisplugin.synthetic_slide`)
with a monolayer band of known tile columns, analysed by the real models and the real DICOM
frame reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from lisplugin.config import AnalysisSettings, Settings
from lisplugin.core.analysis import analyse_field
from lisplugin.core.monolayer import coverage_of, rank_tiles
from lisplugin.core.slide import analyse_slide, tile_grid
from lisplugin.core.types import Detection, FieldDetections
from lisplugin.dicom.frames import read_frame, whole_slide_levels
from lisplugin.reports.sources import frame_origin
from lisplugin.service.models import load_models
from lisplugin.service.pipeline import Pipeline
from lisplugin.synthetic_slide import TILE, write_synthetic_slide


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_settings(Settings())


def _levels(*paths: Path) -> list:
    return whole_slide_levels(
        list(paths), [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    )


@pytest.mark.parametrize("with_low_level", [True, False], ids=["pyramid", "single-level"])
def test_monolayer_band_is_chosen_at_low_resolution(tmp_path: Path, with_low_level: bool) -> None:
    slide = write_synthetic_slide(tmp_path, 4096, band=(0.3, 0.6))
    paths = (slide.finest, slide.low) if with_low_level else (slide.finest,)
    (level,) = _levels(*paths)
    assert (level.low is not None) is with_low_level
    coverage = coverage_of(level.low_resolution(), *tile_grid(level), TILE, TILE)
    ranked = rank_tiles(coverage)
    assert {c for c, _ in ranked} == set(slide.band_columns)  # neither thick nor feathered
    assert len(ranked) == len(slide.band_columns) * slide.across


def test_analysis_counts_the_band_up_to_the_target_and_stops(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    slide = write_synthetic_slide(tmp_path, 4096, band=(0.3, 0.6))
    settings = pipeline.settings.analysis.model_copy(update={"slide_leukocyte_target": 9})
    (level,) = _levels(slide.finest, slide.low)
    results = analyse_slide(
        level, 0, pipeline.detector, pipeline.classifier, settings, analyse_field
    )
    leukocytes = sum(c.kind == "WBC" for r in results for c in r.cells)
    assert leukocytes >= 9
    assert len(results) < len(slide.band_columns) * slide.across  # stopped early
    header = pydicom.dcmread(slide.finest, stop_before_pixels=True)
    for result in results:
        frame = int(result.source.rpartition("=")[2])
        column, _ = frame_origin(header, frame)
        assert int(column) // TILE in slide.band_columns
        assert (result.width, result.height) == (TILE, TILE)
    # the review station and the reports read that tile alone, by its frame number
    frame = int(results[-1].source.rpartition("=")[2])
    tile = read_frame(slide.finest, frame)
    assert tile.source == results[-1].source and tile.image.shape == (TILE, TILE, 3)


MEMORY_LIMIT = 1536 * 2**20


def test_slide_larger_than_the_memory_limit_is_analysed(tmp_path: Path) -> None:
    size = 24576  # 1.8 GB of RGB, over the 1.5 GB address-space limit of the analysis
    assert size * size * 3 > MEMORY_LIMIT
    slide = write_synthetic_slide(tmp_path, size)
    script = textwrap.dedent(
        f"""
        import json, resource
        from pathlib import Path
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
        from lisplugin.config import Settings
        from lisplugin.service.pipeline import Pipeline, read_fields
        settings = Settings(analysis={{"slide_leukocyte_target": 20}})
        pipeline = Pipeline.from_settings(settings)
        fields = read_fields([Path({str(slide.finest)!r}), Path({str(slide.low)!r})])
        result = pipeline.analyse(fields, {{}}, None)
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
        status = open("/proc/self/status").read().split("VmHWM:")[1]
        peak = int(status.split()[0]) / 1024
        print(json.dumps({{"wbc": result.counts["WBC"], "fields": len(result.fields),
                          "peak_rss_mb": peak}}))
        """
    )
    # glibc reserves 64 MB of address space per malloc arena (one per thread, up to 8 per
    # core): on a many-core machine that alone would eat the limit, so two arenas are used
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["wbc"] >= 20
    assert found["peak_rss_mb"] < 600


# --- cells on tile borders -------------------------------------------------------------------


@dataclass
class DiscSlide:
    """An in-memory tiled image: grey glass with dark discs, several on tile borders."""

    pixels: np.ndarray
    tile_width: int = 128
    tile_height: int = 128
    pixel_spacing_um: float | None = None

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    def tile(self, column: int, row: int) -> np.ndarray | None:
        x, y = column * self.tile_width, row * self.tile_height
        return self.pixels[y : y + self.tile_height, x : x + self.tile_width]

    def tile_source(self, column: int, row: int) -> str:
        return f"1.2.3#frame={row * -(-self.width // self.tile_width) + column + 1}"

    def low_resolution(self) -> Iterator[tuple[float, float, float, np.ndarray]]:
        yield 0.0, 0.0, 1.0, self.pixels


class DiscDetector:
    """Every dark disc, whole, as a leukocyte: a detector whose answer is known exactly."""

    version = "discs"

    def detect(self, image: np.ndarray, pixel_spacing_um: float | None = None) -> FieldDetections:
        labels, _ = ndimage.label(image[..., 0] < 100)
        found = []
        for where in ndimage.find_objects(labels):
            ys, xs = where
            box = (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))
            touches = xs.start == 0 or ys.start == 0
            touches |= xs.stop == image.shape[1] or ys.stop == image.shape[0]
            if not touches:  # a disc cut by the window's edge is not a whole cell
                found.append(Detection("WBC", 0.99, box))
        return FieldDetections(tuple(found))


@pytest.mark.parametrize(
    "window_px", [256, 384, 1536], ids=["one-tile-windows", "2x2-tile-blocks", "one-window"]
)
def test_cells_on_tile_borders_are_counted_once(pipeline: Pipeline, window_px: int) -> None:
    pixels = np.full((384, 384, 3), (200, 170, 190), dtype=np.uint8)  # stained: all "monolayer"
    centres = [(128, 60), (256, 200), (128, 128), (300, 256), (60, 300), (250, 128), (200, 40)]
    y, x = np.mgrid[0:384, 0:384]
    for cx, cy in centres:
        pixels[(x - cx) ** 2 + (y - cy) ** 2 <= 14**2] = (60, 30, 90)
    slide = DiscSlide(pixels)
    settings = AnalysisSettings(
        min_focus=0.0,
        exposure_range=(0.0, 1.0),
        max_clipped_fraction=1.0,
        slide_window_px=window_px,  # margin 64 px: blocks of 1, 2 x 2 and 3 x 3 tiles of 128 px
    )
    _, classifier = load_models(Settings())
    results = analyse_slide(slide, 0, DiscDetector(), classifier, settings, analyse_field)
    assert len(results) == 9  # every tile, the target not reached
    found = []
    for result in results:
        tile = int(result.source.rpartition("=")[2]) - 1
        ox, oy = tile % 3 * 128, tile // 3 * 128
        for cell in result.cells:
            x0, y0, x1, y1 = cell.box
            found.append((int(ox + (x0 + x1) / 2), int(oy + (y0 + y1) / 2)))
    assert sorted(found) == sorted(centres)  # each disc once, at its place on the slide
