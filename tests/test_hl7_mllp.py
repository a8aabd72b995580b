"""MLLP over real loopback sockets: the order listener, the result sender and the LIS simulator."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from daemon import free_port
from hl7.client import MLLPClient

from lisplugin.config import Hl7Settings
from lisplugin.core.types import ResultValue
from lisplugin.hl7.ack import ErrorCode, MessageRejected, build_ack
from lisplugin.hl7.lis_sim import LisSimulator, build_test_order, cli
from lisplugin.hl7.mllp import (
    LisUnreachable,
    MllpOrderListener,
    MllpServer,
    next_retry_delay,
    send_message,
)
from lisplugin.hl7.orders import Order, OrderRejected
from lisplugin.hl7.oru import build_oru, parse_ack

REPO = Path(__file__).resolve().parent.parent
LOINC = yaml.safe_load((REPO / "config" / "loinc.yaml").read_text(encoding="utf-8"))
ORDER = (REPO / "interfaces" / "hl7-examples" / "ORM_O01.hl7").read_text(encoding="utf-8")


class BackgroundLoop:
    """An event loop in a thread, as the daemon runs its MLLP listener."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class Application:
    """The daemon's side of the listener: keeps orders, or fails as told."""

    def __init__(self) -> None:
        self.orders: list[tuple[Order, str]] = []
        self.failure: Exception | None = None

    def on_order(self, order: Order, message: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.orders.append((order, message))


@pytest.fixture
def listener() -> Iterator[tuple[MllpOrderListener, Application]]:
    application = Application()
    server = MllpOrderListener("127.0.0.1", 0, application.on_order, application="LISPLUGIN")
    background = BackgroundLoop()
    background.run(server.start())
    yield server, application
    background.run(server.stop())
    background.close()


def unframe(block: bytes) -> str:
    assert block.startswith(b"\x0b") and block.endswith(b"\x1c\r")
    return block[1:-2].decode("utf-8")


def oru(control_id: str = "LP1-1") -> str:
    return build_oru(
        [ResultValue("neutrophil_pct", 61.0, "%", 40, 75), ResultValue("wbc_classified", 150, "")],
        [],
        "F",
        None,
        {"id": "PAT1", "name_family": "DOE", "accession_number": "ACC1"},
        LOINC,
        control_id,
        Hl7Settings(),
        datetime.now(UTC),
    )


# --- order listener -----------------------------------------------------------------------


def test_python_hl7_client_sends_an_order_and_gets_aa(listener) -> None:  # type: ignore[no-untyped-def]
    server, application = listener
    with MLLPClient("127.0.0.1", server.port) as client:
        ack = unframe(client.send_message(ORDER))
    assert parse_ack(ack) == ("AA", "ORD20240315-0042", "")
    [(order, message)] = application.orders
    assert order.accession_number == "ACC240315-017" and order.is_stat
    assert message.split() == ORDER.split()


def test_bad_messages_are_answered_and_the_connection_goes_on(listener) -> None:  # type: ignore[no-untyped-def]
    server, application = listener
    without_accession = ORDER.replace("ACC240315-017", "")
    with MLLPClient("127.0.0.1", server.port) as client:
        garbage = parse_ack(unframe(client.send_message("hello")))
        missing = parse_ack(unframe(client.send_message(without_accession)))
        good = parse_ack(unframe(client.send_message(ORDER)))
    assert garbage[0] == "AR" and "MSH" in garbage[2]
    assert missing[:2] == ("AE", "ORD20240315-0042") and "accession" in missing[2]
    assert good[0] == "AA"
    assert len(application.orders) == 1


def test_unframed_and_truncated_input_does_not_stop_the_listener(listener) -> None:  # type: ignore[no-untyped-def]
    server, _ = listener
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"no start block\x1c\r")
        answer = raw.recv(4096)
        assert parse_ack(unframe(answer))[0] == "AR"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"\x0bMSH|^~\\&|LIS|LAB")  # the peer goes away inside a message
    with MLLPClient("127.0.0.1", server.port) as client:
        assert parse_ack(unframe(client.send_message(ORDER)))[0] == "AA"


@pytest.mark.parametrize(
    ("failure", "code", "error"),
    [
        (OrderRejected(ErrorCode.TABLE_VALUE_NOT_FOUND, "unknown test"), "AE", "unknown test"),
        (RuntimeError("database is down"), "AR", "send it again later"),
    ],
)
def test_application_errors_are_acknowledged(listener, failure, code, error) -> None:  # type: ignore[no-untyped-def]
    server, application = listener
    application.failure = failure
    with MLLPClient("127.0.0.1", server.port) as client:
        answer = unframe(client.send_message(ORDER))
    assert parse_ack(answer)[0] == code and error in parse_ack(answer)[2]
    if code == "AR":
        assert f"|{int(ErrorCode.APPLICATION_INTERNAL_ERROR)}^" in answer


