"""Rule-based auto-verification end to end: `lisplugin serve`, the LIS simulator, real sockets.

A case that passes every rule goes to the LIS as final (``F``) with nobody touching it; a case
that fails a rule goes as preliminary (``P``) with the reasons in NTE segments, and waits on
the worklist. The passing run uses a site configuration (``LISPLUGIN_CONFIG_DIR``) whose rules
the synthetic capture passes whatever models are installed: field quality control, and the
reference intervals as information only. The failing run uses the shipped rules, whose
minimum of 100 classified leukocytes a single smear field never reaches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import hl7
import pytest
import yaml
from daemon import Daemon, free_port
from pydicom.uid import generate_uid
from review_support import obx_values

from lisplugin.config import DEFAULT_CONFIG_DIR
from lisplugin.dicom.scu import send, wrap_image_as_vl_microscopic
from lisplugin.hl7.lis_sim import LisSimulator, build_test_order
from lisplugin.hl7.mllp import send_message
from lisplugin.synthetic import save_synthetic

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

PASSING_RULES = {
    "rules": [
        {
            "code": "FIELD_QC",
            "kind": "field_quality",
            "severity": "review",
            "description": "A field failed quality control and was not counted",
            "max_failed_fields": 0,
        },
        {
            "code": "REF_RANGE",
            "kind": "reference_range",
            "severity": "info",
            "description": "A differential value lies outside the reference interval",
        },
    ]
}


@pytest.fixture
def lis() -> LisSimulator:
    simulator = LisSimulator(port=free_port()).start()
    yield simulator
    simulator.stop()


def run_case(daemon: Daemon, lis: LisSimulator, folder: Path, accession: str) -> tuple[str, dict]:
    """Order, capture, wait: the ORU the LIS received and the case as the API shows it."""
    order = build_test_order(
        accession=accession, patient_id=f"P{accession}", birth_date="19700101", sex="M"
    )
    assert send_message("127.0.0.1", daemon.hl7_port, order, timeout=10).code == "AA"
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = folder / f"{accession}.jpg"
    save_synthetic(jpeg, seed=41)
    ds = wrap_image_as_vl_microscopic(
        jpeg, patient_id=f"P{accession}", accession=accession, study_uid=generate_uid()
    )
    path = folder / f"{accession}.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert all(r.ok for r in send([path], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))
    assert lis.wait_for(1, timeout=120), daemon.log_path.read_text()[-2000:]
    (oru,) = [m for m in lis.received if "ORU^R01" in m and accession in m]
    case = daemon.wait_for_case(accession, {"review", "verified"})
    return oru, case


def notes(oru: str) -> list[str]:
    return [str(s[3]) for s in hl7.parse(oru.replace("\n", "\r")) if str(s[0]) == "NTE"]


def test_a_case_that_passes_every_rule_goes_out_final_untouched(
    tmp_path: Path, database_url: str, lis: LisSimulator
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    for name in ("loinc.yaml", "reference-ranges.yaml"):
        shutil.copy(DEFAULT_CONFIG_DIR / name, config / name)
    (config / "rules.yaml").write_text(yaml.safe_dump(PASSING_RULES))
    daemon = Daemon(
        tmp_path / "var", database_url, lis.port, extra_env={"LISPLUGIN_CONFIG_DIR": str(config)}
    )
    daemon.start()
    try:
        oru, case = run_case(daemon, lis, tmp_path / "in", "ACC5001")
        assert case["status"] == "verified"
        assert not case["result"]["needs_review"]
        assert {status for _, status in obx_values(oru).values()} == {"F"}
        assert str(hl7.parse(oru.replace("\n", "\r")).segment("OBR")[25]) == "F"
        assert all("(info)" in note for note in notes(oru))  # information only, nothing held
        assert len(notes(oru)) == len(case["result"]["flags"])
        assert case["messages"][0]["result_status"] == "F"
        assert daemon.get(f"/api/cases/{case['id']}/audit") == []  # no human action
        assert daemon.get("/api/worklist") == []
    finally:
        daemon.stop()


def test_a_case_that_fails_a_rule_goes_out_preliminary_with_the_reasons(
    tmp_path: Path, database_url: str, lis: LisSimulator
) -> None:
    daemon = Daemon(tmp_path / "var", database_url, lis.port)
    daemon.start()
    try:
        oru, case = run_case(daemon, lis, tmp_path / "in", "ACC5002")
        assert case["status"] == "review"
        assert {status for _, status in obx_values(oru).values()} == {"P"}
        assert str(hl7.parse(oru.replace("\n", "\r")).segment("OBR")[25]) == "P"
        flags = case["result"]["flags"]
        assert [note.split(" ", 1)[0] for note in notes(oru)] == [f["code"] for f in flags]
        few = next(note for note in notes(oru) if note.startswith("WBC_FEW"))
        assert "(review)" in few and "minimum 100" in few
        (entry,) = daemon.get("/api/worklist")
        assert entry["id"] == case["id"]
        assert "WBC_FEW" in [r["code"] for r in entry["reasons"]]
    finally:
        daemon.stop()
