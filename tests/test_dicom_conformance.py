"""interfaces/dicom-conformance.md says what the code does: SOP classes, syntaxes, statuses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import instance, jpeg_instance
from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom.sop_class import Verification

from lisplugin.dicom import scp
from lisplugin.dicom.decode import UnusableInstance, fields_from_dataset
from lisplugin.dicom.scp import error_comment
from lisplugin.dicom.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

DOC = Path(__file__).resolve().parent.parent / "interfaces" / "dicom-conformance.md"


def table_after(heading: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table under the ``## ...`` heading that contains ``heading``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and heading in line)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, separator, *body = rows
    assert all(set(cell) <= set("-: ") for cell in separator)
    return [dict(zip(header, row, strict=True)) for row in body]


def test_sop_class_table_matches_the_scp() -> None:
    rows = table_after("Supported SOP classes")
    assert {row["Role"] for row in rows} == {"SCP"}
    documented = {UID(row["UID"]) for row in rows}
    assert documented == {*STORAGE_SOP_CLASSES, Verification}
    for row in rows:
        assert UID(row["UID"]).name == row["SOP Class"]


def test_transfer_syntax_table_matches_in_order() -> None:
    rows = table_after("Transfer syntaxes")
    assert [UID(row["UID"]) for row in rows] == list(TRANSFER_SYNTAXES)
    for row in rows:
        assert UID(row["UID"]).name == row["Transfer Syntax"]


def test_status_table_matches_the_scp() -> None:
    rows = table_after("C-STORE response status")
    documented = {int(row["Status"], 16): row["Meaning"] for row in rows}
    assert documented == scp.STORE_STATUSES
    module_codes = {
        value
        for name, value in vars(scp).items()
        if name.isupper()
        and isinstance(value, int)
        and name != "ERROR_COMMENT_MAX"
        and not name.startswith("_")
    }
    assert module_codes == set(scp.STORE_STATUSES)


def _documented_comment_patterns() -> list[re.Pattern[str]]:
    """Error Comment cells as regexes: `<value>` and `...` stand for any text."""
    patterns = []
    for row in table_after("C-STORE response status"):
        for comment in re.findall(r"`([^`]*)`", row["Error Comment"]):
            parts = re.split(r"<[^>]*>|\.\.\.", comment)
            patterns.append(re.compile(".*".join(re.escape(p) for p in parts) + "$"))
    return patterns


def _reason(ds: Dataset) -> str:
    with pytest.raises(UnusableInstance) as caught:
        fields_from_dataset(ds)
    return caught.value.reason


def test_decoder_reasons_are_documented() -> None:
    """The reasons the decoder gives (sent as Error Comment) match a documented comment."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    no_study, no_sop, no_pixels, hsv, ict, broken = (instance(pixels) for _ in range(6))
    del no_study.StudyInstanceUID
    no_sop.SOPInstanceUID = ""
    del no_pixels.PixelData
    hsv.PhotometricInterpretation = "HSV"
    ict.PhotometricInterpretation = "YBR_ICT"
    broken.PixelData = broken.PixelData[:10]
    reasons = [_reason(ds) for ds in (no_study, no_sop, no_pixels, hsv, ict, broken)]
    reasons += [
        _reason(jpeg_instance(pixels, b"\xff\xd8\xff\xd9")),
        _reason(jpeg_instance(pixels, b"\xff\xd8")),
    ]
    patterns = _documented_comment_patterns()
    for reason in reasons:
        assert any(p.match(error_comment(reason)) for p in patterns), reason


def test_pacs_scu_table_names_the_report_objects() -> None:
    from pydicom.uid import (
        Comprehensive3DSRStorage,
        EncapsulatedPDFStorage,
        MicroscopyBulkSimpleAnnotationsStorage,
    )

    rows = table_after("Storage SCU: results to PACS")
    assert {row["UID"] for row in rows} == {
        Comprehensive3DSRStorage,
        MicroscopyBulkSimpleAnnotationsStorage,
        EncapsulatedPDFStorage,
    }
    assert {row["Role"] for row in rows} == {"SCU"}
