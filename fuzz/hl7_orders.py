"""Coverage-guided fuzzing (atheris) of the HL7 entry point: bytes as an MLLP order message.

The bytes are decoded as the listener decodes a block, then answered by the order listener's
own handler (``MllpOrderListener._answer``: sender check, ``parse_order``, the order applied to
a real SQLite database, the ACK built). What counts as a crash:

* the handler raising, or answering something that is not an HL7 ACK python-hl7 can parse;
* ``parse_order`` failing with anything but ``MessageRejected`` (an AE/AR with a reason): any
  other exception would answer "send it again later" to a message that can never be taken.

``python -m fuzz.run hl7 [libFuzzer options] [corpus folder]``; ``make fuzz`` runs it longer.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from contextlib import suppress
from pathlib import Path

import hl7

from fuzz.corpus import fuzz
from lisplugin.hl7.ack import ErrorCode, MessageRejected
from lisplugin.hl7.lis_sim import build_test_order
from lisplugin.hl7.mllp import MllpOrderListener, _decode
from lisplugin.hl7.orders import Order, OrderRejected, parse_order
from lisplugin.service.ingest import OrderConflict, apply_order
from lisplugin.storage.db import Database


class Target:
    """The order listener's handler on a throw-away SQLite database."""

    def __init__(self, folder: Path) -> None:
        self.db = Database(f"sqlite:///{folder / 'fuzz.db'}")
        self.db.migrate()
        self.listener = MllpOrderListener("127.0.0.1", 0, self._apply, application="LISPLUGIN")

    def _apply(self, order: Order, message: str) -> None:
        """What ``Runtime.accept_order`` does, without the scheduler to wake."""
        try:
            apply_order(self.db, order, message)
        except OrderConflict as exc:
            raise OrderRejected(
                ErrorCode.APPLICATION_INTERNAL_ERROR, str(exc), "PID^1", ack_code="AE"
            ) from exc

    def one_input(self, data: bytes) -> None:
        message = _decode(data)
        with suppress(MessageRejected):
            parse_order(message)
        ack = self.listener._answer(message)
        parsed = hl7.parse(ack.replace("\n", "\r"))
        if str(parsed.segment("MSA")[1]) not in ("AA", "AE", "AR"):
            raise AssertionError(f"not an ACK: {ack!r}")


def seeds() -> list[bytes]:
    """Valid orders to start from: a new order, a cancellation, one with every field."""
    return [
        build_test_order(accession="FZ1", patient_id="FZP1").encode(),
        build_test_order(accession="FZ2", patient_id="FZP2", order_control="CA").encode(),
        build_test_order(
            accession="FZ3",
            patient_id="FZP3",
            family="Fuzzfamily",
            given="Fuzzgiven",
            birth_date="19700101",
            sex="F",
            priority="S",
        ).encode(),
    ]


def main(argv: list[str]) -> None:
    logging.disable(logging.CRITICAL)  # a line per refused input would set the pace
    with tempfile.TemporaryDirectory(prefix="fuzz-hl7-") as folder:
        fuzz(argv, Target(Path(folder)).one_input, seeds())


if __name__ == "__main__":
    main(sys.argv)
