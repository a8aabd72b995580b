"""Data lifecycle: retention purge, backup with the documented restore, explicit upgrades."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import _postgres_database
from ops_support import outbox_message
from sqlalchemy import func, select

from lisplugin.config import Settings
from lisplugin.service.lifecycle import purge
from lisplugin.service.runtime import Runtime
from lisplugin.storage.db import Database, SchemaOutdated
from lisplugin.storage.orm import (
    Case,
    CaseStatus,
    Instance,
    OutboxMessage,
    OutboxStatus,
    QuarantinedInstance,
)

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=400)


def _file(path: Path, size: int = 1000, old: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if old:
        stamp = time.time() - 400 * 86400
        os.utime(path, (stamp, stamp))
    return path


def _case(session, storage: Path, key: str, status: CaseStatus) -> tuple[Case, Path, Path]:  # type: ignore[no-untyped-def]
    case = Case(
        case_key=f"acc:{key}",
        accession_number=key,
        status=status,
        patient={},
        created_at=OLD,
        updated_at=OLD,
    )
    session.add(case)
    session.flush()
    image = _file(storage / "instances" / key / "1.dcm", 5000)
    session.add(
        Instance(
            case_id=case.id,
            sop_instance_uid=f"1.2.{case.id}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.2",
            path=str(image),
        )
    )
    reports = storage / "reports" / str(case.id)
    for name in ("sr-1.dcm", "sr-0.dcm", "sr-2.dcm", "report.pdf"):
        _file(reports / name)
    (reports / "report.json").write_text(json.dumps({"documents": [{"file": "sr-1.dcm"}]}))
    return case, image, reports


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        storage={"path": tmp_path / "var"},
        database={"url": database_url},
        retention={
            "images_days": 30,
            "reports_days": 0,
            "superseded_reports_days": 7,
            "quarantine_days": 30,
            "outbox_days": 30,
        },
    )


def test_purge_keeps_open_cases_current_reports_and_unsent_objects(settings: Settings) -> None:
    storage = settings.storage.path
    db = Database(settings.database_url)
    db.migrate()
    with db.session() as session:
        closed, closed_image, closed_reports = _case(session, storage, "DONE1", CaseStatus.FINAL)
        _, open_image, open_reports = _case(session, storage, "OPEN1", CaseStatus.REVIEW)
        waiting = str(closed_reports / "sr-2.dcm")
        session.add(outbox_message(closed.id, "dicom", "2", OutboxStatus.PENDING, waiting))
        session.add(
            outbox_message(closed.id, "hl7", "old", OutboxStatus.DELIVERED, delivered_at=OLD)
        )
        quarantined = _file(storage / "quarantine" / "q.dcm", 700)
        _file(quarantined.with_suffix(".json"), 30)
        session.add(QuarantinedInstance(path=str(quarantined), reason="bad", received_at=OLD))
    before = sorted(p for p in storage.rglob("*") if p.is_file())

    dry = purge(settings, db, dry_run=True).as_dict()["categories"]
    assert sorted(p for p in storage.rglob("*") if p.is_file()) == before
    assert dry["images"] == {"files": 1, "bytes": 5000, "rows": 0}
    assert dry["reports"] == {"files": 0, "bytes": 0, "rows": 0}  # reports_days 0: kept
    # sr-0 of both cases: replaced and not waiting to be sent; sr-2 of the closed case waits.
    assert dry["superseded_reports"] == {"files": 3, "bytes": 3000, "rows": 0}
    assert dry["quarantine"] == {"files": 2, "bytes": 730, "rows": 1}
    assert dry["delivered_messages"]["rows"] == 1

    done = purge(settings, db, dry_run=False).as_dict()["categories"]
    assert done == dry
    assert not closed_image.exists() and open_image.exists()
    assert (closed_reports / "sr-1.dcm").exists() and (closed_reports / "sr-2.dcm").exists()
    assert not (closed_reports / "sr-0.dcm").exists() and not (open_reports / "sr-0.dcm").exists()
    assert (open_reports / "sr-2.dcm").exists() is False  # open case: replaced, nothing waits
    assert not quarantined.exists()
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(QuarantinedInstance)) == 0
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
        assert session.scalar(select(func.count()).select_from(Case)) == 2  # the record stays
    assert all(
        v["files"] == 0 and v["rows"] == 0
        for v in purge(settings, db, dry_run=False).as_dict()["categories"].values()
    )
    db.dispose()


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "LISPLUGIN_STORAGE__PATH": str(settings.storage.path),
        "LISPLUGIN_DATABASE__URL": settings.database.url,
    }


def _lisplugin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lisplugin", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_backup_and_documented_restore(
    settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    storage = settings.storage.path
    db = Database(settings.database_url)
    db.migrate()
    with db.session() as session:
        _, image, _ = _case(session, storage, "BACK1", CaseStatus.VERIFIED)
    db.dispose()
    made = _lisplugin(_env(settings), "backup", str(tmp_path / "backups"))
    assert made.returncode == 0, made.stderr
    folder = Path(made.stdout.strip())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema_revision"]

    # The restore of deploy/README.md, onto a new storage folder and an empty database.
    restored = tmp_path / "restored"
    restored.mkdir()
    with tarfile.open(folder / "storage.tar.gz") as tar:
        tar.extractall(restored, filter="data")
    new_storage = restored / storage.name
    if manifest["database"] == "sqlite":
        shutil.copy(folder / "lisplugin.db", new_storage / "lisplugin.db")
        url = f"sqlite:///{new_storage / 'lisplugin.db'}"
    else:
        url = _postgres_database(request)
        libpq = url.replace("postgresql+psycopg", "postgresql")
        subprocess.run(
            ["pg_restore", "--no-owner", "--dbname", libpq, str(folder / "lisplugin.pgdump")],
            check=True,
            timeout=300,
        )
    assert (new_storage / image.relative_to(storage)).read_bytes() == image.read_bytes()
    assert not (new_storage / "lisplugin.db-wal").exists()
    copy = Database(url)
    copy.check_schema()
    with copy.session() as session:
        assert session.scalar(select(Case.accession_number)) == "BACK1"
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    copy.dispose()


def test_upgrade_is_explicit_when_migrate_on_start_is_off(tmp_path: Path) -> None:
    settings = Settings(storage={"path": tmp_path / "var"}, database={"migrate_on_start": False})
    settings.storage.path.mkdir(parents=True)
    env = {**_env(settings), "LISPLUGIN_DATABASE__MIGRATE_ON_START": "false"}
    with pytest.raises(SchemaOutdated, match="lisplugin db upgrade"):
        Runtime(settings)
    refused = _lisplugin(env, "serve")
    assert refused.returncode == 2 and "lisplugin db upgrade" in refused.stderr
    assert _lisplugin(env, "db", "current").returncode == 1
    upgraded = _lisplugin(env, "db", "upgrade")
    assert upgraded.returncode == 0 and "schema revision" in upgraded.stdout, upgraded.stderr
    assert _lisplugin(env, "db", "current").returncode == 0
    runtime = Runtime(settings)  # now it starts on the upgraded schema
    runtime.db.dispose()
