"""Prometheus metrics of the daemon (one registry per process, served at /metrics)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

INSTANCES = Counter(
    "lisplugin_instances_received_total",
    "DICOM instances received, by outcome (stored or quarantined)",
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
    "Cases analysed, by outcome (verified, review, failed)",
    ["outcome"],
    registry=REGISTRY,
)
ANALYSIS_SECONDS = Histogram(
    "lisplugin_case_analysis_seconds",
    "Wall time to analyse one case",
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
OUTBOX_PENDING = Gauge(
    "lisplugin_outbox_pending",
    "Outgoing messages not yet delivered",
    ["channel"],
    registry=REGISTRY,
)
OUTBOX_FAILURES = Counter(
    "lisplugin_outbox_failures_total",
    "Outgoing messages not accepted, by channel and outcome: error (AE/CE), refused (AR/CR), "
    "no_answer (refused connection, timeout, lost), parked (given up: needs attention)",
    ["channel", "outcome"],
    registry=REGISTRY,
)
