"""C-STORE to ORU: the scheduler is woken by events, not by a poll, and the ORU leaves before
the reports are made.

The daemon's runtime runs with its threads (SCP, scheduler, outbox, report writer) and the real
models; a synthetic field goes in with pynetdicom's C-STORE and the ORU comes out at the LIS
simulator. The scheduler's safety wait is 60 s: a result that arrives within seconds was
brought by a wake-up or by the case's own stability deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import c_store
from PIL import Image
from review_support import free_port

from lisplugin.config import Settings
from lisplugin.dicom.scu import wrap_image_as_vl_microscopic
from lisplugin.hl7.lis_sim import LisSimulator
from lisplugin.service import cases
from lisplugin.service.reports import reports_dir
from lisplugin.service.runtime import Runtime
from lisplugin.synthetic import synthetic_field


@pytest.fixture
def lis() -> Iterator[LisSimulator]:
    with LisSimulator(port=free_port()) as simulator:
        yield simulator


def capture(folder: Path, seed: int, accession: str) -> pydicom.Dataset:
    folder.mkdir(parents=True, exist_ok=True)
    image, _ = synthetic_field(seed)
    png = folder / f"{seed}.png"
    Image.fromarray(image).save(png)
    ds = wrap_image_as_vl_microscopic(png, patient_id="PLAT", accession=accession)
    path = folder / f"{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def runtime_for(tmp_path: Path, lis: LisSimulator, stable_seconds: float) -> Runtime:
    settings = Settings(
        storage={"path": tmp_path / "var"},
        dicom={"host": "127.0.0.1", "port": free_port()},
        hl7={
            "listen_host": "127.0.0.1",
            "listen_port": free_port(),
            "lis_host": "127.0.0.1",
            "lis_port": lis.port,
        },
        cases={"stable_seconds": stable_seconds},
    )
    return Runtime(settings)


def store_and_wait(runtime: Runtime, lis: LisSimulator, ds: pydicom.Dataset) -> float:
    """Seconds from sending the C-STORE to the ORU at the LIS."""
    count = len(lis.received)
    started = time.perf_counter()
    assert c_store(runtime.settings.dicom.port, ds).Status == 0
    assert lis.wait_for(count + 1, timeout=30), "no ORU within 30 s"
    return time.perf_counter() - started


def test_c_store_wakes_the_scheduler_and_the_oru_does_not_wait_for_reports(
    tmp_path: Path, lis: LisSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = runtime_for(tmp_path, lis, stable_seconds=0.0)
    released = threading.Event()
    real_write = cases.write_case_reports

    def held_reports(*args: object) -> list[Path]:
        assert released.wait(60), "the reports were never released"
        return real_write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cases, "write_case_reports", held_reports)
    runtime.start()
    try:
        first = store_and_wait(runtime, lis, capture(tmp_path / "in", 1, "LAT1"))
        assert first < 10, f"ORU after {first:.2f} s: the reports held it, or nothing woke"
        released.set()
        latencies = [
            store_and_wait(runtime, lis, capture(tmp_path / "in", 1 + n, f"LAT{1 + n}"))
            for n in range(1, 4)
        ]
        print(f"C-STORE -> ORU, 1 field, stable 0 s: {[round(s, 3) for s in latencies]} s")
        # No poll: each is analysis time; a 1 s poll alone would average 0.5 s on top
        assert float(np.median(latencies)) < 5
        deadline = time.monotonic() + 30
        while not (reports_dir(runtime.settings, 1) / "report.json").is_file():
            assert time.monotonic() < deadline, "reports of the first case never written"
            time.sleep(0.1)
    finally:
        released.set()
        runtime.stop()


def test_a_receiving_case_is_analysed_at_its_stability_deadline(
    tmp_path: Path, lis: LisSimulator
) -> None:
    runtime = runtime_for(tmp_path, lis, stable_seconds=1.5)
    runtime.start()
    try:
        elapsed = store_and_wait(runtime, lis, capture(tmp_path / "in", 7, "LATS"))
    finally:
        runtime.stop()
    assert 1.5 <= elapsed < 10, f"ORU after {elapsed:.2f} s with 1.5 stable seconds"
    waiting = runtime.scheduler.seconds_to_next_event()
    assert waiting is None or waiting > 1  # nothing receiving: no busy loop
