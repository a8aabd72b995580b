"""What arrives: DICOM instances (from the SCP) and orders (from the MLLP listener) become cases.

A capture and its order meet in one case keyed by accession number (falling back to the Study
Instance UID), whichever arrives first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydicom import Dataset
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from lisplugin.config import InstanceLimits
from lisplugin.core.revision import reclassified
from lisplugin.dicom.decode import validate_header
from lisplugin.hl7.orders import Order
from lisplugin.service.pipeline import ANALYSER_KEY
from lisplugin.storage.db import Database
from lisplugin.storage.files import safe_name, write_durably
from lisplugin.storage.orm import Case, CaseStatus, Instance, OrderMessage, QuarantinedInstance

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

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
        self._commits = GroupCommit(db, _record)

    def store(self, ds: Dataset, raw: bytes) -> FiledCase:
        """Keep a usable instance; ``UnusableInstance`` tells the SCP to refuse it."""
        # Headers only: decoding every frame here cost most of the ingest time and let a
        # small instance that declares huge frames exhaust memory.
        frames = validate_header(ds, self.limits)
        calling = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "") or None
        return self._keep(ds, raw, frames, calling)

    def _keep(
        self, ds: Dataset, raw: bytes, frames: int, calling_ae_title: str | None
    ) -> FiledCase:
        study_uid = str(ds.StudyInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        path = self.instances_dir / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"
        # A file is only ever written for an instance not yet recorded, so no file means no
        # record: the common case skips a database round trip (a transaction of its own).
        if path.exists():
            duplicate = self.db.transaction(lambda session: _held_by(session, sop_uid))
            if duplicate is not None:
                # A re-sent instance (its C-STORE response was lost): acknowledged, nothing
                # changes, so an analysed or reported case is not re-opened and no result goes
                # out again.
                log.info("%s already stored in case %s: acknowledged again", sop_uid, duplicate)
                return duplicate
        write_durably(path, raw)
        capture = _Capture(
            study_uid=study_uid,
            sop_uid=sop_uid,
            accession=str(ds.get("AccessionNumber", "") or "") or None,
            patient=patient_from_dicom(ds),
            sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.get("SeriesInstanceUID", "") or "") or None,
            path=str(path),
            frames=frames,
            calling_ae_title=calling_ae_title,
        )
        case = self._commits.submit(capture)
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


@dataclasses.dataclass(frozen=True)
class _Capture:
    """What the database records of a stored instance (its file is already durable)."""

    study_uid: str
    sop_uid: str
    accession: str | None
    patient: dict[str, str]
    sop_class_uid: str
    series_uid: str | None
    path: str
    frames: int
    calling_ae_title: str | None


@dataclasses.dataclass(frozen=True)
class FiledCase:
    """The case a capture was filed in, as it stood after the capture (not the whole row: that
    would read the case's result, hundreds of kB, for every instance)."""

    id: int
    case_key: str
    status: CaseStatus
    last_instance_at: datetime | None


#: Statuses whose result may hold reviewer decisions a new capture must not discard.
_RESULT_MATTERS = REOPENABLE - {CaseStatus.RECEIVING}


def _record(session: Session, capture: _Capture) -> FiledCase:
    """File one instance in its case (created by the first capture or order of an accession).

    Column statements rather than ORM objects: this runs for every instance, and the case's
    optimistic lock (``version``) is kept by hand.
    """
    holder = session.scalar(
        select(Instance.case_id).where(Instance.sop_instance_uid == capture.sop_uid)
    )
    if holder is not None:  # the same instance, concurrently
        return _filed(session, holder)
    key = case_key(capture.accession, capture.study_uid)
    now = datetime.now(UTC)
    row = session.execute(
        select(Case.id, Case.status, Case.version, Case.patient, Case.study_instance_uid).where(
            Case.case_key == key
        )
    ).one_or_none()
    if row is None:
        case = Case(
            case_key=key,
            accession_number=capture.accession,
            study_instance_uid=capture.study_uid,
            status=CaseStatus.RECEIVING,
            patient=capture.patient,
            last_instance_at=now,
        )
        session.add(case)
        session.flush()
        _insert_instance(session, case.id, capture)
        return FiledCase(case.id, key, case.status, now)
    status = row.status
    if row.status in _RESULT_MATTERS:
        result = session.scalar(select(Case.result).where(Case.id == row.id))
        if row.status in REOPENABLE and not reclassified(result or {}):
            status = CaseStatus.RECEIVING
        else:  # re-analysing would discard what a person decided; they re-analyse explicitly
            log.warning(
                "case %s is %s with reviewer decisions: %s kept, not analysed until "
                "someone re-analyses the case",
                key,
                row.status.value,
                capture.sop_uid,
            )
    elif row.status == CaseStatus.FINAL:
        log.warning(
            "case %s is final: %s kept, not analysed until someone re-analyses the case",
            key,
            capture.sop_uid,
        )
    values: dict[str, Any] = {
        "status": status,
        "last_instance_at": now,
        "version": row.version + 1,
        "study_instance_uid": row.study_instance_uid or capture.study_uid,
    }
    if not row.patient:
        values["patient"] = capture.patient
    updated = session.execute(
        update(Case).where(Case.id == row.id, Case.version == row.version).values(**values)
    )
    if updated.rowcount != 1:  # another writer changed the case: the transaction runs again
        raise StaleDataError(f"case {key} changed concurrently")
    _insert_instance(session, row.id, capture)
    return FiledCase(row.id, key, status, now)


def _insert_instance(session: Session, case_id: int, capture: _Capture) -> None:
    session.execute(
        insert(Instance).values(
            case_id=case_id,
            sop_instance_uid=capture.sop_uid,
            sop_class_uid=capture.sop_class_uid,
            series_instance_uid=capture.series_uid,
            path=capture.path,
            frames=capture.frames,
            calling_ae_title=capture.calling_ae_title,
        )
    )


def _filed(session: Session, case_id: int) -> FiledCase:
    row = session.execute(
        select(Case.id, Case.case_key, Case.status, Case.last_instance_at).where(Case.id == case_id)
    ).one()
    return FiledCase(row.id, row.case_key, row.status, row.last_instance_at)


class _Waiting(Generic[T, R]):
    """One submitted item: its result or error, and whether its thread is to lead next."""

    def __init__(self, item: T) -> None:
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.ready = threading.Event()


class GroupCommit(Generic[T, R]):
    """Items from concurrent threads applied in one transaction (one durable commit) each time
    the database is free, instead of one commit - one fsync - per item.

    Every caller still returns only after the transaction holding its item committed. The
    first caller leads (no hand-off to another thread: one association pays nothing); items
    arriving while it commits are taken together by the next leader, one of their own threads.
    A failing batch is re-run item by item, so one item's error never fails the others.
    """

    def __init__(self, db: Database, apply: Callable[[Session, T], R]) -> None:
        self.db = db
        self.apply = apply
        self._lock = threading.Lock()
        self._pending: list[_Waiting[T, R]] = []
        self._leading = False
        self.batches = 0  #: transactions committed (with ``items``: the mean batch size)
        self.items = 0

    def submit(self, item: T) -> R:
        """Apply ``item`` and return once it is committed (raises what applying it raised)."""
        mine: _Waiting[T, R] = _Waiting(item)
        with self._lock:
            self._pending.append(mine)
            lead = not self._leading
            self._leading = True
        if not lead:
            mine.ready.wait()
        if mine.lead or lead:
            self._run_batch()
        if mine.error is not None:
            raise mine.error
        return mine.result  # type: ignore[return-value]

    def _run_batch(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            self._commit(batch)
        finally:
            with self._lock:
                if self._pending:  # the next leader is one of the threads that waited
                    self._pending[0].lead = True
                    self._pending[0].ready.set()
                else:
                    self._leading = False
            for waiting in batch:
                waiting.ready.set()

    def _commit(self, batch: list[_Waiting[T, R]]) -> None:
        try:
            results = self.db.transaction(
                lambda session: [self.apply(session, w.item) for w in batch]
            )
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for waiting in batch:  # find the one that failed; the others commit alone
                self._commit([waiting])
            return
        self.batches += 1
        self.items += len(batch)
        for waiting, result in zip(batch, results, strict=True):
            waiting.result = result


def _held_by(session: Session, sop_uid: str) -> FiledCase | None:
    """The case an instance with this SOP Instance UID was already filed in, if any."""
    case_id = session.scalar(select(Instance.case_id).where(Instance.sop_instance_uid == sop_uid))
    return None if case_id is None else _filed(session, case_id)


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
