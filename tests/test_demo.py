"""``make demo`` runs ``lisplugin demo``: the whole path on embedded defaults, real sockets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_sends_an_order_and_a_capture_and_the_lis_gets_the_oru(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lisplugin", "demo"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "-> ACK AA" in out  # the order was accepted
    assert "C-STORE synthetic-field.jpg: status 0x0000" in out
    oru = [line for line in out.splitlines() if line.startswith("MSH|") and "ORU^R01" in line]
    assert oru, out[-3000:]
    assert "OBX|1|NM|26511-6^Neutrophils" in out  # the differential, LOINC-coded
    assert '"ack_code": "AA"' in out  # and the LIS simulator acknowledged it
