"""Idle and greedy peers on the DICOM and MLLP ports (issue 10, finding 3).

Connections that say nothing are dropped after the configured timeout, connection counts are
capped, an unfinished or oversized MLLP message costs one answer at most, and well-behaved
peers get served again once the idle ones are gone.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from dicom_factory import SCP_AET, Recorder, instance, smear
from hl7.client import MLLPClient
from pynetdicom import AE
from test_hl7_mllp import ORDER, Application, BackgroundLoop, unframe

from lisplugin.config import DicomSettings
from lisplugin.dicom.scp import StorageSCP
from lisplugin.hl7.mllp import MllpOrderListener
from lisplugin.hl7.oru import parse_ack

pytestmark = pytest.mark.reliability


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """True when the peer closes ``conn`` (EOF or reset) within ``seconds``, data discarded."""
    conn.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if conn.recv(65536) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


@pytest.fixture
def mllp() -> Iterator[tuple[MllpOrderListener, Application]]:
    application = Application()
    server = MllpOrderListener(
        "127.0.0.1",
        0,
        application.on_order,
        read_timeout=1.0,
        max_connections=4,
        max_message_bytes=64 * 1024,
    )
    background = BackgroundLoop()
    background.run(server.start())
    yield server, application
    background.run(server.stop())
    background.close()


def order_ack(port: int) -> str:
    with MLLPClient("127.0.0.1", port) as client:
        return parse_ack(unframe(client.send_message(ORDER)))[0]


def test_idle_mllp_connection_is_closed(mllp) -> None:  # type: ignore[no-untyped-def]
    server, _ = mllp
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        assert closed_within(idle, 3)


def test_message_without_end_block_is_dropped(mllp) -> None:  # type: ignore[no-untyped-def]
    server, application = mllp
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"\x0b" + ORDER.encode())  # no <FS><CR>: never complete
        assert closed_within(conn, 3)
    assert application.orders == []
    assert order_ack(server.port) == "AA"


def test_mllp_connections_are_capped_and_served_again(mllp) -> None:  # type: ignore[no-untyped-def]
    server, _ = mllp
    with ExitStack() as stack:
        idle = [
            stack.enter_context(socket.create_connection(("127.0.0.1", server.port)))
            for _ in range(4)
        ]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            assert closed_within(extra, 0.5)  # refused at once, not after the read timeout
        assert all(closed_within(conn, 3) for conn in idle)
    assert order_ack(server.port) == "AA"


def test_oversized_message_gets_one_ar_and_the_connection_closes(mllp) -> None:  # type: ignore[no-untyped-def]
    server, application = mllp
    big = ORDER.rstrip("\r\n") + "\rNTE|1||" + "x" * (1024 * 1024) + "\r"
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
        sender = threading.Thread(
            target=lambda: _send_ignoring_reset(conn, b"\x0b" + big.encode() + b"\x1c\r")
        )
        sender.start()
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        sender.join(timeout=5)
    blocks = [b for b in received.split(b"\x1c\r") if b]
    assert len(blocks) == 1
    code, _, text = parse_ack(blocks[0][1:].decode())
    assert code == "AR" and "larger than 65536 bytes" in text
    assert application.orders == []
    assert order_ack(server.port) == "AA"


def _send_ignoring_reset(conn: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server closed first: expected
        conn.sendall(data)


def test_idle_dicom_connections_do_not_lock_out_modalities() -> None:
    """As many idle TCP connections as pynetdicom's default association limit: a modality is
    served within the ACSE timeout, not locked out for pynetdicom's default 30 s."""
    settings = DicomSettings(
        ae_title=SCP_AET, host="127.0.0.1", port=0, max_associations=10, acse_timeout=1
    )
    scp = StorageSCP(settings, Recorder())
    scp.start()
    try:
        with ExitStack() as stack:
            for _ in range(10):
                stack.enter_context(socket.create_connection(("127.0.0.1", scp.port)))
            time.sleep(0.3)
            started = time.monotonic()
            status = None
            while status is None and time.monotonic() - started < 5:
                status = _try_store(scp.port)
            assert status == 0
            assert time.monotonic() - started < 4
    finally:
        scp.stop()


def _try_store(port: int) -> int | None:
    ae = AE(ae_title="MODALITY")
    ds = instance(smear())
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AET)
    if not assoc.is_established:
        time.sleep(0.2)
        return None
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_one_host_cannot_take_every_association_slot() -> None:
    """Idle connections from one address (127.0.0.2) are capped per peer: a modality on
    another address is served meanwhile, and an extra connection from 127.0.0.2 is closed."""
    settings = DicomSettings(
        ae_title=SCP_AET,
        host="127.0.0.1",
        port=0,
        max_associations=4,
        max_associations_per_peer=3,
        acse_timeout=5,
    )
    scp = StorageSCP(settings, Recorder())
    scp.start()
    hostile = ("127.0.0.2", 0)
    try:
        with ExitStack() as stack:
            for _ in range(3):
                stack.enter_context(
                    socket.create_connection(("127.0.0.1", scp.port), source_address=hostile)
                )
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", scp.port), source_address=hostile) as extra:
                assert closed_within(extra, 2)
            assert _try_store(scp.port) == 0  # 127.0.0.1 while 127.0.0.2 idles
    finally:
        scp.stop()
