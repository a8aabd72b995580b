"""Data lifecycle for IT: ``lisplugin purge``, ``lisplugin backup``, ``lisplugin db upgrade``.

Retention (``retention.*`` settings) removes what the laboratory no longer needs: captures and
reports of closed cases, replaced DICOM report objects, quarantined instances and delivered
outbox rows; case rows, results and the audit trail are kept. ``--dry-run`` says what would go.
A backup is one folder: the database (SQLite's online backup, or ``pg_dump``) and a tarball of
``storage.path``; deploy/README.md gives the restore steps, which tests/test_lifecycle.py runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.engine import make_url

from lisplugin import __version__
from lisplugin.config import Settings, load_settings
from lisplugin.progress import progress
from lisplugin.service.ingest import SPOOL_FILE
from lisplugin.service.outbox import as_utc
from lisplugin.service.reports import REPORT_JSON, reports_dir
from lisplugin.storage.db import Database, schema_revisions
from lisplugin.storage.orm import (
    Case,
    CaseStatus,
    OutboxMessage,
    OutboxStatus,
    QuarantinedInstance,
)

#: Cases whose work is done: their captures and reports may age out.
CLOSED = (CaseStatus.FINAL, CaseStatus.VERIFIED, CaseStatus.CANCELLED)
DB_FILE = "lisplugin.db"


@dataclass
class Tally:
    files: int = 0
    bytes: int = 0
    rows: int = 0


@dataclass
class PurgeReport:
    dry_run: bool
    categories: dict[str, Tally] = field(default_factory=dict)

    def tally(self, category: str) -> Tally:
        return self.categories.setdefault(category, Tally())

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "categories": {k: asdict(v) for k, v in self.categories.items()},
        }


class _Purger:
    def __init__(self, settings: Settings, db: Database, dry_run: bool, now: datetime) -> None:
        self.settings, self.db, self.now = settings, db, now
        self.report = PurgeReport(dry_run)

    def cutoff(self, days: int) -> datetime | None:
        return self.now - timedelta(days=days) if days > 0 else None

    def remove(self, category: str, paths: Iterable[Path]) -> None:
        tally = self.report.tally(category)
        for path in progress(list(paths), desc=category):
            if not path.exists():
                continue
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            tally.files += len(files)
            tally.bytes += sum(p.stat().st_size for p in files)
            if not self.report.dry_run:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def closed_cases(self, days: int) -> list[Case]:
        cutoff = self.cutoff(days)
        if cutoff is None:
            return []
        with self.db.session() as session:
            cases = session.scalars(select(Case).where(Case.status.in_(CLOSED))).all()
            old = [c for c in cases if as_utc(c.updated_at) < cutoff]
            for case in old:
                _ = case.instances  # loaded while the session is open
            return old

    def run(self) -> PurgeReport:
        retention = self.settings.retention
        self.remove(
            "images",
            (Path(i.path) for c in self.closed_cases(retention.images_days) for i in c.instances),
        )
        self.remove(
            "reports",
            (reports_dir(self.settings, c.id) for c in self.closed_cases(retention.reports_days)),
        )
        self.superseded(retention.superseded_reports_days)
        self.quarantine(retention.quarantine_days)
        self.outbox(retention.outbox_days)
        return self.report

    def superseded(self, days: int) -> None:
        """DICOM report objects no longer listed in report.json nor waiting to be sent."""
        cutoff = self.cutoff(days)
        root = self.settings.storage.path / "reports"
        if cutoff is None or not root.is_dir():
            return
        with self.db.session() as session:
            waiting = set(
                session.scalars(
                    select(OutboxMessage.payload)
                    .where(OutboxMessage.channel == "dicom")
                    .where(OutboxMessage.status == OutboxStatus.PENDING)
                )
            )
        old: list[Path] = []
        for folder in root.iterdir():
            listing = folder / REPORT_JSON
            if not listing.is_file():
                continue  # reports not finished (or being written): leave the folder alone
            current = {d["file"] for d in json.loads(listing.read_text())["documents"]}
            for path in folder.glob("*.dcm"):
                mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                if path.name not in current and str(path) not in waiting and mtime < cutoff:
                    old.append(path)
        self.remove("superseded_reports", old)

    def quarantine(self, days: int) -> None:
        cutoff = self.cutoff(days)
        if cutoff is None:
            return
        with self.db.session() as session:
            rows = [
                r
                for r in session.scalars(select(QuarantinedInstance))
                if as_utc(r.received_at) < cutoff
            ]
            paths = [Path(r.path) for r in rows]
            self.remove("quarantine", [*paths, *(p.with_suffix(".json") for p in paths)])
            self.report.tally("quarantine").rows += len(rows)
            if not self.report.dry_run:
                for row in rows:
                    session.delete(row)

    def outbox(self, days: int) -> None:
        cutoff = self.cutoff(days)
        if cutoff is None:
            return
        with self.db.session() as session:
            ids = [
                row.id
                for row in session.scalars(
                    select(OutboxMessage).where(OutboxMessage.status == OutboxStatus.DELIVERED)
                )
                if row.delivered_at is not None and as_utc(row.delivered_at) < cutoff
            ]
            self.report.tally("delivered_messages").rows += len(ids)
            if ids and not self.report.dry_run:
                session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))


def purge(
    settings: Settings, db: Database, dry_run: bool, now: datetime | None = None
) -> PurgeReport:
    """Apply the retention settings; with ``dry_run`` only count what would be removed."""
    return _Purger(settings, db, dry_run, now or datetime.now(UTC)).run()


def backup(settings: Settings, target: Path) -> Path:
    """Write ``target/lisplugin-backup-<UTC time>/``: database dump, files, manifest."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = target / f"lisplugin-backup-{stamp}"
    folder.mkdir(parents=True)
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        database_file = folder / DB_FILE
        source = sqlite3.connect(str(url.database))
        try:
            with sqlite3.connect(str(database_file)) as copy:
                source.backup(copy)  # consistent while the daemon writes
        finally:
            source.close()
    elif url.get_backend_name() == "postgresql":
        database_file = folder / "lisplugin.pgdump"
        env = dict(os.environ)
        if url.password:
            env["PGPASSWORD"] = str(url.password)  # not on the command line, where ps shows it
        libpq = url.set(drivername="postgresql", password=None)
        subprocess.run(
            [
                "pg_dump",
                "--format=custom",
                "--no-owner",
                "--file",
                str(database_file),
                libpq.render_as_string(hide_password=False),
            ],
            check=True,
            env=env,
            timeout=3600,
        )
    else:
        raise ValueError(f"backup supports SQLite and PostgreSQL, not {url.get_backend_name()}")
    storage = settings.storage.path.resolve()
    # SQLite files are copied consistently above (the database) or not at all (the spool: a
    # queue of instances filed within milliseconds, whose live file a tar would tear).
    skip = {f"{name}{suffix}" for name in (DB_FILE, SPOOL_FILE) for suffix in ("", "-wal", "-shm")}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name)
        if name.name in skip and len(name.parts) == 2:
            return None
        if (storage.parent / info.name).resolve() == target.resolve():
            return None  # a backup folder inside storage.path is not backed up into itself
        return info

    with tarfile.open(folder / "storage.tar.gz", "w:gz") as tar:
        tar.add(storage, arcname=storage.name, filter=keep)
    current, _ = schema_revisions(Database(settings.database_url).engine)
    manifest = {
        "lisplugin": __version__,
        "schema_revision": current,
        "database": url.get_backend_name(),
        "database_file": database_file.name,
        "storage_path": str(storage),
        "created_at": stamp,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _open(args: argparse.Namespace) -> tuple[Settings, Database]:
    settings = load_settings(args.config)
    settings.storage.path.mkdir(parents=True, exist_ok=True)
    return settings, Database(settings.database_url)


def _purge(args: argparse.Namespace) -> int:
    settings, db = _open(args)
    try:
        db.check_schema()
        report = purge(settings, db, dry_run=args.dry_run)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for name, tally in report.categories.items():
        print(
            f"{name:<20} {verb} {tally.files} files ({tally.bytes / 2**20:.1f} MB), "
            f"{tally.rows} rows"
        )
    return 0


def _backup(args: argparse.Namespace) -> int:
    settings, db = _open(args)
    db.dispose()
    print(backup(settings, args.dir))
    return 0


def _db(args: argparse.Namespace) -> int:
    _, db = _open(args)
    try:
        if args.action == "upgrade":
            db.migrate()
        current, head = schema_revisions(db.engine)
    finally:
        db.dispose()
    print(f"schema revision {current or 'none'} (this lisplugin's newest: {head})")
    return 0 if current == head else 1


def cli(argv: Sequence[str], command: str) -> int:
    parser = argparse.ArgumentParser(prog=f"lisplugin {command}", description=__doc__)
    parser.add_argument("--config", type=Path, help="site settings YAML (default: built-in)")
    if command == "purge":
        parser.add_argument("--dry-run", action="store_true", help="only say what would go")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.set_defaults(func=_purge)
    elif command == "backup":
        parser.add_argument("dir", type=Path, metavar="DIR", help="where the backup folder goes")
        parser.set_defaults(func=_backup)
    else:
        parser.add_argument(
            "action", choices=("upgrade", "current"), help="upgrade to the newest schema, or show"
        )
        parser.set_defaults(func=_db)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        print(f"lisplugin {command}: {exc}", file=sys.stderr)
        return 1


def purge_cli(argv: Sequence[str]) -> int:
    return cli(argv, "purge")


def backup_cli(argv: Sequence[str]) -> int:
    return cli(argv, "backup")


def db_cli(argv: Sequence[str]) -> int:
    return cli(argv, "db")
