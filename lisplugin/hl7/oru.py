"""Outbound results: ORU^R01 (HL7 v2.5.1) built and strictly validated with hl7apy.

One message per specimen result: PID (from the order, else from the DICOM header), ORC/OBR
echoing the order numbers, one NTE per review flag and per reviewer comment, and one OBX per
reported quantity, coded with the site's LOINC map (``config/loinc.yaml``), naming in OBX-18
the model versions that produced it. A message that fails hl7apy's strict
validation is never returned, so a broken ORU never reaches the outbox.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import hl7
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from hl7apy.exceptions import ChildNotValid, MaxChildLimitReached
from hl7apy.parser import parse_message

from lisplugin.config import Hl7Settings
from lisplugin.core.analysis import DETECTOR_KEYS
from lisplugin.core.types import Flag, ResultValue
from lisplugin.hl7.ack import (
    ErrorCode,
    hl7_timestamp,
    normalise_segments,
    set_field,
    text_value,
)
from lisplugin.hl7.orders import Order

ORU_VERSION = "2.5.1"
ResultStatus = Literal["P", "F", "C"]
#: OBR-25 / OBX-11: preliminary, final, corrected (HL7 tables 0123 and 0085).
RESULT_STATUSES: tuple[str, ...] = ("P", "F", "C")
#: Keys every entry of the LOINC map needs.
LOINC_ENTRY_KEYS = ("code", "display", "system")
LOINC_RESULT_KEYS = (*LOINC_ENTRY_KEYS, "units", "decimals")
#: OBX-18 EI-2 (namespace) of the model versions; EI-1 is "<model> <version>".
EQUIPMENT_NAMESPACE = "LISPLUGIN"
#: NTE-4 (HL7 table 0364) of a reviewer's comment: remark.
COMMENT_TYPE = "RE"
#: HL7 v2.5.1 limits MSH-10 to 20 characters.
MAX_CONTROL_ID = 20


class OruInvalid(ValueError):
    """A message is not an ORU^R01 that passes hl7apy's strict validation.

    ``code`` is the HL7 table 0357 code a receiver would answer with.
    """

    def __init__(self, text: str, code: ErrorCode = ErrorCode.DATA_TYPE_ERROR) -> None:
        super().__init__(text)
        self.code = code


def build_oru(
    result_values: list[ResultValue],
    flags: list[Flag],
    status: ResultStatus,
    order: Order | None,
    patient_from_dicom: Mapping[str, str] | None,
    loinc_map: Mapping[str, Any],
    control_id: str,
    settings: Hl7Settings,
    observed_at: datetime,
    *,
    comments: Sequence[str] = (),
    model_versions: Mapping[str, str] | None = None,
) -> str:
    """The ER7 text of an ORU^R01 reporting ``result_values`` for one specimen.

    ``comments`` (reviewers' result comments) follow the flags as NTE with NTE-4 ``RE``;
    ``model_versions`` (``detector``, ``classifier`` -> version) go into OBX-18 of each value
    they produced (counts: the detector only).

    ``patient_from_dicom`` is used when there is no order; its keys are ``id``, ``id_authority``,
    ``name_family``, ``name_given``, ``birth_date`` (YYYYMMDD), ``sex`` and
    ``accession_number`` (becomes the filler order number), all optional. Raises ``ValueError``
    for unusable input (unknown result key, units that differ from the map, no order number)
    and ``OruInvalid`` if the message fails strict validation.
    """
    if status not in RESULT_STATUSES:
        raise ValueError(f"result status {status!r} is not one of {RESULT_STATUSES}")
    if not 0 < len(control_id) <= MAX_CONTROL_ID:
        raise ValueError(f"control id {control_id!r} must have 1 to {MAX_CONTROL_ID} characters")
    panel, entries = _loinc_entries(loinc_map)
    dicom = dict(patient_from_dicom or {})
    accession = order.accession_number if order else dicom.get("accession_number", "")
    placer = order.placer_order_number if order else ""
    filler = (order.filler_order_number if order else "") or accession
    if not placer and not filler:
        raise ValueError("no order number for OBR-2/OBR-3: no order and no accession number")

    message = Message("ORU_R01", version=ORU_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    _header(message.msh, settings, control_id)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _patient(result, order, dicom)
    request = result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = request.add_segment("ORC")
    orc.orc_1 = "RE"
    obr = request.add_segment("OBR")
    obr.obr_1 = "1"
    set_field(orc.orc_2, placer)
    set_field(obr.obr_2, placer)
    set_field(orc.orc_3, filler)
    set_field(obr.obr_3, filler)
    if order and order.test_code:
        set_field(obr.obr_4, order.test_code, order.test_text, order.test_coding_system)
    else:
        set_field(obr.obr_4, panel["code"], panel["display"], panel["system"])
    if order and order.collected_at:
        obr.obr_7 = hl7_timestamp(order.collected_at)
    if order and order.ordering_provider_id:
        provider = (
            order.ordering_provider_id,
            order.ordering_provider_family_name,
            order.ordering_provider_given_name,
        )
        set_field(orc.orc_12, *provider)
        set_field(obr.obr_16, *provider)
    set_field(obr.obr_18, accession)
    obr.obr_22 = hl7_timestamp(datetime.now().astimezone())
    obr.obr_24 = "HM"
    obr.obr_25 = status
    for number, flag in enumerate(flags, start=1):
        nte = request.add_segment("NTE")
        nte.nte_1 = str(number)
        nte.nte_2 = "L"
        nte.nte_3.value = text_value("FT", f"{flag.code} ({flag.severity}): {flag.text}")
    for number, comment in enumerate(comments, start=len(flags) + 1):
        nte = request.add_segment("NTE")
        nte.nte_1 = str(number)
        nte.nte_2 = "L"
        nte.nte_3.value = text_value("FT", comment)
        set_field(nte.nte_4, COMMENT_TYPE, "Remark", "HL70364")
    for number, value in enumerate(result_values, start=1):
        obx = request.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        _observation(obx, number, value, entries, status, observed_at)
        _equipment(obx, value.key, model_versions or {})
    text = message.to_er7()
    validate_oru(text)
    return text


def validate_oru(text: str) -> None:
    """Raise ``OruInvalid`` unless ``text`` is an ORU^R01 passing hl7apy's strict validation.

    Segments the ORU_R01 structure has no place for (hl7apy drops them while grouping) are
    reported too.
    """
    text = normalise_segments(text)
    try:
        message = parse_message(text, find_groups=True, validation_level=VALIDATION_LEVEL.STRICT)
        if message.name != "ORU_R01":
            raise OruInvalid(
                f"not an ORU^R01 message: MSH-9 is {message.msh.msh_9.to_er7()}",
                ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            )
        message.validate()
    except OruInvalid:
        raise
    except (MaxChildLimitReached, ChildNotValid) as exc:  # a segment in the wrong place
        raise OruInvalid(str(exc), ErrorCode.SEGMENT_SEQUENCE_ERROR) from exc
    except Exception as exc:  # hl7apy raises many kinds, all meaning "invalid"
        missing = "Missing required" in str(exc)  # hl7apy's wording for absent R elements
        raise OruInvalid(
            str(exc), ErrorCode.REQUIRED_FIELD_MISSING if missing else ErrorCode.DATA_TYPE_ERROR
        ) from exc
    sent = [line.split(text[3], 1)[0] for line in text.split("\r")]
    placed = [segment.name for segment in _segments(message)]
    if sent != placed:
        unplaced = next(
            (
                f"{name} (segment {i})"
                for i, name in enumerate(sent, 1)
                if i > len(placed) or placed[i - 1] != name
            ),
            "?",
        )
        raise OruInvalid(
            f"segment not allowed here by the ORU_R01 structure: {unplaced}",
            ErrorCode.SEGMENT_SEQUENCE_ERROR,
        )


def parse_ack(text: str) -> tuple[str, str, str]:
    """MSA-1 (AA/AE/AR, or CA/CE/CR), MSA-2 and the error text of an ACK.

    The text is ERR-8 (user message), else ERR-3.2 (error code text), else MSA-3. Raises
    ``ValueError`` when ``text`` is no acknowledgement.
    """
    try:
        message = hl7.parse(normalise_segments(text))
        message.segment("MSA")
    except Exception as exc:  # python-hl7 raises several kinds on garbage
        raise ValueError(f"not an HL7 acknowledgement: {exc}") from exc

    def field(segment: str, number: int, component: int = 1) -> str:
        try:
            return str(message.extract_field(segment, 1, number, 1, component)).strip()
        except (IndexError, KeyError):
            return ""

    code = field("MSA", 1).upper()
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        raise ValueError(f"MSA-1 {code!r} is not an acknowledgment code")
    return code, field("MSA", 2), field("ERR", 8) or field("ERR", 3, 2) or field("MSA", 3)


def _loinc_entries(loinc_map: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The panel entry and the result entries, checked for the keys they need."""
    try:
        panel, results = loinc_map["panel"], loinc_map["results"]
    except (KeyError, TypeError) as exc:
        raise ValueError("LOINC map needs a 'panel' and a 'results' section") from exc
    for name, entry, keys in [("panel", panel, LOINC_ENTRY_KEYS)] + [
        (key, entry, LOINC_RESULT_KEYS) for key, entry in results.items()
    ]:
        missing = [k for k in keys if k not in (entry or {})]
        if missing:
            raise ValueError(f"LOINC map entry {name!r} lacks {', '.join(missing)}")
    return panel, results


def _header(msh: Segment, settings: Hl7Settings, control_id: str) -> None:
    for field, value in (
        (msh.msh_3, settings.sending_application),
        (msh.msh_4, settings.sending_facility),
        (msh.msh_5, settings.receiving_application),
        (msh.msh_6, settings.receiving_facility),
    ):
        if value:
            field.hd_1.value = text_value("IS", value)
    msh.msh_7 = hl7_timestamp(datetime.now().astimezone())
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10.value = text_value("ST", control_id)
    msh.msh_11 = "P"
    msh.msh_18 = "UNICODE UTF-8"


def _patient(result: Any, order: Order | None, dicom: dict[str, str]) -> None:
    """PID from the order when it names a patient, else from the DICOM header.

    Without a patient id and family name (PID-3 and PID-5 are required) there is no PID: the
    order numbers in ORC/OBR still identify the specimen, and an empty name could overwrite the
    LIS's patient record.
    """
    if order and order.patient_id:
        identity = (
            order.patient_id,
            order.patient_id_authority,
            order.patient_family_name,
            order.patient_given_name,
            order.patient_birth_date.strftime("%Y%m%d") if order.patient_birth_date else "",
            order.patient_sex,
        )
    else:
        identity = tuple(
            str(dicom.get(key) or "")
            for key in ("id", "id_authority", "name_family", "name_given", "birth_date", "sex")
        )
    patient_id, authority, family, given, birth_date, sex = identity
    if not patient_id or not family:
        return
    pid = result.add_group("ORU_R01_PATIENT").add_segment("PID")
    pid.pid_1 = "1"
    set_field(pid.pid_3, patient_id, "", "", authority)
    set_field(pid.pid_5, family, given)
    if re.fullmatch(r"\d{4}(?:\d{2}){0,2}", birth_date):  # DICOM DA is YYYYMMDD
        pid.pid_7 = birth_date
    sex = sex.upper()
    if sex:
        pid.pid_8 = sex if sex in ("F", "M", "O", "U", "A", "N") else "U"


def _observation(
    obx: Segment,
    number: int,
    value: ResultValue,
    entries: Mapping[str, Any],
    status: str,
    observed_at: datetime,
) -> None:
    entry = entries.get(value.key)
    if entry is None:
        raise ValueError(f"no LOINC map entry for result {value.key!r} (config/loinc.yaml)")
    units = str(entry["units"])
    if value.units and value.units != units:
        raise ValueError(
            f"result {value.key!r} is in {value.units!r} but the LOINC map reports {units!r}"
        )
    if not math.isfinite(value.value):
        raise ValueError(f"result {value.key!r} is not a finite number: {value.value}")
    obx.obx_1 = str(number)
    obx.obx_2 = "NM"
    set_field(obx.obx_3, str(entry["code"]), str(entry["display"]), str(entry["system"]))
    obx.obx_5 = _number(value.value, int(entry["decimals"]))
    set_field(obx.obx_6, units, units, "UCUM")
    reference = _reference_range(value.reference_low, value.reference_high)
    if reference:
        obx.obx_7.value = text_value("ST", reference)
    if value.abnormal_flag:
        obx.obx_8 = value.abnormal_flag
    obx.obx_11 = status
    obx.obx_14 = hl7_timestamp(observed_at)


def _equipment(obx: Segment, key: str, model_versions: Mapping[str, str]) -> None:
    """OBX-18, one repetition per model that produced the value: ``detector 1.2.0^LISPLUGIN``."""
    for model, version in model_versions.items():
        if key in DETECTOR_KEYS and model != "detector":
            continue
        field = obx.add_field("OBX_18")
        field.ei_1.value = text_value("ST", f"{model} {version}")
        field.ei_2 = EQUIPMENT_NAMESPACE


def _reference_range(low: float | None, high: float | None) -> str:
    """OBX-7 as HL7 writes it: ``low-high``, ``>low`` or ``<high``."""
    if low is not None and high is not None:
        return f"{low:g}-{high:g}"
    if low is not None:
        return f">{low:g}"
    if high is not None:
        return f"<{high:g}"
    return ""


def _number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _segments(element: Any) -> list[Any]:
    found = []
    for child in element.children:
        found.extend([child] if child.classname == "Segment" else _segments(child))
    return found
