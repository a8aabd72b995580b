"""Storage and outbox on the embedded default (SQLite) and on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.orm.exc import StaleDataError

from lisplugin.core.delivery import Delivery, ReceiverUnavailable
from lisplugin.service.outbox import OutboxWorker
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus, OutboxMessage, OutboxStatus


def _case_with_message(db: Database, control_id: str = "LP1-1") -> int:
    with db.session() as session:
        case = Case(case_key=f"acc:{control_id}", status=CaseStatus.REVIEW, patient={})
        session.add(case)
        session.flush()
        session.add(
            OutboxMessage(
                case_id=case.id,
                channel="hl7",
                control_id=control_id,
                result_status="P",
                payload=f"MSH|^~\\&|...|{control_id}",
                status=OutboxStatus.PENDING,
            )
        )
        return case.id


def test_migrations_create_every_table_and_are_idempotent(db: Database) -> None:
    tables = set(inspect(db.engine).get_table_names())
    assert {"cases", "instances", "quarantine", "order_messages", "outbox"} <= tables
    db.migrate()  # a second start finds the schema current


def test_outbox_retries_with_same_control_id_until_delivered(db: Database) -> None:
    _case_with_message(db, "LP1-1")
    sent: list[str] = []
    answers = iter([ReceiverUnavailable("refused"), ReceiverUnavailable("timeout"), None])

    def sender(message: OutboxMessage) -> Delivery:
        sent.append(message.control_id)
        failure = next(answers)
        if failure is not None:
            raise failure
        return Delivery(accepted=True, code="AA")

    worker = OutboxWorker(db, {"hl7": sender}, backoff=lambda attempt: 30.0 * attempt)
    now = datetime.now(UTC)
    assert worker.run_once(now) == 1
    assert worker.run_once(now) == 0  # backing off: not due yet
    assert worker.run_once(now + timedelta(seconds=31)) == 1
    assert worker.run_once(now + timedelta(seconds=200)) == 1
    assert worker.run_once(now + timedelta(seconds=999)) == 0  # delivered: never again
    assert sent == ["LP1-1", "LP1-1", "LP1-1"]
    with db.session() as session:
        row = session.scalars(select(OutboxMessage)).one()
        assert row.status == OutboxStatus.DELIVERED
        assert row.attempts == 3
        assert row.ack_code == "AA"


def test_outbox_records_rejection_and_does_not_retry(db: Database) -> None:
    _case_with_message(db, "LP2-1")
    calls: list[str] = []

    def sender(message: OutboxMessage) -> Delivery:
        calls.append(message.control_id)
        return Delivery(accepted=False, code="AE", text="OBX-3 unknown code")

    worker = OutboxWorker(db, {"hl7": sender}, backoff=lambda attempt: 0.0)
    worker.run_once()
    worker.run_once()
    assert calls == ["LP2-1"]
    with db.session() as session:
        row = session.scalars(select(OutboxMessage)).one()
        assert (row.status, row.ack_code, row.last_error) == (
            OutboxStatus.REJECTED,
            "AE",
            "OBX-3 unknown code",
        )


def test_control_ids_are_unique_per_channel(db: Database) -> None:
    case_id = _case_with_message(db, "LP3-1")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"), db.session() as session:
        session.add(
            OutboxMessage(
                case_id=case_id,
                channel="hl7",
                control_id="LP3-1",
                result_status="F",
                payload="x",
                status=OutboxStatus.PENDING,
            )
        )


def test_concurrent_case_edits_conflict(db: Database) -> None:
    """Optimistic locking: the second writer of a stale copy gets an error, not a lost update."""
    case_id = _case_with_message(db, "LP4-1")
    with db.session() as first, pytest.raises(StaleDataError):
        stale = first.get(Case, case_id)
        assert stale is not None
        with db.session() as second:
            fresh = second.get(Case, case_id)
            assert fresh is not None
            fresh.status = CaseStatus.FINAL
        stale.status = CaseStatus.VERIFIED
        first.flush()
