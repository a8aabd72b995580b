"""What arrives: DICOM instances (from the SCP) and orders (from the MLLP listener) become cases.

A capture and its order meet in one case keyed by accession number (falling back to the Study
Instance UID), whichever arrives first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from lisplugin.config import InstanceLimits, Settings
from lisplugin.core.revision import reclassified
from lisplugin.dicom.decode import validate_header
from lisplugin.hl7.orders import Order
from lisplugin.service.pipeline import ANALYSER_KEY
from lisplugin.storage.db import Database
from lisplugin.storage.files import safe_name, write_all_durably, write_durably
from lisplugin.storage.group import GroupCommit
from lisplugin.storage.orm import Case, CaseStatus, Instance, OrderMessage, QuarantinedInstance
from lisplugin.storage.spool import Spool, Spooled

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


#: What happens once an instance is filed in its case (count it, restart the case's clock).
OnFiled = Callable[["FiledCase"], None]


class InstanceStore:
    """The SCP's storage callback: validate, keep durably, group into a case - or quarantine.

    ``store`` files an instance before it returns (file and database record). ``accept``, the
    C-STORE path, returns as soon as the instance is durable in the spool (one sync) and files
    it moments later in the background (``SpoolRecorder``; ``on_filed`` is called then); with
    no spool, or while the recorder is behind or failing, it is ``store``.
    """

    def __init__(
        self,
        db: Database,
        storage_path: Path,
        limits: InstanceLimits | None = None,
        spool: Spool | None = None,
        on_filed: OnFiled | None = None,
        spool_max_instance_bytes: int = 16 * 1024 * 1024,
        spool_max_backlog_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.db = db
        self.limits = limits or InstanceLimits()
        self.instances_dir = storage_path / "instances"
        self.quarantine_dir = storage_path / "quarantine"
        self._commits: GroupCommit[_Capture, FiledCase] = GroupCommit(
            lambda captures: db.transaction(lambda s: _record_all(s, captures))
        )
        self.on_filed: OnFiled = on_filed or (lambda case: None)
        self.spool = spool
        self.kept = 0  #: instances this process kept (stored or spooled), re-sent ones not
        self.spool_max_instance_bytes = spool_max_instance_bytes
        self.recorder = (
            SpoolRecorder(spool, self._file_spooled, spool_max_backlog_bytes)
            if spool is not None
            else None
        )

    def store(self, ds: Dataset, raw: bytes) -> FiledCase:
        """Keep a usable instance; ``UnusableInstance`` tells the SCP to refuse it."""
        # Headers only: decoding every frame here cost most of the ingest time and let a
        # small instance that declares huge frames exhaust memory.
        frames = validate_header(ds, self.limits)
        capture, duplicate = self._capture(ds, frames)
        if duplicate is not None:
            return duplicate
        write_durably(Path(capture.path), raw)
        self.kept += 1
        case = self._commits.submit(capture)
        log.info("stored %s in case %s (%d frames)", capture.sop_uid, case.case_key, frames)
        return case

    def accept(self, ds: Dataset, raw: bytes) -> None:
        """Keep a usable instance durably and have it filed (``on_filed``), through the spool
        when there is room; ``UnusableInstance`` tells the SCP to refuse it."""
        recorder = self.recorder
        if (
            recorder is None
            or self.spool is None
            or len(raw) > self.spool_max_instance_bytes
            or not recorder.has_room(len(raw))
        ):
            self.on_filed(self.store(ds, raw))
            return
        frames = validate_header(ds, self.limits)
        capture, duplicate = self._capture(ds, frames)
        if duplicate is not None:
            return  # acknowledged again; it was counted when it was filed
        record = dataclasses.asdict(capture)
        row = self.spool.put(capture.path, record, raw)
        self.kept += 1
        recorder.offer(Spooled(row, capture.path, record, raw, time.time()))

    def _capture(self, ds: Dataset, frames: int) -> tuple[_Capture, FiledCase | None]:
        """What is recorded of an instance, and the case it is already filed in, if any."""
        study_uid = str(ds.StudyInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        path = self.instances_dir / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"
        calling = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "") or None
        capture = _Capture(
            study_uid=study_uid,
            sop_uid=sop_uid,
            accession=str(ds.get("AccessionNumber", "") or "") or None,
            patient=patient_from_dicom(ds),
            sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.get("SeriesInstanceUID", "") or "") or None,
            path=str(path),
            frames=frames,
            calling_ae_title=calling,
        )
        # A file is only ever written for an instance not yet recorded, so no file means no
        # record: the common case skips a database round trip (a transaction of its own).
        if path.exists():
            duplicate = self.db.transaction(lambda session: _held_by(session, sop_uid))
            if duplicate is not None:
                # A re-sent instance (its C-STORE response was lost): acknowledged, nothing
                # changes, so an analysed or reported case is not re-opened and no result goes
                # out again.
                log.info("%s already stored in case %s: acknowledged again", sop_uid, duplicate)
                return capture, duplicate
        return capture, None

    def _file_spooled(self, items: list[Spooled]) -> tuple[list[Spooled], int]:
        """Write the files of spooled instances and record them (one transaction; item by item
        if it fails); returns those now filed or already held, whose rows can go, and how many
        were filed now."""
        captures = [(_Capture(**item.record), item) for item in items]
        uids = [c.sop_uid for c, _ in captures]
        held = set(
            self.db.transaction(
                lambda session: session.scalars(
                    select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))
                ).all()
            )
        )
        new: dict[str, tuple[_Capture, Spooled]] = {}
        for capture, item in captures:  # a re-sent instance is filed once, as it came first
            if capture.sop_uid not in held:
                new.setdefault(capture.sop_uid, (capture, item))
        write_all_durably([(Path(item.path), item.raw) for _, item in new.values()])
        chosen = {item.id for _, item in new.values()}
        done = [item for _, item in captures if item.id not in chosen]  # held: nothing to do
        filed: list[tuple[FiledCase, _Capture]] = []
        try:
            cases = self.db.transaction(lambda s: _record_all(s, [c for c, _ in new.values()]))
            filed = list(zip(cases, [c for c, _ in new.values()], strict=True))
            done += [item for _, item in new.values()]
        except Exception:
            if len(new) <= 1:
                raise
            for capture, item in new.values():  # one bad item must not hold up the others
                try:
                    case = self.db.transaction(lambda s, c=capture: _record_all(s, [c])[0])
                except Exception:
                    log.exception("spooled %s could not be filed; kept for later", item.path)
                    continue
                filed.append((case, capture))
                done.append(item)
        for case, capture in filed:
            log.info(
                "stored %s in case %s (%d frames)", capture.sop_uid, case.case_key, capture.frames
            )
            self.on_filed(case)
        return done, len(filed)

    def recover(self) -> int:
        """File what the spool holds from before this start (a crash, a kill); returns how
        many instances. Run before accepting associations."""
        if self.spool is None:
            return 0
        total = 0
        while items := self.spool.left():
            done, filed = self._file_spooled(items)
            if not done:
                raise RuntimeError(f"spooled instances cannot be filed: {items[0].path}")
            self.spool.remove([item.id for item in done])
            total += filed
        if total:  # rows another process on the port filed already are only deleted
            log.warning("filed %d instance(s) left in the spool by the last run", total)
        return total

    def start(self) -> None:
        """Start filing spooled instances in the background."""
        if self.recorder is not None:
            self.recorder.start()

    def stop(self, timeout: float = 30.0) -> None:
        """File what is spooled (at most ``timeout`` s; the rest is filed at the next start)."""
        if self.recorder is not None:
            self.recorder.stop(timeout)
        if self.spool is not None:
            self.spool.close()

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


#: The ingest spool's file in ``storage.path`` (all processes accepting on the port share it).
SPOOL_FILE = "ingest-spool.sqlite"


def instance_store(db: Database, settings: Settings, on_filed: OnFiled) -> InstanceStore:
    """The daemon's store as its settings say (``storage.spool``)."""
    storage = settings.storage
    return InstanceStore(
        db,
        storage.path,
        settings.dicom.limits,
        spool=Spool(storage.spool_path or storage.path / SPOOL_FILE) if storage.spool else None,
        on_filed=on_filed,
        spool_max_instance_bytes=storage.spool_max_instance_mb * 1024 * 1024,
        spool_max_backlog_bytes=storage.spool_backlog_mb * 1024 * 1024,
    )


