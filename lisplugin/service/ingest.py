"""What arrives: DICOM instances (from the SCP) and orders (from the MLLP listener) become cases.

A capture and its order meet in one case keyed by accession number (falling back to the Study
Instance UID), whichever arrives first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from lisplugin.config import InstanceLimits
from lisplugin.core.revision import reclassified
from lisplugin.dicom.decode import validate_header
from lisplugin.hl7.orders import Order
from lisplugin.service.pipeline import ANALYSER_KEY
from lisplugin.storage.db import Database
from lisplugin.storage.files import safe_name, write_durably
from lisplugin.storage.orm import Case, CaseStatus, Instance, OrderMessage, QuarantinedInstance

log = logging.getLogger(__name__)

#: Case states in which a new capture re-opens the case for analysis - unless a reviewer has
#: already reclassified cells of its result (signed-out cases are never re-opened by a capture).
REOPENABLE = {
    CaseStatus.AWAITING_IMAGES,
    CaseStatus.RECEIVING,
    CaseStatus.REVIEW,
    CaseStatus.VERIFIED,
    CaseStatus.FAILED,
}


#: A result of the case has gone to the LIS: its identity is no longer the order's to change.
RELEASED = {CaseStatus.REVIEW, CaseStatus.VERIFIED, CaseStatus.FINAL}
#: Patient fields compared when an order arrives for a released case.
IDENTITY_FIELDS = ("id", "name_family", "name_given", "birth_date")


class OrderConflict(Exception):
    """An order that would change or withdraw a case whose result was released: refused, never
    applied silently (the LIS would otherwise get the next result under another patient)."""


def case_key(accession_number: str | None, study_instance_uid: str | None) -> str:
    if accession_number:
        return f"acc:{accession_number}"
    if study_instance_uid:
        return f"study:{study_instance_uid}"
    raise ValueError("neither Accession Number nor Study Instance UID")


def patient_from_dicom(ds: Dataset) -> dict[str, str]:
    name = ds.get("PatientName")
    return {
        "id": str(ds.get("PatientID", "") or ""),
        "name_family": str(getattr(name, "family_name", "") or ""),
        "name_given": str(getattr(name, "given_name", "") or ""),
        "birth_date": str(ds.get("PatientBirthDate", "") or ""),
        "sex": str(ds.get("PatientSex", "") or ""),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def get_or_create_case(
    session: Session, accession_number: str | None, study_instance_uid: str | None
) -> Case:
    key = case_key(accession_number, study_instance_uid)
    case = session.scalar(select(Case).where(Case.case_key == key).with_for_update())
    if case is None:
        case = Case(
            case_key=key,
            accession_number=accession_number,
            study_instance_uid=study_instance_uid,
            status=CaseStatus.AWAITING_IMAGES,
            patient={},
        )
        session.add(case)
        session.flush()
    return case


class InstanceStore:
    """The SCP's storage callback: validate, keep durably, group into a case - or quarantine."""

    def __init__(
        self, db: Database, storage_path: Path, limits: InstanceLimits | None = None
    ) -> None:
        self.db = db
        self.limits = limits or InstanceLimits()
        self.instances_dir = storage_path / "instances"
        self.quarantine_dir = storage_path / "quarantine"

    def store(self, ds: Dataset, raw: bytes) -> Case:
        """Keep a usable instance; ``UnusableInstance`` tells the SCP to refuse it."""
        # Headers only: decoding every frame here cost most of the ingest time and let a
        # small instance that declares huge frames exhaust memory.
        frames = validate_header(ds, self.limits)
        calling = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "") or None
        return self._keep(ds, raw, frames, calling)

    def _keep(self, ds: Dataset, raw: bytes, frames: int, calling_ae_title: str | None) -> Case:
        study_uid = str(ds.StudyInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        duplicate = self.db.transaction(lambda session: _case_holding(session, sop_uid))
        if duplicate is not None:
            # A re-sent instance (its C-STORE response was lost): acknowledged, nothing changes,
            # so an analysed or reported case is not re-opened and no result goes out again.
            log.info("%s already stored in case %s: acknowledged again", sop_uid, duplicate)
            return duplicate
        path = self.instances_dir / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"
        write_durably(path, raw)

        def record(session: Session) -> Case:
            accession = str(ds.get("AccessionNumber", "") or "") or None
            case = get_or_create_case(session, accession, study_uid)
            if _case_holding(session, sop_uid) is not None:  # the same instance, concurrently
                return case
            if not case.patient:
                case.patient = patient_from_dicom(ds)
            case.study_instance_uid = case.study_instance_uid or study_uid
            session.add(
                Instance(
                    case_id=case.id,
                    sop_instance_uid=sop_uid,
                    sop_class_uid=str(ds.SOPClassUID),
                    series_instance_uid=str(ds.get("SeriesInstanceUID", "") or "") or None,
                    path=str(path),
                    frames=frames,
                    calling_ae_title=calling_ae_title,
                )
            )
            if case.status in REOPENABLE and not reclassified(case.result or {}):
                case.status = CaseStatus.RECEIVING
            elif case.status in REOPENABLE or case.status == CaseStatus.FINAL:
                # Re-analysing would discard what a person decided; they re-analyse explicitly.
                log.warning(
                    "case %s is %s with reviewer decisions: %s kept, not analysed until "
                    "someone re-analyses the case",
                    case.case_key,
                    case.status.value,
                    sop_uid,
                )
            case.last_instance_at = datetime.now(UTC)
            session.flush()
            return case

        # Concurrent first captures of one accession race to create its case: the loser's
        # transaction runs again and finds the case the winner made.
        case = self.db.transaction(record)
        log.info("stored %s in case %s (%d frames)", sop_uid, case.case_key, frames)
        return case

    def quarantine(self, raw: bytes, reason: str, sop_uid: str, calling_ae_title: str) -> Path:
        """Keep a refused instance and its reason; it never becomes part of a case."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        path = self.quarantine_dir / f"{stamp}_{safe_name(sop_uid or 'unknown')}.dcm"
        write_durably(path, raw)
        write_durably(
            path.with_suffix(".json"),
            json.dumps({"reason": reason, "calling_ae_title": calling_ae_title}).encode(),
        )
        with self.db.session() as session:
            session.add(
                QuarantinedInstance(
                    path=str(path),
                    reason=reason,
                    sop_instance_uid=sop_uid or None,
                    calling_ae_title=calling_ae_title or None,
                )
            )
        log.warning("quarantined %s: %s", path.name, reason)
        return path


def _case_holding(session: Session, sop_uid: str) -> Case | None:
    """The case an instance with this SOP Instance UID was already filed in, if any."""
    return session.scalar(
        select(Case)
        .join(Instance, Instance.case_id == Case.id)
        .where(Instance.sop_instance_uid == sop_uid)
    )


def apply_order(db: Database, order: Order, message: str) -> Case:
    """Create or update the case an order names; captures already received are kept."""
    # Field by field: asdict() deep-copies, which python-hl7's tzinfo objects do not support.
    order_json = {f.name: _jsonable(getattr(order, f.name)) for f in dataclasses.fields(order)}
    return db.transaction(lambda session: _apply_order(session, order, order_json, message))


def _apply_order(session: Session, order: Order, order_json: dict[str, Any], message: str) -> Case:
    """One order applied in one transaction (run again if a capture created the case first)."""
    case = get_or_create_case(session, order.accession_number, None)
    if case.status in RELEASED or case.final_sent:
        _check_released(case, order, order_json)
    session.add(OrderMessage(case_id=case.id, control_id=order.control_id, message=message))
    if order.is_cancel:
        case.status = CaseStatus.CANCELLED
        return case
    if case.status == CaseStatus.CANCELLED:  # ordered again after a cancellation
        case.status = CaseStatus.RECEIVING if case.instances else CaseStatus.AWAITING_IMAGES
        case.last_instance_at = datetime.now(UTC)
    kept = (case.order or {}).get(ANALYSER_KEY)  # the analyser's later word stays
    case.order = {**order_json, ANALYSER_KEY: kept} if kept else order_json
    case.patient = _patient_of(order)
    return case


def _patient_of(order: Order) -> dict[str, str]:
    return {
        "id": order.patient_id,
        "id_authority": order.patient_id_authority,
        "name_family": order.patient_family_name,
        "name_given": order.patient_given_name,
        "birth_date": order.patient_birth_date.strftime("%Y%m%d")
        if order.patient_birth_date
        else "",
        "sex": order.patient_sex,
    }


def _check_released(case: Case, order: Order, order_json: dict[str, Any]) -> None:
    """Refuse a cancellation, or a patient identity other than the one already reported."""
    if order.is_cancel:
        log.warning("case %s: cancellation refused, a result was released", case.case_key)
        raise OrderConflict(
            "a result of this case was already released; it cannot be cancelled by order: "
            "ask the laboratory to correct or withdraw it"
        )
    new = _patient_of(order)
    known = case.patient or {}
    changed = [
        key
        for key in IDENTITY_FIELDS
        if known.get(key) and new.get(key) and known[key].casefold() != new[key].casefold()
    ]
    if changed:  # field names only: the values are PHI
        log.warning("case %s: order changing %s refused", case.case_key, ", ".join(changed))
        raise OrderConflict(
            "a result of this case was already released under another patient identity "
            f"({', '.join(changed)} differ): correct the case in the review station"
        )
