"""The daemon's parts wired together: SCP, MLLP listener, scheduler, outbox, pipeline."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import func, select, text

from lisplugin.config import Settings
from lisplugin.core.delivery import Delivery, ReceiverUnavailable
from lisplugin.dicom.mwl import WorklistSCP
from lisplugin.dicom.scp import StorageSCP
from lisplugin.hl7.ack import ErrorCode
from lisplugin.hl7.analyser import AnalyserCounts
from lisplugin.hl7.mllp import (
    BackgroundServer,
    LisUnreachable,
    MllpOrderListener,
    next_retry_delay,
    send_message,
)
from lisplugin.hl7.orders import Order, OrderRejected
from lisplugin.inference.registry import ModelCardError, load_card
from lisplugin.inference.store import active_models_dir
from lisplugin.reports.pacs import pacs_sender
from lisplugin.service.analyser import apply_analyser_counts
from lisplugin.service.cases import CaseScheduler, ReportWriter
from lisplugin.service.claims import process_name
from lisplugin.service.ingest import FiledCase, OrderConflict, apply_order, instance_store
from lisplugin.service.ingest_worker import QUARANTINED, READY, STORED
from lisplugin.service.metrics import INSTANCES, MODEL_INFO, ORDERS
from lisplugin.service.outbox import OutboxWorker, Sender, needing_attention
from lisplugin.service.pipeline import Pipeline
from lisplugin.service.worklist import scheduled_orders
from lisplugin.storage.db import Database
from lisplugin.storage.orm import OutboxMessage, OutboxStatus
from lisplugin.tls import client_context, server_context

log = logging.getLogger(__name__)


def hl7_sender(settings: Settings) -> Sender:
    tls = client_context(settings.hl7.lis_tls)

    def send(message: OutboxMessage) -> Delivery:
        try:
            ack = send_message(
                settings.hl7.lis_host,
                settings.hl7.lis_port,
                message.payload,
                timeout=settings.hl7.ack_timeout_seconds,
                ssl_context=tls,
            )
        except LisUnreachable as exc:
            raise ReceiverUnavailable(str(exc)) from exc
        return Delivery(
            accepted=ack.code in ("AA", "CA"),
            code=ack.code,
            text=ack.text or "",
            retry=ack.code in ("AR", "CR"),  # refused for reasons other than content
        )

    return send


class Runtime:
    """Owns every long-lived part; ``start``/``stop`` bracket the daemon's life."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.storage.path.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.database_url)
        if settings.database.migrate_on_start:
            self.db.migrate()
        else:
            self.db.check_schema()
        self.store = instance_store(self.db, settings, self._filed)
        #: This process's name in the work claims it writes (``service.claims``).
        self.owner = process_name()
        hl7 = settings.hl7
        self.outbox = OutboxWorker(
            self.db,
            senders={
                "hl7": hl7_sender(settings),
                "dicom": pacs_sender(settings.pacs, settings.dicom.ae_title),
            },
            backoff=lambda attempt: next_retry_delay(
                attempt, hl7.retry_initial_seconds, hl7.retry_max_seconds
            ),
            max_attempts_refused=hl7.max_attempts_refused,
            owner=self.owner,
            lease_seconds=settings.database.send_lease_seconds,
        )
        self._pipeline: Pipeline | None = None
        self._pipeline_models: Path | None = None
        self._pipeline_lock = threading.Lock()
        self.reports = ReportWriter(self.db, settings, on_outbox=self.outbox.notify)
        self.scheduler = CaseScheduler(
            self.db,
            settings,
            self.pipeline,
            on_outbox=self.outbox.notify,
            reports=self.reports,
            owner=self.owner,
        )
        worklist = (
            WorklistSCP(lambda: scheduled_orders(self.db)) if settings.dicom.worklist else None
        )
        self.scp = StorageSCP(
            settings.dicom,
            self.store_instance,
            self.quarantine_instance,
            worklist,
            reuse_port=settings.dicom.ingest_processes > 1,
        )
        self.ingest_workers: list[subprocess.Popen[str]] = []
        listener = MllpOrderListener(
            settings.hl7.listen_host,
            settings.hl7.listen_port,
            self.accept_order,
            on_result=self.accept_analyser_counts,
            application=settings.hl7.sending_application,
            facility=settings.hl7.sending_facility,
            max_message_bytes=settings.hl7.max_message_bytes,
            read_timeout=settings.hl7.read_timeout_seconds,
            max_connections=settings.hl7.max_connections,
            allowed_peers=settings.hl7.allowed_peers,
            allowed_senders=settings.hl7.allowed_senders,
            ssl_context=server_context(settings.hl7.listen_tls),
        )
        self.mllp = BackgroundServer(listener, "lisplugin-mllp")
        self._threads: list[threading.Thread] = []

    def pipeline(self) -> Pipeline:
        """Models are loaded on first use or at start-up, and again when an admin has promoted
        (or rolled back) a models folder since: the next case uses it, no restart needed."""
        with self._pipeline_lock:
            models_dir = active_models_dir(self.settings)
            if self._pipeline is None or models_dir != self._pipeline_models:
                self._pipeline = Pipeline.from_settings(self.settings)
                self._pipeline_models = models_dir
                log.info("analysing with the models in %s", models_dir)
                self._publish_models(models_dir)
            return self._pipeline

    def _publish_models(self, models_dir: Path) -> None:
        analysis = self.settings.analysis
        MODEL_INFO.clear()
        for name in (analysis.detector, analysis.classifier):
            try:
                card = load_card(models_dir, name, verify=False)
            except ModelCardError:  # a test double in place of a shipped model
                continue
            MODEL_INFO.labels(card.name, card.version, card.sha256).set(1)

    def store_instance(self, ds: Dataset, raw: bytes) -> None:
        self.store.accept(ds, raw)  # durable on return; filed now or moments later

    def _filed(self, case: FiledCase) -> None:
        INSTANCES.labels("stored").inc()
        self.scheduler.capture_stored()  # its case's stability clock restarted

    def quarantine_instance(self, raw: bytes, reason: str, sop_uid: str, calling: str) -> None:
        self.store.quarantine(raw, reason, sop_uid, calling)
        INSTANCES.labels("quarantined").inc()

    def accept_order(self, order: Order, message: str) -> None:
        try:
            apply_order(self.db, order, message)
        except OrderConflict as exc:  # AE: resending the same order would not help
            raise OrderRejected(
                ErrorCode.APPLICATION_INTERNAL_ERROR, str(exc), "PID^1", ack_code="AE"
            ) from exc
        ORDERS.labels("AA").inc()
        self.scheduler.wake()

    def accept_analyser_counts(self, counts: AnalyserCounts, message: str) -> None:
        """The analyser's WBC/platelet counts: kept with the case, its result evaluated again
        and, where due, a new result queued (``lisplugin.service.analyser``)."""
        applied = apply_analyser_counts(self.db, self.pipeline(), counts)
        # An analysis running meanwhile finds its case changed and leaves it queued: redo it now.
        self.scheduler.wake()
        if applied.control_id is not None:
            self.outbox.notify()
            self.reports.request(applied.case_id)

    def wake_scheduler(self) -> None:
        self.scheduler.wake()

    def readiness(self) -> dict[str, bool]:
        """Each part needed to accept and report work: all must be True to be ready."""
        return {
            "models": self._pipeline is not None,
            "dicom": self.scp_running,
            "hl7": self.mllp.running,
            "database": self.database_reachable(),
            "disk": self.disk_free_mb() >= self.settings.storage.min_free_mb,
        }

    def database_reachable(self) -> bool:
        try:
            with self.db.session() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("database unreachable: %s", type(exc).__name__)
            return False
        return True

    def disk_free_mb(self) -> float:
        return shutil.disk_usage(self.settings.storage.path).free / 2**20

    def lis_link(self) -> str:
        """ "degraded" while a result waits for a retry (the LIS did not answer or refused)."""
        try:
            with self.db.session() as session:
                failing = session.scalar(
                    select(func.count())
                    .select_from(OutboxMessage)
                    .where(OutboxMessage.channel == "hl7")
                    .where(OutboxMessage.status == OutboxStatus.PENDING)
                    .where(OutboxMessage.attempts > 0)
                )
        except Exception:
            return "unknown"
        return "degraded" if failing else "ok"

    def alive(self) -> bool:
        """Every listener and worker thread is running (what systemd's watchdog is told)."""
        threads = all(thread.is_alive() for thread in self._threads)
        workers = all(worker.poll() is None for worker in self.ingest_workers)
        return threads and workers and self.scp_running and self.mllp.running

    def degradations(self) -> dict[str, int]:
        """Non-zero counts need a person (results parked or overdue) but do not stop work."""
        return needing_attention(self.db, self.settings.hl7.overdue_seconds)

    @property
    def scp_running(self) -> bool:
        try:
            self.scp.port  # noqa: B018 - raises when not listening
        except RuntimeError:
            return False
        return True

    def start(self) -> None:
        self.pipeline()
        self.store.recover()  # what the last run spooled and did not file
        self.store.start()
        self.scp.start()
        for _ in range(self.settings.dicom.ingest_processes - 1):
            self._start_ingest_worker()
        self.mllp.start()
        self._spawn("scheduler", self.scheduler.run_forever)
        self._spawn("outbox", self.outbox.run_forever)
        self._spawn("reports", self.reports.run_forever)

    def _start_ingest_worker(self) -> None:
        """One more process accepting associations on the SCP's port (``ingest_worker``);
        returns once it listens. Its captures count and wake the scheduler as ours do."""
        settings = self.settings.model_copy(deep=True)
        settings.dicom.port = self.scp.port  # the port actually bound (settings may say 0)
        worker = subprocess.Popen(
            [sys.executable, "-m", "lisplugin.service.ingest_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(settings.model_dump_json() + "\n")
        worker.stdin.flush()
        if worker.stdout.readline().strip() != READY:
            worker.kill()
            raise RuntimeError(f"ingest worker exited with {worker.wait()} before listening")
        self.ingest_workers.append(worker)
        self._spawn(f"ingest-worker-{worker.pid}", lambda: self._relay(worker))

    def _relay(self, worker: subprocess.Popen[str]) -> None:
        assert worker.stdout is not None
        for line in worker.stdout:
            word = line.strip()
            if word == STORED:
                INSTANCES.labels("stored").inc()
                self.scheduler.capture_stored()
            elif word == QUARANTINED:
                INSTANCES.labels("quarantined").inc()
        if self.scp_running:  # it died while the daemon runs: alive() turns false
            log.error("ingest worker %d exited with %s", worker.pid, worker.wait())

    def _stop_ingest_workers(self) -> None:
        for worker in self.ingest_workers:
            if worker.stdin is not None:
                worker.stdin.close()  # the worker's signal to finish its associations and stop
        for worker in self.ingest_workers:
            try:
                worker.wait(timeout=self.settings.dicom.network_timeout)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self.ingest_workers = []

    def _spawn(self, name: str, target: Callable[[], Any]) -> None:
        thread = threading.Thread(target=target, name=f"lisplugin-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.scheduler.stop()
        self.reports.stop()
        self.outbox.stop()
        self.mllp.stop()
        self.scp.stop()
        self._stop_ingest_workers()
        self.store.stop()  # files what is spooled; anything left is filed at the next start
        for thread in self._threads:
            thread.join(timeout=15)
        self.db.dispose()
