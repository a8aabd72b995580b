"""What hospital IT operates: systemd notification, watchdog, help, health, metrics, logs."""

from __future__ import annotations

import socket
import time
from pathlib import Path

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
