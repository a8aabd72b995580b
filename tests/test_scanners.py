"""Scanners reach lisplugin the standard ways: Modality Worklist (DCMTK findscu) and STOW-RS."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicom_factory import dcmtk
from dicomweb_client import DICOMwebClient
from hl7.client import MLLPClient
from pydicom.uid import CTImageStorage, generate_uid
from report_factory import smear_capture

from lisplugin.dicom.scu import send
from lisplugin.hl7.lis_sim import LisSimulator, build_test_order
from tests.daemon import Daemon, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def lis() -> LisSimulator:
    simulator = LisSimulator(port=free_port()).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def daemon(tmp_path: Path, lis: LisSimulator) -> Daemon:
    process = Daemon(tmp_path / "var", "", lis.port)
    process.start()
    yield process
    process.stop()


def order(daemon: Daemon, **fields: str) -> None:
    with MLLPClient("127.0.0.1", daemon.hl7_port) as client:
        ack = client.send_message(build_test_order(**fields))
    text = ack.decode() if isinstance(ack, bytes) else str(ack)
    assert "MSA|AA" in text, text


def findscu(daemon: Daemon, out: Path, *keys: str) -> list[pydicom.Dataset]:
    tool = dcmtk("findscu")
    if tool is None:
        pytest.skip("DCMTK findscu not installed (apt-get install dcmtk)")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [tool, "-W", "-aet", "SCOPE1", "-aec", "LISPLUGIN", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(
        [*args, "127.0.0.1", str(daemon.dicom_port)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


WORKLIST_KEYS = (
    "(0008,0005)=ISO_IR 192",
    "(0008,0050)",  # Accession Number
    "(0010,0010)",  # Patient's Name
    "(0010,0020)",  # Patient ID
    "(0010,0030)",  # Patient's Birth Date
    "(0020,000D)",  # Study Instance UID
    "(0032,1060)",  # Requested Procedure Description
    "(0040,1001)",  # Requested Procedure ID
    "(0040,0100)[0].(0008,0060)=SM",  # Scheduled Procedure Step: Modality
    "(0040,0100)[0].(0040,0002)",  # Scheduled Procedure Step Start Date
    "(0040,0100)[0].(0040,0009)",  # Scheduled Procedure Step ID
)


def test_worklist_answers_findscu_with_orders_from_hl7(daemon: Daemon, tmp_path: Path) -> None:
    order(
        daemon,
        accession="MWL1001",
        patient_id="P1001",
        family="Müller",
        given="Zoë",
        birth_date="19700203",
        sex="F",
    )
    order(
        daemon,
        accession="MWL1002",
        patient_id="P1002",
        family="Smith",
        given="Ann",
        birth_date="19800101",
        sex="F",
    )
    order(daemon, accession="MWL1003", patient_id="P1003", family="Gone", given="Bob")
    order(daemon, accession="MWL1003", patient_id="P1003", order_control="CA")

    everything = findscu(daemon, tmp_path / "all", *WORKLIST_KEYS)
    assert sorted(ds.AccessionNumber for ds in everything) == ["MWL1001", "MWL1002"]

    (mueller,) = findscu(
        daemon, tmp_path / "name", *WORKLIST_KEYS[:2], "(0010,0010)=MÜLL*", *WORKLIST_KEYS[3:]
    )
    assert mueller.SpecificCharacterSet == "ISO_IR 192"
    assert str(mueller.PatientName) == "Müller^Zoë"
    assert mueller.PatientID == "P1001" and mueller.PatientBirthDate == "19700203"
    assert mueller.RequestedProcedureDescription.startswith("Differential panel")
    step = mueller.ScheduledProcedureStepSequence[0]
    assert step.Modality == "SM" and step.ScheduledProcedureStepID == "MWL1001"
    assert len(step.ScheduledProcedureStepStartDate) == 8

    none = findscu(daemon, tmp_path / "none", *WORKLIST_KEYS, "(0010,0020)=NOBODY")
    assert none == []
    wrong_modality = [k.replace("=SM", "=CT") for k in WORKLIST_KEYS]
    assert findscu(daemon, tmp_path / "ct", *wrong_modality) == []

    # The scanner fills the capture from the worklist item: it meets its order, is analysed,
    # and the order leaves the worklist.
    capture = smear_capture(
        tmp_path / "in",
        1,
        str(mueller.StudyInstanceUID),
        accession=mueller.AccessionNumber,
        patient_id=mueller.PatientID,
    )
    assert all(r.ok for r in send([capture], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))
    case = daemon.wait_for_case("MWL1001", {"review", "verified"})
    assert case["study_instance_uid"] == mueller.StudyInstanceUID
    assert case["order"]["patient_family_name"] == "Müller"
    left = findscu(daemon, tmp_path / "after", *WORKLIST_KEYS)
    assert [ds.AccessionNumber for ds in left] == ["MWL1002"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the malformed UID on purpose
def test_stow_rs_through_the_same_ingest_with_dicomweb_client(
    tmp_path: Path, lis: LisSimulator
) -> None:
    daemon = Daemon(tmp_path / "var", "", lis.port)
    daemon.extra_env.update({"LISPLUGIN_HTTP__MAX_STOW_MB": "4"})
    daemon.start()
    try:
        client = DICOMwebClient(
            url=f"{daemon.api}/dicomweb", headers={"Authorization": f"Bearer {daemon.token}"}
        )
        study = generate_uid()
        captures = [
            pydicom.dcmread(
                smear_capture(tmp_path / "in", seed, study, accession="STOW1", patient_id="P-STOW")
            )
            for seed in (1, 2)
        ]
        answer = client.store_instances(captures)
        stored = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
        assert stored == {str(ds.SOPInstanceUID) for ds in captures}
        assert "FailedSOPSequence" not in answer
        case = daemon.wait_for_case("STOW1", {"review", "verified"})
        assert case["instances"] == 2 and case["study_instance_uid"] == study

        # A class the C-STORE SCP refuses is refused here too; the rest of the request is kept.
        ct = pydicom.dcmread(smear_capture(tmp_path / "in", 3, study, accession="STOW2"))
        ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
        good = pydicom.dcmread(smear_capture(tmp_path / "in", 4, study, accession="STOW2"))
        mixed = client.store_instances([ct, good])
        (failed,) = mixed.FailedSOPSequence
        assert failed.ReferencedSOPInstanceUID == ct.SOPInstanceUID
        assert failed.FailureReason == 0x0122
        assert [i.ReferencedSOPInstanceUID for i in mixed.ReferencedSOPSequence] == [
            good.SOPInstanceUID
        ]
        # Unidentifiable: quarantined with the C-STORE status, as the SCP does.
        broken = pydicom.dcmread(smear_capture(tmp_path / "in", 5, study, accession="STOW3"))
        broken.SOPInstanceUID = "not a uid"
        with pytest.raises(requests.HTTPError) as refused:
            client.store_instances([broken])
        assert refused.value.response.status_code == 409
        (item,) = pydicom.Dataset.from_json(refused.value.response.json()).FailedSOPSequence
        assert item.FailureReason == 0xA900
        assert len(list((tmp_path / "var" / "quarantine").glob("*.dcm"))) == 1

        url = f"{daemon.api}/dicomweb/studies"
        multipart = 'multipart/related; type="application/dicom"; boundary=XX'
        assert httpx.post(url, content=b"x", headers={"Content-Type": multipart}).status_code == 401
        auth = {"Authorization": f"Bearer {daemon.token}"}
        too_big = httpx.post(
            url, content=b"x" * (5 * 2**20), headers={**auth, "Content-Type": multipart}, timeout=30
        )
        assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
        wrong = httpx.post(url, content=b"{}", headers={**auth, "Content-Type": "application/json"})
        assert wrong.status_code == 415
        metrics = httpx.get(f"{daemon.api}/metrics").text
        assert 'lisplugin_instances_received_total{outcome="stored"} 3.0' in metrics
        assert 'lisplugin_instances_received_total{outcome="quarantined"} 1.0' in metrics
    finally:
        daemon.stop()
