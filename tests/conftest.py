"""Shared fixtures: where the public datasets are, and skipping cleanly when they are not."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from phi_guard import _no_patient_names_in_logs, pytest_configure  # noqa: F401 - the plugin

from lisplugin.storage.db import Database

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """``$LISPLUGIN_DATA`` or ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("LISPLUGIN_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"public datasets not found at {path} (set LISPLUGIN_DATA)")
    return path


POSTGRES_ADMIN = os.environ.get(
    "LISPLUGIN_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)


def _postgres_database(request: pytest.FixtureRequest) -> str:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    import uuid

    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable ({POSTGRES_ADMIN}): {exc}")
    name = f"lisplugin_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in POSTGRES_ADMIN.split())

    def drop() -> None:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    request.addfinalizer(drop)
    return (
        f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}"
        f":{params.get('port', '5432')}/{name}"
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on the embedded default (SQLite) and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lisplugin.db'}"
    return _postgres_database(request)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A migrated database of ``database_url`` (SQLite and PostgreSQL), disposed after."""
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()
