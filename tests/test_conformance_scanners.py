"""The worklist, STOW-RS and report-code sections of the conformance statement match the code."""

from __future__ import annotations

import re
from pathlib import Path

from pydicom.datadict import dictionary_description, keyword_for_tag
from pydicom.sr.coding import Code

from lisplugin.dicom import mwl
from lisplugin.http import dicomweb
from lisplugin.reports import coding

DOC = Path(__file__).resolve().parent.parent / "interfaces" / "dicom-conformance.md"


def tables(heading: str) -> list[list[dict[str, str]]]:
    """Every Markdown table under the ``##``/``###`` heading that contains ``heading``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return [[dict(zip(t[0], row, strict=True)) for row in t[2:]] for t in found]


def test_worklist_keys_and_statuses() -> None:
    sop, keys, statuses = tables("Modality Worklist SCP")
    assert sop[0]["UID"] == "1.2.840.10008.5.1.4.31"
    matched = set()
    for row in keys:
        group, element = re.fullmatch(r"\((\w{4}),(\w{4})\)", row["Tag"]).groups()  # type: ignore[union-attr]
        tag = int(group + element, 16)
        keyword = keyword_for_tag(tag)
        assert row["Attribute"].lstrip("> ") == dictionary_description(tag), row
        if row["Matching"] not in ("-", ""):
            matched.add(keyword)
    matched.discard("ScheduledProcedureStepSequence")
    assert matched == set(mwl.MATCHED)
    documented = {int(row["Status"], 16) for row in statuses}
    assert documented == {
        mwl.PENDING,
        mwl.SUCCESS,
        mwl.CANCELLED,
        mwl.IDENTIFIER_DOES_NOT_MATCH,
        mwl.UNABLE_TO_PROCESS,
    }
    assert re.search(rf"At most {mwl.MAX_MATCHES}\s+items", DOC.read_text())


def test_stow_failure_reasons() -> None:
    (reasons,) = tables("DICOMweb STOW-RS")
    documented = {int(row["Failure Reason"], 16) for row in reasons}
    assert {
        dicomweb.SOP_CLASS_NOT_SUPPORTED,
        dicomweb.TRANSFER_SYNTAX_NOT_SUPPORTED,
        dicomweb.CANNOT_UNDERSTAND,
        dicomweb.STUDY_MISMATCH,
    } <= documented


def test_every_fixed_report_code_is_listed() -> None:
    (codes,) = tables("Codes used")
    documented = {(r["Code Value"], r["Coding Scheme"], r["Code Meaning"]) for r in codes}
    used = [*coding.CELL_TYPES.values()] + [
        v for v in vars(coding).values() if isinstance(v, Code) and v is not coding.CELL_CATEGORY
    ]
    assert {(c.value, c.scheme_designator, c.meaning) for c in used} == documented
