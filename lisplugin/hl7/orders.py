"""Inbound orders: ORM^O01 and OML^O21, HL7 v2.3 to v2.5.1, parsed into a frozen ``Order``.

hl7apy groups the segments by the message structure of the version in MSH-12, so a PID or OBR
inside an OML prior-result group is never taken for the order's own; python-hl7 reads the field
values, unescaped. Anything unusable raises ``OrderRejected`` with the HL7 table 0357 code,
the location and the text that the ACK reports.

The accession number is how captures find their order (DICOM Accession Number, 0008,0050). It is
the first non-empty of OBR-18 (placer field 1: where IHE scheduled workflow carries the accession
number that modalities put into the DICOM header), OBR-20 (filler field 1), then OBR-3 and ORC-3
(filler order number: in laboratory workflows the LIS, as order filler, numbers the specimen's
order with its accession number). ``Order.accession_source`` says which field it came from.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import hl7
import hl7.util
from hl7apy import load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import ChildNotFound
from hl7apy.parser import parse_message

from lisplugin.hl7.ack import ErrorCode, MessageRejected, normalise_segments

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
#: Accepted message types and their one trigger event.
SUPPORTED_MESSAGES = {"ORM": "O01", "OML": "O21"}
#: ORC-1 order control codes (HL7 table 0119) this interface acts on.
ORDER_CONTROLS = ("NW", "XO", "CA", "DC")
#: Order controls that withdraw an order; they need neither PID nor OBR.
CANCEL_CONTROLS = ("CA", "DC")
#: Where the accession number is looked for, first match wins.
ACCESSION_FIELDS = (("OBR", 18), ("OBR", 20), ("OBR", 3), ("ORC", 3))
#: Administrative sex, HL7 table 0001; anything else is reported as U.
SEXES = ("F", "M", "O", "U", "A", "N")
#: OBX-3 codes (LOINC) of the analyser counts an order may carry, x10^9/L after conversion.
WBC_COUNT_CODES = ("6690-2", "26464-8", "804-5")  # leukocytes #/volume (automated, any, manual)
PLATELET_COUNT_CODES = ("777-3", "26515-7", "778-1")  # platelets #/volume
#: OBX-6 units (lower case, spaces removed) -> factor to x10^9/L; no units is taken as x10^9/L.
COUNT_UNITS = {
    "": 1.0,
    "10*9/l": 1.0,
    "10^9/l": 1.0,
    "x10e9/l": 1.0,
    "10e9/l": 1.0,
    "g/l": 1.0,
    "/nl": 1.0,
    "10*3/ul": 1.0,
    "10^3/ul": 1.0,
    "x10e3/ul": 1.0,
    "10e3/ul": 1.0,
    "k/ul": 1.0,
    "10*3/mm3": 1.0,
    "/ul": 0.001,
    "{cells}/ul": 0.001,
    "/mm3": 0.001,
}
#: Counts above these (x10^9/L) are taken for a unit error, not a patient.
MAX_COUNTS = {"wbc": 1000.0, "platelet": 5000.0}
#: OBX-11 statuses whose value is not (or no longer) a result: deleted, wrong, no result.
VOID_OBSERVATION_STATUSES = ("D", "W", "X", "N")
#: HL7 DTM, YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]; python-hl7 alone accepts more.
_DTM = re.compile(r"\d{4}(?:\d{2}){0,5}(?:\.\d{1,4})?(?:[+-]\d{4})?")
#: Segments about the patient: their values are never repeated in an error text or a log.
PATIENT_SEGMENTS = frozenset({"PID", "PD1", "NK1"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _WithholdValues(logging.Filter):
    """python-hl7 logs undecodable escape sequences with the whole field, e.g. a surname."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "python-hl7 found a malformed value (withheld: it may identify a patient)"
        record.args = ()
        record.exc_info = record.exc_text = None
        return True


logging.getLogger(hl7.util.__file__).addFilter(_WithholdValues())


class OrderRejected(MessageRejected):
    """An inbound order message cannot be taken; the ACK answers AE or AR with this error."""


