"""What hospital IT operates: systemd notification, watchdog, help, health, metrics, logs."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from hl7.client import MLLPClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

import lisplugin
from lisplugin.config import Settings
from lisplugin.dicom.scu import send
from lisplugin.hl7.lis_sim import LisSimulator, build_test_order
from lisplugin.http.app import create_app
from lisplugin.logging_setup import QUIET_LOGGERS
from lisplugin.service import users
from lisplugin.service.runtime import Runtime
from lisplugin.storage.db import Database
from lisplugin.storage.orm import Case, CaseStatus, OutboxStatus
from lisplugin.storage.orm_review import Role
from tests.daemon import Daemon, free_port
from tests.ops_support import outbox_message
from tests.report_factory import smear_capture
from tests.review_support import PASSWORD, ServerThread


def _datagrams(sock: socket.socket, until: set[str], timeout: float) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not until <= seen and time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            seen.add(sock.recv(4096).decode())
        except TimeoutError:
            break
    return seen


def test_serve_tells_systemd_ready_and_pings_the_watchdog(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        daemon = Daemon(tmp_path / "var", "", free_port())
        daemon.extra_env.update({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        try:
            daemon.start()
            seen = _datagrams(sock, {"READY=1", "WATCHDOG=1"}, timeout=20)
            assert {"READY=1", "WATCHDOG=1"} <= seen, seen
        finally:
            daemon.stop()
        assert "STOPPING=1" in _datagrams(sock, {"STOPPING=1"}, timeout=5)


def _commands() -> list[list[str]]:
    """Every command and sub-command the ``lisplugin`` parser lists, and ``user``'s own."""
    import argparse

    from lisplugin.cli import build_parser

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        found = [prefix]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += walk(sub, [*prefix, name])
        return found

    return [*walk(build_parser(), []), ["user", "add"], ["user", "list"], ["user", "disable"]]


def test_every_command_answers_help_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from lisplugin.cli import main

    commands = _commands()
    assert ["train", "classifier"] in commands and ["evaluate", "differential"] in commands
    for words in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*words, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0, words
        assert out.startswith("usage: lisplugin"), (words, out[:200])
        if "--config" in out or "--epochs" in out:
            assert "(default:" in out, (words, out)


def test_progress_bar_is_off_without_a_terminal() -> None:
    script = (
        "import sys; from lisplugin.progress import progress\n"
        "print(sum(progress(range(50000), desc='work')), sys.stderr.isatty())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["1249975000", "False"]
    assert result.stderr == ""


@dataclass
class Ops:
    """A started runtime and its HTTP API on loopback ports, with an admin signed in."""

    runtime: Runtime
    url: str
    admin: httpx.Client
    anonymous: httpx.Client


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    root = tmp_path_factory.mktemp("ops")
    settings = Settings(
        storage={"path": root / "var"},
        dicom={"host": "127.0.0.1", "port": free_port()},
        hl7={"listen_host": "127.0.0.1", "listen_port": free_port(), "lis_port": free_port()},
    )
    runtime = Runtime(settings)
    with runtime.db.session() as session:
        users.add_user(session, "ops", PASSWORD, Role.ADMIN, by="test")
    runtime.start()
    try:
        with ServerThread(create_app(runtime), free_port()) as server:
            admin = httpx.Client(base_url=server.url, timeout=30)
            token = admin.post("/api/session", json={"username": "ops", "password": PASSWORD})
            admin.headers["Authorization"] = f"Bearer {token.json()['token']}"
            yield Ops(runtime, server.url, admin, httpx.Client(base_url=server.url, timeout=30))
    finally:
        runtime.stop()


def test_api_docs_load_nothing_from_outside(ops: Ops) -> None:
    assert ops.anonymous.get("/docs").status_code == 401
    page = ops.admin.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html), html
    assert not re.search(r"https?://", html), html
    assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)["']""", html)
    assert {a for a in assets if a.endswith((".js", ".css"))}, assets
    for asset in assets:
        assert ops.admin.get(asset).status_code == 200, asset
    assert ops.admin.get("/openapi.json").json()["info"]["title"] == "lisplugin"


