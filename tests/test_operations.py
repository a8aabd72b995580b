"""What hospital IT operates: systemd notification, watchdog, help, health, metrics, logs."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lisplugin.config import Settings
from lisplugin.http.app import create_app
from lisplugin.service import users
from lisplugin.service.runtime import Runtime
from lisplugin.storage.orm_review import Role
from tests.daemon import Daemon, free_port
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
        daemon.extra_env["LISPLUGIN_DATABASE__URL"] = ""
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
