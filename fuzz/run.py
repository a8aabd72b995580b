"""``python -m fuzz.run dicom|hl7 [libFuzzer options] [corpus folder]``: one harness under atheris.

lisplugin, pydicom, pynetdicom and python-hl7 are imported with atheris's coverage
instrumentation here, before the harness module uses them, so the fuzzer sees which branches an
input reached (instrumenting everything already loaded instead takes minutes).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["lisplugin", "pydicom", "pynetdicom", "hl7"]):
    from fuzz import dicom_ingest, hl7_orders

HARNESSES = {"dicom": dicom_ingest.main, "hl7": hl7_orders.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in HARNESSES:
        sys.exit(f"usage: python -m fuzz.run {'|'.join(HARNESSES)} [libFuzzer options] [corpus]")
    HARNESSES[sys.argv[1]]([sys.argv[0], *sys.argv[2:]])
