"""Engine, sessions and schema migration (Alembic, run programmatically at start-up)."""

from __future__ import annotations

import fcntl
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
log = logging.getLogger(__name__)
T = TypeVar("T")

#: What a concurrent writer makes a transaction fail with: a unique key taken in between, an
#: optimistic-lock version moved on, SQLite busy. Running the transaction again resolves it.
CONFLICTS = (IntegrityError, StaleDataError, OperationalError)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while the daemon writes; FULL sync makes commits durable.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    # A database host that drops packets must not hang /readyz (or anything else) for minutes.
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class DatabaseInUse(RuntimeError):
    """Another daemon process already serves from this SQLite file."""


def serve_exclusively(url: str) -> IO[bytes] | None:
    """Hold a lock beside a SQLite database for as long as the returned file stays open.

    SQLite is the single-process embedded default: two daemons on one file would both analyse
    and send everything. Several processes need PostgreSQL, where they share the work (claims).
    The kernel drops the lock when the process ends, even by kill -9. None for other databases.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    lock_path = Path(f"{parsed.database}.serve-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = lock_path.open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DatabaseInUse(
            f"another lisplugin serve already uses {parsed.database}: SQLite serves one process; "
            "to run several processes, point them all at one PostgreSQL database"
        ) from None
    return handle


class SchemaOutdated(RuntimeError):
    """The database schema is not the one this version of lisplugin needs."""


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's current Alembic revision or None, the newest this code knows)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, str(head)


class Database:
    """One engine and its session factory, shared by every adapter of the daemon."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        migrate(self.engine)

    def check_schema(self) -> None:
        """Raise ``SchemaOutdated`` unless the schema is at the newest revision."""
        current, head = schema_revisions(self.engine)
        if current != head:
            raise SchemaOutdated(
                f"database schema is at {current or 'nothing'}, this lisplugin needs {head}: "
                "run `lisplugin db upgrade` (back up first: `lisplugin backup DIR`)"
            )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def transaction(self, work: Callable[[Session], T], attempts: int = 8) -> T:
        """``work`` in a transaction of its own, run again from the start (after a short random
        pause) when a concurrent writer conflicted; the last conflict is raised."""
        for attempt in range(1, attempts + 1):
            try:
                with self.session() as session:
                    return work(session)
            except CONFLICTS as exc:
                if attempt == attempts:
                    raise
                log.info("transaction conflict (%s), attempt %d", type(exc).__name__, attempt)
                time.sleep(random.uniform(0.0, 0.02 * attempt))
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()
