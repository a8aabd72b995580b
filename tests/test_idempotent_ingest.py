"""Re-sent and simultaneous captures (issue 10, findings 4 and 6), on SQLite and PostgreSQL.

A modality that lost a C-STORE response sends the instance again: it is acknowledged and
changes nothing. Modalities that send the first captures of one new accession at the same time
all get Success, into one case, with no file left behind outside it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_factory import SCP_AET, c_store, instance, smear
from sqlalchemy import select

from lisplugin.config import DicomSettings
from lisplugin.dicom.scp import StorageSCP
from lisplugin.service.ingest import InstanceStore
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus, Instance

pytestmark = pytest.mark.reliability

MODALITIES = 8


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[InstanceStore]:
    db = Database(database_url)
    db.migrate()
    yield InstanceStore(db, tmp_path / "var")
    db.dispose()


@pytest.fixture
def scp(store: InstanceStore) -> Iterator[StorageSCP]:
    server = StorageSCP(
        DicomSettings(ae_title=SCP_AET, host="127.0.0.1", port=0), store.store, store.quarantine
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("status", [CaseStatus.VERIFIED, CaseStatus.REVIEW, CaseStatus.FINAL])
def test_resent_instance_is_acknowledged_and_changes_nothing(
    scp: StorageSCP, store: InstanceStore, status: CaseStatus
) -> None:
    ds = instance(smear())
    assert c_store(scp.port, ds).Status == 0
    with store.db.session() as session:
        case = session.scalars(select(Case)).one()
        case.status = status  # analysed and reported meanwhile
    with store.db.session() as session:
        case = session.scalars(select(Case)).one()
        before = (case.status, case.last_instance_at, case.version)
    kept = Path(store.db.transaction(lambda s: s.scalars(select(Instance.path)).one()))
    mtime = kept.stat().st_mtime_ns

    assert c_store(scp.port, ds).Status == 0  # the response was lost: the device sends again

    with store.db.session() as session:
        case = session.scalars(select(Case)).one()
        assert (case.status, case.last_instance_at, case.version) == before
        assert len(session.scalars(select(Instance)).all()) == 1
    assert kept.stat().st_mtime_ns == mtime


def test_simultaneous_first_captures_of_one_accession_all_succeed(
    scp: StorageSCP, store: InstanceStore
) -> None:
    captures = []
    for n in range(MODALITIES):
        ds = instance(smear(seed=n))
        ds.AccessionNumber = "ACC-RACE"
        captures.append(ds)
    start = threading.Barrier(MODALITIES)
    statuses: dict[int, int] = {}

    def modality(n: int) -> None:
        start.wait()
        statuses[n] = int(c_store(scp.port, captures[n], calling_aet=f"MOD{n}").Status)

    threads = [threading.Thread(target=modality, args=(n,)) for n in range(MODALITIES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert statuses == dict.fromkeys(range(MODALITIES), 0)
    with store.db.session() as session:
        (case,) = session.scalars(select(Case)).all()
        assert case.case_key == "acc:ACC-RACE"
        paths = {row.path for row in session.scalars(select(Instance))}
    assert len(paths) == MODALITIES
    on_disk = {str(p) for p in store.instances_dir.rglob("*.dcm")}
    assert on_disk == paths  # no orphan file
