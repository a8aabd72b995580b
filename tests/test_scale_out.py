"""Several daemon processes on one PostgreSQL database (issue 10, scale-out).

Work is claimed with row locks (``SELECT ... FOR UPDATE SKIP LOCKED``) and a lease: two workers
never take the same case or message, a case's messages still leave in order when another
worker holds the first, and a claim whose holder died is taken over once its lease ran out.
The end-to-end run is ``lisplugin soak``: three ``lisplugin serve`` processes on one database,
one killed with SIGKILL mid-run, the LIS away for a while. SQLite stays one process.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from daemon import Daemon, free_port
from phi_guard import watch_log_file
from sqlalchemy import select, update
from test_outbox_order import Lis, new_case, queue, statuses, worker

from lisplugin.config import Settings
from lisplugin.evaluation.soak import Options, soak
from lisplugin.service.cases import CaseScheduler
from lisplugin.storage.db import Database, DatabaseInUse, serve_exclusively
from lisplugin.storage.orm import Case, CaseStatus, OutboxMessage, OutboxStatus

pytestmark = pytest.mark.reliability


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Iterator[Database]:
    """PostgreSQL only: several processes (here threads) claiming at once is its setting;
    SQLite serves one process, whose one scheduler and one outbox thread claim in turn."""
    from conftest import _postgres_database

    database = Database(_postgres_database(request))
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def lis() -> Iterator[Lis]:
    peer = Lis()
    yield peer
    peer.down()


def scheduler(db: Database, owner: str, lease: float = 60.0) -> CaseScheduler:
    settings = Settings()
    settings.database.analysis_lease_seconds = lease
    return CaseScheduler(db, settings, pipeline=lambda: None, owner=owner)  # type: ignore[arg-type,return-value]


def queued_cases(db: Database, count: int) -> list[int]:
    with db.session() as session:
        cases = [
            Case(case_key=f"acc:Q{n}", status=CaseStatus.QUEUED, patient={}) for n in range(count)
        ]
        session.add_all(cases)
        session.flush()
        return [c.id for c in cases]


def test_concurrent_workers_claim_each_queued_case_once(pg: Database) -> None:
    db = pg
    ids = queued_cases(db, 24)
    workers = [scheduler(db, f"worker-{n}") for n in range(4)]
    taken: dict[str, list[int]] = {w.owner: [] for w in workers}
    start = threading.Barrier(len(workers))
    returned: list[int] = []

    def claim_all(one: CaseScheduler) -> None:
        start.wait()
        while (case_id := one.claim_case()) is not None:
            if case_id in taken[one.owner]:  # it finished that one: a claim that never ends
                returned.append(case_id)
                return
            taken[one.owner].append(case_id)
            with db.session() as session:  # "analysed": a claimed case that is done leaves the
                session.execute(  # queue (Core UPDATE: the claim stays for the check below)
                    update(Case).where(Case.id == case_id).values(status=CaseStatus.REVIEW)
                )

    threads = [threading.Thread(target=claim_all, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not returned, f"workers got back cases they had finished: {returned}"
    claimed = [case_id for ids_of in taken.values() for case_id in ids_of]
    assert sorted(claimed) == ids  # every case once, none twice
    with db.session() as session:
        owners = dict(session.execute(select(Case.id, Case.claimed_by)).all())
    assert all(owners[c] == owner for owner, cases in taken.items() for c in cases)


def test_a_dead_workers_case_is_taken_over_when_its_lease_ran_out(db: Database) -> None:
    (case_id,) = queued_cases(db, 1)
    dead, alive = scheduler(db, "killed", lease=30), scheduler(db, "alive", lease=30)
    assert dead.claim_case() == case_id
    assert alive.claim_case() is None  # held
    later = datetime.now(UTC) + timedelta(seconds=31)
    assert alive.claim_case(now=later) == case_id
    with db.session() as session:
        assert session.get(Case, case_id).claimed_by == "alive"  # type: ignore[union-attr]
    # the dead one's analysis, had it been slow rather than dead, could no longer commit
    dead.analyse_case(case_id)  # returns at once: not its claim any more


def test_a_case_that_moves_on_is_nobodys_claim(db: Database) -> None:
    (case_id,) = queued_cases(db, 1)
    assert scheduler(db, "a").claim_case() == case_id
    with db.session() as session:
        case = session.get(Case, case_id)
        assert case is not None
        case.status = CaseStatus.RECEIVING  # a new capture re-opened it
    with db.session() as session:
        case = session.get(Case, case_id)
        assert case is not None
        assert (case.claimed_by, case.claimed_until) == (None, None)


def test_a_message_held_by_another_process_blocks_its_case_queue(db: Database, lis: Lis) -> None:
    case, other = new_case(db, "acc:HELD"), new_case(db, "acc:FREE")
    queue(db, case, "LP1-1", "P")
    queue(db, case, "LP1-2", "F")  # would supersede the P - but the P may be on its way
    queue(db, other, "LP2-1", "F")
    lis.up()
    first, second = worker(db, lis), worker(db, lis)
    first.lease = timedelta(seconds=30)
    with db.session() as session:
        p_id = session.scalar(select(OutboxMessage.id).where(OutboxMessage.control_id == "LP1-1"))
    held = first._claim(p_id)  # the first process is sending LP1-1 (e.g. then killed)
    assert not isinstance(held, str)
    assert second.run_once() == 1  # only the other case's message
    assert lis.control_ids() == ["LP2-1"]
    assert statuses(db)["LP1-1"] == OutboxStatus.PENDING
    # the first process died: once its claim ran out, the second takes the queue over, in order
    with db.session() as session:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.control_id == "LP1-1")
            .values(claimed_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    second.run_once()
    assert lis.control_ids() == ["LP2-1", "LP1-2"]
    assert statuses(db) == {
        "LP1-1": OutboxStatus.SUPERSEDED,
        "LP1-2": OutboxStatus.DELIVERED,
        "LP2-1": OutboxStatus.DELIVERED,
    }


def test_two_workers_never_send_the_same_message(pg: Database, lis: Lis) -> None:
    db = pg
    cases = [new_case(db, f"acc:T{n}") for n in range(6)]
    for case in cases:
        queue(db, case, f"LP{case}-1", "F")
        queue(db, case, f"LP{case}-2", "C")
    lis.up()
    workers = [worker(db, lis) for _ in range(3)]
    threads = [threading.Thread(target=w.run_once) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for w in workers:
        w.run_once()
    received = lis.control_ids()
    assert sorted(received) == sorted(f"LP{c}-{n}" for c in cases for n in (1, 2))
    for case in cases:  # per case, in order
        assert received.index(f"LP{case}-1") < received.index(f"LP{case}-2")


def test_a_second_serve_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lisplugin.db'}"
    held = serve_exclusively(url)
    assert held is not None
    with pytest.raises(DatabaseInUse, match="PostgreSQL"):
        serve_exclusively(url)
    held.close()  # as when the first process ends, even by kill -9
    serve_exclusively(url).close()  # type: ignore[union-attr]
    assert serve_exclusively("postgresql+psycopg://x@127.0.0.1/none") is None


def test_serve_refuses_a_sqlite_file_another_daemon_serves(tmp_path: Path) -> None:
    first = Daemon(tmp_path / "var", "", free_port())
    try:
        first.start(timeout=300)
        second = subprocess.run(
            [sys.executable, "-m", "lisplugin", "serve"],
            env={
                **first.env(),
                "LISPLUGIN_HTTP__PORT": str(free_port()),
                "LISPLUGIN_DICOM__PORT": str(free_port()),
                "LISPLUGIN_HL7__LISTEN_PORT": str(free_port()),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.stop()
    assert second.returncode == 2
    assert "SQLite serves one process" in second.stderr


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite-1", "postgresql-3"])
def test_soak_daemons_killed_and_the_lis_away(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Captures to the daemons (SQLite: one; PostgreSQL: three), one SIGKILLed every 2.5 s
    during ingest, analysis and delivery, the LIS away for 3 s: each accepted capture analysed
    once, no message sent twice, each case's results in order."""
    from conftest import _postgres_database

    postgres = database.startswith("postgresql")
    options = Options(
        captures=60,
        accessions=20,
        processes=3 if postgres else 1,
        database_url=_postgres_database(request) if postgres else "",
        kill_every=2.5,
        outage_at=1.0,
        outage_seconds=3.0,
        rate=10.0,
        work_dir=tmp_path,
        settle_timeout=240.0,
    )
    try:
        figures = soak(options)
    finally:
        for log in sorted((tmp_path / "var").glob("soak-daemon-*.log")):
            watch_log_file(log)
    assert figures["settled"], figures
    assert figures["kills"] >= 1, figures
    assert figures["captures_accepted"] == 60, figures
    assert (figures["lost"], figures["duplicated"], figures["out_of_order"]) == (0, 0, 0), figures
    # One analysis per accession, and one more only where a capture of it was stored after
    # the analysis: a capture whose daemon was killed is sent again to another, and on a loaded
    # machine that can take longer than the soak's 2 s stable time (seen twice at load 4-6,
    # 21 ORUs). Such a re-analysis is the product's right answer; one that no capture
    # justified is counted in "duplicated" above. A re-send carries its MSH-10 again.
    distinct = figures["orus_received"] - figures["resent_same_msh10"]
    assert figures["analyses_not_justified"] == 0, figures
    assert 20 <= distinct <= 20 + figures["kills"], figures
