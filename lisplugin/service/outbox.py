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

Several processes may share the outbox (PostgreSQL): a message is claimed before it is sent
(``service.claims``), and a case's queue is worked only up to a message another process holds,
so no two processes send the same message and a case's messages still leave in order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from lisplugin.core.delivery import Delivery, ReceiverUnavailable
from lisplugin.service.claims import claimable, held_by_other, process_name
from lisplugin.service.metrics import OUTBOX_FAILURES, RESULTS_REJECTED
from lisplugin.storage.db import Database
from lisplugin.storage.orm import OutboxMessage, OutboxStatus

log = logging.getLogger(__name__)


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
        owner: str | None = None,
        lease_seconds: float = 120.0,
    ) -> None:
        self.db = db
        self.senders = senders
        self.backoff = backoff
        self.max_attempts_refused = max_attempts_refused
        #: This process's name in the claims it writes.
        self.owner = owner or process_name()
        self.lease = timedelta(seconds=lease_seconds)
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
                outcome = self._attempt(message_id)
                if outcome == "busy":  # another process holds it: the queue is theirs for now
                    break
                attempted += 1
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
                    OutboxMessage.claimed_by,
                    OutboxMessage.claimed_until,
                )
                .where(OutboxMessage.status == OutboxStatus.PENDING)
                .order_by(OutboxMessage.id)
            ).all()
            queues: dict[tuple[int, str], list[Any]] = {}
            for row in pending:
                queues.setdefault((row.case_id, row.channel), []).append(row)
            due: list[list[tuple[int, str]]] = []
            for queue in queues.values():
                ready: list[tuple[int, str]] = []
                for n, row in enumerate(queue):
                    if held_by_other(row.claimed_by, row.claimed_until, self.owner, now):
                        break  # being sent by another process: what follows waits for it
                    if row.result_status == "P" and any(
                        later.result_status in SUPERSEDING for later in queue[n + 1 :]
                    ):
                        if not self._supersede(session, row.id, now):
                            break  # claimed meanwhile: it may be on its way
                        log.info("%s %s superseded, not sent", row.channel, row.control_id)
                        continue
                    if as_utc(row.next_attempt_at) > now:
                        break  # the rest of this case's queue waits for it
                    ready.append((row.id, row.channel))
                if ready:
                    due.append(ready)
        return sorted(due)

    def _supersede(self, session: Session, message_id: int, now: datetime) -> bool:
        """Mark an unsent preliminary superseded unless another process is sending it."""
        marked = session.execute(
            update(OutboxMessage)
            .where(
                OutboxMessage.id == message_id,
                OutboxMessage.status == OutboxStatus.PENDING,
                claimable(OutboxMessage, self.owner, now),
            )
            .values(status=OutboxStatus.SUPERSEDED, claimed_by=None, claimed_until=None)
        )
        return bool(marked.rowcount)  # type: ignore[attr-defined]

    def _claim(self, message_id: int) -> OutboxMessage | str:
        """The message, claimed for this process; or "done" (no longer pending) or "busy"
        (another process holds it, or is claiming it right now)."""
        return self.db.transaction(lambda session: self._claim_in(session, message_id))

    def _claim_in(self, session: Session, message_id: int) -> OutboxMessage | str:
        """``_claim`` in the caller's transaction (run again on a conflict)."""
        now = datetime.now(UTC)
        message = session.scalar(
            select(OutboxMessage)
            .where(OutboxMessage.id == message_id)
            .with_for_update(skip_locked=True)
        )
        if message is None:
            exists_now = session.get(OutboxMessage, message_id) is not None
            return "busy" if exists_now else "done"
        if message.status != OutboxStatus.PENDING:
            return "done"
        if held_by_other(message.claimed_by, message.claimed_until, self.owner, now):
            return "busy"
        message.claimed_by = self.owner
        message.claimed_until = now + self.lease
        session.flush()
        session.expunge(message)
        return message

    def _attempt(self, message_id: int) -> str:
        """One try: "done" (delivered, parked or gone), "later" (refused for now, scheduled),
        "down" (no answer: its channel is skipped for the rest of the pass) or "busy" (another
        process is sending it)."""
        with self.db.session() as session:
            channel = session.scalar(
                select(OutboxMessage.channel).where(OutboxMessage.id == message_id)
            )
            sender = self.senders.get(channel) if channel else None
        if channel is None:
            return "done"
        if sender is None:
            return "later"
        message = self._claim(message_id)
        if isinstance(message, str):
            return message
        try:
            delivery = sender(message)
        except ReceiverUnavailable as exc:
            OUTBOX_FAILURES.labels(message.channel, "no_answer").inc()
            self._retry_later(message_id, str(exc))
            return "down"
        with self.db.session() as session:
            row = session.get(OutboxMessage, message_id)
            assert row is not None
            self._release(row)
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
            self._release(row)
            row.attempts += 1
            row.last_error = error
            self._schedule(row, error)

    def _release(self, row: OutboxMessage) -> None:
        """The try is over: the message is free again (a lost claim is only logged)."""
        if row.claimed_by not in (None, self.owner):
            log.warning(
                "%s %s: claim ran out while sending; %s holds it now",
                row.channel,
                row.control_id,
                row.claimed_by,
            )
        row.claimed_by = None
        row.claimed_until = None

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
