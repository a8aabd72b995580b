"""Durable outbox: every outgoing message is a row first and is sent until the receiver answers.

At-least-once with a stable control id: a resend after an outage or a restart carries the same
MSH-10, so the receiver can recognise it. Per case and channel, messages leave in the order they
were queued: a later one waits until the earlier one is delivered or parked, and an unsent
preliminary (P) is superseded, never sent, once a final or corrected result follows it.
Answers (policy in interfaces/hl7-interface.md section 5):

* accepted (AA/CA): delivered;
* an error in the message (AE/CE): parked at once (status ``rejected``), not resent;
* refused for now (AR/CR): resent with the backoff, parked after ``max_attempts_refused``;
* no answer: resent with the backoff until it is answered.

When a receiver does not answer, the rest of its channel waits for the next pass, so a silent
LIS costs every other channel at most one ACK timeout per pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import aliased

from lisplugin.service.metrics import OUTBOX_FAILURES, RESULTS_REJECTED
from lisplugin.storage.db import Database
from lisplugin.storage.orm import OutboxMessage, OutboxStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """What a receiver answered: ``accepted`` means done; otherwise ``text`` says why not."""

    accepted: bool
    code: str
    text: str = ""
    #: Not accepted *now* (HL7 AR/CR): resent later, up to the worker's bound.
    retry: bool = False


class ReceiverUnavailable(Exception):
    """No answer (refused, timed out, connection lost): try again later."""


#: Sends one payload and reports the receiver's answer, or raises ReceiverUnavailable.
Sender = Callable[[OutboxMessage], Delivery]
#: Seconds to wait before attempt number ``attempts`` + 1.
Backoff = Callable[[int], float]
#: Result statuses that replace an unsent preliminary of the same case and channel.
SUPERSEDING = frozenset({"F", "C"})


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class OutboxWorker:
    def __init__(
        self,
        db: Database,
        senders: dict[str, Sender],
        backoff: Backoff,
        max_attempts_refused: int = 5,
    ) -> None:
        self.db = db
        self.senders = senders
        self.backoff = backoff
        self.max_attempts_refused = max_attempts_refused
        self._wake = threading.Event()
        self._stop = threading.Event()

    def notify(self) -> None:
        """Something new is in the outbox: do not wait for the next poll."""
        self._wake.set()

    def run_once(self, now: datetime | None = None) -> int:
        """Try the due messages of every case and channel once, each case's in order; return
        how many were attempted. A case's queue stops at a message not delivered (a later
        one must not overtake it); a channel whose receiver did not answer is left for the
        next pass."""
        now = now or datetime.now(UTC)
        down: set[str] = set()
        attempted = 0
        for queue in self._due_queues(now):
            for message_id, channel in queue:
                if channel in down:
                    break
                attempted += 1
                outcome = self._attempt(message_id)
                if outcome == "down":
                    down.add(channel)
                if outcome != "done":
                    break
        return attempted

    def _due_queues(self, now: datetime) -> list[list[tuple[int, str]]]:
        """Per case and channel, the (id, channel) of its pending messages from the first up to
        the first not yet due, oldest queue first. Unsent preliminaries followed by a final or
        corrected result are marked superseded on the way."""
        with self.db.session() as session:
            pending = session.execute(  # no payloads: a long outage leaves many rows
                select(
                    OutboxMessage.id,
                    OutboxMessage.case_id,
                    OutboxMessage.channel,
                    OutboxMessage.control_id,
                    OutboxMessage.result_status,
                    OutboxMessage.next_attempt_at,
                )
                .where(OutboxMessage.status == OutboxStatus.PENDING)
                .order_by(OutboxMessage.id)
            ).all()
            queues: dict[tuple[int, str], list[Any]] = {}
            for row in pending:
                queues.setdefault((row.case_id, row.channel), []).append(row)
            due: list[list[tuple[int, str]]] = []
            superseded: list[int] = []
            for queue in queues.values():
                ready: list[tuple[int, str]] = []
                for n, row in enumerate(queue):
                    if row.result_status == "P" and any(
                        later.result_status in SUPERSEDING for later in queue[n + 1 :]
                    ):
                        superseded.append(row.id)
                        log.info("%s %s superseded, not sent", row.channel, row.control_id)
                        continue
                    if as_utc(row.next_attempt_at) > now:
                        break  # the rest of this case's queue waits for it
                    ready.append((row.id, row.channel))
                if ready:
                    due.append(ready)
            if superseded:
                session.execute(
                    update(OutboxMessage)
                    .where(
                        OutboxMessage.id.in_(superseded),
                        OutboxMessage.status == OutboxStatus.PENDING,
                    )
                    .values(status=OutboxStatus.SUPERSEDED)
                )
        return sorted(due)

    def _attempt(self, message_id: int) -> str:
        """One try: "done" (delivered, parked or gone), "later" (refused for now, scheduled)
        or "down" (no answer: its channel is skipped for the rest of the pass)."""
        with self.db.session() as session:
            message = session.get(OutboxMessage, message_id)
            if message is None or message.status != OutboxStatus.PENDING:
                return "done"
            session.expunge(message)
        sender = self.senders.get(message.channel)
        if sender is None:
            return "later"
        try:
            delivery = sender(message)
        except ReceiverUnavailable as exc:
            OUTBOX_FAILURES.labels(message.channel, "no_answer").inc()
            self._retry_later(message_id, str(exc))
            return "down"
        with self.db.session() as session:
            row = session.get(OutboxMessage, message_id)
            assert row is not None
            row.attempts += 1
            row.ack_code = delivery.code
            if delivery.accepted:
                row.status = OutboxStatus.DELIVERED
                row.delivered_at = datetime.now(UTC)
                row.last_error = None
                log.info("%s %s delivered (%s)", row.channel, row.control_id, delivery.code)
                return "done"
            row.last_error = delivery.text or delivery.code
            OUTBOX_FAILURES.labels(row.channel, "refused" if delivery.retry else "error").inc()
            if delivery.retry and row.attempts < self.max_attempts_refused:
                self._schedule(row, f"refused ({delivery.code})")
                return "later"
            row.status = OutboxStatus.REJECTED
            OUTBOX_FAILURES.labels(row.channel, "parked").inc()
            RESULTS_REJECTED.labels(row.channel).inc()
            log.error(
                "%s %s parked after %s (attempt %d): %s",
                row.channel,
                row.control_id,
                delivery.code,
                row.attempts,
                row.last_error,
            )
            return "done"

    def _retry_later(self, message_id: int, error: str) -> None:
        with self.db.session() as session:
            row = session.get(OutboxMessage, message_id)
            assert row is not None
            row.attempts += 1
            row.last_error = error
            self._schedule(row, error)

    def _schedule(self, row: OutboxMessage, why: str) -> None:
        row.next_attempt_at = datetime.now(UTC) + timedelta(seconds=self.backoff(row.attempts))
        log.warning(
            "%s %s not delivered (%s); attempt %d", row.channel, row.control_id, why, row.attempts
        )

    def run_forever(self, poll_seconds: float = 1.0) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a broken row must not stop delivery of the others
                log.exception("outbox pass failed")
            self._wake.wait(poll_seconds)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def needing_attention(db: Database, overdue_seconds: float) -> dict[str, int]:
    """What /readyz reports as degraded: parked messages whose case has had nothing delivered
    on that channel since, and messages waiting longer than ``overdue_seconds``."""
    later = aliased(OutboxMessage)
    superseded_by_delivery = exists().where(
        and_(
            later.case_id == OutboxMessage.case_id,
            later.channel == OutboxMessage.channel,
            later.id > OutboxMessage.id,
            later.status == OutboxStatus.DELIVERED,
        )
    )
    cutoff = datetime.now(UTC) - timedelta(seconds=overdue_seconds)
    with db.session() as session:
        parked = session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.status == OutboxStatus.REJECTED, ~superseded_by_delivery)
        )
        overdue = session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.status == OutboxStatus.PENDING, OutboxMessage.created_at < cutoff)
        )
    return {"outbox_parked": int(parked or 0), "outbox_overdue": int(overdue or 0)}