@dataclass(frozen=True)
class Order:
    """One order as the LIS sent it; empty strings for fields the message left empty."""

    control_id: str  # MSH-10, echoed in MSA-2 of the ACK
    message_type: str  # "ORM^O01" or "OML^O21"
    version: str  # MSH-12
    order_control: str  # ORC-1: NW, XO, CA or DC
    placer_order_number: str  # ORC-2, else OBR-2 (entity identifier)
    filler_order_number: str  # ORC-3, else OBR-3 (entity identifier)
    accession_number: str
    accession_source: str  # "OBR-18", "OBR-20", "OBR-3" or "ORC-3"
    test_code: str  # OBR-4.1
    test_text: str  # OBR-4.2
    test_coding_system: str  # OBR-4.3, e.g. LN or L
    priority: str  # HL7 table 0027 (S = STAT, A = ASAP, R = routine): TQ1-9, OBR-27.6, ORC-7.6
    patient_id: str  # PID-3, first repetition, CX-1
    patient_id_authority: str  # PID-3, first repetition, CX-4 (namespace id)
    patient_family_name: str  # PID-5.1
    patient_given_name: str  # PID-5.2
    patient_birth_date: date | None  # PID-7
    patient_sex: str  # PID-8, HL7 table 0001
    collected_at: datetime | None  # OBR-7, else SPM-17 (OML)
    ordering_provider_id: str  # OBR-16, else ORC-12: XCN-1
    ordering_provider_family_name: str  # XCN-2
    ordering_provider_given_name: str  # XCN-3
    wbc_count: float | None = None  # x10^9/L, the analyser's count in an OBX of the order
    platelet_count: float | None = None  # x10^9/L, likewise

    @property
    def is_stat(self) -> bool:
        return self.priority == "S"

    @property
    def is_cancel(self) -> bool:
        return self.order_control in CANCEL_CONTROLS


@dataclass(frozen=True)
class _Ref:
    """A segment by name and occurrence in the message: what ERR-2 locations are made of."""

    name: str
    sequence: int

    def __str__(self) -> str:
        return f"{self.name}^{self.sequence}"

    def at(self, field: int) -> str:
        return f"{self}^{field}"


def parse_order(text: str) -> Order:
    """The order in an ORM^O01 or OML^O21 message; ``OrderRejected`` if it cannot be taken."""
    text = normalise_segments(text)
    reader = _Reader(text)
    msh = _Ref("MSH", 1)
    message_type, version = _check_header(reader, msh)
    patient, order_group, ignored = _groups(text, message_type, version)
    orc = next(order_group.segments())
    obr = order_group.first("OBR")
    order_control = reader.value(orc, 1).upper()
    if not order_control:
        raise OrderRejected(
            ErrorCode.REQUIRED_FIELD_MISSING, "ORC-1 order control is empty", orc.at(1)
        )
    if order_control not in ORDER_CONTROLS:
        raise OrderRejected(
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            f"ORC-1 order control {order_control} is not one of {', '.join(ORDER_CONTROLS)}",
            orc.at(1),
        )
    pid = patient.first("PID") if patient else None
    if order_control not in CANCEL_CONTROLS:
        _check_new_order(reader, pid, obr)
    accession, source = _accession(reader, orc, obr)
    birth_date = _timestamp(reader, pid, 7)
    collected_at = _timestamp(reader, obr, 7) or _timestamp(reader, order_group.first("SPM"), 17)
    provider = obr if reader.value(obr, 16) else orc
    provider_field = 16 if provider is obr else 12
    counts = counts_of(reader, [r for r in order_group.segments() if r.name == "OBX"])
    return Order(
        control_id=reader.value(msh, 10),
        message_type=message_type,
        version=version,
        order_control=order_control,
        placer_order_number=reader.value(orc, 2) or reader.value(obr, 2),
        filler_order_number=reader.value(orc, 3) or reader.value(obr, 3),
        accession_number=accession,
        accession_source=source,
        test_code=reader.value(obr, 4),
        test_text=reader.value(obr, 4, 2),
        test_coding_system=reader.value(obr, 4, 3),
        priority=_priority(reader, order_group.first("TQ1") or ignored.get("TQ1"), obr, orc),
        patient_id=reader.value(pid, 3),
        patient_id_authority=reader.value(pid, 3, 4),
        patient_family_name=reader.value(pid, 5),
        patient_given_name=reader.value(pid, 5, 2),
        patient_birth_date=birth_date.date() if birth_date else None,
        patient_sex=_sex(reader.value(pid, 8)),
        collected_at=collected_at,
        ordering_provider_id=reader.value(provider, provider_field),
        ordering_provider_family_name=reader.value(provider, provider_field, 2),
        ordering_provider_given_name=reader.value(provider, provider_field, 3),
        wbc_count=counts.get("wbc"),
        platelet_count=counts.get("platelet"),
    )