# --- sender and LIS simulator -------------------------------------------------------------


def test_send_message_delivers_to_the_lis_simulator(tmp_path: Path) -> None:
    message = oru("LP5-1")
    with LisSimulator(store=tmp_path) as lis:
        ack = send_message("127.0.0.1", lis.port, message, timeout=5)
    assert (ack.code, ack.control_id, ack.accepted) == ("AA", "LP5-1", True)
    assert lis.received == [message]
    [stored] = tmp_path.iterdir()
    assert stored.name == "00001_LP5-1.hl7" and stored.read_bytes().decode("utf-8") == message


def test_lis_unreachable_when_nothing_listens() -> None:
    started = time.monotonic()
    with pytest.raises(LisUnreachable):
        send_message("127.0.0.1", free_port(), oru(), timeout=5)
    assert time.monotonic() - started < 2


def test_lis_unreachable_when_no_ack_comes() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(LisUnreachable, match="no ACK"):
            send_message("127.0.0.1", silent.getsockname()[1], oru(), timeout=0.5)


def test_lis_unreachable_when_the_ack_is_for_another_message() -> None:
    other = build_test_order(accession="X", patient_id="P", control_id="SOMETHING-ELSE")
    server = MllpServer("127.0.0.1", 0, lambda _: build_ack(other, application="LIS"))
    background = BackgroundLoop()
    background.run(server.start())
    try:
        with pytest.raises(LisUnreachable, match="SOMETHING-ELSE"):
            send_message("127.0.0.1", server.port, oru(), timeout=5)
    finally:
        background.run(server.stop())
        background.close()


def test_lis_sim_fail_first_answers_ae_then_aa() -> None:
    with LisSimulator(fail_first=2) as lis:
        answers = [send_message("127.0.0.1", lis.port, oru(), timeout=5) for _ in range(3)]
    assert [a.code for a in answers] == ["AE", "AE", "AA"]
    assert "simulated failure 1 of 2" in answers[0].text


def test_lis_sim_answers_ae_to_an_invalid_oru_and_ar_when_rejecting() -> None:
    invalid = oru().replace("|F|||", "||||")  # OBX-11 result status emptied
    with LisSimulator() as lis:
        ack = send_message("127.0.0.1", lis.port, invalid, timeout=5)
    assert ack.code == "AE" and "OBX_11" in ack.text
    with LisSimulator(reject=True) as lis:
        assert send_message("127.0.0.1", lis.port, oru(), timeout=5).code == "AR"


def test_lis_sim_command_line(tmp_path: Path) -> None:
    port = free_port()
    result: list[int] = []
    command = [
        "--port",
        str(port),
        "--fail-first",
        "1",
        "--exit-after",
        "2",
        "--store",
        str(tmp_path),
    ]
    runner = threading.Thread(target=lambda: result.append(cli(command)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            first = send_message("127.0.0.1", port, oru("LP8-1"), timeout=5)
            break
        except LisUnreachable:
            assert time.monotonic() < deadline, "lis-sim did not start listening"
            time.sleep(0.05)
    second = send_message("127.0.0.1", port, oru("LP8-2"), timeout=5)
    runner.join(timeout=10)
    assert (first.code, second.code) == ("AE", "AA")
    assert result == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001_LP8-1.hl7", "00002_LP8-2.hl7"]


def test_lis_sim_sends_a_test_order_to_the_listener(listener) -> None:  # type: ignore[no-untyped-def]
    server, application = listener
    status = cli(
        [
            "--send-only",
            "--to-port",
            str(server.port),
            "--accession",
            "ACC42",
            "--patient-id",
            "PAT42",
            "--priority",
            "S",
        ]
    )
    assert status == 0
    [(order, _)] = application.orders
    assert (order.accession_number, order.patient_id, order.is_stat) == ("ACC42", "PAT42", True)
    application.failure = MessageRejected(ErrorCode.REQUIRED_FIELD_MISSING, "no")
    assert cli(["--send-only", "--to-port", str(server.port)]) == 1


def test_next_retry_delay_doubles_up_to_the_maximum() -> None:
    delays = [next_retry_delay(attempt, 2.0, 300.0) for attempt in range(1, 11)]
    assert delays == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert next_retry_delay(10_000, 2.0, 300.0) == 300
    with pytest.raises(ValueError):
        next_retry_delay(0, 2.0, 300.0)
