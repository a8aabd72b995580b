"""An ingest worker: one more process accepting C-STOREs on the daemon's DICOM port.

Python runs one thread at a time per process, so one process cannot use a second CPU core for
ingest. With ``dicom.ingest_processes: N`` the daemon starts N - 1 of these; each binds the same
port with SO_REUSEPORT (the kernel spreads incoming connections over the listening processes)
and stores into the same storage folder and database, with the same guarantees (Success only
after the durable commit, quarantine, limits, idempotency). Analysis, HL7 and HTTP stay in the
daemon.

The daemon writes the settings as one JSON line to the worker's stdin and keeps stdin open: the
worker stops when it closes (or when the daemon dies: Linux's parent-death signal too). The
worker reports on stdout, one word a line: ``ready`` once listening, then ``stored`` or
``quarantined`` per instance, which the daemon counts in its metrics and which wakes its
scheduler as its own captures do.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import sys
import threading
from typing import TextIO

from pydicom import Dataset

from lisplugin.config import Settings
from lisplugin.dicom.mwl import WorklistSCP
from lisplugin.dicom.scp import StorageSCP
from lisplugin.service.ingest import instance_store
from lisplugin.service.worklist import scheduled_orders
from lisplugin.storage.db import Database

log = logging.getLogger(__name__)

READY, STORED, QUARANTINED = "ready", "stored", "quarantined"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGTERM when the daemon dies, even by kill -9: no orphan keeps taking connections."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: stdin's end still stops it
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _Reporter:
    """Lines to the daemon, whole even when several association threads write at once."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._lock = threading.Lock()

    def __call__(self, word: str) -> None:
        with self._lock:
            self.out.write(word + "\n")
            self.out.flush()


def serve_worker(settings: Settings, stdin: TextIO, report: _Reporter) -> None:
    """Accept associations on the shared port until ``stdin`` ends."""
    db = Database(settings.database_url)
    store = instance_store(db, settings, lambda case: report(STORED))

    def stored(ds: Dataset, raw: bytes) -> None:
        store.accept(ds, raw)  # reports STORED once filed

    def refused(raw: bytes, reason: str, sop_uid: str, calling: str) -> None:
        store.quarantine(raw, reason, sop_uid, calling)
        report(QUARANTINED)

    worklist = WorklistSCP(lambda: scheduled_orders(db)) if settings.dicom.worklist else None
    scp = StorageSCP(settings.dicom, stored, refused, worklist, reuse_port=True)
    store.start()
    scp.start()
    report(READY)
    try:
        stdin.read()  # blocks until the daemon closes it or exits
    finally:
        scp.stop()
        store.stop()
        db.dispose()


def main() -> int:
    """``python -m lisplugin.service.ingest_worker`` (started by the daemon, not by people)."""
    from lisplugin.logging_setup import configure_logging

    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    settings = Settings.model_validate_json(sys.stdin.readline())
    configure_logging(settings.logging.format, settings.logging.level)
    serve_worker(settings, sys.stdin, _Reporter(sys.stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
