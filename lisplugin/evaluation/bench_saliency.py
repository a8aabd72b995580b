"""``lisplugin bench saliency``: how long one leukocyte's occlusion saliency map takes here.

The review station draws the map when a reviewer picks a cell, so it must come within a click's
patience (the target is under 300 ms per cell). Wall time depends on what else the machine
runs, so the CPU time per cell and the load average are reported with it. Each timed cell is one
:func:`lisplugin.core.saliency.occlusion_sensitivity` call with the settings' classifier: the
classifier's answer for the crop, then the unoccluded window and every occluded copy of it
scored in one batch. Cells are centred leukocyte images at PBC scale (``--images``, e.g. the
PBC data set's folders), else the leukocytes the detector finds in synthetic fields, cropped as
the daemon crops them. One untimed cell first warms the ONNX sessions up.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lisplugin.config import load_settings
from lisplugin.core.analysis import median_rbc_diameter
from lisplugin.core.crops import leukocyte_crop, pbc_scale
from lisplugin.core.saliency import PATCH_PX, STRIDE_PX, occlusion_sensitivity
from lisplugin.core.types import CellDetector
from lisplugin.datasets import load_rgb
from lisplugin.evaluation.bench import image_files, peak_rss_mb
from lisplugin.service.models import load_models
from lisplugin.synthetic import synthetic_field


def cells_from_images(paths: Sequence[Path], count: int) -> list[np.ndarray]:
    """PBC-scale crops of centred single-leukocyte images, spread over the files given."""
    step = max(len(paths) // count, 1)
    crops = []
    for path in list(paths)[::step][:count]:
        image = load_rgb(path)
        h, w = image.shape[:2]
        crops.append(leukocyte_crop(image, (w / 2 - 30, h / 2 - 30, w / 2 + 30, h / 2 + 30), 1.0))
    return crops


def cells_from_synthetic(detector: CellDetector, count: int, seed: int = 0) -> list[np.ndarray]:
    """Leukocytes the detector finds in synthetic fields, cropped as the daemon crops them."""
    crops: list[np.ndarray] = []
    for index in range(200):
        if len(crops) >= count:
            break
        image, _ = synthetic_field(seed + index)
        detections = detector.detect(image).cells
        h, w = image.shape[:2]
        rbc = median_rbc_diameter(detections, w, h)
        for det in detections:
            if det.kind == "WBC" and len(crops) < count:
                crops.append(leukocyte_crop(image, det.box, pbc_scale(None, rbc, det.box)))
    if len(crops) < count:
        raise RuntimeError(f"only {len(crops)} leukocytes found in 200 synthetic fields")
    return crops


def measure(crops: Sequence[np.ndarray], config: Path | None = None) -> dict[str, Any]:
    """Median and 95th percentile ms per cell over ``crops[1:]`` (the first warms up)."""
    settings = load_settings(config)
    _, classifier = load_models(settings)
    occlusion_sensitivity(crops[0], classifier)
    times, cpu, found = [], [], None
    for crop in crops[1:]:
        started, started_cpu = time.perf_counter(), time.process_time()
        found = occlusion_sensitivity(crop, classifier)
        times.append((time.perf_counter() - started) * 1000.0)
        cpu.append((time.process_time() - started_cpu) * 1000.0)
    assert found is not None
    return {
        "cells": len(times),
        "ms_per_cell_median": round(float(np.median(times)), 1),
        "ms_per_cell_p95": round(float(np.percentile(times, 95)), 1),
        # CPU time of all this process's threads: what a busy machine does not inflate much
        "cpu_ms_per_cell_median": round(float(np.median(cpu)), 1),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "map_px": list(found.heat.shape),
        "window": list(found.window),
        "patch_px": PATCH_PX,
        "stride_px": STRIDE_PX,
        "classifier": classifier.version,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lisplugin bench saliency", description=__doc__)
    parser.add_argument("--cells", type=int, default=20, help="timed cells")
    parser.add_argument(
        "--images",
        type=Path,
        action="append",
        default=[],
        help="centred leukocyte image file or folder at PBC scale, repeatable "
        "(default: leukocytes of synthetic fields)",
    )
    parser.add_argument("--config", type=Path, help="site settings YAML")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.cells < 1:
        parser.error("--cells must be at least 1")
    if args.images:
        files = image_files(args.images)
        if not files:
            parser.error("no image files in the given paths")
        crops = cells_from_images(files, args.cells + 1)
        source = f"{len(crops)} of {len(files)} image file(s)"
    else:
        detector, _ = load_models(load_settings(args.config))
        crops = cells_from_synthetic(detector, args.cells + 1)
        source = "leukocytes of synthetic fields"
    if len(crops) < 2:
        parser.error("need at least two cells (one warms up)")
    report = {"source": source, **measure(crops, args.config)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        print(f"{key:<20}{value}")
    return 0
