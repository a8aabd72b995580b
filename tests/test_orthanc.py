"""lisplugin and a real PACS (Orthanc) on loopback: captures in, reports back in the same study.

Orthanc runs as a subprocess with a temporary configuration (storage in tmp, free ports, no
plugins) that names lisplugin's Storage SCP as the modality "lisplugin".
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon import Daemon, free_port
from pydicom import dcmread
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    MicroscopyBulkSimpleAnnotationsStorage,
    generate_uid,
)
from report_factory import ACCESSION, result_for, smear_capture, vl_capture

from lisplugin.config import PacsSettings, Settings, StorageSettings
from lisplugin.hl7.lis_sim import LisSimulator
from lisplugin.reports.pacs import pacs_sender
from lisplugin.service.outbox import OutboxWorker
from lisplugin.service.reports import write_case_reports
from lisplugin.service.runtime import Runtime
from lisplugin.storage.orm import Case, OutboxMessage, OutboxStatus

ORTHANC_AET = "ORTHANC"
REPORT_CLASSES = {
    Comprehensive3DSRStorage,
    MicroscopyBulkSimpleAnnotationsStorage,
    EncapsulatedPDFStorage,
}


@dataclass
class Orthanc:
    """An Orthanc server and its REST API."""

    process: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, **kwargs: Any) -> Any:
        response = httpx.post(self.url + path, timeout=120, **kwargs)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> dict[str, Any]:
        return self.post(
            "/instances", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
        )

    def sop_classes(self, study: str) -> dict[str, set[str]]:
        """Modality -> SOP Class UIDs of the instances of every series of ``study``."""
        found: dict[str, set[str]] = {}
        for series in self.get(f"/studies/{study}/series"):
            modality = series["MainDicomTags"].get("Modality", "")
            for orthanc_id in series["Instances"]:
                tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
                found.setdefault(modality, set()).add(tags["SOPClassUID"])
        return found


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if binary is None:
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    return_modality_port = free_port()  # replaced by each test through the REST API
    folder = tmp_path / "orthanc"
    folder.mkdir()
    config = {
        "Name": "lisplugin-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "Plugins": [],
        "HttpPort": free_port(),
        "DicomPort": free_port(),
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "HttpTimeout": 60,
        "DicomScuTimeout": 30,
        "DicomModalities": {"lisplugin": ["LISPLUGIN", "127.0.0.1", return_modality_port]},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    log = folder / "orthanc.log"
    process = subprocess.Popen([binary, str(path)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = Orthanc(process, config["HttpPort"], config["DicomPort"], log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/system")
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc did not start: {log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _point_modality_at(orthanc: Orthanc, port: int) -> None:
    """Orthanc's modality "lisplugin" is lisplugin's Storage SCP at ``port``."""
    response = httpx.put(
        f"{orthanc.url}/modalities/lisplugin",
        json={"AET": "LISPLUGIN", "Host": "127.0.0.1", "Port": port},
        timeout=30,
    )
    response.raise_for_status()


def test_report_objects_are_stored_in_the_capture_study(orthanc: Orthanc, tmp_path: Path) -> None:
    """The outbox's dicom channel stores SR, annotations and PDF in the study of the captures."""
    first = vl_capture(tmp_path, "field-1", seed=1)
    study_uid = str(dcmread(first).StudyInstanceUID)
    captures = [first, vl_capture(tmp_path, "field-2", seed=2, study_uid=study_uid)]
    study = {orthanc.upload(p)["ParentStudy"] for p in captures}.pop()

    settings = Settings(
        storage=StorageSettings(path=tmp_path / "var"),
        pacs=PacsSettings(
            enabled=True, host="127.0.0.1", port=orthanc.dicom_port, ae_title=ORTHANC_AET
        ),
    )
    runtime = Runtime(settings)
    try:
        for path in captures:
            case = runtime.store.store(dcmread(path), path.read_bytes())
        with runtime.db.session() as session:
            row = session.get(Case, case.id)
            assert row is not None
            row.result = result_for(captures)
        write_case_reports(runtime.db, case.id, settings)
        worker = OutboxWorker(
            runtime.db,
            {"dicom": pacs_sender(settings.pacs, settings.dicom.ae_title)},
            backoff=lambda attempt: 1.0,
        )
        assert worker.run_once() == 4  # SR, 2 annotation objects, encapsulated PDF
        with runtime.db.session() as session:
            rows = session.query(OutboxMessage).filter_by(channel="dicom").all()
            assert {(m.status, m.ack_code) for m in rows} == {(OutboxStatus.DELIVERED, "0000")}
    finally:
        runtime.db.dispose()

    classes = orthanc.sop_classes(study)
    assert classes["SR"] == {Comprehensive3DSRStorage}
    assert classes["ANN"] == {MicroscopyBulkSimpleAnnotationsStorage}
    assert classes["DOC"] == {EncapsulatedPDFStorage}
    # each capture is its own series here; the reports add one series per kind of object
    assert len(orthanc.get(f"/studies/{study}")["Series"]) == len(captures) + 3


@pytest.mark.slow
def test_orthanc_forwards_captures_and_gets_reports_back(orthanc: Orthanc, tmp_path: Path) -> None:
    """PACS -> lisplugin -> PACS: Orthanc C-STOREs a study, the daemon's reports come back."""
    lis = LisSimulator(port=free_port()).start()
    daemon = Daemon(
        tmp_path / "var",
        f"sqlite:///{tmp_path / 'lisplugin.db'}",
        lis.port,
        extra_env={
            "LISPLUGIN_PACS__ENABLED": "true",
            "LISPLUGIN_PACS__HOST": "127.0.0.1",
            "LISPLUGIN_PACS__PORT": str(orthanc.dicom_port),
            "LISPLUGIN_PACS__AE_TITLE": ORTHANC_AET,
        },
    )
    daemon.start()
    try:
        _point_modality_at(orthanc, daemon.dicom_port)
        study_uid = str(generate_uid())
        captures = [smear_capture(tmp_path, seed, study_uid) for seed in (1, 2)]
        study = {orthanc.upload(p)["ParentStudy"] for p in captures}.pop()
        job = orthanc.post(
            "/modalities/lisplugin/store", json={"Resources": [study], "Synchronous": True}
        )
        assert job.get("FailedInstancesCount", 0) == 0, job

        case = daemon.wait_for_case(ACCESSION, {"review", "verified"})
        # Annotations come with cells: every trained detector finds them in these fields.
        expected = (
            REPORT_CLASSES
            if case["result"]["cells"]
            else {Comprehensive3DSRStorage, EncapsulatedPDFStorage}
        )
        deadline = time.monotonic() + 60
        while True:
            classes = orthanc.sop_classes(study)
            if set().union(*classes.values()) >= expected:
                break
            assert time.monotonic() < deadline, (classes, daemon.log_path.read_text()[-3000:])
            time.sleep(0.5)
        assert classes["SR"] == {Comprehensive3DSRStorage}
        assert classes["DOC"] == {EncapsulatedPDFStorage}
        if case["result"]["cells"]:
            assert classes["ANN"] == {MicroscopyBulkSimpleAnnotationsStorage}
        report = daemon.get(f"/api/cases/{case['id']}/reports/json")
        sent = {d["sop_instance_uid"] for d in report["documents"]}
        stored = {
            orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
            for series in orthanc.get(f"/studies/{study}/series")
            for i in series["Instances"]
        }
        assert sent <= stored
    finally:
        daemon.stop()
        lis.stop()
