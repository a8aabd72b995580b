"""``lisplugin soak``: many captures against real daemon processes that get killed, while the LIS
goes away for a while; then count what was lost, duplicated or delivered out of order.

The daemons are ``lisplugin serve`` subprocesses sharing one database and one storage folder
(SQLite: one process; PostgreSQL: one or several). Captures are tiny synthetic VL Microscopic
images (64 x 64: the analysis, not the network, would otherwise set the pace on a small machine),
sent over DICOM to any live daemon; a capture that was not accepted (its daemon was killed) is
sent again to another one, as a modality would. A LIS simulator receives the ORUs. Every
``--kill-every`` seconds one daemon gets SIGKILL and is started again. At the end:

* ``lost``: an accepted capture not in the database, or not covered by its case's latest
  analysis, or a case whose latest result never reached the LIS;
* ``duplicated``: a message sent twice at once (one MSH-10 at the LIS twice within less than
  half the ACK timeout: two processes sending it), plus analyses of a case that no capture
  justified (no capture arrived after the case's previous analysis). A re-send after a lost
  ACK or a killed sender, with the same MSH-10, is what the LIS must discard and is counted
  apart (``resent_same_msh10``);
* ``out_of_order``: a case's result received after a later result of the same case.

Prints one JSON object; exit status 1 when any of the three is not zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, VLMicroscopicImageStorage, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from lisplugin.evaluation.bench_ingest import free_port, stop_process, wait_http
from lisplugin.hl7.lis_sim import LisSimulator
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus, Instance, OutboxMessage, OutboxStatus
from lisplugin.synthetic import synthetic_field

AE_TITLE = "LISPLUGIN"
#: The daemons' ACK timeout and send lease in a soak run: a message is sent again, with its
#: MSH-10, no sooner than the shorter of the two after it was first sent.
ACK_TIMEOUT_SECONDS = 20
SEND_LEASE_SECONDS = 45
CONTROL_ID = re.compile(r"^MSH\|[^\r\n]*", re.MULTILINE)
#: Case states that mean "analysed and its result released".
ANALYSED = {CaseStatus.REVIEW, CaseStatus.VERIFIED}


def capture(accession: str, study_uid: str, number: int, pixels: np.ndarray) -> Dataset:
    """A tiny VL Microscopic Image of a synthetic smear (made-up, non-identifying patient)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = VLMicroscopicImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    ds.PatientID = f"SOAK-{accession}"
    ds.Modality = "GM"
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.set_pixel_data(pixels, "RGB", 8, generate_instance_uid=False)
    return ds


@dataclass
class Daemon:
    """One ``lisplugin serve`` process on its own ports; started again on the same ports."""

    index: int
    env: dict[str, str]
    storage: Path
    dicom_port: int = field(default_factory=free_port)
    hl7_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    peak_rss_kb: int = 0
    log_paths: list[Path] = field(default_factory=list)

    def start(self, timeout: float = 600.0) -> None:
        self.starts += 1
        log_path = self.storage / f"soak-daemon-{self.index}-{self.starts}.log"
        self.log_paths.append(log_path)
        env = {
            **self.env,
            "LISPLUGIN_DICOM__PORT": str(self.dicom_port),
            "LISPLUGIN_HL7__LISTEN_PORT": str(self.hl7_port),
            "LISPLUGIN_HTTP__PORT": str(self.http_port),
        }
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lisplugin", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_http(f"http://127.0.0.1:{self.http_port}/readyz", self.process, log_path, timeout)
        except TimeoutError:
            self.process.kill()  # not half-started on its ports when it is started again
            self.process.wait()
            raise

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def sample_rss(self) -> None:
        """Keep the process's peak resident set (VmHWM) before it is killed."""
        if not self.alive:
            return
        assert self.process is not None
        with suppress(OSError), open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))

    def kill(self) -> None:
        self.sample_rss()
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.sample_rss()
        if self.alive:
            assert self.process is not None
            stop_process(self.process)


@dataclass
class Options:
    captures: int = 60
    accessions: int = 20
    processes: int = 1
    database_url: str = ""
    postgres_admin: str = ""
    kill_every: float = 0.0
    outage_at: float = 0.0
    outage_seconds: float = 0.0
    senders: int = 4
    #: Captures per second (0: as fast as the daemons take them), so a run spans the kills.
    rate: float = 0.0
    seed: int = 0
    work_dir: Path | None = None
    settle_timeout: float = 300.0
    extra_env: dict[str, str] = field(default_factory=dict)


