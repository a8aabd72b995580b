"""Hostile and malformed orders over a real MLLP connection (issue 10, finding 9).

Each gets a clear AE/AR with ERR, and neither the ACK text nor the log (at the daemon's INFO
level) repeats the patient's name or birth date.
"""

from __future__ import annotations

import logging

import pytest
from hl7.client import MLLPClient
from test_hl7_mllp import ORDER, listener, unframe  # noqa: F401 - listener is a fixture

from lisplugin.hl7.oru import parse_ack

pytestmark = pytest.mark.reliability

SURNAME, BIRTH_DATE = "MUSTERMANN", "19640812"

HOSTILE = {
    "control-character-in-msh9": (
        ORDER.replace("|ORM^O01|", "|ORM\t^O01|"),
        "AR",
        "MSH-9 message type contains control characters",
    ),
    "impossible-birth-date": (
        ORDER.replace(f"|{BIRTH_DATE}|", "|19640899|"),
        "AE",
        "PID-7 is not an HL7 date/time",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_malformed_order_gets_a_clear_answer(listener, case: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    server, application = listener
    message, code, text = HOSTILE[case]
    with MLLPClient("127.0.0.1", server.port) as client:
        answer = parse_ack(unframe(client.send_message(message)))
    assert answer[:2] == (code, "ORD20240315-0042")
    assert answer[2].startswith(text)
    assert "19640899" not in answer[2]
    assert application.orders == []


@pytest.mark.parametrize(
    "message",
    [
        ORDER.replace(f"|{BIRTH_DATE}|", "|19640899|"),
        ORDER.replace(SURNAME, f"{SURNAME[:3]}\\X4G\\{SURNAME[3:]}"),  # bad hex escape
        ORDER.replace(SURNAME, f"{SURNAME[:3]}\\ZZ\\{SURNAME[3:]}"),  # unknown escape
        ORDER.replace(SURNAME, f"{SURNAME[:3]}\\C2842\\{SURNAME[3:]}"),  # charset escape
    ],
    ids=["birth-date", "hex-escape", "unknown-escape", "charset-escape"],
)
def test_no_patient_data_in_the_log(listener, caplog, message: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    server, _ = listener
    caplog.set_level(logging.INFO)
    with MLLPClient("127.0.0.1", server.port) as client:
        client.send_message(message)
    assert caplog.records  # something was logged ...
    logged = caplog.text
    assert SURNAME[3:] not in logged and "19640899" not in logged  # ... but not who


def _listener(**allow: list[str]):  # type: ignore[no-untyped-def]
    from test_hl7_mllp import Application, BackgroundLoop

    from lisplugin.hl7.mllp import MllpOrderListener

    application = Application()
    server = MllpOrderListener("127.0.0.1", 0, application.on_order, **allow)  # type: ignore[arg-type]
    background = BackgroundLoop()
    background.run(server.start())
    return server, application, background


def _stop(server, background) -> None:  # type: ignore[no-untyped-def]
    background.run(server.stop())
    background.close()


@pytest.mark.parametrize(("networks", "served"), [(["10.0.0.0/8"], False), (["127.0.0.0/8"], True)])
def test_peer_allow_list(networks: list[str], served: bool) -> None:
    import socket

    server, application, background = _listener(allowed_peers=networks)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            try:
                conn.sendall(b"\x0b" + ORDER.encode() + b"\x1c\r")
                answer = conn.recv(65536)
            except ConnectionResetError:  # closed before our message arrived
                answer = b""
        assert bool(answer) == served
        assert len(application.orders) == int(served)
    finally:
        _stop(server, background)


def test_sending_application_allow_list() -> None:
    server, application, background = _listener(allowed_senders=["LIS^CENTRAL LAB"])
    try:
        with MLLPClient("127.0.0.1", server.port) as client:
            good = parse_ack(unframe(client.send_message(ORDER)))
            other = ORDER.replace("|LIS|CENTRAL LAB|", "|EVIL|CENTRAL LAB|", 1)
            evil = parse_ack(unframe(client.send_message(other)))
        assert good[0] == "AA"
        assert evil[0] == "AR" and "not allowed" in evil[2]
        assert len(application.orders) == 1
    finally:
        _stop(server, background)
