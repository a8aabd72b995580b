"""When a case is stable (or asked for), analyse it and put its result message in the outbox.

The result, the case state and the outbox row are committed in one transaction, so a restart
either re-analyses a queued case or finds its message already waiting: never both, never none.
Processes sharing a database each claim a queued case before analysing it (``service.claims``):
one analyses it; a killed one's case is taken over when its claim runs out.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, defer
from sqlalchemy.orm.exc import StaleDataError

from lisplugin.config import Hl7Settings, Settings
from lisplugin.core.revision import carry_decisions, revise
from lisplugin.core.rules import PreviousResult
from lisplugin.core.types import Flag, ResultValue
from lisplugin.hl7.orders import parse_order
from lisplugin.hl7.oru import build_oru
from lisplugin.logging_setup import bound_contextvars
from lisplugin.service.claims import claimable, process_name
from lisplugin.service.metrics import ANALYSIS_SECONDS, CASES_ANALYSED
from lisplugin.service.outbox import as_utc
from lisplugin.service.pipeline import Pipeline, patient_context, read_fields
from lisplugin.service.reports import mark_reports_due, reports_due, write_case_reports
from lisplugin.storage.db import Database
from lisplugin.storage.orm import (
    Case,
    CaseStatus,
    OrderMessage,
    OutboxMessage,
    OutboxStatus,
    PendingReport,
)

log = logging.getLogger(__name__)

DELTA_WINDOW = timedelta(hours=72)
#: Key set in a reviewed result whose case is to be analysed again with the captures that
#: arrived since, keeping the reviewer's decisions (``service.review.add_captures``).
EXTEND_MARK = "add_captures_requested"


def queue_oru(
    session: Session,
    case: Case,
    values: list[ResultValue],
    flags: list[Flag],
    status: str,
    loinc_map: dict[str, Any],
    settings: Hl7Settings,
    observed_at: datetime,
    comments: Sequence[str] = (),
    model_versions: Mapping[str, str] | None = None,
) -> str:
    """Build the case's ORU^R01 and add it to the outbox in the caller's transaction.

    ``comments`` go out as NTE; ``model_versions`` (default: those of the case's result) are
    named in OBX-18.
    Control ids are ``LP<case>-<n>``: unique, stable across resends, readable in the LIS. The
    case's reports are marked due in the same transaction.
    """
    sequence = 1 + (
        session.scalar(select(func.count()).where(OutboxMessage.case_id == case.id)) or 0
    )
    control_id = f"LP{case.id}-{sequence}"
    order_text = session.scalar(
        select(OrderMessage.message)
        .where(OrderMessage.case_id == case.id)
        .order_by(OrderMessage.id.desc())
        .limit(1)
    )
    order = parse_order(order_text) if order_text else None
    # Without an accession number lisplugin, as order filler, numbers the case itself.
    dicom_patient = {
        **(case.patient or {}),
        "accession_number": case.accession_number or f"LP{case.id}",
    }
    message = build_oru(
        result_values=values,
        flags=flags,
        status=status,  # type: ignore[arg-type]
        order=order,
        patient_from_dicom=None if order else dicom_patient,
        loinc_map=loinc_map,
        control_id=control_id,
        settings=settings,
        observed_at=observed_at,
        comments=comments,
        model_versions=(case.result or {}).get("model_versions")
        if model_versions is None
        else model_versions,
    )
    session.add(
        OutboxMessage(
            case_id=case.id,
            channel="hl7",
            control_id=control_id,
            result_status=status,
            payload=message,
            status=OutboxStatus.PENDING,
        )
    )
    mark_reports_due(session, case.id)  # every released result gets its reports
    return control_id


def result_status(needs_review: bool, final_already_sent: bool) -> str:
    """OBX-11/OBR-25: P while review is pending, F when verified, C for a changed final."""
    if needs_review:
        return "P"
    return "C" if final_already_sent else "F"


class ReportWriter:
    """Makes a case's reports after its result left, in a thread of its own, so that neither
    the ORU nor the next case waits for the PDF, SR and annotations.

    Without its thread running (tools and tests that drive the scheduler by hand) a request
    writes the reports at once, in the caller's thread.
    """

    def __init__(self, db: Database, settings: Settings, on_outbox: Callable[[], None]) -> None:
        self.db = db
        self.settings = settings
        self.on_outbox = on_outbox
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._running = threading.Event()

    def request(self, case_id: int) -> None:
        if self._running.is_set():
            self._queue.put(case_id)
        else:
            self.write(case_id)

    def write(self, case_id: int) -> bool:
        try:
            write_case_reports(self.db, case_id, self.settings)
        except Exception:  # the ORU is queued already; reports are made again later
            log.exception("reports of case %s failed; retried later", case_id)
            return False
        self.on_outbox()  # PACS copies, when the PACS is enabled
        return True

    def run_forever(self) -> None:
        self._running.set()
        try:
            while (case_id := self._queue.get()) is not None:
                self.write(case_id)
        finally:
            self._running.clear()

    def stop(self) -> None:
        self._queue.put(None)


class CaseScheduler:
    """Queues stable cases and analyses them; sleeps until the next case can become stable
    or someone (a C-STORE, an order, the API) wakes it."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        pipeline: Callable[[], Pipeline],
        on_outbox: Callable[[], None] = lambda: None,
        reports: ReportWriter | None = None,
        owner: str | None = None,
    ) -> None:
        self.db = db
        #: This process's name in the claims it writes.
        self.owner = owner or process_name()
        self.lease = timedelta(seconds=settings.database.analysis_lease_seconds)
        self.settings = settings
        self._pipeline = pipeline  # built lazily: loading models is slow
        self.on_outbox = on_outbox
        self.reports = reports or ReportWriter(db, settings, on_outbox)
        self._wake = threading.Event()
        self._stop = threading.Event()
        #: ``time.monotonic()`` of the next pass while asleep; infinite during a pass.
        self._next_pass = math.inf

    def wake(self) -> None:
        self._wake.set()

    def wake_within(self, seconds: float) -> None:
        """Wake up unless a pass is already due within ``seconds``: a capture makes a case
        stable ``stable_seconds`` later, which only matters when that is before the planned
        pass (a first capture, or ``stable_seconds: 0``); otherwise each of hundreds of
        captures a second would cost a pass of database queries for nothing."""
        if time.monotonic() + seconds < self._next_pass:
            self._wake.set()

    def capture_stored(self) -> None:
        """A capture restarted its case's stability clock."""
        self.wake_within(self.settings.cases.stable_seconds)

    def queue_stable(self, now: datetime | None = None) -> list[int]:
        """Mark cases whose last capture is older than the stability delay as queued."""
        now = now or datetime.now(UTC)
        limit = now - timedelta(seconds=self.settings.cases.stable_seconds)

        def queue(session: Session) -> list[int]:
            receiving = session.execute(
                select(Case.id, Case.last_instance_at).where(Case.status == CaseStatus.RECEIVING)
            ).all()
            stable = [i for i, last in receiving if last and as_utc(last) <= limit]
            if stable:
                for case in session.scalars(
                    select(Case)
                    .where(Case.id.in_(stable), Case.status == CaseStatus.RECEIVING)
                    .options(defer(Case.result))
                ):  # still receiving: another process may have queued and analysed it since
                    case.status = CaseStatus.QUEUED
            return stable

        # Another process queueing the same cases, or a capture arriving, conflicts: run again.
        return self.db.transaction(queue)

    def seconds_to_next_event(self, now: datetime | None = None) -> float | None:
        """Until the next receiving case becomes stable or owed reports fall due; None when
        nothing is waiting for time to pass (only a wake-up brings new work)."""
        now = now or datetime.now(UTC)
        with self.db.session() as session:
            last = session.scalar(
                select(func.min(Case.last_instance_at)).where(Case.status == CaseStatus.RECEIVING)
            )
            due = session.scalar(select(func.min(PendingReport.due_at)))
            lease_ends = session.scalar(  # a claim of a (perhaps killed) other process
                select(func.min(Case.claimed_until)).where(
                    Case.status == CaseStatus.QUEUED, Case.claimed_until.is_not(None)
                )
            )
        moments = []
        if lease_ends is not None:
            moments.append(as_utc(lease_ends))
        if last is not None:
            moments.append(as_utc(last) + timedelta(seconds=self.settings.cases.stable_seconds))
        if due is not None:  # owed reports that failed again are retried a grace period later
            grace = timedelta(seconds=self.settings.cases.report_retry_seconds)
            moments.append(max(as_utc(due) + grace, now + grace))
        if not moments:
            return None
        return max((min(moments) - now).total_seconds(), 0.0)

    def run_once(self) -> list[int]:
        """Queue the stable cases, then analyse queued cases one claim at a time until none
        is left that another process does not hold."""
        self.queue_stable()
        analysed: list[int] = []
        while not self._stop.is_set() and (case_id := self.claim_case()) is not None:
            if case_id in analysed:  # left queued by this pass (changed meanwhile): next pass
                break
            with bound_contextvars(case_id=case_id):
                self.analyse_case(case_id)
            analysed.append(case_id)
        self.catch_up_reports()
        return analysed

    def claim_case(self, now: datetime | None = None) -> int | None:
        """Claim the oldest queued case that nobody holds, or whose claim ran out (its process
        died): ``SELECT ... FOR UPDATE SKIP LOCKED``, so processes never wait on each other."""
        moment = now or datetime.now(UTC)

        def claim(session: Session) -> int | None:
            case = session.scalar(
                select(Case)
                .where(
                    Case.status == CaseStatus.QUEUED,
                    claimable(Case, self.owner, moment),
                )
                .order_by(Case.id)
                .limit(1)
                .options(defer(Case.result))
                .with_for_update(skip_locked=True)
            )
            if case is None:
                return None
            if case.claimed_by not in (None, self.owner):
                log.warning("case %s: taking over from %s", case.id, case.claimed_by)
            case.claimed_by = self.owner
            case.claimed_until = moment + self.lease
            session.flush()
            return case.id

        # A capture changing the case meanwhile (or SQLite's busy writer) conflicts: again.
        return self.db.transaction(claim)

    def catch_up_reports(self, now: datetime | None = None) -> list[int]:
        """Make the reports a stop or a failure left owed (after a grace period in which the
        writer that owes them, e.g. a sign-out, is still at work)."""
        now = now or datetime.now(UTC)
        grace = timedelta(seconds=self.settings.cases.report_retry_seconds)
        done = [c for c in reports_due(self.db, now - grace) if self.reports.write(c)]
        for case_id in done:
            log.info("case %s: owed reports written", case_id)
        return done

    def analyse_case(self, case_id: int) -> None:
        started = time.perf_counter()
        with self.db.session() as session:
            case = session.get(Case, case_id)
            if case is None or case.status != CaseStatus.QUEUED:
                return
            if case.claimed_by not in (None, self.owner):
                return  # another process claimed it first
            version = case.version
            paths = [i.path for i in case.instances]
            patient = dict(case.patient or {})
            order = dict(case.order) if case.order else None
            final_sent = case.final_sent
            previous = self._previous_result(session, case)
            # a reviewer asked to add new captures to a case they have worked on
            before = dict(case.result) if (case.result or {}).get(EXTEND_MARK) else None
        try:
            with self._renewing(case_id):
                fields = read_fields([Path(p) for p in paths])
                pipeline = self._pipeline()
                result = pipeline.analyse(fields, patient, previous, order)
                result_json = {
                    **pipeline.to_json(result),
                    "previous": previous.to_json() if previous else None,
                }
                if before is not None:
                    context = patient_context(patient, order, datetime.now(UTC), previous)
                    result, result_json = revise(
                        carry_decisions(before, result_json),
                        pipeline.rules,
                        pipeline.ranges,
                        context,
                    )
                values = pipeline.values(result, patient, order)
        except Exception as exc:
            log.exception("analysis of case %s failed", case_id)
            self._fail(case_id, f"analysis failed: {exc}")
            return
        # reviewed work goes out only when a person signs it out
        held = result.needs_review or before is not None
        status = result_status(held, final_sent)
        try:
            with self.db.session() as session:
                case = session.get(Case, case_id)
                assert case is not None
                if case.version != version:
                    raise StaleDataError("case changed while it was analysed")
                now = datetime.now(UTC)
                control_id = queue_oru(
                    session,
                    case,
                    values,
                    list(result.flags),
                    status,
                    pipeline.loinc_map,
                    self.settings.hl7,
                    now,
                    model_versions=result.model_versions,
                )
                case.result = result_json
                case.status = CaseStatus.REVIEW if held else CaseStatus.VERIFIED
                case.analysed_at = now
                case.error = None
                case.final_sent = final_sent or status in ("F", "C")
        except StaleDataError:
            log.info("case %s received new captures during analysis; it will be redone", case_id)
            return
        self.on_outbox()  # committed: the ORU leaves now, before any report is made
        CASES_ANALYSED.labels("review" if result.needs_review else "verified").inc()
        ANALYSIS_SECONDS.observe(time.perf_counter() - started)
        log.info("case %s analysed: %s, ORU %s queued", case_id, status, control_id)
        self.reports.request(case_id)

    @contextmanager
    def _renewing(self, case_id: int) -> Iterator[None]:
        """Keep this process's claim on the case alive while it is analysed (every third of the
        lease), so a slow analysis is not taken over; a killed process stops renewing."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease.total_seconds() / 3):
                try:
                    with self.db.session() as session:
                        # Core UPDATE: the case's version stays, the analysis can still commit.
                        session.execute(
                            update(Case)
                            .where(Case.id == case_id, Case.claimed_by == self.owner)
                            .values(claimed_until=datetime.now(UTC) + self.lease)
                        )
                except Exception:  # the next renewal tries again; the lease is the bound
                    log.warning("case %s: claim not renewed", case_id, exc_info=True)

        thread = threading.Thread(target=renew, name="lisplugin-claim", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _previous_result(self, session: Session, case: Case) -> PreviousResult | None:
        """The same patient's latest verified (F/C) result within the delta-check window.

        The same patient is the same identifier from the same assigning authority; a result
        still waiting for review (P) is never compared with: it may be wrong.
        """
        patient = case.patient or {}
        patient_id, authority = patient.get("id"), patient.get("id_authority") or ""
        if not patient_id:
            return None
        since = datetime.now(UTC) - DELTA_WINDOW
        candidates = session.execute(
            select(Case.id, Case.analysed_at, Case.summary, Case.accession_number, Case.patient)
            .where(Case.id != case.id)
            .where(Case.summary.is_not(None))
            .where(Case.status.in_([CaseStatus.VERIFIED, CaseStatus.FINAL]))
            .where(Case.analysed_at >= since)
            .where(Case.patient["id"].as_string() == str(patient_id))
            .order_by(Case.analysed_at.desc())
            .limit(50)
        ).all()
        for other in candidates:
            if ((other.patient or {}).get("id_authority") or "") != authority:
                continue
            if other.analysed_at is None:
                continue
            return PreviousResult(
                analysed_at=as_utc(other.analysed_at),
                differential=dict(other.summary.get("differential", {})),
                case_id=other.id,
                accession_number=other.accession_number,
            )
        return None

    def _fail(self, case_id: int, error: str) -> None:
        with self.db.session() as session:
            case = session.get(Case, case_id)
            if case is not None and case.claimed_by in (None, self.owner):
                case.status = CaseStatus.FAILED
                case.error = error[:2000]
        CASES_ANALYSED.labels("failed").inc()

    def run_forever(self, max_wait_seconds: float | None = None) -> None:
        """Work, then sleep until woken or until the next case can become stable.

        ``max_wait_seconds`` (default ``database.poll_seconds``) bounds the sleep: new captures,
        orders and API requests of this process wake the scheduler at once; those of other
        processes sharing the database are found by the next look.
        """
        if max_wait_seconds is None:
            max_wait_seconds = self.settings.database.poll_seconds
        while not self._stop.is_set():
            self._next_pass = math.inf  # a capture during the pass wakes the next sleep
            self._wake.clear()  # before the pass: a wake-up during it is not lost
            wait = max_wait_seconds
            try:
                self.run_once()
                due = self.seconds_to_next_event()
                if due is not None:
                    wait = min(wait, due)
            except Exception:
                log.exception("scheduler pass failed")
                wait = 1.0
            self._next_pass = time.monotonic() + wait
            self._wake.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