class Lis:
    """The LIS simulator on a fixed port, which can be taken down and brought back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sim: LisSimulator | None = None
        self.received: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        with self._lock:
            self.sim = LisSimulator(port=self.port).start()

    def down(self) -> None:
        with self._lock:
            if self.sim is not None:
                self.sim.stop()
                self.received += list(zip(self.sim.arrived_at, self.sim.received, strict=True))
                self.sim = None

    def all_received(self) -> list[tuple[float, str]]:
        """(``time.monotonic()`` of arrival, message) of everything received, in order."""
        with self._lock:
            now = (
                list(zip(self.sim.arrived_at, self.sim.received, strict=False)) if self.sim else []
            )
            return self.received + now


def control_id(message: str) -> str:
    header = CONTROL_ID.search(message.replace("\r", "\n"))
    return header.group(0).split("|")[9] if header else ""


@contextmanager
def postgres_database(admin_dsn: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one soak run, dropped afterwards."""
    import psycopg

    name = f"lisplugin_soak_{uuid.uuid4().hex[:10]}"
    params = dict(p.split("=", 1) for p in admin_dsn.split())
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield (
                f"postgresql+psycopg://{params.get('user', 'postgres')}@"
                f"{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}/{name}"
            )
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Soak:
    def __init__(self, options: Options, database_url: str, work: Path) -> None:
        self.options = options
        self.work = work
        self.storage = work / "var"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url or f"sqlite:///{self.storage / 'lisplugin.db'}"
        self.lis = Lis()
        env = dict(os.environ)
        env.update(
            {
                "LISPLUGIN_DICOM__HOST": "127.0.0.1",
                "LISPLUGIN_DICOM__WORKLIST": "false",
                "LISPLUGIN_HL7__LISTEN_HOST": "127.0.0.1",
                "LISPLUGIN_HL7__LIS_HOST": "127.0.0.1",
                "LISPLUGIN_HL7__LIS_PORT": str(self.lis.port),
                "LISPLUGIN_HL7__ACK_TIMEOUT_SECONDS": str(ACK_TIMEOUT_SECONDS),
                "LISPLUGIN_HL7__RETRY_INITIAL_SECONDS": "0.5",
                "LISPLUGIN_HL7__RETRY_MAX_SECONDS": "2",
                "LISPLUGIN_HTTP__HOST": "127.0.0.1",
                "LISPLUGIN_STORAGE__PATH": str(self.storage),
                "LISPLUGIN_STORAGE__MIN_FREE_MB": "50",
                "LISPLUGIN_DATABASE__URL": self.database_url,
                "LISPLUGIN_DATABASE__POLL_SECONDS": "1",
                "LISPLUGIN_DATABASE__ANALYSIS_LEASE_SECONDS": "6",
                "LISPLUGIN_DATABASE__SEND_LEASE_SECONDS": str(SEND_LEASE_SECONDS),
                "LISPLUGIN_CASES__STABLE_SECONDS": "2",
                "LISPLUGIN_CASES__REPORT_RETRY_SECONDS": "5",
                "LISPLUGIN_LOGGING__LEVEL": "INFO",
            }
        )
        env.update(options.extra_env)
        self.daemons = [Daemon(i, env, self.storage) for i in range(options.processes)]
        self.rng = random.Random(options.seed)
        self.accepted: dict[str, str] = {}  # SOP Instance UID -> accession
        self.sent = 0
        self.resent = 0
        self.kills = 0
        self._lock = threading.Lock()
        self._done = threading.Event()

    # -- the run ---------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, list[Dataset]]]:
        """Accessions with their captures (``captures`` spread over ``accessions``)."""
        o = self.options
        field_pixels = synthetic_field(o.seed)[0]
        tiles = [
            np.ascontiguousarray(field_pixels[y : y + 64, x : x + 64])
            for y in range(0, 448, 64)
            for x in range(0, 576, 64)
        ]
        run = uuid.uuid4().hex[:6].upper()
        plan: list[tuple[str, list[Dataset]]] = []
        for a in range(o.accessions):
            count = o.captures // o.accessions + (1 if a < o.captures % o.accessions else 0)
            accession, study = f"S{run}{a:05d}", generate_uid()
            plan.append(
                (
                    accession,
                    [
                        capture(accession, study, n + 1, tiles[(a + n) % len(tiles)])
                        for n in range(count)
                    ],
                )
            )
        return plan

    def send(self, accession: str, datasets: list[Dataset]) -> None:
        """Send until every capture is accepted, to any live daemon (a modality retrying)."""
        waiting = list(datasets)
        ae = AE(ae_title="SOAKSCU")
        ae.add_requested_context(VLMicroscopicImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        deadline = time.monotonic() + 300
        attempt = 0
        while waiting and time.monotonic() < deadline:
            live = [d for d in self.daemons if d.alive] or self.daemons
            daemon = live[self.rng.randrange(len(live))]
            if attempt:
                with self._lock:
                    self.resent += len(waiting)
                time.sleep(0.2)
            attempt += 1
            assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AE_TITLE)
            if not assoc.is_established:
                continue
            try:
                for ds in list(waiting):
                    with self._lock:
                        self.sent += 1
                    status = assoc.send_c_store(ds)
                    if status and getattr(status, "Status", None) == 0x0000:
                        with self._lock:
                            self.accepted[str(ds.SOPInstanceUID)] = accession
                        waiting.remove(ds)
                    else:
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
        if waiting:
            raise RuntimeError(f"{accession}: {len(waiting)} captures never accepted")

    def killer(self) -> None:
        """Every ``kill_every`` seconds, SIGKILL one daemon and start it again."""
        while not self._done.wait(self.options.kill_every):
            daemon = self.daemons[self.rng.randrange(len(self.daemons))]
            daemon.kill()
            self.kills += 1
            try:
                daemon.start()
            except (RuntimeError, TimeoutError) as exc:  # started again after the sending
                print(f"soak: restart failed: {exc}", file=sys.stderr)

    def sampler(self) -> None:
        while not self._done.wait(0.5):
            for daemon in self.daemons:
                daemon.sample_rss()

    def outage(self) -> None:
        if self._done.wait(self.options.outage_at):
            return
        self.lis.down()
        time.sleep(self.options.outage_seconds)
        self.lis.up()

    def run(self) -> dict[str, Any]:
        o = self.options
        plan = self.plan()
        self.lis.up()
        try:
            self.daemons[0].start()  # the first migrates the schema; the others find it done
            for daemon in self.daemons[1:]:
                daemon.start()
            started = time.monotonic()
            helpers = [threading.Thread(target=self.sampler, daemon=True)]
            if o.kill_every > 0:
                helpers.append(threading.Thread(target=self.killer, daemon=True))
            if o.outage_seconds > 0:
                helpers.append(threading.Thread(target=self.outage, daemon=True))
            for helper in helpers:
                helper.start()
            errors: list[BaseException] = []
            work = list(plan)
            scheduled = 0

            def sender() -> None:
                nonlocal scheduled
                while True:
                    with self._lock:
                        if not work or errors:
                            return
                        accession, datasets = work.pop(0)
                        due = started + scheduled / o.rate if o.rate > 0 else 0.0
                        scheduled += len(datasets)
                    time.sleep(max(0.0, due - time.monotonic()))
                    try:
                        self.send(accession, datasets)
                    except BaseException as exc:  # reported below, the others stop
                        with self._lock:
                            errors.append(exc)

            senders = [threading.Thread(target=sender) for _ in range(o.senders)]
            for thread in senders:
                thread.start()
            for thread in senders:
                thread.join()
            sending_seconds = time.monotonic() - started
            if errors:
                raise errors[0]
            self._done.set()
            for helper in helpers:
                helper.join()
            for daemon in self.daemons:
                if not daemon.alive:
                    daemon.start()
            if self.lis.sim is None:
                self.lis.up()
            settled = self.settle(o.settle_timeout)
            wall = time.monotonic() - started
            figures = self.figures(plan)
        finally:
            self._done.set()
            for daemon in self.daemons:
                daemon.stop()
            self.lis.down()
        return {
            **figures,
            "settled": settled,
            "captures": o.captures,
            "accessions": o.accessions,
            "processes": o.processes,
            "database": self.database_url.split(":", 1)[0].split("+")[0],
            "kills": self.kills,
            "kill_every_seconds": o.kill_every,
            "lis_outage_seconds": o.outage_seconds,
            "captures_resent": self.resent,
            "sending_seconds": round(sending_seconds, 1),
            "wall_seconds": round(wall, 1),
            "peak_rss_mb": round(max(d.peak_rss_kb for d in self.daemons) / 1024, 1),
            "peak_rss_mb_per_process": [round(d.peak_rss_kb / 1024, 1) for d in self.daemons],
        }

    def settle(self, timeout: float, quiet_for: float = 0.0) -> bool:
        """Wait until every case is analysed and every result delivered (or parked), and has
        stayed so for ``quiet_for`` seconds."""
        db = Database(self.database_url)
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        try:
            while time.monotonic() < deadline:
                with db.session() as session:
                    busy = session.scalar(
                        select(Case.id).where(
                            Case.status.in_([CaseStatus.RECEIVING, CaseStatus.QUEUED])
                        )
                    )
                    pending = session.scalar(
                        select(OutboxMessage.id).where(
                            OutboxMessage.channel == "hl7",
                            OutboxMessage.status == OutboxStatus.PENDING,
                        )
                    )
                if busy is None and pending is None:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since >= quiet_for:
                        return True
                else:
                    quiet_since = None
                time.sleep(0.5)
            return False
        finally:
            db.dispose()

    # -- the figures -----------------------------------------------------------------------

    def figures(self, plan: list[tuple[str, list[Dataset]]]) -> dict[str, Any]:
        arrivals_at_lis = [
            (at, control_id(m)) for at, m in self.lis.all_received() if "ORU^R01" in m
        ]
        received = [cid for _, cid in arrivals_at_lis]
        receipts = Counter(received)
        resent, sent_twice = resends(arrivals_at_lis)
        db = Database(self.database_url)
        try:
            with db.session() as session:
                cases = {
                    c.id: c
                    for c in session.scalars(select(Case).where(Case.accession_number.is_not(None)))
                }
                instances = session.execute(
                    select(Instance.sop_instance_uid, Instance.case_id, Instance.received_at)
                ).all()
                messages = session.execute(
                    select(
                        OutboxMessage.case_id,
                        OutboxMessage.control_id,
                        OutboxMessage.status,
                        OutboxMessage.created_at,
                    )
                    .where(OutboxMessage.channel == "hl7")
                    .order_by(OutboxMessage.id)
                ).all()
        finally:
            db.dispose()
        stored = {uid: (case_id, _utc(at)) for uid, case_id, at in instances}
        per_case: dict[int, list[Any]] = defaultdict(list)
        for row in messages:
            per_case[row.case_id].append(row)
        arrivals: dict[int, list[datetime]] = defaultdict(list)
        for case_id, at in stored.values():
            arrivals[case_id].append(at)

        lost_captures = [uid for uid in self.accepted if uid not in stored]
        not_analysed = []
        for uid in self.accepted:
            if uid not in stored:
                continue
            case = cases[stored[uid][0]]
            analysed_at = _utc(case.analysed_at) if case.analysed_at else None
            if case.status not in ANALYSED or analysed_at is None or analysed_at < stored[uid][1]:
                not_analysed.append(uid)
        undelivered = []
        unjustified = 0
        for case_id, rows in per_case.items():
            if rows[-1].control_id not in receipts:
                undelivered.append(rows[-1].control_id)
            for before in rows[:-1]:  # each later analysis needs a capture after this one
                if not any(at > _utc(before.created_at) for at in arrivals[case_id]):
                    unjustified += 1
        out_of_order = 0
        highest: dict[str, int] = {}
        for cid in received:
            case_part, _, seq = cid.partition("-")
            if not seq.isdigit():
                continue
            if int(seq) < highest.get(case_part, 0):
                out_of_order += 1
            highest[case_part] = max(highest.get(case_part, 0), int(seq))
        failed = sum(1 for c in cases.values() if c.status == CaseStatus.FAILED)
        return {
            "lost": len(lost_captures) + len(not_analysed) + len(undelivered),
            "duplicated": sent_twice + unjustified,
            "out_of_order": out_of_order,
            "captures_accepted": len(self.accepted),
            "captures_not_stored": len(lost_captures),
            "captures_not_analysed": len(not_analysed),
            "results_not_delivered": len(undelivered),
            "sent_twice_at_once": sent_twice,
            "resent_same_msh10": resent,
            "analyses_not_justified": unjustified,
            "cases": len(cases),
            "cases_failed": failed,
            "orus_received": len(received),
            "orus_queued": len(messages),
            "orus_superseded": sum(1 for m in messages if m.status == OutboxStatus.SUPERSEDED),
        }


