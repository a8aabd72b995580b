"""``lisplugin bench worklist``: the review station with many cases waiting.

Fills a fresh database with ``--cases`` analysed cases held for review, each with a result of
``--fields`` fields and their cells with outlines (about 10 kB per field, as the daemon stores
them), then serves the app on a loopback port and times the worklist page and API, and the
case list. Memory is the process's peak RSS while serving (models loaded, as in the daemon).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lisplugin.config import Settings
from lisplugin.core.types import LEUKOCYTE_CLASSES
from lisplugin.progress import progress
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus

#: Cells per field and outline points per cell of the generated results.
CELLS_PER_FIELD = 20
OUTLINE_POINTS = 36


def review_result(fields: int, seed: int = 0) -> dict[str, Any]:
    """A specimen result as ``specimen_to_json`` makes it, held for review."""
    rng = np.random.default_rng(seed)
    cells: list[dict[str, Any]] = []
    angles = np.linspace(0, 2 * math.pi, OUTLINE_POINTS, endpoint=False)
    for index in range(fields):
        for _ in range(CELLS_PER_FIELD):
            x, y = (float(v) for v in rng.uniform(40, 600, 2))
            kind = "WBC" if rng.random() < 0.2 else "RBC"
            label = str(rng.choice(LEUKOCYTE_CLASSES[:5])) if kind == "WBC" else kind
            cells.append(
                {
                    "id": len(cells),
                    "field": index,
                    "kind": kind,
                    "class": label,
                    "score": 0.9,
                    "box": [x - 20, y - 20, x + 20, y + 20],
                    "outline": [
                        [round(x + 20 * math.cos(a), 1), round(y + 20 * math.sin(a), 1)]
                        for a in angles
                    ],
                    "probabilities": {c: round(1 / 7, 4) for c in LEUKOCYTE_CLASSES}
                    if kind == "WBC"
                    else None,
                }
            )
    wbc = sum(c["kind"] == "WBC" for c in cells)
    return {
        "counts": {"RBC": len(cells) - wbc, "WBC": wbc, "PLT": 0},
        "differential": {"neutrophil": 60.0, "lymphocyte": 40.0},
        "class_counts": {"neutrophil": wbc},
        "wbc_classified": wbc,
        "needs_review": True,
        "flags": [
            {"code": "LOW_COUNT", "text": "fewer than 100 leukocytes", "severity": "review"},
            {"code": "NOTE", "text": "informative", "severity": "info"},
        ],
        "fields": [
            {
                "index": i,
                "source": f"1.2.3.{i}",
                "width": 640,
                "height": 480,
                "quality": {
                    "focus": 120.0,
                    "exposure": 0.7,
                    "clipped_fraction": 0.0,
                    "passed": True,
                    "reasons": [],
                },
                "regressed_counts": None,
                "cells": CELLS_PER_FIELD,
            }
            for i in range(fields)
        ],
        "cells": cells,
        "model_versions": {"detector": "bench", "classifier": "bench"},
    }


def seed_waiting_cases(db: Database, cases: int, fields: int, stat_every: int = 10) -> None:
    """``cases`` cases in review, one in ``stat_every`` STAT, waiting from oldest to newest."""
    result = review_result(fields)
    start = datetime.now(UTC) - timedelta(hours=cases)
    for first in progress(range(0, cases, 100), desc="seeding cases", unit="x100"):
        with db.session() as session:
            for n in range(first, min(first + 100, cases)):
                session.add(
                    Case(
                        case_key=f"acc:BENCH{n:06d}",
                        accession_number=f"BENCH{n:06d}",
                        status=CaseStatus.REVIEW,
                        patient={"id": f"P{n}", "name_family": "Bench", "name_given": str(n)},
                        order={"priority": "S" if n % stat_every == 0 else "R"},
                        result=result,
                        analysed_at=start + timedelta(hours=n),
                    )
                )


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lisplugin bench worklist", description=__doc__)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--fields", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="timed requests of each kind")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.cases, args.fields, args.rounds), indent=2))
    return 0


def measure(cases: int, fields: int, rounds: int) -> dict[str, Any]:
    """Seed, serve on loopback, sign in, and time each list ``rounds`` times (median)."""
    import socket
    import threading

    import uvicorn

    from lisplugin.http.app import create_app
    from lisplugin.service import users
    from lisplugin.service.runtime import Runtime
    from lisplugin.storage.orm_review import Role, User

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(storage={"path": Path(folder)})
        runtime = Runtime(settings)
        started = time.perf_counter()
        seed_waiting_cases(runtime.db, cases, fields)
        seed_s = time.perf_counter() - started
        with runtime.db.session() as session:
            session.add(
                User(username="bench", password_hash=users.hash_password("bench"), role=Role.ADMIN)
            )
        runtime.pipeline()  # the daemon holds its models
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        server = uvicorn.Server(
            uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
        rss_before = _vm_kb("VmRSS")
        timings: dict[str, float] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            client.post("/api/session", json={"username": "bench", "password": "bench"})
            for name, path in (
                ("worklist_page_s", "/worklist"),
                ("worklist_api_s", "/api/worklist"),
                ("case_list_s", "/api/cases?limit=100"),
            ):
                times = []
                for _ in progress(range(rounds), desc=name, unit="request"):
                    t0 = time.perf_counter()
                    client.get(path).raise_for_status()
                    times.append(time.perf_counter() - t0)
                timings[name] = round(float(np.median(times)), 4)
            total = client.get("/api/worklist?limit=1").headers["X-Total-Count"]
        server.should_exit = True
        thread.join(timeout=10)
        runtime.db.dispose()
        return {
            "cases_waiting": int(total),
            "fields_per_case": fields,
            "result_kb_per_case": round(len(json.dumps(review_result(fields))) / 1024, 1),
            "seed_s": round(seed_s, 1),
            **timings,
            "rss_mb_before_requests": round(rss_before / 1024, 1),
            "peak_rss_mb_serving": round(_vm_kb("VmHWM") / 1024, 1),
        }
