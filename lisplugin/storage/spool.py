"""The ingest spool: received instances made durable with one sync, filed afterwards.

A C-STORE may only be answered Success once its instance cannot be lost. Writing the file
(fsync of the file and of its folder) and then recording it in the database (a WAL sync) took
three syncs per instance, most of an instance's time. The spool is a local SQLite file in WAL
mode at ``synchronous=FULL``: one row per instance (its bytes, where its file goes, what the
database will record), one ``fdatasync`` per commit, and concurrent associations commit
together (``GroupCommit``). The recorder (``service.ingest.SpoolRecorder``) then writes the
files, records the instances in the database, and deletes the rows; whatever a crash leaves in
the spool is filed at the next start. The rows are a queue, never a store: they live for
milliseconds while the daemon runs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lisplugin.storage.group import GroupCommit

SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    path TEXT NOT NULL,
    record TEXT NOT NULL,
    raw BLOB NOT NULL
)
"""

#: Rows deleted between two checkpoints of the spool's WAL (~6 pages a 23 kB instance).
CHECKPOINT_EVERY = 128


@dataclass(frozen=True)
class Spooled:
    """One instance in the spool: its row, the file it becomes, what is recorded of it."""

    id: int
    path: str
    record: dict[str, Any]
    raw: bytes
    created: float


class Spool:
    """A durable queue of received instances in one SQLite file, shared by the processes that
    accept on the DICOM port (each with its own connections)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Puts (the associations' group leader) and the recorder's reads and deletes each
        # have a connection: a checkpoint never holds up a C-STORE.
        self._lock = threading.Lock()
        self._conn = self._connect()
        self._conn.execute(SCHEMA)
        self._own_lock = threading.Lock()
        self._own = self._connect()
        self._removed = 0
        self._group: GroupCommit[tuple[str, dict[str, Any], bytes], int] = GroupCommit(self._insert)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), timeout=30, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # durable at commit: the WAL is synced
        # Checkpoints (a sync of the database file) are the recorder's, off the C-STORE path.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def put(self, path: str, record: dict[str, Any], raw: bytes) -> int:
        """Keep one instance durably (returns once synced) and return its row id."""
        return self._group.submit((path, record, raw))

    def _insert(self, items: list[tuple[str, dict[str, Any], bytes]]) -> list[int]:
        now = time.time()
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    int(
                        conn.execute(
                            "INSERT INTO spooled (created, path, record, raw) VALUES (?, ?, ?, ?)",
                            (now, path, json.dumps(record), raw),
                        ).lastrowid
                        or 0
                    )
                    for path, record, raw in items
                ]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return ids

    def remove(self, ids: list[int]) -> None:
        """Forget filed instances; every ``CHECKPOINT_EVERY`` rows let the WAL be reused (a
        passive checkpoint: it never waits for the associations)."""
        if not ids:
            return
        with self._own_lock:
            self._own.executemany("DELETE FROM spooled WHERE id = ?", [(i,) for i in ids])
            self._removed += len(ids)
            if self._removed >= CHECKPOINT_EVERY:
                self._own.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self._removed = 0

    def left(self, older_than: float = 0.0, limit: int = 256) -> list[Spooled]:
        """Rows spooled more than ``older_than`` seconds ago, oldest first: what a crashed
        process (or one whose recorder is stuck) left to file."""
        with self._own_lock:
            rows = self._own.execute(
                "SELECT id, path, record, raw, created FROM spooled WHERE created <= ? "
                "ORDER BY id LIMIT ?",
                (time.time() - older_than, limit),
            ).fetchall()
        return [Spooled(r[0], r[1], json.loads(r[2]), bytes(r[3]), r[4]) for r in rows]

    def count(self) -> int:
        with self._own_lock:
            return int(self._own.execute("SELECT count(*) FROM spooled").fetchone()[0])

    def close(self) -> None:
        with self._lock, self._own_lock:
            self._conn.close()
            self._own.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._own.close()
