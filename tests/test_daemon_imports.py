"""The daemon runs on onnxruntime and numpy: torch and torchvision belong to the train extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every module of the package outside lisplugin.training (service, inference, evaluation,
# DICOM, HL7, HTTP, core, cli), imported in a fresh interpreter.
SCRIPT = """
import json, pkgutil, sys
import lisplugin
names = sorted(
    m.name for m in pkgutil.walk_packages(lisplugin.__path__, "lisplugin.")
    if not m.name.startswith(("lisplugin.training", "lisplugin.storage.migrations"))
    and m.name != "lisplugin.__main__"
)
for name in names:
    __import__(name)
print(json.dumps({
    "imported": names,
    "heavy": sorted(m for m in ("torch", "torchvision", "onnx") if m in sys.modules),
}))
"""


def test_daemon_modules_do_not_import_torch():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"lisplugin.cli", "lisplugin.service.runtime", "lisplugin.inference.detector"} <= set(
        result["imported"]
    )
    assert result["heavy"] == []
