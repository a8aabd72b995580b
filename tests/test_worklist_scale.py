"""The review station with many cases: paginated, bounded lists that read case summaries only.

Cases are seeded with full-size results (cells with outlines) by the worklist benchmark's own
seeder; the app runs in uvicorn on a loopback port, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from alembic import command
from review_support import PASSWORD, ServerThread, free_port
from sqlalchemy import select, text

from lisplugin.config import Settings
from lisplugin.evaluation.bench_worklist import review_result, seed_waiting_cases
from lisplugin.http.app import create_app
from lisplugin.service import users
from lisplugin.service.cases import CaseScheduler
from lisplugin.service.runtime import Runtime
from lisplugin.storage.db import Database, alembic_config
from lisplugin.storage.orm import Case, CaseStatus, Instance
from lisplugin.storage.orm_review import Role, User

CASES = 120


@pytest.fixture
def station(tmp_path: Path, database_url: str) -> Iterator[tuple[Runtime, httpx.Client]]:
    runtime = Runtime(Settings(storage={"path": tmp_path / "var"}, database={"url": database_url}))
    seed_waiting_cases(runtime.db, CASES, fields=2, stat_every=10)
    with runtime.db.session() as session:
        session.add(
            User(username="tech", password_hash=users.hash_password(PASSWORD), role=Role.ADMIN)
        )
    try:
        with (
            ServerThread(create_app(runtime), free_port()) as server,
            httpx.Client(base_url=server.url, timeout=60) as client,
        ):
            client.post("/api/session", json={"username": "tech", "password": PASSWORD})
            yield runtime, client
    finally:
        runtime.db.dispose()


def test_worklist_pages_through_every_waiting_case_once(
    station: tuple[Runtime, httpx.Client],
) -> None:
    runtime, client = station
    with runtime.db.session() as session:
        rows = session.execute(select(Case.id, Case.accession_number)).all()
    number = {case_id: int(acc[5:]) for case_id, acc in rows}
    # STAT first (every tenth), each group oldest first: the seeder's order of waiting
    expected = sorted(number, key=lambda i: (number[i] % 10 != 0, number[i]))

    seen = []
    for offset in (0, 50, 100):
        answer = client.get("/api/worklist", params={"limit": 50, "offset": offset})
        assert answer.status_code == 200
        assert answer.headers["X-Total-Count"] == str(CASES)
        seen += [e["id"] for e in answer.json()]
    assert seen == expected
    assert len(client.get("/api/worklist").json()) == 100  # bounded by default
    assert client.get("/api/worklist", params={"limit": 501}).status_code == 422
    assert client.get("/api/worklist", params={"offset": -1}).status_code == 422
    entry = client.get("/api/worklist", params={"limit": 1}).json()[0]
    assert entry["stat"] is True
    assert entry["wbc_classified"] == review_result(2)["wbc_classified"]
    assert [r["code"] for r in entry["reasons"]] == ["LOW_COUNT"]  # info flags left out

    last = client.get("/worklist", params={"page": 3})
    assert last.status_code == 200
    assert last.text.count("data-case-id=") == CASES - 100
    assert "page 3 of 3" in last.text and 'rel="prev"' in last.text
    assert 'rel="next"' not in last.text
    assert client.get("/worklist", params={"page": 0}).status_code == 422


def test_case_list_counts_instances_per_page(station: tuple[Runtime, httpx.Client]) -> None:
    runtime, client = station
    with runtime.db.session() as session:
        ids = session.scalars(select(Case.id).order_by(Case.id.desc()).limit(3)).all()
        for n, case_id in enumerate(ids):
            for k in range(n + 1):
                session.add(
                    Instance(
                        case_id=case_id,
                        sop_instance_uid=f"1.2.826.0.1.{case_id}.{k}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.2",
                        path="/nonexistent",
                    )
                )
    first = client.get("/api/cases", params={"limit": 2}).json()
    second = client.get("/api/cases", params={"limit": 2, "offset": 2}).json()
    assert [c["id"] for c in first + second] == [*ids, ids[-1] - 1]
    assert [c["instances"] for c in first + second] == [1, 2, 3, 0]
    assert all(c["needs_review"] is True for c in first)


def test_summary_follows_every_write_of_the_result(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.migrate()
    with db.session() as session:
        case = Case(case_key="acc:S1", status=CaseStatus.RECEIVING, patient={})
        session.add(case)
    assert case.summary is None and case.stat is False
    with db.session() as session:
        case = session.get(Case, case.id)
        case.order = {"priority": "S"}
        case.result = {**review_result(1), "needs_review": False, "wbc_classified": 7}
    with db.session() as session:
        stored = session.get(Case, case.id)
        assert stored.stat is True
        assert stored.summary["needs_review"] is False
        assert stored.summary["wbc_classified"] == 7
        assert stored.summary["fields"] == 1
        assert "cells" not in stored.summary
    db.dispose()


def test_migration_fills_the_summary_of_existing_cases(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    db = Database(url)
    config = alembic_config(url)
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
        connection.execute(
            text(
                'INSERT INTO cases (case_key, status, patient, result, "order", final_sent, '
                "created_at, updated_at, version) VALUES ('acc:M1', 'review', '{}', :result, "
                ":order, 0, '2026-01-01', '2026-01-01', 1)"
            ),
            {
                "result": '{"needs_review": true, "wbc_classified": 3, "flags": []}',
                "order": ('{"priority": "S"}'),
            },
        )
    db.migrate()
    with db.session() as session:
        case = session.scalar(select(Case))
        assert case.stat is True
        assert case.summary["wbc_classified"] == 3 and case.summary["needs_review"] is True
    db.dispose()


def test_delta_check_finds_the_patients_previous_result_in_sql(tmp_path: Path) -> None:
    settings = Settings(storage={"path": tmp_path})
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.migrate()
    now = datetime.now(UTC)
    with db.session() as session:
        for key, patient, hours, neutrophils in (
            ("old", "P1", 100, 10.0),  # outside the 72 h window
            ("recent", "P1", 5, 55.0),
            ("other", "P2", 1, 90.0),
        ):
            result = {**review_result(1), "differential": {"neutrophil": neutrophils}}
            session.add(
                Case(
                    case_key=key,
                    status=CaseStatus.VERIFIED,
                    patient={"id": patient},
                    result=result,
                    analysed_at=now - timedelta(hours=hours),
                )
            )
        new = Case(case_key="new", status=CaseStatus.QUEUED, patient={"id": "P1"})
        session.add(new)
    scheduler = CaseScheduler(db, settings, pipeline=lambda: None)  # type: ignore[arg-type,return-value]
    with db.session() as session:
        previous = scheduler._previous_result(session, session.get(Case, new.id))
    assert previous is not None
    assert previous.differential == {"neutrophil": 55.0}
    db.dispose()


def test_cells_are_loaded_per_field(station: tuple[Runtime, httpx.Client]) -> None:
    runtime, client = station
    with runtime.db.session() as session:
        case_id = session.scalar(select(Case.id).limit(1))
    answer = client.get(f"/api/cases/{case_id}/fields/1/cells")
    assert answer.status_code == 200
    cells = answer.json()["cells"]
    expected = [c for c in review_result(2)["cells"] if c["field"] == 1]
    assert [c["id"] for c in cells] == [c["id"] for c in expected]
    assert all(c["outline"] for c in cells)
    assert client.get(f"/api/cases/{case_id}/fields/2/cells").status_code == 404
    page = client.get(f"/cases/{case_id}")
    assert page.status_code == 200
    assert '"outline": null' in page.text and '"outline": [[' not in page.text