def counts_of(reader: _Reader, segments: Iterable[_Ref]) -> dict[str, float]:
    """WBC and platelet counts of these OBX segments, x10^9/L (an order's: prior results left
    out; an analyser result's: all).

    An OBX-5 that is no number, units that are not a count per volume, or a count beyond
    ``MAX_COUNTS`` is refused (AE): a wrong count would make wrong absolute counts.
    """
    found: dict[str, float] = {}
    for obx in segments:
        code = reader.value(obx, 3)
        kind = (
            "wbc" if code in WBC_COUNT_CODES else "platelet" if code in PLATELET_COUNT_CODES else ""
        )
        if not kind or reader.value(obx, 11).upper() in VOID_OBSERVATION_STATUSES:
            continue
        text = reader.value(obx, 5)
        try:
            value = float(text)
        except ValueError:
            raise OrderRejected(
                ErrorCode.DATA_TYPE_ERROR,
                f"OBX-5 {text!r} of {code} is not a number",
                obx.at(5),
            ) from None
        units = reader.value(obx, 6).lower().replace(" ", "")
        if units not in COUNT_UNITS:
            raise OrderRejected(
                ErrorCode.DATA_TYPE_ERROR,
                f"OBX-6 units {reader.value(obx, 6)!r} of {code} are not a count per volume: "
                "send 10*9/L or 10*3/uL",
                obx.at(6),
            )
        value *= COUNT_UNITS[units]
        if not 0 <= value <= MAX_COUNTS[kind]:
            raise OrderRejected(
                ErrorCode.DATA_TYPE_ERROR,
                f"OBX-5 {text} {reader.value(obx, 6)} of {code} is not a plausible count "
                f"(0 to {MAX_COUNTS[kind]:g} x10^9/L)",
                obx.at(5),
            )
        found[kind] = round(value, 3)
    return found


class _Reader:
    """Unescaped field values by segment occurrence (python-hl7), blank where absent."""

    def __init__(self, text: str) -> None:
        if not text.startswith("MSH"):
            raise OrderRejected(
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                "the message does not start with an MSH segment",
                "MSH^1",
                ack_code="AR",
            )
        try:
            self.message = hl7.parse(text)
        except Exception as exc:  # python-hl7 raises several kinds on garbage
            raise OrderRejected(  # its text may quote the message: only the kind is told
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                f"unparseable message ({type(exc).__name__})",
                "MSH^1",
                ack_code="AR",
            ) from exc

    def raw(self, ref: _Ref, field: int) -> str:
        """The whole field as received (all components, not stripped)."""
        try:
            return str(self.message.segments(ref.name)[ref.sequence - 1][field])
        except (IndexError, KeyError):
            return ""

    def value(self, ref: _Ref | None, field: int, component: int = 1, sub: int = 1) -> str:
        if ref is None:
            return ""
        try:
            value = self.message.extract_field(ref.name, ref.sequence, field, 1, component, sub)
        except (IndexError, KeyError):
            return ""
        return str(value).strip()


