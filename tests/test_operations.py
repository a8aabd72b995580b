"""What hospital IT operates: systemd notification, watchdog, help, health, metrics, logs."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon, free_port


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
