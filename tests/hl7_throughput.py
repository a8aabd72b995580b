"""Orders per second through lisplugin's MLLP listener (interfaces/hl7-interface.md, section 10).

Starts ``lisplugin serve`` on SQLite, sends N ORM^O01 over one MLLP connection, each waiting for
its ACK (the order is in the database before the ACK), and prints the rate:

    .venv/bin/python tests/hl7_throughput.py 300
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from hl7.client import MLLPClient  # noqa: E402

from lisplugin.hl7.lis_sim import build_test_order  # noqa: E402
from tests.daemon import Daemon, free_port  # noqa: E402


def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp) / "var", "", free_port())
        daemon.start()
        try:
            messages = [
                build_test_order(accession=f"TP{i:05d}", patient_id=f"P{i}", family="Doe",
                                 given="J", birth_date="19700101", sex="F")
                for i in range(count + 1)
            ]  # fmt: skip
            with MLLPClient("127.0.0.1", daemon.hl7_port) as client:
                client.send_message(messages[0])  # connection and first-use costs
                started = time.perf_counter()
                for message in messages[1:]:
                    ack = client.send_message(message)
                    text = ack.decode() if isinstance(ack, bytes) else str(ack)
                    assert "MSA|AA" in text, text
                elapsed = time.perf_counter() - started
        finally:
            daemon.stop()
    print(f"{count} orders in {elapsed:.1f} s: {count / elapsed:.1f} orders/s, "
          f"{1000 * elapsed / count:.0f} ms per order (ACK round trip, SQLite)")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
