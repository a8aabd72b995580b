"""Ingest over a real association: durable storage, quarantine, cases keyed by accession/study.

Runs on SQLite and PostgreSQL (the ``database_url`` fixture).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dicom_factory import SCP_AET, c_store, instance, smear
from pydicom import dcmread
from sqlalchemy import select

from lisplugin.config import DicomSettings
from lisplugin.dicom.scp import CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS, StorageSCP
from lisplugin.hl7.lis_sim import build_test_order
from lisplugin.hl7.orders import parse_order
from lisplugin.service.ingest import InstanceStore, apply_order
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus, Instance, QuarantinedInstance


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> InstanceStore:
    db = Database(database_url)
    db.migrate()
    yield InstanceStore(db, tmp_path / "var")
    db.dispose()


@pytest.fixture
def scp(store: InstanceStore) -> StorageSCP:
    server = StorageSCP(
        DicomSettings(ae_title=SCP_AET, host="127.0.0.1", port=0), store.store, store.quarantine
    )
    server.start()
    yield server
    server.stop()


def test_stored_instance_is_on_disk_and_in_its_case(scp: StorageSCP, store: InstanceStore) -> None:
    ds = instance(smear())
    assert c_store(scp.port, ds).Status == 0
    with store.db.session() as session:
        row = session.scalars(select(Instance)).one()
        case = session.get(Case, row.case_id)
        assert case is not None
        assert (case.case_key, case.status) == ("acc:A1", CaseStatus.RECEIVING)
        assert case.patient["id"] == "P1"
        assert row.calling_ae_title == "TESTSCU"
    kept = dcmread(row.path)
    assert kept.SOPInstanceUID == ds.SOPInstanceUID
    assert (kept.pixel_array == smear()).all()


@pytest.mark.parametrize(
    ("break_it", "status", "reason"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), DATASET_DOES_NOT_MATCH_SOP_CLASS, "study"),
        (lambda ds: delattr(ds, "PixelData"), CANNOT_UNDERSTAND, "pixel"),
    ],
    ids=["missing-study-uid", "no-pixel-data"],
)
def test_refused_instance_is_quarantined_with_its_reason(
    scp: StorageSCP, store: InstanceStore, break_it, status: int, reason: str
) -> None:
    ds = instance(smear())
    break_it(ds)
    answer = c_store(scp.port, ds)
    assert answer.Status == status
    assert reason in answer.ErrorComment.lower()
    with store.db.session() as session:
        (kept,) = session.scalars(select(QuarantinedInstance)).all()
        assert reason in kept.reason.lower()
        assert session.scalars(select(Instance)).all() == []
    assert dcmread(kept.path).SOPInstanceUID == ds.SOPInstanceUID
    # the server keeps serving
    assert c_store(scp.port, instance(smear())).Status == 0


@pytest.mark.parametrize("order_first", [True, False], ids=["order-first", "captures-first"])
def test_order_and_captures_meet_in_one_case(
    scp: StorageSCP, store: InstanceStore, order_first: bool
) -> None:
    text = build_test_order(accession="A1", patient_id="LIS-77", family="Roe", sex="M")
    if order_first:
        apply_order(store.db, parse_order(text), text)
    assert c_store(scp.port, instance(smear())).Status == 0
    if not order_first:
        apply_order(store.db, parse_order(text), text)
    with store.db.session() as session:
        (case,) = session.scalars(select(Case)).all()
        assert case.status == CaseStatus.RECEIVING
        assert len(case.instances) == 1
        assert case.order is not None and case.order["accession_number"] == "A1"
        assert case.patient["id"] == "LIS-77"  # the LIS's identity wins over the image's


def test_cancelled_order_is_not_analysed(scp: StorageSCP, store: InstanceStore) -> None:
    text = build_test_order(accession="A1", patient_id="P1")
    apply_order(store.db, parse_order(text), text)
    cancel = build_test_order(accession="A1", patient_id="P1", order_control="CA")
    apply_order(store.db, parse_order(cancel), cancel)
    assert c_store(scp.port, instance(smear())).Status == 0
    with store.db.session() as session:
        (case,) = session.scalars(select(Case)).all()
        assert case.status == CaseStatus.CANCELLED
