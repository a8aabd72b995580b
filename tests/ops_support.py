"""Rows the operations tests (metrics, retention) put straight into the database."""

from __future__ import annotations

from typing import Any

from lisplugin.storage.orm import OutboxMessage, OutboxStatus


def outbox_message(
    case_id: int,
    channel: str,
    control_id: str,
    status: OutboxStatus,
    payload: str = "MSH|",
    **extra: Any,
) -> OutboxMessage:
    """An outbox row as the daemon would have left it (``extra``: timestamps, attempts)."""
    return OutboxMessage(
        case_id=case_id,
        channel=channel,
        control_id=control_id,
        result_status=extra.pop("result_status", "F"),
        payload=payload,
        status=status,
        **extra,
    )
