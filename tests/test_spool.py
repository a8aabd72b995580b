"""The ingest spool: a C-STORE is answered once its instance is durable in the spool (one
sync); the instance is filed (file + database record) moments later, or at the next start if
the process ended first. Runs on SQLite and PostgreSQL (the ``database_url`` fixture)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

from dicom_factory import SCP_AET, c_store, instance, smear
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from sqlalchemy import select

from lisplugin.config import DicomSettings
from lisplugin.dicom.scp import StorageSCP
from lisplugin.service.ingest import SPOOL_FILE, FiledCase, InstanceStore
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Instance
from lisplugin.storage.spool import Spool


def _store(db: Database, var: Path, filed: list[FiledCase], **kwargs: int) -> InstanceStore:
    return InstanceStore(db, var, spool=Spool(var / SPOOL_FILE), on_filed=filed.append, **kwargs)


def _raw(ds: Dataset) -> bytes:
    ds.file_meta.SourceApplicationEntityTitle = "TESTSCU"
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _filed_uids(db: Database) -> list[str]:
    with db.session() as session:
        return sorted(session.scalars(select(Instance.sop_instance_uid)).all())


def _wait(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)


def test_c_store_is_answered_from_the_spool_and_filed_moments_later(
    db: Database, tmp_path: Path
) -> None:
    filed: list[FiledCase] = []
    store = _store(db, tmp_path / "var", filed)
    store.start()
    scp = StorageSCP(
        DicomSettings(ae_title=SCP_AET, host="127.0.0.1", port=0), store.accept, store.quarantine
    )
    scp.start()
    try:
        sent = [instance(smear(seed=n)) for n in range(5)]
        assert [c_store(scp.port, ds).Status for ds in sent] == [0] * 5
        _wait(lambda: len(filed) == 5)
    finally:
        scp.stop()
        store.stop()
    assert _filed_uids(db) == sorted(str(ds.SOPInstanceUID) for ds in sent)
    with db.session() as session:
        path = session.scalars(select(Instance.path)).first()
    assert path is not None and dcmread(path).pixel_array.shape == smear().shape
    assert Spool(tmp_path / "var" / SPOOL_FILE).count() == 0  # the rows were a queue


def test_spooled_instances_outlive_a_failed_filing_and_a_dead_process(
    db: Database, tmp_path: Path
) -> None:
    var = tmp_path / "var"
    filed: list[FiledCase] = []
    first = _store(db, var, filed)
    assert first.recorder is not None

    def unreachable(items: list) -> tuple[list, int]:
        raise OSError("database unreachable")

    first.recorder.file = unreachable  # filing fails, as with the database down
    first.start()
    sent = [instance(smear(seed=n)) for n in range(2)]
    first.accept(sent[0], _raw(sent[0]))  # durable in the spool: Success would be answered
    _wait(lambda: not first.recorder.healthy)
    assert not first.recorder.healthy and filed == [] and _filed_uids(db) == []
    # While filing fails, a capture is filed before the answer (had the database failed it, the
    # sender would get A700 and keep its copy).
    first.accept(sent[1], _raw(sent[1]))
    assert len(filed) == 1 and _filed_uids(db) == [str(sent[1].SOPInstanceUID)]
    # The process ends without filing (first is never stopped); the next start files the rest.
    second = _store(db, var, filed)
    assert second.recover() == 1
    assert _filed_uids(db) == sorted(str(ds.SOPInstanceUID) for ds in sent[:2])
    assert [case.case_key for case in filed] == ["acc:A1", "acc:A1"]
    assert dcmread(var / "instances" / _relative(sent[0])).SOPInstanceUID == sent[0].SOPInstanceUID
    assert second.spool is not None and second.spool.count() == 0


def _relative(ds: Dataset) -> str:
    return f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"


def test_a_resent_instance_spooled_twice_is_filed_once_as_it_came_first(
    db: Database, tmp_path: Path
) -> None:
    filed: list[FiledCase] = []
    store = _store(db, tmp_path / "var", filed)
    ds = instance(smear(seed=1))
    again = instance(smear(seed=2))
    again.SOPInstanceUID = ds.SOPInstanceUID  # the same instance, other bytes
    again.StudyInstanceUID = ds.StudyInstanceUID
    for copy in (ds, again):  # both spooled before the recorder runs
        assert store.recorder is not None and store.spool is not None
        record = store._capture(copy, 1)[0]
        store.spool.put(record.path, dataclasses.asdict(record), _raw(copy))
    assert store.recover() == 1  # two rows done, one instance filed
    assert _filed_uids(db) == [str(ds.SOPInstanceUID)] and len(filed) == 1
    kept = dcmread(tmp_path / "var" / "instances" / _relative(ds))
    assert (kept.pixel_array == smear(seed=1)).all()


def test_a_full_backlog_files_before_answering(db: Database, tmp_path: Path) -> None:
    filed: list[FiledCase] = []
    store = _store(db, tmp_path / "var", filed, spool_max_backlog_bytes=1)
    store.start()
    try:
        ds = instance(smear())
        store.accept(ds, _raw(ds))
        # no room in the spool: filed (on_filed called) before accept returned
        assert [case.case_key for case in filed] == ["acc:A1"]
        assert store.spool is not None and store.spool.count() == 0
    finally:
        store.stop()


def test_rows_a_dead_process_left_are_filed_by_the_sweep(db: Database, tmp_path: Path) -> None:
    var = tmp_path / "var"
    filed: list[FiledCase] = []
    store = _store(db, var, filed)
    assert store.recorder is not None
    store.recorder.ABANDONED_SECONDS = 0.2
    other = _store(db, var, [])  # another process on the port, which then died
    ds = instance(smear())
    record = other._capture(ds, 1)[0]
    assert other.spool is not None
    other.spool.put(record.path, dataclasses.asdict(record), _raw(ds))
    store.start()
    try:
        _wait(lambda: len(filed) == 1)
    finally:
        store.stop()
    assert _filed_uids(db) == [str(ds.SOPInstanceUID)]


def test_concurrent_associations_share_one_spool_commit(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / SPOOL_FILE)
    barrier = threading.Barrier(8)
    ids: list[int] = []

    def put(n: int) -> None:
        barrier.wait()
        ids.append(spool.put(f"/x/{n}.dcm", {"n": n}, bytes(20_000)))

    threads = [threading.Thread(target=put, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(ids) == list(range(1, 9)) and spool.count() == 8
    assert spool._group.batches < 8  # at least two puts shared a commit (one sync)
    spool.remove(ids)
    assert spool.count() == 0 and spool.left() == []


def test_the_spool_lives_where_the_settings_say(db: Database, tmp_path: Path) -> None:
    from lisplugin.config import Settings
    from lisplugin.service.ingest import instance_store

    beside = Settings(storage={"path": tmp_path / "var", "spool_path": ""})
    local = Settings(storage={"path": tmp_path / "var", "spool_path": tmp_path / "local.sqlite"})
    off = Settings(storage={"path": tmp_path / "var", "spool": False})
    for settings, where in ((beside, tmp_path / "var" / SPOOL_FILE),
                            (local, tmp_path / "local.sqlite"), (off, None)):  # fmt: skip
        store = instance_store(db, settings, lambda case: None)
        assert (store.spool.path if store.spool else None) == where
        store.stop()
