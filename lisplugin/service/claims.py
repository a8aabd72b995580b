"""Work claims shared by the processes of one database (scale-out on PostgreSQL).

A process takes a queued case or an outgoing message by writing its name and a lease end into
the row, in a transaction that locked the row with ``SELECT ... FOR UPDATE SKIP LOCKED``: two
processes never hold the same row, and a process killed with its claim held loses it when the
lease runs out, after which any other process takes the work over. On SQLite (one process) the
same columns are written; the row lock is the database's single writer.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, or_


def process_name() -> str:
    """Unique per process start: host, pid and a random part (a pid is reused after a kill)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def held_by_other(
    claimed_by: str | None, claimed_until: datetime | None, me: str, now: datetime
) -> bool:
    """Someone else's claim that has not run out yet."""
    return (
        claimed_by is not None
        and claimed_by != me
        and claimed_until is not None
        and (claimed_until if claimed_until.tzinfo else claimed_until.replace(tzinfo=UTC)) > now
    )


def claimable(row: Any, me: str, now: datetime) -> ColumnElement[bool]:
    """SQL for "not held by another process": nobody's, run out, or already ``me``'s (the
    query form of ``not held_by_other``; ``row`` is a mapped class with the claim columns)."""
    return or_(row.claimed_until.is_(None), row.claimed_until <= now, row.claimed_by == me)
