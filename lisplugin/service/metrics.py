"""Prometheus metrics of the daemon (one registry per process, served at /metrics).

Counters are incremented where things happen; what lives in the database (outbox depth and age,
review backlog) and on disk (free space) is read when Prometheus scrapes, by ``StateCollector``.
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lisplugin import __version__
from lisplugin.storage.orm import Case, CaseStatus, OutboxMessage, OutboxStatus

REGISTRY = CollectorRegistry()
# The standard process (CPU, memory, open files) and Python (version, GC) collectors.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

BUILD_INFO = Info("lisplugin_build", "lisplugin version and Python it runs on", registry=REGISTRY)
BUILD_INFO.info({"version": __version__, "python": platform.python_version()})
MODEL_INFO = Gauge(
    "lisplugin_model_info",
    "Models in use (1), by card name, version and SHA-256 of the ONNX file",
    ["name", "version", "sha256"],
    registry=REGISTRY,
)
INSTANCES = Counter(
    "lisplugin_instances_received_total",
    "DICOM instances received, by outcome (stored, or quarantined: refused with a failure status)",
    ["outcome"],
    registry=REGISTRY,
)
ORDERS = Counter(
    "lisplugin_orders_received_total",
    "HL7 orders received, by ACK code",
    ["ack"],
    registry=REGISTRY,
)
CASES_ANALYSED = Counter(
    "lisplugin_cases_analysed_total",
    "Cases analysed, by outcome (verified: auto-verified, review: flagged for review, failed)",
    ["outcome"],
    registry=REGISTRY,
)
RESULTS_REJECTED = Counter(
    "lisplugin_results_rejected_total",
    "Outgoing results the receiver rejected (HL7 AE, DICOM failure): not retried",
    ["channel"],
    registry=REGISTRY,
)
ANALYSIS_SECONDS = Histogram(
    "lisplugin_case_analysis_seconds",
    "Wall time to analyse one case",
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
HTTP_SECONDS = Histogram(
    "lisplugin_http_request_seconds",
    "HTTP request latency, by method, route template and status",
    ["method", "route", "status"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OUTBOX_FAILURES = Counter(
    "lisplugin_outbox_failures_total",
    "Outgoing messages not accepted, by channel and outcome: error (AE/CE), refused (AR/CR), "
    "no_answer (refused connection, timeout, lost), parked (given up: needs attention)",
    ["channel", "outcome"],
    registry=REGISTRY,
)


for _outcome in ("stored", "quarantined"):
    INSTANCES.labels(_outcome)
for _outcome in ("verified", "review", "failed"):
    CASES_ANALYSED.labels(_outcome)
for _channel in ("hl7", "dicom"):
    RESULTS_REJECTED.labels(_channel)
ORDERS.labels("AA")

CHANNELS = ("hl7", "dicom")


def _age(since: datetime | None, now: float) -> float:
    if since is None:
        return 0.0
    if since.tzinfo is None:  # SQLite returns naive UTC
        since = since.replace(tzinfo=UTC)
    return max(0.0, now - since.timestamp())


class StateCollector(Collector):
    """Gauges read at scrape time from the database and the disk of one runtime."""

    def __init__(self, session: Callable[[], object], storage_path: Path) -> None:
        self._session = session
        self._storage_path = storage_path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.time()
        depth = GaugeMetricFamily(
            "lisplugin_outbox_pending", "Outgoing messages not yet delivered", labels=["channel"]
        )
        oldest = GaugeMetricFamily(
            "lisplugin_outbox_oldest_pending_seconds",
            "Age of the oldest undelivered message (0 when none)",
            labels=["channel"],
        )
        backlog = GaugeMetricFamily(
            "lisplugin_review_backlog", "Cases waiting for review (status review)"
        )
        waiting = GaugeMetricFamily(
            "lisplugin_review_oldest_waiting_seconds",
            "How long the longest-waiting case has waited for review (0 when none)",
        )
        with self._session() as session:  # type: ignore[attr-defined]
            assert isinstance(session, Session)
            pending = {
                channel: (count, first)
                for channel, count, first in session.execute(
                    select(OutboxMessage.channel, func.count(), func.min(OutboxMessage.created_at))
                    .where(OutboxMessage.status == OutboxStatus.PENDING)
                    .group_by(OutboxMessage.channel)
                )
            }
            review_count, review_first = session.execute(
                select(func.count(), func.min(Case.analysed_at)).where(
                    Case.status == CaseStatus.REVIEW
                )
            ).one()
        for channel in CHANNELS:
            count, first = pending.get(channel, (0, None))
            depth.add_metric([channel], count)
            oldest.add_metric([channel], _age(first, now))
        backlog.add_metric([], review_count)
        waiting.add_metric([], _age(review_first, now))
        disk = shutil.disk_usage(self._storage_path)
        free = GaugeMetricFamily(
            "lisplugin_storage_free_bytes", "Free space on the file system of storage.path"
        )
        free.add_metric([], disk.free)
        yield from (depth, oldest, backlog, waiting, free)
