"""The daemon end to end, over real sockets with real peers.

`lisplugin serve` runs as a subprocess; DCMTK's storescu and pynetdicom send captures, python-hl7's
MLLP client sends the order, the LIS simulator receives the ORU, hl7apy validates it strictly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import hl7
import jsonschema
import pytest
import yaml
from daemon import Daemon, free_port
from dicom_factory import dcmtk
from hl7.client import MLLPClient
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from report_factory import smear_capture

from lisplugin.config import DEFAULT_CONFIG_DIR
from lisplugin.dicom.scu import send
from lisplugin.hl7.lis_sim import LisSimulator, build_test_order

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def send_order(port: int, message: str) -> hl7.Message:
    with MLLPClient("127.0.0.1", port) as client:
        return hl7.parse(client.send_message(message))


def oru_messages(lis: LisSimulator, accession: str) -> list[str]:
    return [m for m in lis.received if "ORU^R01" in m and accession in m]


def obx_values(message: str) -> dict[str, tuple[str, str, str, str]]:
    """OBX-3 code -> (OBX-5 value, OBX-7 range, OBX-8 flag, OBX-11 status)."""
    parsed = hl7.parse(message.replace("\n", "\r"))
    return {
        str(obx[3][0][0]): (str(obx[5]), str(obx[7]), str(obx[8]), str(obx[11]))
        for obx in parsed.segments("OBX")
    }


def expected_values(report: dict) -> dict[str, float]:
    """What `lisplugin analyze --json` reports, keyed by LOINC/local code as in the ORU."""
    loinc = yaml.safe_load((DEFAULT_CONFIG_DIR / "loinc.yaml").read_text())["results"]
    keys: dict[str, float] = {
        "wbc_classified": report["wbc_classified"],
        "rbc_counted": report["counts"]["RBC"],
        "wbc_counted": report["counts"]["WBC"],
        "plt_counted": report["counts"]["PLT"],
    }
    for cls, percent in report["differential"].items():
        key = "erythroblast_per_100wbc" if cls == "erythroblast" else f"{cls}_pct"
        keys[key] = round(percent, 1)
    return {loinc[k]["code"]: v for k, v in keys.items() if k in loinc}


@pytest.fixture
def lis() -> LisSimulator:
    simulator = LisSimulator(port=free_port()).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def daemon(tmp_path: Path, database_url: str, lis: LisSimulator) -> Daemon:
    process = Daemon(tmp_path / "var", database_url, lis.port)
    process.start()
    yield process
    process.stop()


def test_order_and_captures_to_validated_oru(
    daemon: Daemon, lis: LisSimulator, tmp_path: Path
) -> None:
    accession, patient_id = "ACC1001", "PAT1001"
    ack = send_order(
        daemon.hl7_port,
        build_test_order(
            accession=accession,
            patient_id=patient_id,
            family="Doe",
            given="Jane",
            birth_date="19800101",
            sex="F",
        ),
    )
    assert str(ack.segment("MSA")[1]) == "AA"

    study = generate_uid()
    first = smear_capture(tmp_path / "in", 1, study, accession=accession, patient_id=patient_id)
    second = smear_capture(tmp_path / "in", 2, study, accession=accession, patient_id=patient_id)
    storescu = dcmtk("storescu")
    if storescu is None:
        pytest.skip("DCMTK storescu not installed (apt-get install dcmtk)")
    subprocess.run(
        [storescu, "-xy", "-aec", "LISPLUGIN", "127.0.0.1", str(daemon.dicom_port), str(first)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert all(r.ok for r in send([second], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))

    assert lis.wait_for(1, timeout=120), daemon.log_path.read_text()[-2000:]
    (oru,) = oru_messages(lis, accession)
    parsed = parse_message(
        oru.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    parsed.validate()
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"

    analyze = subprocess.run(
        [sys.executable, "-m", "lisplugin", "analyze", str(first), str(second), "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(analyze.stdout)
    schema = json.loads((REPO / "interfaces/schemas/specimen-result.schema.json").read_text())
    jsonschema.validate(report, schema)
    observed = obx_values(oru)
    expected = expected_values(report)
    assert set(expected) <= set(observed)
    for code, value in expected.items():
        assert float(observed[code][0]) == pytest.approx(value), code
    status = "P" if report["needs_review"] else "F"
    assert {v[3] for v in observed.values()} == {status}
    notes = [s for s in oru.split("\r") if s.startswith("NTE")]
    assert len(notes) == len(report["flags"])

    case = daemon.wait_for_case(accession, {"review", "verified"})
    assert case["patient"]["id"] == patient_id
    assert len(case["result"]["fields"]) == 2
    assert case["messages"][0]["status"] == "delivered"


def test_bad_input_is_refused_clearly_and_loses_nothing(
    daemon: Daemon, lis: LisSimulator, tmp_path: Path
) -> None:
    # HL7: an order without a patient id (AE/AR + ERR), and something that is no HL7 at all.
    order = build_test_order(accession="ACC2001", patient_id="PAT2001")
    broken = "\r".join(s for s in order.split("\r") if not s.startswith("PID"))
    ack = send_order(daemon.hl7_port, broken)
    assert str(ack.segment("MSA")[1]) in ("AE", "AR")
    assert str(ack.segment("ERR")[8]) or str(ack.segment("ERR")[3])
    ack = send_order(daemon.hl7_port, "hello, this is not HL7")
    assert str(ack.segment("MSA")[1]) == "AR"

    # DICOM: an unsupported SOP class is refused at association negotiation ...
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="LISPLUGIN")
    if assoc.is_established:
        assert not [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
        assoc.release()

    # ... an instance without pixel data gets a failure status with a reason, kept in quarantine.
    good = smear_capture(
        tmp_path / "in", 3, generate_uid(), accession="ACC2002", patient_id="PAT2002"
    )
    from pydicom import dcmread

    ds = dcmread(good)
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    empty = tmp_path / "in" / "no-pixels.dcm"
    ds.save_as(empty, enforce_file_format=True)
    (refused,) = send([empty], "127.0.0.1", daemon.dicom_port, "LISPLUGIN")
    assert refused.status is not None and refused.status & 0xF000 in (0xA000, 0xC000)
    assert "pixel" in refused.comment.lower()
    quarantined = list((daemon.storage / "quarantine").glob("*.dcm"))
    assert len(quarantined) == 1
    assert "pixel" in json.loads(quarantined[0].with_suffix(".json").read_text())["reason"].lower()

    # The daemon is still serving, and the good capture goes all the way to the LIS.
    assert all(r.ok for r in send([good], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))
    assert lis.wait_for(1, timeout=120)
    assert len(oru_messages(lis, "ACC2002")) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_restart_while_queued_posts_exactly_once(
    tmp_path: Path, database_url: str, lis: LisSimulator
) -> None:
    daemon = Daemon(
        tmp_path / "var", database_url, lis.port, extra_env={"LISPLUGIN_CASES__STABLE_SECONDS": "3"}
    )
    daemon.start()
    try:
        path = smear_capture(
            tmp_path / "in", 4, generate_uid(), accession="ACC3001", patient_id="PAT3001"
        )
        assert all(r.ok for r in send([path], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))
        daemon.kill()  # before the case was stable: it is waiting in the database
        assert not lis.received
        daemon.start()
        assert lis.wait_for(1, timeout=120), daemon.log_path.read_text()[-2000:]
        daemon.stop()  # and once more, after the result went out
        daemon.start()
        time.sleep(5)
        assert len(oru_messages(lis, "ACC3001")) == 1
    finally:
        daemon.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_lis_outage_delivers_every_result_once_it_is_back(
    tmp_path: Path, database_url: str
) -> None:
    lis_port = free_port()
    daemon = Daemon(tmp_path / "var", database_url, lis_port)
    daemon.start()
    try:
        accessions = ["ACC4001", "ACC4002"]
        for seed, accession in enumerate(accessions, start=5):
            path = smear_capture(
                tmp_path / "in", seed, generate_uid(), accession=accession, patient_id=f"P{seed}"
            )
            assert all(r.ok for r in send([path], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))
        for accession in accessions:  # analysed, but the LIS is down: the ORU waits, retried
            deadline = time.monotonic() + 120
            while True:
                case = daemon.wait_for_case(accession, {"review", "verified"})
                if case["messages"] and case["messages"][0]["attempts"] >= 2:
                    break
                assert time.monotonic() < deadline, case
                time.sleep(0.5)
            assert case["messages"][0]["status"] == "pending"
        daemon.stop()  # a restart during the outage keeps the outbox
        daemon.start()
        lis = LisSimulator(port=lis_port).start()
        try:
            assert lis.wait_for(2, timeout=60)
            time.sleep(4)
            control_ids = [str(hl7.parse(m).segment("MSH")[10]) for m in lis.received]
            assert len(control_ids) == 2
            assert len(set(control_ids)) == 2
            for accession in accessions:
                assert len(oru_messages(lis, accession)) == 1
        finally:
            lis.stop()
    finally:
        daemon.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_lis_error_answer_is_recorded_with_its_text(tmp_path: Path, database_url: str) -> None:
    """AE is the LIS refusing the content: recorded with the LIS's error text, not resent."""
    lis = LisSimulator(port=free_port(), fail_first=1).start()
    daemon = Daemon(tmp_path / "var", database_url, lis.port)
    daemon.start()
    try:
        path = smear_capture(
            tmp_path / "in", 9, generate_uid(), accession="ACC5001", patient_id="PAT5001"
        )
        assert all(r.ok for r in send([path], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))
        deadline = time.monotonic() + 120
        while True:
            case = daemon.wait_for_case("ACC5001", {"review", "verified"})
            if case["messages"] and case["messages"][0]["status"] != "pending":
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        message = case["messages"][0]
        assert (message["status"], message["ack_code"]) == ("rejected", "AE")
        assert message["last_error"]
        time.sleep(3)
        assert len(oru_messages(lis, "ACC5001")) == 1
    finally:
        daemon.stop()
        lis.stop()
