"""``lisplugin lis-sim``: a small LIS to run lisplugin against, in tests and demos.

It listens for ORU^R01 over MLLP, stores and prints every message, and answers AA when the
message passes hl7apy's strict ORU_R01 validation, AE with an ERR segment when it does not.
``--fail-first N`` answers AE to the first N messages and ``--reject`` answers AR to all, to
exercise the sender's retries. ``--send-order`` sends a test ORM^O01 to the daemon, as the LIS
would when a smear is ordered.

``LisSimulator`` is the same server for tests: it runs in a background thread and keeps what
it received in ``.received``.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from hl7.util import generate_message_control_id
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

from lisplugin.config import load_settings
from lisplugin.hl7.ack import (
    ErrorCode,
    MessageRejected,
    ReceivedHeader,
    build_ack,
    hl7_timestamp,
    set_field,
)
from lisplugin.hl7.mllp import BackgroundServer, LisUnreachable, MllpServer, send_message
from lisplugin.hl7.oru import OruInvalid, validate_oru

ORDER_VERSION = "2.5.1"


class LisSimulator:
    """An MLLP server acting as the LIS, run in a background thread (``start``/``stop``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        store: Path | None = None,
        fail_first: int = 0,
        reject: bool = False,
        echo: bool = False,
        application: str = "LIS",
        facility: str = "LAB",
    ) -> None:
        self.store = store
        self.fail_first = fail_first
        self.reject = reject
        self.echo = echo
        self.application = application
        self.facility = facility
        self.received: list[str] = []
        #: ``time.monotonic()`` of each message in ``received``, in the same order.
        self.arrived_at: list[float] = []
        self._arrived = threading.Condition()
        self._server = MllpServer(host, port, self.answer)
        self._background = BackgroundServer(self._server, "lis-sim")

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> LisSimulator:
        """Listen in a background thread; returns once listening, or raises why it cannot."""
        self._background.start()
        return self

    def stop(self) -> None:
        self._background.stop()

    def __enter__(self) -> LisSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float | None = None) -> bool:
        """Wait until ``count`` messages have arrived; False when ``timeout`` passed first."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.received) >= count, timeout)

    def answer(self, message: str) -> str:
        """Store the message and build its ACK (the MLLP handler)."""
        with self._arrived:
            self.received.append(message)
            self.arrived_at.append(time.monotonic())
            number = len(self.received)
            self._arrived.notify_all()
        error = self._judge(message, number)
        ack = build_ack(message, error, application=self.application, facility=self.facility)
        if self.store is not None:
            self.store.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9._-]", "_", ReceivedHeader(message).control_id)
            (self.store / f"{number:05d}_{name or 'unknown'}.hl7").write_text(
                message, encoding="utf-8", newline=""
            )
        if self.echo:
            answer = error.ack_code if error else "AA"
            print(f"--- message {number}, answered {answer}" + (f": {error}" if error else ""))
            print(message.replace("\r", "\n"), flush=True)
        return ack

    def _judge(self, message: str, number: int) -> MessageRejected | None:
        if self.reject:
            return MessageRejected(
                ErrorCode.APPLICATION_INTERNAL_ERROR, "simulated rejection (lis-sim --reject)"
            )
        if number <= self.fail_first:
            return MessageRejected(
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                f"simulated failure {number} of {self.fail_first} (lis-sim --fail-first)",
                ack_code="AE",
            )
        try:
            validate_oru(message)
        except OruInvalid as exc:
            return MessageRejected(exc.code, f"invalid ORU^R01: {exc}")
        return None


def build_test_order(
    *,
    accession: str,
    patient_id: str,
    family: str = "",
    given: str = "",
    birth_date: str = "",
    sex: str = "",
    test_code: str = "69738-3",
    test_text: str = "Differential panel, method unspecified - Blood",
    test_system: str = "LN",
    priority: str = "R",
    order_control: str = "NW",
    control_id: str | None = None,
    application: str = "LIS",
    facility: str = "LAB",
) -> str:
    """An ORM^O01 (v2.5.1) as a LIS sends it: accession number in OBR-18 and as placer number.

    Built with hl7apy; not strictly validated, because hl7apy models the ORM_O01 order-detail
    choice (OBR | RQD | RQ1 | RXO | ODS | ODT) as all six required. ``parse_order`` reads it.
    """
    message = Message("ORM_O01", version=ORDER_VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    now = hl7_timestamp(datetime.now().astimezone())
    msh = message.msh
    set_field(msh.msh_3, application)
    set_field(msh.msh_4, facility)
    set_field(msh.msh_5, "LISPLUGIN")
    msh.msh_7 = now
    msh.msh_9 = "ORM^O01^ORM_O01"
    set_field(msh.msh_10, control_id or generate_message_control_id())
    msh.msh_11 = "P"
    pid = message.add_group("ORM_O01_PATIENT").add_segment("PID")
    pid.pid_1 = "1"
    set_field(pid.pid_3, patient_id)
    set_field(pid.pid_5, family, given)
    set_field(pid.pid_7, birth_date)
    set_field(pid.pid_8, sex)
    order = message.add_group("ORM_O01_ORDER")
    orc = order.add_segment("ORC")
    set_field(orc.orc_1, order_control)
    set_field(orc.orc_2, accession)
    obr = (
        order.add_group("ORM_O01_ORDER_DETAIL")
        .add_group("ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP")
        .add_segment("OBR")
    )
    obr.obr_1 = "1"
    set_field(obr.obr_2, accession)
    set_field(obr.obr_4, test_code, test_text, test_system)
    obr.obr_7 = now
    set_field(obr.obr_18, accession)
    set_field(obr.obr_27, "", "", "", "", "", priority)
    return message.to_er7()


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin lis-sim",
        description="A small LIS: ACKs, prints and stores ORU^R01; can send a test ORM^O01.",
    )
    parser.add_argument("--config", type=Path, help="site settings YAML (for default ports)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, help="MLLP port (default: hl7.lis_port)")
    parser.add_argument("--store", type=Path, help="folder to write each received message to")
    parser.add_argument(
        "--fail-first", type=int, default=0, metavar="N", help="answer AE to the first N messages"
    )
    parser.add_argument("--reject", action="store_true", help="answer AR to every message")
    parser.add_argument(
        "--exit-after",
        type=int,
        metavar="N",
        help="stop after N messages (default: run until Ctrl-C)",
    )
    order = parser.add_argument_group("test order")
    order.add_argument("--send-order", action="store_true", help="send an ORM^O01 to the daemon")
    order.add_argument(
        "--send-only", action="store_true", help="send the order and exit, without listening"
    )
    order.add_argument("--to-host", default="127.0.0.1")
    order.add_argument("--to-port", type=int, help="daemon's MLLP port (default: hl7.listen_port)")
    order.add_argument("--accession", default="ACC0001")
    order.add_argument("--patient-id", default="PAT0001")
    order.add_argument("--family", default="DOE")
    order.add_argument("--given", default="JANE")
    order.add_argument("--birth-date", default="19800101", help="YYYYMMDD")
    order.add_argument("--sex", default="F")
    order.add_argument("--priority", default="R", help="R routine, S STAT")
    args = parser.parse_args(argv)
    hl7_settings = load_settings(args.config).hl7

    simulator = None
    if not args.send_only:
        port = hl7_settings.lis_port if args.port is None else args.port
        simulator = LisSimulator(
            args.host,
            port,
            store=args.store,
            fail_first=args.fail_first,
            reject=args.reject,
            echo=True,
        ).start()
        print(f"lis-sim listening on {args.host}:{simulator.port}", flush=True)
    status = 0
    try:
        if args.send_order or args.send_only:
            status = _send_order(args, hl7_settings.listen_port, hl7_settings.ack_timeout_seconds)
        if simulator is not None and status == 0:
            simulator.wait_for(args.exit_after or sys.maxsize)
    except KeyboardInterrupt:
        pass
    finally:
        if simulator is not None:
            simulator.stop()
    return status


def _send_order(args: argparse.Namespace, default_port: int, timeout: float) -> int:
    message = build_test_order(
        accession=args.accession,
        patient_id=args.patient_id,
        family=args.family,
        given=args.given,
        birth_date=args.birth_date,
        sex=args.sex,
        priority=args.priority,
    )
    port = default_port if args.to_port is None else args.to_port
    print(f"--- order to {args.to_host}:{port}\n" + message.replace("\r", "\n"), flush=True)
    try:
        ack = send_message(args.to_host, port, message, timeout)
    except LisUnreachable as exc:
        print(f"order not delivered: {exc}", file=sys.stderr)
        return 1
    print(f"order answered {ack.code}" + (f": {ack.text}" if ack.text else ""), flush=True)
    return 0 if ack.accepted else 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