def resends(arrivals: list[tuple[float, str]]) -> tuple[int, int]:
    """(re-sends, messages sent twice at once) among (arrival time, MSH-10) at the LIS.

    A daemon sends a message again, under the same MSH-10, only when it cannot know that the
    LIS took it: no ACK within the ACK timeout (the LIS went away mid-message), or its sender
    was killed and the send lease ran out. The LIS discards such a re-send by its MSH-10 (HL7
    interface specification, section 5), so it is counted apart. The same MSH-10 again sooner
    than half the shorter of the two bounds is two processes sending one message: a duplicate.
    """
    bound = min(ACK_TIMEOUT_SECONDS, SEND_LEASE_SECONDS) / 2
    last: dict[str, float] = {}
    resent = at_once = 0
    for at, cid in sorted(arrivals):
        if cid in last:
            if at - last[cid] < bound:
                at_once += 1
            else:
                resent += 1
        last[cid] = at
    return resent, at_once


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def soak(options: Options) -> dict[str, Any]:
    """One soak run; the daemons' logs stay in ``work_dir`` when one is given."""
    with (
        tempfile.TemporaryDirectory(prefix="lisplugin-soak-") as tmp,
        postgres_database(options.postgres_admin)
        if options.postgres_admin
        else _given(options.database_url) as url,
    ):
        work = options.work_dir or Path(tmp)
        return Soak(options, url, work).run()


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin soak",
        description="Captures against daemon processes killed with SIGKILL and an LIS outage; "
        "prints lost, duplicated and out-of-order counts and the daemons' peak RSS as JSON.",
    )
    parser.add_argument("--captures", type=int, default=60)
    parser.add_argument("--accessions", type=int, default=20)
    parser.add_argument("--processes", type=int, default=1, help="daemon processes")
    parser.add_argument(
        "--database-url", default="", help="shared database (default: SQLite in the work folder)"
    )
    parser.add_argument(
        "--postgres",
        default="",
        metavar="DSN",
        help="libpq DSN of a PostgreSQL server: a fresh database is made there and dropped "
        "after (e.g. 'host=127.0.0.1 dbname=postgres user=postgres')",
    )
    parser.add_argument("--kill-every", type=float, default=0.0, help="seconds; 0: no kills")
    parser.add_argument("--outage-at", type=float, default=5.0, help="LIS goes away (seconds)")
    parser.add_argument("--outage-seconds", type=float, default=0.0, help="0: no LIS outage")
    parser.add_argument("--senders", type=int, default=4, help="concurrent DICOM senders")
    parser.add_argument("--rate", type=float, default=0.0, help="captures/s; 0: unpaced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep the storage and daemon logs here")
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.captures < 1 or not 1 <= args.accessions <= args.captures:
        parser.error("need --captures >= --accessions >= 1")
    if args.processes > 1 and not (args.postgres or args.database_url.startswith("postgres")):
        parser.error("several processes need PostgreSQL (--postgres DSN): SQLite serves one")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # a line per request, or per refused association while a daemon restarts, otherwise
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    figures = soak(
        Options(
            captures=args.captures,
            accessions=args.accessions,
            processes=args.processes,
            database_url=args.database_url,
            postgres_admin=args.postgres,
            kill_every=args.kill_every,
            outage_at=args.outage_at,
            outage_seconds=args.outage_seconds,
            senders=args.senders,
            rate=args.rate,
            seed=args.seed,
            work_dir=args.work_dir,
            settle_timeout=args.settle_timeout,
        )
    )
    print(json.dumps(figures, indent=2))
    clean = figures["settled"] and not (
        figures["lost"] or figures["duplicated"] or figures["out_of_order"]
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(cli())
