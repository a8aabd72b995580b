"""Inbound analyser results: the haematology analyser's WBC and platelet counts for a specimen.

The counts that turn the smear's differential into absolute counts (x10^9/L) usually come
from the analyser after the order, often after the smear was analysed: the LIS (or the
analyser's middleware) forwards the CBC as ORU^R01, OUL^R22 or OUL^R21. This module reads such
a message into ``AnalyserCounts``: the numbers that identify the specimen, the patient, and the
WBC (LOINC 6690-2 and kin) and platelet (777-3 and kin) counts in x10^9/L, with the same unit and
plausibility checks as counts carried by an order (:func:`lisplugin.hl7.orders.counts_of`).
Other OBX segments (haemoglobin, MCV, ...) are ignored. One specimen per message: the first
OBR, ORC and SPM name it.

Anything unusable raises ``MessageRejected`` (table 0357 code, location, text) for the ACK.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lisplugin.hl7.ack import ErrorCode, MessageRejected, normalise_segments
from lisplugin.hl7.orders import (
    PLATELET_COUNT_CODES,
    VOID_OBSERVATION_STATUSES,
    WBC_COUNT_CODES,
    _check_header,
    _Reader,
    _Ref,
    _timestamp,
    counts_of,
)

#: Accepted message types and their triggers (the first is assumed when MSH-9.2 is empty).
RESULT_MESSAGES: dict[str, tuple[str, ...]] = {"ORU": ("R01",), "OUL": ("R22", "R21")}
#: Where the specimen's numbers are looked for, in this order: the accession-number fields of
#: orders (OBR-18, OBR-20, OBR-3, ORC-3), the specimen id (SPM-2: placer's, then filler's part),
#: then the placer order number (OBR-2, ORC-2). Each is matched to a case's accession number,
#: then to its order's placer or filler number.
IDENTIFIER_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("OBR", 18, 1),
    ("OBR", 20, 1),
    ("OBR", 3, 1),
    ("ORC", 3, 1),
    ("SPM", 2, 1),
    ("SPM", 2, 2),
    ("OBR", 2, 1),
    ("ORC", 2, 1),
)


@dataclass(frozen=True)
class AnalyserCounts:
    """The analyser's counts for one specimen, as received."""

    control_id: str  # MSH-10
    message_type: str  # "ORU^R01", "OUL^R22" or "OUL^R21"
    version: str  # MSH-12
    sender: str  # MSH-3^MSH-4
    identifiers: tuple[tuple[str, str], ...]  # ("OBR-3", "ACC0001"), ... in matching order
    patient_id: str  # PID-3, first repetition, CX-1 ("" without PID)
    patient_id_authority: str  # PID-3 CX-4
    wbc_count: float | None  # x10^9/L
    platelet_count: float | None  # x10^9/L
    observed_at: datetime | None  # OBX-14 of the first count, else OBR-7

    def location(self, source: str) -> str:
        """The ERL (``OBR^1^3``) of an identifier's field (``OBR-3`` or ``SPM-2.2``)."""
        name, _, field = source.partition("-")
        return f"{name}^1^{field.split('.')[0]}"


def parse_analyser_result(text: str) -> AnalyserCounts:
    """The counts in an ORU^R01, OUL^R22 or OUL^R21; ``MessageRejected`` if unusable."""
    text = normalise_segments(text)
    reader = _Reader(text)
    msh = _Ref("MSH", 1)
    message_type, version = _check_header(reader, msh, RESULT_MESSAGES)
    present = {str(segment[0]) for segment in reader.message}
    if "OBR" not in present and "SPM" not in present:
        raise MessageRejected(
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            "no OBR or SPM segment: the message does not say which specimen it is about",
            "OBR^1",
        )
    identifiers = []
    for name, field, component in IDENTIFIER_FIELDS:
        value = reader.value(_Ref(name, 1), field, component) if name in present else ""
        source = f"{name}-{field}" + (f".{component}" if name == "SPM" else "")
        if value and value not in (v for _, v in identifiers):
            identifiers.append((source, value))
    if not identifiers:
        raise MessageRejected(
            ErrorCode.REQUIRED_FIELD_MISSING,
            "no specimen number: OBR-18, OBR-20, OBR-3, ORC-3, SPM-2, OBR-2 and ORC-2 are "
            "all empty",
            "OBR^1^3",
        )
    obx = [_Ref("OBX", i + 1) for i in range(sum(1 for s in reader.message if str(s[0]) == "OBX"))]
    counted = [
        ref
        for ref in obx
        if reader.value(ref, 3) in (*WBC_COUNT_CODES, *PLATELET_COUNT_CODES)
        and reader.value(ref, 11).upper() not in VOID_OBSERVATION_STATUSES
    ]
    counts = counts_of(reader, counted)
    if not counts:
        codes = ", ".join((*WBC_COUNT_CODES, *PLATELET_COUNT_CODES))
        raise MessageRejected(
            ErrorCode.REQUIRED_FIELD_MISSING,
            f"no WBC or platelet count: no usable OBX with OBX-3 one of {codes}",
            "OBX^1^3" if obx else "OBX^1",
        )
    pid = _Ref("PID", 1) if "PID" in present else None
    observed_at = _timestamp(reader, counted[0], 14) or (
        _timestamp(reader, _Ref("OBR", 1), 7) if "OBR" in present else None
    )
    sender = "^".join(v for v in (reader.value(msh, 3), reader.value(msh, 4)) if v)
    return AnalyserCounts(
        control_id=reader.value(msh, 10),
        message_type=message_type,
        version=version,
        sender=sender,
        identifiers=tuple(identifiers),
        patient_id=reader.value(pid, 3),
        patient_id_authority=reader.value(pid, 3, 4),
        wbc_count=counts.get("wbc"),
        platelet_count=counts.get("platelet"),
        observed_at=observed_at,
    )
