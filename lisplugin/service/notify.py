"""systemd's service notification (``Type=notify``): READY=1 once serving, WATCHDOG=1 while alive.

The protocol is one datagram to the socket named by ``$NOTIFY_SOCKET`` (sd_notify(3)); it is
written here rather than pulled in as a dependency because the maintained binding
(``systemd-python``) needs libsystemd headers to build. Outside systemd every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False when not under one."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", state, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half the ``WatchdogSec`` systemd set for this process, or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Watchdog:
    """Pings systemd's watchdog while ``alive()`` says the daemon's parts are working."""

    def __init__(self, alive: Callable[[], bool]) -> None:
        self._alive = alive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="lisplugin-watchdog", daemon=True
        )
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self._alive():
                notify("WATCHDOG=1")
            else:  # no ping: systemd restarts the daemon once WatchdogSec has passed
                log.error("a part of the daemon stopped; withholding the watchdog ping")

    def stop(self) -> None:
        self._stop.set()
        notify("STOPPING=1")
