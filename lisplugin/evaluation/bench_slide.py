"""``lisplugin bench slide --size N``: a synthetic whole slide, analysed as the daemon would.

Builds a VL Whole Slide Microscopy pyramid of N x N (512 px JPEG tiles, a monolayer band in the
middle of the smear, see :mod:`lisplugin.synthetic_slide`) and times reading and analysing it
up to the leukocyte target: wall time, analysed megapixels per second, leukocytes found and the
process's peak RSS. ``--every-tile`` makes the whole slide monolayer with no target, to compare
the analysed rate with ``lisplugin bench``'s per-field rate (``--field-rate`` measures that in
the same process).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from lisplugin.config import load_settings
from lisplugin.evaluation.bench import peak_rss_mb, run_bench, synthetic_jpegs
from lisplugin.progress import bar
from lisplugin.service.pipeline import Pipeline, read_fields
from lisplugin.synthetic_slide import write_synthetic_slide


def measure(
    size: int,
    target: int | None,
    every_tile: bool,
    config: Path | None,
    folder: Path,
) -> dict[str, Any]:
    settings = load_settings(config)
    if target is not None:
        settings.analysis.slide_leukocyte_target = target
    if every_tile:
        settings.analysis.slide_leukocyte_target = 10**9
    with bar(3, desc="slide", unit="step") as steps:  # one analysis call: steps, no per-tile ETA
        steps.set_postfix_str("writing the slide")
        started = time.perf_counter()
        slide = write_synthetic_slide(folder, size, band=(0.0, 1.0) if every_tile else (0.4, 0.6))
        build_s = time.perf_counter() - started
        steps.update(1)
        steps.set_postfix_str("loading models")
        pipeline = Pipeline.from_settings(settings)
        steps.update(1)
        steps.set_postfix_str("analysing")
        started = time.perf_counter()
        fields = read_fields([slide.finest, slide.low])
        result = pipeline.analyse(fields, {}, None)
        wall = time.perf_counter() - started
        steps.update(1)
    analysed_mpx = sum(f.width * f.height for f in result.fields) / 1e6
    return {
        "size": size,
        "slide_mpx": round(size * size / 1e6, 1),
        "file_mb": round(slide.finest.stat().st_size / 1e6, 1),
        "build_s": round(build_s, 1),
        "leukocyte_target": settings.analysis.slide_leukocyte_target if not every_tile else None,
        "tiles_analysed": len(result.fields),
        "analysed_mpx": round(analysed_mpx, 1),
        "wall_s": round(wall, 2),
        "analysed_mpx_per_s": round(analysed_mpx / wall, 2),
        "leukocytes": int(result.counts.get("WBC", 0)),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lisplugin bench slide", description=__doc__)
    parser.add_argument("--size", type=int, default=8192, help="slide side in pixels")
    parser.add_argument("--target", type=int, help="leukocyte target (default: settings, 200)")
    parser.add_argument("--every-tile", action="store_true", help="analyse every tile")
    parser.add_argument(
        "--field-rate", action="store_true", help="also run the per-field bench (10 fields)"
    )
    parser.add_argument("--config", type=Path, help="site settings YAML")
    parser.add_argument("--keep", type=Path, help="write the slide here and keep it")
    args = parser.parse_args(argv)
    if args.size < 512:
        parser.error("--size must be at least 512")
    with tempfile.TemporaryDirectory() as scratch:
        report = measure(
            args.size, args.target, args.every_tile, args.config, args.keep or Path(scratch)
        )
    if args.field_rate:
        fields = run_bench(args.config, synthetic_jpegs(11), None)
        per_field = 640 * 480 / 1e6 / (fields["field_ms_median"] / 1000)
        report["bench_field_mpx_per_s"] = round(per_field, 2)
        report["ratio_to_bench"] = round(report["analysed_mpx_per_s"] / per_field, 2)
    print(json.dumps(report, indent=2))
    return 0
