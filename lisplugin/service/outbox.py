"""Durable outbox: every outgoing message is a row first and is sent until the receiver answers.

At-least-once with a stable control id: a resend after an outage or a restart carries the same
MSH-10, so the receiver can recognise it; AE/AR answers are recorded and not retried.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from lisplugin.service.metrics import RESULTS_REJECTED
from lisplugin.storage.db import Database
from lisplugin.storage.orm import OutboxMessage, OutboxStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """What a receiver answered: ``accepted`` means done; otherwise ``text`` says why not."""

    accepted: bool
    code: str
    text: str = ""


class ReceiverUnavailable(Exception):
    """No answer (refused, timed out, connection lost): try again later."""


#: Sends one payload and reports the receiver's answer, or raises ReceiverUnavailable.
Sender = Callable[[OutboxMessage], Delivery]
#: Seconds to wait before attempt number ``attempts`` + 1.
Backoff = Callable[[int], float]


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class OutboxWorker:
    def __init__(self, db: Database, senders: dict[str, Sender], backoff: Backoff) -> None:
        self.db = db
        self.senders = senders
        self.backoff = backoff
        self._wake = threading.Event()
        self._stop = threading.Event()

    def notify(self) -> None:
        """Something new is in the outbox: do not wait for the next poll."""
        self._wake.set()

    def run_once(self, now: datetime | None = None) -> int:
        """Try every due message once, oldest first; return how many were attempted."""
        now = now or datetime.now(UTC)
        with self.db.session() as session:
            due = session.scalars(
                select(OutboxMessage.id)
                .where(OutboxMessage.status == OutboxStatus.PENDING)
                .where(OutboxMessage.next_attempt_at <= now)
                .order_by(OutboxMessage.id)
            ).all()
        for message_id in due:
            self._attempt(message_id)
        return len(due)

    def _attempt(self, message_id: int) -> None:
        with self.db.session() as session:
            message = session.get(OutboxMessage, message_id)
            if message is None or message.status != OutboxStatus.PENDING:
                return
            session.expunge(message)
        sender = self.senders.get(message.channel)
        if sender is None:
            return
        try:
            delivery = sender(message)
        except ReceiverUnavailable as exc:
            self._retry_later(message_id, str(exc))
            return
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
            else:
                row.status = OutboxStatus.REJECTED
                row.last_error = delivery.text or delivery.code
                log.error("%s %s rejected: %s", row.channel, row.control_id, row.last_error)
                RESULTS_REJECTED.labels(row.channel).inc()

    def _retry_later(self, message_id: int, error: str) -> None:
        with self.db.session() as session:
            row = session.get(OutboxMessage, message_id)
            assert row is not None
            row.attempts += 1
            row.last_error = error
            row.next_attempt_at = datetime.now(UTC) + timedelta(seconds=self.backoff(row.attempts))
            log.warning(
                "%s %s not delivered (%s); attempt %d",
                row.channel,
                row.control_id,
                error,
                row.attempts,
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
