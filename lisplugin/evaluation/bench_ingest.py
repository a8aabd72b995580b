"""``lisplugin bench ingest --peer orthanc|storescp``: C-STORE rate of the daemon beside a peer.

Both servers run on loopback as children of this command: ``lisplugin serve`` (its own
storage and SQLite, analysis held back by a long stability delay unless ``--with-analysis``)
and the peer (Orthanc with a temporary configuration, or DCMTK's ``storescp``, forking per
association when there are several). DCMTK's ``storescu`` sends the same kind of instances to
each (23 kB VL Microscopic Images, new UIDs every round, ``--cases`` accession numbers
interleaved) over ``--associations`` parallel associations, with ``TCP_NODELAY=1`` in every
DCMTK process's environment (otherwise each C-STORE waits ~40-90 ms for a delayed ACK and every
server looks alike). Rates are instances per second of wall time, median of ``--rounds``; the
ratio is lisplugin's rate over the peer's, both measured in the same run on the same machine,
with both servers up and their rounds alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid

from lisplugin.dicom.scu import wrap_image_as_vl_microscopic
from lisplugin.progress import progress
from lisplugin.synthetic import synthetic_field

PEER_AET = "PEER"
LISPLUGIN_AET = "LISPLUGIN"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nodelay_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def make_instances(folder: Path, count: int, cases: int, tag: str) -> list[Path]:
    """``count`` VL Microscopic Images of one synthetic field, new UIDs each, spread over
    ``cases`` accession numbers in turn (so that associations interleave cases)."""
    folder.mkdir(parents=True, exist_ok=True)
    image, _ = synthetic_field(0)
    jpeg = folder / "field.jpg"
    Image.fromarray(image).save(jpeg, quality=85)
    template = wrap_image_as_vl_microscopic(jpeg, patient_id="BENCH", accession="X")
    studies = [generate_uid() for _ in range(cases)]
    paths = []
    for n in range(count):
        ds = template.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = studies[n % cases]
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[studies[n % cases], "s"])
        ds.AccessionNumber = f"B{tag}{n % cases:04d}"
        ds.InstanceNumber = n + 1
        path = folder / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    jpeg.unlink()
    return paths


def send(port: int, called: str, paths: Sequence[Path], associations: int) -> float:
    """Send with ``associations`` storescu processes at once; wall seconds until all ended."""
    storescu = shutil.which("storescu")
    if storescu is None:
        raise RuntimeError("DCMTK storescu not found (apt-get install dcmtk)")
    groups = [list(paths[i::associations]) for i in range(associations)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [storescu, "-xy", "-nh", "-aet", "BENCHSCU", "-aec", called, "127.0.0.1", str(port)]
            + [str(p) for p in group],
            env=nodelay_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for group in groups
        if group
    ]
    for process in processes:
        process.wait(timeout=900)
    return time.perf_counter() - started


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until ``url`` answers 200; raise when the server exited or ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready: {log.read_text()[-2000:]}")


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def lisplugin_daemon(
    folder: Path, with_analysis: bool, processes: int = 1
) -> Iterator[tuple[int, Path]]:
    """``lisplugin serve`` on loopback (``processes`` accepting on its DICOM port); yields its
    DICOM port and its instances folder."""
    port = free_port()
    env = {
        **os.environ,
        "LISPLUGIN_DICOM__HOST": "127.0.0.1",
        "LISPLUGIN_DICOM__PORT": str(port),
        "LISPLUGIN_HL7__LISTEN_HOST": "127.0.0.1",
        "LISPLUGIN_HL7__LISTEN_PORT": str(free_port()),
        "LISPLUGIN_HL7__LIS_PORT": str(free_port()),
        "LISPLUGIN_HTTP__PORT": str(http := free_port()),
        "LISPLUGIN_STORAGE__PATH": str(folder),
        "LISPLUGIN_CASES__STABLE_SECONDS": "0" if with_analysis else "86400",
        "LISPLUGIN_DICOM__INGEST_PROCESSES": str(processes),
    }
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "daemon.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "lisplugin", "serve"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{http}/readyz", process, log, 180)
        yield port, folder / "instances"
    finally:
        stop_process(process)


@contextmanager
def storescp(folder: Path, associations: int) -> Iterator[tuple[int, Path]]:
    binary = shutil.which("storescp")
    if binary is None:
        raise RuntimeError("DCMTK storescp not found (apt-get install dcmtk)")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder.parent / "storescp.log"
    command = [binary, "+xa", "-aet", PEER_AET, "-od", str(folder)]
    if associations > 1:
        command.append("--fork")
    process = subprocess.Popen(
        [*command, str(port)], env=nodelay_env(), stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:
        _wait_port(port, process, log)
        yield port, folder
    finally:
        stop_process(process)


@contextmanager
def orthanc(folder: Path) -> Iterator[tuple[int, str]]:
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if binary is None:
        raise RuntimeError("Orthanc not found (apt-get install orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "lisplugin-bench",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "Plugins": [],
        "HttpPort": free_port(),
        "DicomPort": free_port(),
        "DicomAet": PEER_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = folder / "orthanc.log"
    process = subprocess.Popen(
        [binary, str(folder / "orthanc.json")],
        env=nodelay_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{config['HttpPort']}"
    try:
        wait_http(f"{url}/system", process, log, 60)
        yield int(config["DicomPort"]), url
    finally:
        stop_process(process)


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _settled_files(folder: Path, expected: int, quiet: float = 2.0, limit: float = 60.0) -> int:
    """The files in ``folder`` once filing has caught up: an instance answered from the ingest
    spool is filed just after its answer, so counting at once would call the last ones
    refused. Waits until ``expected`` are there, or the count stops moving for ``quiet`` s."""
    deadline = time.monotonic() + limit
    count, since = _files(folder), time.monotonic()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        now = _files(folder)
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return count


def measure(
    peer: str,
    count: int,
    associations: int,
    rounds: int,
    cases: int,
    with_analysis: bool,
    processes: int = 1,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        batches = [
            make_instances(root / f"in{r}", count, cases, str(r))
            for r in progress(range(rounds), desc="writing instances", unit="round")
        ]
        ours: list[float] = []
        theirs: list[float] = []
        with ExitStack() as servers:
            port, stored = servers.enter_context(
                lisplugin_daemon(root / "lisplugin", with_analysis, processes)
            )
            if peer == "storescp":
                peer_port, peer_stored = servers.enter_context(
                    storescp(root / "storescp" / "in", associations)
                )
            else:
                peer_port, url = servers.enter_context(orthanc(root / "orthanc"))
            # Rounds alternate between the two servers, both up the whole time: on a shared
            # machine whose load changes by the minute, each pair of rounds sees the same load.
            for batch in progress(batches, desc="rounds", unit="round"):
                ours.append(len(batch) / send(port, LISPLUGIN_AET, batch, associations))
                theirs.append(len(batch) / send(peer_port, PEER_AET, batch, associations))
            kept = _settled_files(stored, count * rounds)
            if peer == "storescp":
                peer_kept = _files(peer_stored)
            else:
                peer_kept = int(httpx.get(f"{url}/statistics").json()["CountInstances"])
        ours_rate, peer_rate = float(np.median(ours)), float(np.median(theirs))
        return {
            "peer": peer,
            "instances": count,
            "instance_kb": round(batches[0][0].stat().st_size / 1024, 1),
            "associations": associations,
            "lisplugin_processes": processes,
            "cases_interleaved": cases,
            "rounds": rounds,
            "analysis_running": with_analysis,
            "lisplugin_per_s": round(ours_rate, 1),
            "peer_per_s": round(peer_rate, 1),
            "ratio": round(ours_rate / peer_rate, 3),
            # each round's ratio to the peer round right after it, median: the figure least
            # moved by the machine's load changing between rounds
            "paired_ratio_median": round(
                float(np.median([a / b for a, b in zip(ours, theirs, strict=True)])), 3
            ),
            "lisplugin_refused": count * rounds - kept,
            "peer_refused": count * rounds - peer_kept,
            "lisplugin_rounds_per_s": [round(r, 1) for r in ours],
            "peer_rounds_per_s": [round(r, 1) for r in theirs],
        }


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lisplugin bench ingest", description=__doc__)
    parser.add_argument("--peer", choices=("orthanc", "storescp"), default="orthanc")
    parser.add_argument("--instances", type=int, default=300, help="per round (default 300)")
    parser.add_argument("--associations", type=int, default=1, help="parallel associations")
    parser.add_argument("--cases", type=int, default=8, help="accession numbers interleaved")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="the daemon's dicom.ingest_processes (processes sharing the port)",
    )
    parser.add_argument(
        "--with-analysis", action="store_true", help="let the daemon analyse while it ingests"
    )
    args = parser.parse_args(argv)
    if min(args.instances, args.associations, args.rounds, args.cases, args.processes) < 1:
        parser.error("--instances, --associations, --rounds, --cases, --processes: positive")
    report = measure(
        args.peer,
        args.instances,
        args.associations,
        args.rounds,
        args.cases,
        args.with_analysis,
        args.processes,
    )
    print(json.dumps(report, indent=2))
    return 0
