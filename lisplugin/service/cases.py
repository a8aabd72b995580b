"""When a case is stable (or asked for), analyse it and put its result message in the outbox.

The result, the case state and the outbox row are committed in one transaction, so a restart
either re-analyses a queued case or finds its message already waiting: never both, never none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from lisplugin.config import Hl7Settings, Settings
from lisplugin.core.revision import carry_decisions, revise
from lisplugin.core.rules import PreviousResult
from lisplugin.core.types import Flag, ResultValue
from lisplugin.hl7.orders import parse_order
from lisplugin.hl7.oru import build_oru
from lisplugin.logging_setup import bound_contextvars
from lisplugin.service.metrics import ANALYSIS_SECONDS, CASES_ANALYSED
from lisplugin.service.outbox import as_utc
from lisplugin.service.pipeline import Pipeline, patient_context, read_fields
from lisplugin.service.reports import mark_reports_due, reports_due, write_case_reports
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus, OrderMessage, OutboxMessage, OutboxStatus

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


class CaseScheduler:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        pipeline: Callable[[], Pipeline],
        on_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self.db = db
        self.settings = settings
        self._pipeline = pipeline  # built lazily: loading models is slow
        self.on_outbox = on_outbox
        self._wake = threading.Event()
        self._stop = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def queue_stable(self, now: datetime | None = None) -> list[int]:
        """Mark cases whose last capture is older than the stability delay as queued."""
        now = now or datetime.now(UTC)
        limit = now - timedelta(seconds=self.settings.cases.stable_seconds)
        with self.db.session() as session:
            cases = session.scalars(select(Case).where(Case.status == CaseStatus.RECEIVING)).all()
            stable = [
                c for c in cases if c.last_instance_at and as_utc(c.last_instance_at) <= limit
            ]
            for case in stable:
                case.status = CaseStatus.QUEUED
            return [c.id for c in stable]

    def run_once(self) -> list[int]:
        self.queue_stable()
        with self.db.session() as session:
            queued = session.scalars(
                select(Case.id).where(Case.status == CaseStatus.QUEUED).order_by(Case.id)
            ).all()
        for case_id in queued:
            with bound_contextvars(case_id=case_id):
                self.analyse_case(case_id)
        self.catch_up_reports()
        return list(queued)

    def catch_up_reports(self, now: datetime | None = None) -> list[int]:
        """Make the reports a stop or a failure left owed (after a grace period in which the
        writer that owes them, e.g. a sign-out, is still at work)."""
        now = now or datetime.now(UTC)
        grace = timedelta(seconds=self.settings.cases.report_retry_seconds)
        done = []
        for case_id in reports_due(self.db, now - grace):
            try:
                write_case_reports(self.db, case_id, self.settings)
            except Exception:
                log.exception("reports of case %s failed again; retried later", case_id)
                continue
            log.info("case %s: owed reports written", case_id)
            done.append(case_id)
        if done:
            self.on_outbox()
        return done

    def analyse_case(self, case_id: int) -> None:
        started = time.perf_counter()
        with self.db.session() as session:
            case = session.get(Case, case_id)
            if case is None or case.status != CaseStatus.QUEUED:
                return
            version = case.version
            paths = [i.path for i in case.instances]
            patient = dict(case.patient or {})
            order = dict(case.order) if case.order else None
            final_sent = case.final_sent
            previous = self._previous_result(session, case)
            # a reviewer asked to add new captures to a case they have worked on
            before = dict(case.result) if (case.result or {}).get(EXTEND_MARK) else None
        try:
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
                    carry_decisions(before, result_json), pipeline.rules, pipeline.ranges, context
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
        try:
            write_case_reports(self.db, case_id, self.settings)
        except Exception:  # the ORU is queued already; reports can be made again later
            log.exception("reports of case %s failed", case_id)
        CASES_ANALYSED.labels("review" if result.needs_review else "verified").inc()
        ANALYSIS_SECONDS.observe(time.perf_counter() - started)
        log.info("case %s analysed: %s, ORU %s queued", case_id, status, control_id)
        self.on_outbox()

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
        candidates = session.scalars(
            select(Case)
            .where(Case.id != case.id)
            .where(Case.result.is_not(None))
            .where(Case.status.in_([CaseStatus.VERIFIED, CaseStatus.FINAL]))
            .where(Case.analysed_at >= since)
            .order_by(Case.analysed_at.desc())
        )
        for other in candidates:
            theirs = other.patient or {}
            same = (
                theirs.get("id") == patient_id and (theirs.get("id_authority") or "") == authority
            )
            if same and other.analysed_at:
                return PreviousResult(
                    analysed_at=as_utc(other.analysed_at),
                    differential=dict(other.result.get("differential", {})),
                    case_id=other.id,
                    accession_number=other.accession_number,
                )
        return None

    def _fail(self, case_id: int, error: str) -> None:
        with self.db.session() as session:
            case = session.get(Case, case_id)
            if case is not None:
                case.status = CaseStatus.FAILED
                case.error = error[:2000]
        CASES_ANALYSED.labels("failed").inc()

    def run_forever(self, poll_seconds: float = 1.0) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("scheduler pass failed")
            self._wake.wait(poll_seconds)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