def _series(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_metrics_standard_collectors_versions_counters_and_state(ops: Ops) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    with ops.runtime.db.session() as session:
        case = Case(
            case_key="acc:MET1",
            accession_number="MET1",
            status=CaseStatus.REVIEW,
            patient={},
            analysed_at=long_ago,
        )
        session.add(case)
        session.flush()
        session.add(
            outbox_message(
                case.id,
                "hl7",
                "MET1-1",
                OutboxStatus.PENDING,
                attempts=1,
                created_at=long_ago,
                next_attempt_at=long_ago + timedelta(days=1),
            )
        )
    for _ in range(3):
        assert ops.anonymous.get("/healthz").status_code == 200
    text = ops.anonymous.get("/metrics").text
    series = _series(text)
    for name in (
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_objects_collected_total",
        "lisplugin_build_info",
        "lisplugin_instances_received_total",
        "lisplugin_orders_received_total",
        "lisplugin_cases_analysed_total",
        "lisplugin_results_rejected_total",
        "lisplugin_storage_free_bytes",
    ):
        assert name in series, name
    (build,) = series["lisplugin_build_info"]
    assert build[0]["version"] == lisplugin.__version__
    models = {labels["name"]: labels["version"] for labels, _ in series["lisplugin_model_info"]}
    assert set(models) == {"cell-detector", "leukocyte-classifier"} and all(models.values())
    outcomes = {labels["outcome"] for labels, _ in series["lisplugin_cases_analysed_total"]}
    assert outcomes == {"verified", "review", "failed"}
    assert {labels["outcome"] for labels, _ in series["lisplugin_instances_received_total"]} == {
        "stored",
        "quarantined",
    }

    def value(name: str, **labels: str) -> float:
        return next(v for lab, v in series[name] if all(lab.get(k) == x for k, x in labels.items()))

    assert value("lisplugin_outbox_pending", channel="hl7") == 1
    assert value("lisplugin_outbox_pending", channel="dicom") == 0
    assert 7000 < value("lisplugin_outbox_oldest_pending_seconds", channel="hl7") < 7400
    assert value("lisplugin_review_backlog") == 1
    assert 7000 < value("lisplugin_review_oldest_waiting_seconds") < 7400
    assert value("lisplugin_storage_free_bytes") > 0
    assert value("lisplugin_http_request_seconds_count", route="/healthz", status="200") >= 3

    ready = ops.anonymous.get("/readyz")
    assert ready.status_code == 200 and ready.json()["lis"] == "degraded", ready.json()


def test_readyz_fails_on_a_full_disk(ops: Ops) -> None:
    storage = ops.runtime.settings.storage
    assert ops.anonymous.get("/readyz").status_code == 200
    before = storage.min_free_mb
    storage.min_free_mb = int(shutil.disk_usage(storage.path).free / 2**20) + 10**6
    try:
        answer = ops.anonymous.get("/readyz")
    finally:
        storage.min_free_mb = before
    assert answer.status_code == 503
    assert answer.json()["checks"]["disk"] is False and answer.json()["checks"]["dicom"] is True


def test_readyz_fails_when_the_database_is_unreachable(ops: Ops) -> None:
    reachable = ops.runtime.db
    ops.runtime.db = Database(f"postgresql+psycopg://lisplugin@127.0.0.1:{free_port()}/none")
    try:
        answer = ops.anonymous.get("/readyz")
    finally:
        ops.runtime.db.dispose()
        ops.runtime.db = reachable
    assert answer.status_code == 503
    assert answer.json()["checks"]["database"] is False
    assert ops.anonymous.get("/readyz").status_code == 200


def test_logs_are_json_one_format_with_ids_and_no_phi(tmp_path: Path) -> None:
    lis = LisSimulator(port=free_port()).start()
    daemon = Daemon(tmp_path / "var", "", lis.port)
    daemon.extra_env.update({"LISPLUGIN_LOGGING__FORMAT": "json"})
    accession, patient_id = "LOG1001", "PIDSECRET77"
    try:
        daemon.start()
        with MLLPClient("127.0.0.1", daemon.hl7_port) as client:
            client.send_message(
                build_test_order(
                    accession=accession,
                    patient_id=patient_id,
                    family="Zyxwvut",
                    given="Qponml",
                    birth_date="19610203",
                    sex="F",
                )
            )
        capture = smear_capture(
            tmp_path / "in", 1, generate_uid(), accession=accession, patient_id=patient_id
        )
        assert all(r.ok for r in send([capture], "127.0.0.1", daemon.dicom_port, "LISPLUGIN"))
        daemon.wait_for_case(accession, {"review", "verified"})
        answer = httpx.get(
            f"{daemon.api}/api/cases",
            headers={"Authorization": f"Bearer {daemon.token}", "X-Request-ID": "req-test-42"},
        )
        assert answer.headers["X-Request-ID"] == "req-test-42"
    finally:
        daemon.stop()
        lis.stop()
    lines = daemon.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "event"} <= r.keys() for r in records)
    assert not any("color_message" in r for r in records)
    loggers = {r["logger"] for r in records}
    assert "uvicorn.error" in loggers and "lisplugin.http.access" in loggers
    assert any(
        r.get("request_id") == "req-test-42" and r["logger"] == "lisplugin.http.access"
        for r in records
    )
    assert any("case_id" in r and "analysed" in r["event"] for r in records)
    noisy = [
        r
        for r in records
        if r["logger"].split(".")[0] in QUIET_LOGGERS and r["level"] in ("debug", "info")
    ]
    assert not noisy, noisy[:3]
    text = "\n".join(lines)
    for phi in ("Zyxwvut", "Qponml", patient_id, "19610203"):
        assert phi not in text, phi
