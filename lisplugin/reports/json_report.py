"""The case report as JSON: what the PDF shows, for programs (and people with a JSON viewer).

The document is specified by ``interfaces/schemas/case-report.schema.json`` (JSON Schema draft
2020-12): case identity, patient, order, report status, the stored specimen result, the
reportable values with their reference intervals and flags as the ORU carries them, and the
DICOM objects made from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from lisplugin import __version__
from lisplugin.core.report import value_to_json
from lisplugin.core.types import ResultValue
from lisplugin.reports.coding import Verification

#: Identifies the document format; bump the number on an incompatible change.
FORMAT = "lisplugin-case-report/1"
#: HL7 result status (OBR-25) -> the word the report shows.
REPORT_STATUS = {"P": "preliminary", "F": "final", "C": "corrected"}

DocumentKind = Literal["sr", "ann", "pdf"]


@dataclass(frozen=True)
class Document:
    """A DICOM object made from the report, stored beside it (``file`` is a name in its folder)."""

    kind: DocumentKind  # sr: Comprehensive 3D SR, ann: annotations, pdf: Encapsulated PDF
    file: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def case_report(
    *,
    case: Mapping[str, Any],
    patient: Mapping[str, Any],
    order: Mapping[str, Any] | None,
    result: Mapping[str, Any],
    result_status: str,
    values: Sequence[ResultValue],
    documents: Sequence[Document],
    generated_at: datetime,
    verification: Verification | None = None,
    comments: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The JSON report of one case.

    ``case`` holds ``id``, ``case_key``, ``accession_number``, ``study_instance_uid``,
    ``status`` and ``analysed_at`` (a datetime or None); ``result_status`` is P, F or C as in
    the case's ORU; ``verification`` names who signed the result out, if a person did;
    ``comments`` are the reviewers' comments (``username``, ``at``, ``text``), which the ORU
    carries as NTE once the result is signed out.
    """
    analysed_at = case.get("analysed_at")
    return {
        "format": FORMAT,
        "generated_at": generated_at.isoformat(),
        "generator": f"lisplugin {__version__}",
        "report_status": REPORT_STATUS[result_status],
        "result_status": result_status,
        "case": {
            "id": int(case["id"]),
            "case_key": str(case["case_key"]),
            "accession_number": case.get("accession_number"),
            "study_instance_uid": case.get("study_instance_uid"),
            "status": str(case["status"]),
            "analysed_at": analysed_at.isoformat() if analysed_at else None,
        },
        "patient": dict(patient),
        "order": None if order is None else dict(order),
        "values": [value_to_json(v) for v in values],
        "result": dict(result),
        "documents": [asdict(d) for d in documents],
        "comments": [
            {"username": str(c["username"]), "at": str(c["at"]), "text": str(c["text"])}
            for c in comments
        ],
        "verified_by": None
        if verification is None
        else {
            "username": verification.observer,
            "organization": verification.organization,
            "at": verification.at.isoformat(),
        },
    }