def _check_header(
    reader: _Reader, msh: _Ref, accepted: Mapping[str, tuple[str, ...]] | None = None
) -> tuple[str, str]:
    """MSH-9, -10, -11 and -12 acceptable, else AR; returns message type and version.

    ``accepted`` maps message types to their triggers, the first being the one assumed when
    MSH-9.2 is empty (default: the orders, ``SUPPORTED_MESSAGES``).
    """
    accepted = accepted or {k: (v,) for k, v in SUPPORTED_MESSAGES.items()}
    wanted = " or ".join(f"{k}^{t}" for k, triggers in accepted.items() for t in triggers)
    wanted = wanted.replace(" or ", ", ", wanted.count(" or ") - 1)
    if _CONTROL.search(reader.raw(msh, 9)):  # hl7apy would fail on it later, as a TypeError
        raise OrderRejected(
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            f"MSH-9 message type contains control characters: send {wanted}",
            msh.at(9),
        )
    message_type = reader.value(msh, 9).upper()
    trigger = reader.value(msh, 9, 2).upper()
    if message_type not in accepted:
        raise OrderRejected(
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            f"message type {message_type or '(empty)'} is not accepted: send {wanted}",
            msh.at(9),
        )
    triggers = accepted[message_type]
    if trigger and trigger not in triggers:
        raise OrderRejected(
            ErrorCode.UNSUPPORTED_EVENT_CODE,
            f"{message_type}^{trigger} is not accepted: {message_type} must be "
            f"{' or '.join(triggers)}",
            f"{msh.at(9)}^1^2",
        )
    expected = trigger or triggers[0]
    if not reader.value(msh, 10):
        raise OrderRejected(
            ErrorCode.REQUIRED_FIELD_MISSING,
            "MSH-10 message control id is empty",
            msh.at(10),
            ack_code="AR",
        )
    processing_id = reader.value(msh, 11).upper()
    if processing_id not in ("", "P", "T", "D"):
        raise OrderRejected(
            ErrorCode.UNSUPPORTED_PROCESSING_ID,
            f"MSH-11 processing id {processing_id} is not P, T or D",
            msh.at(11),
        )
    version = reader.value(msh, 12)
    if not version:
        raise OrderRejected(
            ErrorCode.REQUIRED_FIELD_MISSING,
            "MSH-12 version id is empty",
            msh.at(12),
            ack_code="AR",
        )
    if version not in SUPPORTED_VERSIONS:
        raise OrderRejected(
            ErrorCode.UNSUPPORTED_VERSION_ID,
            f"version {version} is not supported: send one of {', '.join(SUPPORTED_VERSIONS)}",
            msh.at(12),
        )
    return f"{message_type}^{expected}", version


@dataclass(frozen=True)
class _Group:
    """An hl7apy segment group: segments (``_Ref``) and sub-groups in message order."""

    name: str
    items: tuple[_Ref | _Group, ...]

    def segments(self) -> Iterator[_Ref]:
        for item in self.items:
            yield from [item] if isinstance(item, _Ref) else item.segments()

    def groups(self) -> Iterator[_Group]:
        for item in self.items:
            if isinstance(item, _Group):
                yield item
                yield from item.groups()

    def first(self, name: str) -> _Ref | None:
        return next((ref for ref in self.segments() if ref.name == name), None)


def _groups(
    text: str, message_type: str, version: str
) -> tuple[_Group | None, _Group, dict[str, _Ref]]:
    """The patient group (if any) and the one order group of the message.

    hl7apy groups the segments by the structure of the message type and version; OML
    prior-result groups are left out, so their PID, ORC and OBR are never the order's own.
    Segments the structure does not define (Z-segments, EVN, a TQ1 that v2.5 senders add to
    ORM) are set aside first, so they cannot split a group; the first of each is returned by
    name.
    """
    structure = message_type.replace("^", "_")
    try:
        defined = _structure_segments(structure, version)
    except ChildNotFound as exc:
        raise OrderRejected(
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            f"{message_type} is not defined in HL7 {version}",
            "MSH^1^9",
        ) from exc
    lines = text.split("\r")
    ignored = {name: _Ref(name, 1) for name in (line[:3] for line in lines) if name not in defined}
    kept = "\r".join(line for line in lines if line[:3] in defined)
    try:
        tree = parse_message(kept, find_groups=True, validation_level=VALIDATION_LEVEL.TOLERANT)
    except Exception as exc:  # hl7apy raises many kinds on malformed input
        raise OrderRejected(
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            f"message structure could not be read ({type(exc).__name__})",
            "MSH^1",
            ack_code="AR",
        ) from exc
    message = _as_group(tree, {})
    assert isinstance(message, _Group)
    sequence = list(message.segments())
    patients = [g for g in message.groups() if g.name.endswith("_PATIENT")]
    orders = [g for g in message.groups() if g.name.endswith("_ORDER")]
    if not orders:
        raise OrderRejected(
            ErrorCode.SEGMENT_SEQUENCE_ERROR, "no ORC segment: the message holds no order", "ORC^1"
        )
    for group in orders:
        first = next(group.segments())
        if first.name != "ORC":
            raise OrderRejected(
                ErrorCode.SEGMENT_SEQUENCE_ERROR,
                f"{first.name} appears before its ORC segment",
                str(first),
            )
    pids = [ref for group in patients for ref in group.segments() if ref.name == "PID"]
    first_orc = sequence.index(next(orders[0].segments()))
    if len(pids) > 1 or any(sequence.index(pid) > first_orc for pid in pids):
        raise OrderRejected(
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            "the PID segment must come once, before the first ORC",
            "PID^1",
        )
    if len(orders) > 1:
        raise OrderRejected(
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
            "only one order (ORC group) per message is supported",
            "ORC^2",
        )
    return (patients[0] if patients else None), orders[0], ignored


