"""``lisplugin bench``: how long one 640 x 480 field takes on this machine, end to end.

Each timed field is JPEG bytes in memory -> decode -> quality control -> detection -> every
leukocyte cropped and classified -> count regression; the specimen's aggregation (rules
included) is timed once over all fields. Fields are synthetic smears JPEG-encoded at quality
90 (:mod:`lisplugin.synthetic`) unless real images are given. One untimed field first warms
the ONNX sessions up.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lisplugin.config import load_settings
from lisplugin.core.analysis import aggregate, analyse_field
from lisplugin.core.rules import parse_rules
from lisplugin.core.types import Field, FieldResult, LeukocyteClassifier
from lisplugin.progress import progress
from lisplugin.service.models import load_models
from lisplugin.synthetic import synthetic_field

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class TimedClassifier:
    """Passes crops to a classifier and keeps the time it took and the number of crops."""

    def __init__(self, inner: LeukocyteClassifier) -> None:
        self.inner = inner
        self.version = inner.version
        self.classes = inner.classes
        self.seconds = 0.0
        self.cells = 0

    def classify(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> np.ndarray:
        started = time.perf_counter()
        probabilities = self.inner.classify(crops, nucleus)
        self.seconds += time.perf_counter() - started
        self.cells += len(crops)
        return probabilities


def synthetic_jpegs(count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    out = []
    for i in range(count):
        image, _ = synthetic_field(seed + i)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def image_files(paths: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_bench(
    settings_path: Path | None, images: Sequence[bytes], models_dir: Path | None
) -> dict[str, Any]:
    """Time the analysis of ``images`` (encoded image files); the first is the warm-up."""
    settings = load_settings(settings_path)
    if models_dir is not None:
        settings.analysis.models_dir = models_dir
    detector, classifier = load_models(settings)
    timed = TimedClassifier(classifier)
    rules = parse_rules(settings.load_yaml("rules.yaml"), settings.analysis)

    def one(index: int, data: bytes) -> FieldResult:
        with Image.open(io.BytesIO(data)) as img:
            image = np.asarray(img.convert("RGB"))
        return analyse_field(
            index, Field(image, f"bench#{index}"), detector, timed, settings.analysis
        )

    one(0, images[0])
    timed.seconds, timed.cells = 0.0, 0
    results, field_ms, field_cpu_ms = [], [], []
    for index, data in enumerate(progress(images[1:], desc="fields", unit="field")):
        started, cpu = time.perf_counter(), time.process_time()
        results.append(one(index, data))
        field_ms.append((time.perf_counter() - started) * 1000.0)
        field_cpu_ms.append((time.process_time() - cpu) * 1000.0)
    started = time.perf_counter()
    versions = {"detector": detector.version, "classifier": classifier.version}
    specimen = aggregate(results, settings.analysis, versions, rules)
    aggregate_ms = (time.perf_counter() - started) * 1000.0
    return {
        "fields": len(results),
        "field_ms_median": round(float(np.median(field_ms)), 1),
        "field_ms_p95": round(float(np.percentile(field_ms, 95)), 1),
        # CPU seconds of every thread of the process (ONNX Runtime's included): on a shared,
        # busy machine wall time mostly measures the wait for a core, this does not.
        "field_cpu_ms_median": round(float(np.median(field_cpu_ms)), 1),
        "cell_classify_ms": round(timed.seconds * 1000.0 / timed.cells, 2) if timed.cells else None,
        "aggregate_ms": round(aggregate_ms, 2),
        "wbc_per_field": round(specimen.counts["WBC"] / len(results), 2),
        "fields_failing_qc": sum(not r.quality.passed for r in results),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "model_versions": versions,
    }


#: ``lisplugin bench MODE``: modes with their own module and arguments.
MODES = {
    "worklist": "lisplugin.evaluation.bench_worklist",
    "ingest": "lisplugin.evaluation.bench_ingest",
    "slide": "lisplugin.evaluation.bench_slide",
    "saliency": "lisplugin.evaluation.bench_saliency",
}


def cli(argv: list[str]) -> int:
    if argv and argv[0] in MODES:
        return int(importlib.import_module(MODES[argv[0]]).cli(argv[1:]) or 0)
    parser = argparse.ArgumentParser(
        prog="lisplugin bench",
        description=__doc__,
        epilog="other modes: lisplugin bench ingest | slide | worklist | saliency --help",
    )
    parser.add_argument("--fields", type=int, default=30, help="timed fields (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--models", type=Path, help="models folder (default: settings)")
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="real image file or folder, repeatable; fields cycle through them",
    )
    parser.add_argument("--config", type=Path, help="site settings YAML")
    parser.add_argument("--seed", type=int, default=0, help="first synthetic seed")
    args = parser.parse_args(argv)
    if args.fields < 1:
        parser.error("--fields must be at least 1")
    if args.image:
        files = image_files(args.image)
        if not files:
            parser.error("no image files in the given paths")
        images = [files[i % len(files)].read_bytes() for i in range(args.fields + 1)]
        source = f"{len(files)} image file(s)"
    else:
        images = synthetic_jpegs(args.fields + 1, args.seed)
        source = "synthetic fields (JPEG q90)"
    report = {"source": source, **run_bench(args.config, images, args.models)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    versions = report.pop("model_versions")
    for key, value in report.items():
        print(f"{key:<18}{value}")
    print(f"{'models':<18}detector {versions['detector']}, classifier {versions['classifier']}")
    return 0