class SpoolRecorder:
    """Files spooled instances in the background, in batches, oldest first.

    Its backlog (bytes offered, not yet filed) is bounded: past it, or while filing fails
    (the database unreachable), ``has_room`` is False and the SCP stores synchronously, so a
    sender gets A700 rather than an ever longer queue. Rows another process left in the spool
    (it died) are filed after ``ABANDONED_SECONDS``.
    """

    #: A row this old that no recorder here holds was left by a process that ended.
    ABANDONED_SECONDS = 60.0
    BATCH = 64
    LINGER_SECONDS = 0.02

    def __init__(
        self,
        spool: Spool,
        file: Callable[[list[Spooled]], tuple[list[Spooled], int]],
        max_backlog: int,
    ) -> None:
        self.spool = spool
        self.file = file
        self.max_backlog = max_backlog
        self.healthy = True
        self._queue: deque[Spooled] = deque()
        self._backlog = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._retry = 0.0
        self._filed_rows: list[int] = []  # filed, their rows not yet deleted

    def has_room(self, size: int) -> bool:
        with self._cond:
            return (
                self.healthy
                and not self._stopping
                and self._thread is not None
                and self._thread.is_alive()
                and self._backlog + size <= self.max_backlog
            )

    def offer(self, item: Spooled) -> None:
        with self._cond:
            self._queue.append(item)
            self._backlog += len(item.raw)
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spool-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """File what is queued, for at most ``timeout`` seconds, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    # rows of filed instances are deleted in bulk, when idle or many: each
                    # delete takes the spool's write lock from the associations
                    self._cond.wait(timeout=0.2 if self._filed_rows else self.ABANDONED_SECONDS / 2)
                # What arrives within LINGER_SECONDS is filed in the same transaction: per
                # instance, a transaction costs the associations more (the GIL) than the wait.
                deadline = time.monotonic() + self.LINGER_SECONDS
                while 0 < len(self._queue) < self.BATCH and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
                stopping = self._stopping and (not self._queue or not self.healthy)
                batch = [self._queue[i] for i in range(min(len(self._queue), self.BATCH))]
                queued = {item.id for item in self._queue}
            try:
                if self._filed_rows and (stopping or not batch or len(self._filed_rows) >= 256):
                    self.spool.remove(self._filed_rows)
                    self._filed_rows = []
                if (
                    not stopping
                    and not batch
                    and time.monotonic() - last_sweep >= (self.ABANDONED_SECONDS / 2)
                ):
                    last_sweep = time.monotonic()
                    batch = [
                        item
                        for item in self.spool.left(older_than=self.ABANDONED_SECONDS)
                        if item.id not in queued and item.id not in self._filed_rows
                    ]
                    if batch:
                        log.warning("filing %d instance(s) another process left", len(batch))
            except Exception:  # the spool's file: a filed row deleted twice is harmless
                log.exception("the ingest spool could not be read or cleaned; retrying")
                time.sleep(1.0)
            if stopping:
                return
            if batch:
                self._file(batch)

    def _file(self, batch: list[Spooled]) -> None:
        try:
            done, _ = self.file(batch)
        except Exception:
            # Nothing is lost (the rows stay); new captures go the synchronous way meanwhile.
            log.exception("filing %d spooled instance(s) failed; retrying", len(batch))
            with self._cond:
                self.healthy = False
                self._retry = min(max(self._retry * 2, 0.5), 30.0)
                self._cond.wait(timeout=self._retry)
            return
        # A row whose instance could not be filed stays in the spool (filed at the next start
        # or by the sweep); it leaves this queue so that it does not hold up the others.
        self._filed_rows += [item.id for item in done]
        ids = {item.id for item in batch}
        with self._cond:
            self.healthy = True
            self._retry = 0.0
            self._backlog -= sum(len(i.raw) for i in self._queue if i.id in ids)
            self._queue = deque(item for item in self._queue if item.id not in ids)


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


def _record_all(session: Session, captures: list[_Capture]) -> list[FiledCase]:
    """File instances in their cases (a case is created by the first capture or order of an
    accession); one result per capture, in order.

    Column statements rather than ORM objects, a few per batch rather than per instance: this
    runs for every instance. Each case's optimistic lock (``version``) is kept by hand.
    """
    uids = [c.sop_uid for c in captures]
    holders: dict[str, int] = {
        uid: case_id
        for uid, case_id in session.execute(
            select(Instance.sop_instance_uid, Instance.case_id).where(
                Instance.sop_instance_uid.in_(uids)
            )
        ).all()
    }
    groups: dict[str, list[_Capture]] = {}
    seen: set[str] = set()
    for capture in captures:  # the same instance twice in a batch: filed as it came first
        if capture.sop_uid not in holders and capture.sop_uid not in seen:
            seen.add(capture.sop_uid)
            groups.setdefault(case_key(capture.accession, capture.study_uid), []).append(capture)
    rows = {
        row.case_key: row
        for row in session.execute(
            select(
                Case.id,
                Case.case_key,
                Case.status,
                Case.version,
                Case.patient,
                Case.study_instance_uid,
            ).where(Case.case_key.in_(list(groups)))
        ).all()
    } if groups else {}  # fmt: skip
    now = datetime.now(UTC)
    filed: dict[str, FiledCase] = {}
    instances: list[dict[str, Any]] = []
    for key, group in groups.items():
        case_id, status = _file_in_case(session, key, rows.get(key), group, now)
        for capture in group:
            filed[capture.sop_uid] = FiledCase(case_id, key, status, now)
            instances.append(
                {
                    "case_id": case_id,
                    "sop_instance_uid": capture.sop_uid,
                    "sop_class_uid": capture.sop_class_uid,
                    "series_instance_uid": capture.series_uid,
                    "path": capture.path,
                    "frames": capture.frames,
                    "calling_ae_title": capture.calling_ae_title,
                }
            )
    if instances:
        session.execute(insert(Instance), instances)
    return [
        filed[c.sop_uid] if c.sop_uid in filed else _filed(session, holders[c.sop_uid])
        for c in captures
    ]


def _file_in_case(
    session: Session, key: str, row: Any, group: list[_Capture], now: datetime
) -> tuple[int, CaseStatus]:
    """Create the case of ``key`` or update it for new captures: (case id, its status)."""
    first = group[0]
    if row is None:
        case = Case(
            case_key=key,
            accession_number=first.accession,
            study_instance_uid=first.study_uid,
            status=CaseStatus.RECEIVING,
            patient=first.patient,
            last_instance_at=now,
        )
        session.add(case)
        session.flush()
        return case.id, case.status
    status = row.status
    kept = f"{first.sop_uid}" + (f" and {len(group) - 1} more" if len(group) > 1 else "")
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
                kept,
            )
    elif row.status == CaseStatus.FINAL:
        log.warning(
            "case %s is final: %s kept, not analysed until someone re-analyses the case",
            key,
            kept,
        )
    values: dict[str, Any] = {
        "status": status,
        "last_instance_at": now,
        "version": row.version + 1,
        "study_instance_uid": row.study_instance_uid or first.study_uid,
    }
    if not row.patient:
        values["patient"] = first.patient
    updated = session.execute(
        update(Case).where(Case.id == row.id, Case.version == row.version).values(**values)
    )
    if updated.rowcount != 1:  # another writer changed the case: the transaction runs again
        raise StaleDataError(f"case {key} changed concurrently")
    return row.id, status


def _filed(session: Session, case_id: int) -> FiledCase:
    row = session.execute(
        select(Case.id, Case.case_key, Case.status, Case.last_instance_at).where(Case.id == case_id)
    ).one()
    return FiledCase(row.id, row.case_key, row.status, row.last_instance_at)


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