@functools.cache
def _structure_segments(structure: str, version: str) -> frozenset[str]:
    """Every segment name the HL7 message structure defines, at any depth."""

    def names(reference: Any) -> Iterator[str]:
        for name, child, _cardinality, kind in reference[1]:
            if kind == "SEG":
                yield name
            elif kind == "GRP":
                yield from names(child)

    return frozenset(names(load_reference(structure, "Message", version)))


def _as_group(element: Any, counts: dict[str, int]) -> _Ref | _Group:
    """hl7apy's tree as ``_Ref``/``_Group``, numbering segments by occurrence, no prior results."""
    if element.classname == "Segment":
        counts[element.name] = counts.get(element.name, 0) + 1
        return _Ref(element.name, counts[element.name])
    items = tuple(_as_group(child, counts) for child in element.children)
    name = element.name or ""  # hl7apy names no group when MSH-9.3 is garbled
    return _Group(name, () if "PRIOR" in name else items)


def _check_new_order(reader: _Reader, pid: _Ref | None, obr: _Ref | None) -> None:
    """A new or changed order needs a patient and a requested test."""
    if pid is None:
        raise OrderRejected(ErrorCode.SEGMENT_SEQUENCE_ERROR, "PID segment missing", "PID^1")
    if not reader.value(pid, 3):
        raise OrderRejected(
            ErrorCode.REQUIRED_FIELD_MISSING, "PID-3 patient identifier is empty", pid.at(3)
        )
    if obr is None:
        raise OrderRejected(ErrorCode.SEGMENT_SEQUENCE_ERROR, "OBR segment missing", "OBR^1")
    if not reader.value(obr, 4):
        raise OrderRejected(
            ErrorCode.REQUIRED_FIELD_MISSING,
            "OBR-4 universal service identifier is empty",
            obr.at(4),
        )


def _accession(reader: _Reader, orc: _Ref, obr: _Ref | None) -> tuple[str, str]:
    for name, field in ACCESSION_FIELDS:
        value = reader.value(obr if name == "OBR" else orc, field)
        if value:
            return value, f"{name}-{field}"
    where = obr.at(18) if obr else orc.at(3)
    raise OrderRejected(
        ErrorCode.REQUIRED_FIELD_MISSING,
        "no accession number: OBR-18, OBR-20, OBR-3 and ORC-3 are all empty",
        where,
    )


def _timestamp(reader: _Reader, ref: _Ref | None, field: int) -> datetime | None:
    """An HL7 TS/DTM field (first component), ``None`` when empty; 102 when malformed."""
    value = reader.value(ref, field)
    if ref is None or not value:
        return None
    try:
        if not _DTM.fullmatch(value):
            raise ValueError("expected YYYY[MM[DD[HH[MM[SS]]]]][+/-ZZZZ]")
        return hl7.parse_datetime(value)
    except ValueError as exc:
        shown = "" if ref.name in PATIENT_SEGMENTS else f" {value!r}"  # a birth date is PHI
        raise OrderRejected(
            ErrorCode.DATA_TYPE_ERROR,
            f"{ref.name}-{field}{shown} is not an HL7 date/time: {exc}",
            ref.at(field),
        ) from exc


def _priority(reader: _Reader, tq1: _Ref | None, obr: _Ref | None, orc: _Ref) -> str:
    value = (reader.value(tq1, 9) or reader.value(obr, 27, 6) or reader.value(orc, 7, 6)).upper()
    return "S" if value == "STAT" else value


def _sex(value: str) -> str:
    value = value.upper()
    return value if value in SEXES or not value else "U"
