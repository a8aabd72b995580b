"""pynetdicom's two polling loops, woken by what they wait for instead of a fixed millisecond.

Every association runs two threads that poll: the DUL provider reads PDUs from the socket and
sleeps ``_run_loop_delay`` (1 ms) whenever it found nothing to do, and the association's reactor
sleeps 1 ms before each look at its DIMSE message queue. A C-STORE passes both, and its response
passes the DUL again, so on an idle machine about 2-3 ms of each instance's ~5 ms was spent
asleep with the data already there (``lisplugin bench ingest``: 212 instances/s on one
association against 312 with the loops woken; pynetdicom issues #120 and #650 discuss the
trade-off between the delay and idle CPU).

Here the same loops wait as long as before when there is nothing to do, but return as soon as
there is work: the DUL waits (``select``, the old delay as timeout) on its socket and on a
socket pair that its outgoing queue writes a byte to, so a response leaves at once; the reactor
waits on its message queue's condition. Idle CPU is unchanged.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
import time
import types
from typing import Any

import pynetdicom.association
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

#: The longest sleep taken for a poll (pynetdicom's loops sleep 1 ms); longer sleeps are kept.
POLL_SECONDS = 0.001

_installed = threading.Lock()


def _reactor_sleep(seconds: float) -> None:
    """``time.sleep`` for pynetdicom.association: an association thread's polling sleep ends
    when a DIMSE message is queued for it (a shorter sleep is always safe for a poll)."""
    thread = threading.current_thread()
    dimse = getattr(thread, "dimse", None) if isinstance(thread, Association) else None
    if dimse is None or seconds > POLL_SECONDS:
        time.sleep(seconds)
        return
    messages = dimse.msg_queue
    with messages.not_empty:  # the queue's own lock and condition, notified by put()
        if not messages.queue:
            messages.not_empty.wait(seconds)


class _ReactorClock(types.ModuleType):
    """The ``time`` module as pynetdicom.association sees it, with :func:`_reactor_sleep`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    sleep = staticmethod(_reactor_sleep)


def install() -> None:
    """Wake association reactors on their messages (idempotent; all associations in-process,
    SCP and SCU alike)."""
    with _installed:
        if not isinstance(pynetdicom.association.time, _ReactorClock):
            pynetdicom.association.time = _ReactorClock("time")  # type: ignore[attr-defined]


def wake_on_data(assoc: Association) -> None:
    """Have the association's DUL wait on its socket, and on what is queued for sending,
    rather than sleep between polls (its socket must be a :class:`WakingSocket`)."""
    sock = assoc.dul.socket
    if not isinstance(sock, WakingSocket):
        raise TypeError("wake_on_data needs a WakingSocket")
    sock.wake_on(assoc.dul.to_provider_queue)
    assoc.dul._run_loop_delay = 0  # its idle wait is now the socket's ``ready``


class WakingSocket(AssociationSocket):
    """An association socket whose readiness check waits up to :data:`POLL_SECONDS` for data
    (the DUL's sleep, moved here), so that a PDU is read as soon as it arrives; a primitive put
    on the DUL's outgoing queue ends the wait too (a byte on a socket pair: the self-pipe
    trick), so that a response is sent at once."""

    _wake: tuple[socket.socket, socket.socket] | None = None

    def wake_on(self, outgoing: queue.Queue[Any]) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wake = (reader, writer)
        put = outgoing.put

        def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
            put(item, block, timeout)
            # closed with the association, or already full of wake-ups: nothing to wake
            with contextlib.suppress(OSError):
                writer.send(b"\0")

        outgoing.put = put_and_wake  # type: ignore[method-assign]

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(POLL_SECONDS)  # nothing to wait on: the DUL's own delay, as before
            return False
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select cannot see
        if pending is not None and pending():
            return True
        waits = [sock] if self._wake is None else [sock, self._wake[0]]
        try:
            readable, _, _ = select.select(waits, [], [], POLL_SECONDS)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom does
            return False
        if self._wake is not None and self._wake[0] in readable:
            with contextlib.suppress(OSError):
                self._wake[0].recv(4096)
        return sock in readable

    def close(self) -> None:
        super().close()
        self.close_wake()

    def close_wake(self) -> None:
        """Close the wake-up socket pair. pynetdicom often ends an association without closing
        its socket (the collector does), so the SCP calls this when the association has ended."""
        wake, self._wake = self._wake, None
        if wake is not None:
            for end in wake:
                end.close()
