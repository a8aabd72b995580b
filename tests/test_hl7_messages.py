"""HL7 messages without sockets: orders in, ACKs, ORU^R01 out, the examples and LOINC table."""

from __future__ import annotations

import functools
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import hl7
import pytest
import yaml
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from lisplugin.config import Hl7Settings
from lisplugin.core.types import Flag, ResultValue
from lisplugin.hl7.ack import ErrorCode, MessageRejected, build_ack, normalise_segments
from lisplugin.hl7.analyser import RESULT_MESSAGES, parse_analyser_result
from lisplugin.hl7.lis_sim import build_test_order
from lisplugin.hl7.orders import SUPPORTED_MESSAGES, Order, OrderRejected, parse_order
from lisplugin.hl7.oru import OruInvalid, build_oru, parse_ack, validate_oru

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "interfaces" / "hl7-examples"
SPEC = REPO / "interfaces" / "hl7-interface.md"
LOINC = yaml.safe_load((REPO / "config" / "loinc.yaml").read_text(encoding="utf-8"))
OBSERVED_AT = datetime(2024, 3, 15, 9, 12, 30, tzinfo=timezone(timedelta(hours=1)))


def segment(name: str, fields: dict[int, str]) -> str:
    """One ER7 segment from field number -> value (MSH numbering starts at MSH-3)."""
    last = max(fields)
    if name == "MSH":
        return "MSH|^~\\&|" + "|".join(fields.get(i, "") for i in range(3, last + 1))
    return name + "|" + "|".join(fields.get(i, "") for i in range(1, last + 1))


BASE: dict[str, dict[int, str]] = {
    "MSH": {
        3: "LIS",
        4: "LAB",
        5: "LISPLUGIN",
        6: "LAB",
        7: "20240315083000",
        9: "ORM^O01",
        10: "ORD0001",
        11: "P",
        12: "2.5.1",
    },
    "PID": {1: "1", 3: "PAT0001^^^HOSP^MR", 5: "DOE^JANE", 7: "19800101", 8: "F"},
    "ORC": {1: "NW", 2: "PL0001", 3: "FL0001"},
    "OBR": {
        1: "1",
        2: "PL0001",
        3: "FL0001",
        4: "69738-3^Differential panel^LN",
        7: "20240315080000",
        16: "D123^HOUSE^GREGORY",
        18: "ACC0001",
        27: "^^^^^R",
    },
}


def order_message(
    changes: dict[str, dict[int, str]] | None = None,
    segments: tuple[str, ...] = ("MSH", "PID", "ORC", "OBR"),
) -> str:
    """An ORM^O01 from BASE with some fields changed, its segments in the given order."""
    changes = changes or {}
    return "\r".join(segment(name, {**BASE[name], **changes.get(name, {})}) for name in segments)


def read(message: str, path: str) -> str:
    """``SEG.field`` (the whole field) or ``SEG.field.component`` of the first such segment."""
    parsed = hl7.parse(normalise_segments(message))
    name, *numbers = path.split(".")
    if len(numbers) == 1:
        return str(parsed.unescape(str(parsed.segment(name)(int(numbers[0])))))
    return str(parsed.extract_field(name, 1, int(numbers[0]), 1, int(numbers[1])))


# --- orders -------------------------------------------------------------------------------


def test_example_orm_o01_v231() -> None:
    order = parse_order((EXAMPLES / "ORM_O01.hl7").read_text(encoding="utf-8"))
    assert order.message_type == "ORM^O01" and order.version == "2.3.1"
    assert order.control_id == "ORD20240315-0042"
    assert (order.order_control, order.placer_order_number, order.filler_order_number) == (
        "NW",
        "PL-88123",
        "ACC240315-017",
    )
    assert (order.accession_number, order.accession_source) == ("ACC240315-017", "OBR-18")
    assert (order.test_code, order.test_coding_system) == ("69738-3", "LN")
    assert order.priority == "S" and order.is_stat and not order.is_cancel
    assert (order.patient_id, order.patient_id_authority) == ("PAT0042", "HOSP")
    assert (order.patient_family_name, order.patient_given_name) == ("MUSTERMANN", "ERIKA")
    assert order.patient_birth_date == date(1964, 8, 12) and order.patient_sex == "F"
    assert order.collected_at == datetime(2024, 3, 15, 8, 15)
    assert (order.ordering_provider_id, order.ordering_provider_family_name) == ("D1234", "HOUSE")


def test_example_oml_o21_falls_back_to_filler_number_and_specimen_time() -> None:
    order = parse_order((EXAMPLES / "OML_O21.hl7").read_text(encoding="utf-8"))
    assert order.message_type == "OML^O21"
    assert (order.accession_number, order.accession_source) == ("ACC240315-018", "OBR-3")
    assert order.priority == "R"  # TQ1-9
    assert order.patient_family_name == "MÜLLER"
    assert order.collected_at == datetime(2024, 3, 15, 9, 5, tzinfo=timezone(timedelta(hours=1)))
    assert order.ordering_provider_id == "D5678"  # OBR-16
    assert (order.wbc_count, order.platelet_count) == (7.9, 245.0)  # OBX 6690-2, 777-3


def _with_obx(*obx: str) -> str:
    return "\r".join([order_message(), *obx])


@pytest.mark.parametrize(
    ("obx", "wbc"),
    [
        ("OBX|1|NM|6690-2^WBC^LN||0.9|10*9/L|||||F", 0.9),
        ("OBX|1|NM|26464-8^WBC^LN||12.5|K/uL|||||F", 12.5),
        ("OBX|1|NM|6690-2^WBC^LN||7400|/uL|||||F", 7.4),
        ("OBX|1|NM|6690-2^WBC^LN||3.1||||||F", 3.1),  # no units: x10^9/L
        ("OBX|1|NM|6690-2^WBC^LN||3.1|10*9/L|||||X", None),  # no result
        ("OBX|1|NM|718-7^Haemoglobin^LN||13.5|g/dL|||||F", None),  # not a count we use
    ],
)
def test_order_obx_carries_the_wbc_count(obx: str, wbc: float | None) -> None:
    assert parse_order(_with_obx(obx)).wbc_count == wbc


@pytest.mark.parametrize(
    ("obx", "location", "text"),
    [
        ("OBX|1|NM|6690-2^WBC^LN||high|10*9/L|||||F", "OBX^1^5", "not a number"),
        ("OBX|1|NM|6690-2^WBC^LN||7.9|mmol/L|||||F", "OBX^1^6", "not a count per volume"),
        ("OBX|1|NM|777-3^PLT^LN||250000|10*9/L|||||F", "OBX^1^5", "not a plausible count"),
    ],
)
def test_order_obx_with_an_unusable_count_is_refused(obx: str, location: str, text: str) -> None:
    with pytest.raises(OrderRejected, match=text) as caught:
        parse_order(_with_obx(obx))
    assert (caught.value.ack_code, caught.value.location) == ("AE", location)


@pytest.mark.parametrize(
    ("message_type", "version"),
    [("ORM^O01", v) for v in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")]
    + [("OML^O21", v) for v in ("2.4", "2.5", "2.5.1")],
)
def test_orders_parse_in_every_supported_version(message_type: str, version: str) -> None:
    order = parse_order(order_message({"MSH": {9: message_type, 12: version}}))
    assert (order.message_type, order.version) == (message_type, version)
    assert (order.accession_number, order.patient_id, order.test_code) == (
        "ACC0001",
        "PAT0001",
        "69738-3",
    )


def test_oml_prior_results_are_not_the_order() -> None:
    prior = [
        segment("PID", {1: "1", 3: "OLDPAT"}),
        segment("ORC", {1: "OK", 2: "OLDPL"}),
        segment("OBR", {1: "1", 2: "OLDPL", 4: "X^old^L", 18: "OLDACC"}),
        segment("OBX", {1: "1", 2: "NM", 3: "26511-6^Neutrophils^LN", 5: "50"}),
    ]
    message = "\r".join([order_message({"MSH": {9: "OML^O21^OML_O21"}}), *prior])
    order = parse_order(message)
    assert (order.accession_number, order.patient_id, order.placer_order_number) == (
        "ACC0001",
        "PAT0001",
        "PL0001",
    )


@pytest.mark.parametrize(
    ("fields", "accession", "source"),
    [
        ({}, "ACC0001", "OBR-18"),
        ({"OBR": {18: "", 20: "F20"}}, "F20", "OBR-20"),
        ({"OBR": {18: ""}}, "FL0001", "OBR-3"),
        ({"OBR": {18: "", 3: ""}}, "FL0001", "ORC-3"),
    ],
)
def test_accession_number_sources(fields: dict, accession: str, source: str) -> None:
    order = parse_order(order_message(fields))
    assert (order.accession_number, order.accession_source) == (accession, source)


def test_unknown_z_segments_and_lf_separators_are_tolerated() -> None:
    text = order_message().replace("\r", "\n") + "\nZXX|site specific\n"
    assert parse_order(text).accession_number == "ACC0001"


def test_segments_outside_the_structure_do_not_split_the_order() -> None:
    """v2.5 senders put TQ1 into ORM; EVN and Z-segments are not part of ORM_O01 either."""
    text = order_message({"OBR": {27: ""}})
    text = text.replace("\rORC", "\rZPI|x\rORC").replace("\rOBR", "\rTQ1|1||||||||S\rOBR")
    order = parse_order(text.replace("\rPID", "\rEVN|O01\rPID"))
    assert (order.priority, order.accession_number) == ("S", "ACC0001")


def test_cancel_needs_no_patient_or_test() -> None:
    order = parse_order(order_message({"ORC": {1: "CA", 3: "ACC0001"}}, ("MSH", "ORC")))
    assert order.is_cancel and order.accession_number == "ACC0001"
    assert order.accession_source == "ORC-3" and order.patient_id == ""


def test_priority_from_orc7_and_stat_spelled_out() -> None:
    text = order_message({"OBR": {27: ""}, "ORC": {7: "^^^^^STAT"}})
    assert parse_order(text).priority == "S"


def test_escaped_values_are_unescaped() -> None:
    text = build_test_order(accession="A|1", patient_id="P1", family="O^Brien & Co")
    order = parse_order(text)
    assert (order.accession_number, order.patient_family_name) == ("A|1", "O^Brien & Co")


BAD_ORDERS = [
    ("no MSH", "PID|1||X", "AR", ErrorCode.SEGMENT_SEQUENCE_ERROR, "MSH^1"),
    (
        "ADT",
        order_message({"MSH": {9: "ADT^A01"}}),
        "AR",
        ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
        "MSH^1^9",
    ),
    (
        "ORM^O02",
        order_message({"MSH": {9: "ORM^O02"}}),
        "AR",
        ErrorCode.UNSUPPORTED_EVENT_CODE,
        "MSH^1^9^1^2",
    ),
    (
        "OML in 2.3",
        order_message({"MSH": {9: "OML^O21", 12: "2.3"}}),
        "AR",
        ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
        "MSH^1^9",
    ),
    (
        "version 2.6",
        order_message({"MSH": {12: "2.6"}}),
        "AR",
        ErrorCode.UNSUPPORTED_VERSION_ID,
        "MSH^1^12",
    ),
    (
        "processing id",
        order_message({"MSH": {11: "X"}}),
        "AR",
        ErrorCode.UNSUPPORTED_PROCESSING_ID,
        "MSH^1^11",
    ),
    (
        "no accession",
        order_message({"OBR": {18: "", 3: ""}, "ORC": {3: ""}}),
        "AE",
        ErrorCode.REQUIRED_FIELD_MISSING,
        "OBR^1^18",
    ),
    (
        "no patient id",
        order_message({"PID": {3: ""}}),
        "AE",
        ErrorCode.REQUIRED_FIELD_MISSING,
        "PID^1^3",
    ),
    ("no test", order_message({"OBR": {4: ""}}), "AE", ErrorCode.REQUIRED_FIELD_MISSING, "OBR^1^4"),
    (
        "no order control",
        order_message({"ORC": {1: ""}}),
        "AE",
        ErrorCode.REQUIRED_FIELD_MISSING,
        "ORC^1^1",
    ),
    (
        "unknown order control",
        order_message({"ORC": {1: "ZZ"}}),
        "AE",
        ErrorCode.TABLE_VALUE_NOT_FOUND,
        "ORC^1^1",
    ),
    (
        "bad birth date",
        order_message({"PID": {7: "1980XX01"}}),
        "AE",
        ErrorCode.DATA_TYPE_ERROR,
        "PID^1^7",
    ),
    (
        "bad collection time",
        order_message({"OBR": {7: "2024-03-15"}}),
        "AE",
        ErrorCode.DATA_TYPE_ERROR,
        "OBR^1^7",
    ),
    (
        "PID after ORC",
        order_message(segments=("MSH", "ORC", "OBR", "PID")),
        "AE",
        ErrorCode.SEGMENT_SEQUENCE_ERROR,
        "PID^1",
    ),
    (
        "OBR without ORC",
        order_message(segments=("MSH", "PID", "OBR")),
        "AE",
        ErrorCode.SEGMENT_SEQUENCE_ERROR,
        "OBR^1",
    ),
    (
        "new order without PID",
        order_message(segments=("MSH", "ORC", "OBR")),
        "AE",
        ErrorCode.SEGMENT_SEQUENCE_ERROR,
        "PID^1",
    ),
    (
        "two orders",
        order_message(segments=("MSH", "PID", "ORC", "OBR", "ORC", "OBR")),
        "AE",
        ErrorCode.SEGMENT_SEQUENCE_ERROR,
        "ORC^2",
    ),
]


@pytest.mark.parametrize(
    ("message", "ack_code", "error_code", "location"),
    [case[1:] for case in BAD_ORDERS],
    ids=[case[0] for case in BAD_ORDERS],
)
def test_bad_order_is_answered_with_its_error(
    message: str, ack_code: str, error_code: ErrorCode, location: str
) -> None:
    with pytest.raises(OrderRejected) as caught:
        parse_order(message)
    error = caught.value
    assert (error.ack_code, error.code, error.location) == (ack_code, error_code, location)
    ack = build_ack(message, error, application="LISPLUGIN", facility="LAB")
    assert read(ack, "MSA.1") == ack_code
    assert read(ack, "ERR.3.1") == str(int(error_code))
    assert read(ack, "ERR.3.3") == "HL70357"
    assert read(ack, "ERR.2") == location
    assert read(ack, "ERR.4") == "E"
    assert read(ack, "ERR.8") == error.text
    if message.startswith("MSH"):
        assert read(ack, "MSA.2") == "ORD0001"
        assert read(ack, "MSH.9") == f"ACK^{read(message, 'MSH.9.2')}^ACK"
        parse_message(ack, validation_level=VALIDATION_LEVEL.STRICT).validate()


def test_aa_ack_echoes_the_sender() -> None:
    ack = build_ack(order_message(), application="LISPLUGIN", facility="HEM")
    parse_message(ack, validation_level=VALIDATION_LEVEL.STRICT).validate()
    assert (read(ack, "MSA.1"), read(ack, "MSA.2")) == ("AA", "ORD0001")
    assert (read(ack, "MSH.3"), read(ack, "MSH.4"), read(ack, "MSH.5")) == (
        "LISPLUGIN",
        "HEM",
        "LIS",
    )
    assert read(ack, "MSH.12") == "2.5.1"
    assert "ERR" not in ack


def test_internal_errors_are_rejected_for_a_later_retry() -> None:
    error = MessageRejected(ErrorCode.APPLICATION_INTERNAL_ERROR, "database down")
    assert error.ack_code == "AR"
    assert MessageRejected(ErrorCode.REQUIRED_FIELD_MISSING, "x").ack_code == "AE"


# --- ORU^R01 ------------------------------------------------------------------------------


def example_values(abnormal: bool) -> list[ResultValue]:
    """The quantities of the example ORUs: a normal differential, or one with findings."""
    neutrophils, lymphocytes = (78.5, 12.0) if abnormal else (58.0, 31.5)
    return [
        ResultValue("neutrophil_pct", neutrophils, "%", 40, 75),
        ResultValue("lymphocyte_pct", lymphocytes, "%", 20, 45),
        ResultValue("monocyte_pct", 6.5, "%", 2, 10),
        ResultValue("eosinophil_pct", 2.0, "%", 1, 6),
        ResultValue("basophil_pct", 0.5, "%", 0, 2),
        ResultValue("ig_pct", 1.0 if abnormal else 0.0, "%", 0, 0.5),
        ResultValue("erythroblast_per_100wbc", 0.0, "/100{WBCs}", 0, 0),
        ResultValue("platelet_pct", 0.0, "%"),
        ResultValue("unidentified_pct", 6.0 if abnormal else 1.5, "%", None, 5),
        ResultValue("wbc_classified", 200, "{cells}", 100, None),
        ResultValue("rbc_counted", 18342, "{cells}"),
        ResultValue("wbc_counted", 212, "{cells}"),
        ResultValue("plt_counted", 1630, "{cells}"),
    ]


EXAMPLE_FLAGS = [
    Flag("UNIDENTIFIED_HIGH", "6.0 % of leukocytes could not be classified", "review"),
    Flag("IG_PRESENT", "immature granulocytes seen: confirm on the smear", "review"),
]


@functools.cache
def example_oru(status: str) -> str:
    """ORU_R01_preliminary.hl7 (P, with findings) and ORU_R01_final.hl7 (F) are these."""
    order = parse_order((EXAMPLES / "ORM_O01.hl7").read_text(encoding="utf-8"))
    preliminary = status == "P"
    return build_oru(
        result_values=example_values(abnormal=preliminary),
        flags=EXAMPLE_FLAGS if preliminary else [],
        status=status,  # type: ignore[arg-type]
        order=order,
        patient_from_dicom=None,
        loinc_map=LOINC,
        control_id="LP17-1" if preliminary else "LP17-2",
        settings=Hl7Settings(),
        observed_at=OBSERVED_AT,
    )


def obx(message: str) -> list[list[str]]:
    parsed = hl7.parse(message)
    return [[str(f) for f in s] for s in parsed.segments("OBX")]


def test_oru_fields() -> None:
    message = example_oru("P")
    parsed = parse_message(message, find_groups=True, validation_level=VALIDATION_LEVEL.STRICT)
    parsed.validate()
    assert read(message, "MSH.9") == "ORU^R01^ORU_R01"
    assert (read(message, "MSH.10"), read(message, "MSH.12")) == ("LP17-1", "2.5.1")
    assert read(message, "PID.3") == "PAT0042^^^HOSP"
    assert (read(message, "PID.5"), read(message, "PID.7")) == ("MUSTERMANN^ERIKA", "19640812")
    assert (read(message, "ORC.1"), read(message, "ORC.2"), read(message, "ORC.3")) == (
        "RE",
        "PL-88123",
        "ACC240315-017",
    )
    assert read(message, "OBR.4") == ("69738-3^Differential panel, method unspecified - Blood^LN")
    assert (read(message, "OBR.18"), read(message, "OBR.25")) == ("ACC240315-017", "P")
    rows = {row[3].split("^")[0]: row for row in obx(message)}
    neutrophils = rows["26511-6"]
    assert neutrophils[2] == "NM" and neutrophils[5] == "78.5"
    assert neutrophils[6] == "%^%^UCUM" and neutrophils[7] == "40-75"
    assert (neutrophils[8], neutrophils[11], neutrophils[14]) == ("H", "P", "20240315091230+0100")
    assert (rows["26478-8"][8], rows["26485-3"][8]) == ("L", "N")
    assert rows["LPL-UNID-PCT"][3].endswith("^L") and rows["LPL-UNID-PCT"][7] == "<5"
    assert rows["LPL-WBC-CLASSIFIED"][5] == "200" and rows["LPL-WBC-CLASSIFIED"][7] == ">100"
    assert rows["LPL-PLT-PCT"][7] == "" and rows["LPL-PLT-PCT"][8] == ""
    assert [row[1] for row in obx(message)] == [str(i) for i in range(1, 14)]


def test_oru_has_one_nte_per_flag() -> None:
    notes = hl7.parse(example_oru("P")).segments("NTE")
    expected = [f"{flag.code} ({flag.severity}): {flag.text}" for flag in EXAMPLE_FLAGS]
    assert [str(note[3]) for note in notes] == expected
    assert [str(note[1]) for note in notes] == ["1", "2"]
    assert "\rNTE|" not in example_oru("F")


def test_corrected_result_status() -> None:
    order = parse_order(order_message())
    message = build_oru(
        example_values(False), [], "C", order, None, LOINC, "LP9-3", Hl7Settings(), OBSERVED_AT
    )
    assert read(message, "OBR.25") == "C"
    assert {row[11] for row in obx(message)} == {"C"}
    assert read(message, "OBR.4") == "69738-3^Differential panel^LN"  # the ordered test


def test_oru_without_order_uses_dicom_patient_and_panel() -> None:
    patient = {
        "id": "P7",
        "name_family": "Curie",
        "name_given": "Ève",
        "birth_date": "19670704",
        "sex": "f",
        "accession_number": "ACC7",
    }
    message = build_oru(
        example_values(False)[:1],
        [],
        "F",
        None,
        patient,
        LOINC,
        "LP7-1",
        Hl7Settings(),
        OBSERVED_AT,
    )
    validate_oru(message)
    assert (read(message, "PID.3"), read(message, "PID.5"), read(message, "PID.8")) == (
        "P7",
        "Curie^Ève",
        "F",
    )
    assert (read(message, "OBR.2"), read(message, "OBR.3"), read(message, "OBR.18")) == (
        "",
        "ACC7",
        "ACC7",
    )
    assert read(message, "OBR.4.1") == "69738-3"


def test_oru_without_patient_name_has_no_pid() -> None:
    message = build_oru(
        example_values(False)[:1],
        [],
        "F",
        None,
        {"id": "P7", "accession_number": "ACC7"},
        LOINC,
        "LP7-1",
        Hl7Settings(),
        OBSERVED_AT,
    )
    validate_oru(message)
    assert "\rPID|" not in message


def test_delimiters_in_flag_text_are_escaped() -> None:
    flags = [Flag("X", "a|b^c&d~e\\f")]
    message = build_oru(
        example_values(False)[:1],
        flags,
        "P",
        parse_order(order_message()),
        None,
        LOINC,
        "LP1-1",
        Hl7Settings(),
        OBSERVED_AT,
    )
    validate_oru(message)
    assert hl7.parse(message).unescape(str(hl7.parse(message).segment("NTE")[3])) == (
        "X (review): a|b^c&d~e\\f"
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"result_values": [ResultValue("mystery_pct", 1.0, "%")]}, "no LOINC map entry"),
        ({"result_values": [ResultValue("neutrophil_pct", 50.0, "percent")]}, "LOINC map reports"),
        ({"result_values": [ResultValue("neutrophil_pct", float("nan"), "%")]}, "finite"),
        ({"status": "X"}, "result status"),
        ({"control_id": "X" * 21}, "control id"),
        ({"order": None, "patient_from_dicom": {"id": "P1"}}, "no order number"),
        ({"loinc_map": {"results": {}}}, "'panel'"),
    ],
)
def test_build_oru_refuses_unusable_input(change: dict, error: str) -> None:
    arguments = {
        "result_values": example_values(False),
        "flags": [],
        "status": "F",
        "order": parse_order(order_message()),
        "patient_from_dicom": None,
        "loinc_map": LOINC,
        "control_id": "LP1-1",
        "settings": Hl7Settings(),
        "observed_at": OBSERVED_AT,
    } | change
    with pytest.raises(ValueError, match=error):
        build_oru(**arguments)


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (
            lambda m: m.replace("ORU^R01^ORU_R01", "ORM^O01^ORM_O01"),
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
        ),
        (
            lambda m: re.sub(r"\|F\|\|\|(\d+)", r"||||\1", m, count=1),
            ErrorCode.REQUIRED_FIELD_MISSING,
        ),  # OBX-11 emptied
        (lambda m: m + "\rPV1|1|O", ErrorCode.SEGMENT_SEQUENCE_ERROR),
        (lambda m: m.replace("20240315091230+0100", "2024-03-15", 1), ErrorCode.DATA_TYPE_ERROR),
    ],
    ids=["not ORU", "OBX-11 missing", "misplaced PV1", "bad timestamp"],
)
def test_validate_oru_rejects(mutate, code: ErrorCode) -> None:  # type: ignore[no-untyped-def]
    message = example_oru("F")
    validate_oru(message)
    with pytest.raises(OruInvalid) as caught:
        validate_oru(mutate(message))
    assert caught.value.code == code


def test_parse_ack() -> None:
    message = order_message()
    assert parse_ack(build_ack(message, application="X")) == ("AA", "ORD0001", "")
    error = OrderRejected(ErrorCode.REQUIRED_FIELD_MISSING, "PID-3 is empty", "PID^1^3")
    assert parse_ack(build_ack(message, error, application="X")) == (
        "AE",
        "ORD0001",
        "PID-3 is empty",
    )
    assert parse_ack("MSH|^~\\&|LIS||||||ACK|1|P|2.3\rMSA|AR|LP1|busy") == ("AR", "LP1", "busy")
    no_msa = "MSH|^~\\&|LIS||||||ACK|1|P|2.3"
    for garbage in ("", "hello", no_msa, "MSH|^~\\&|L\rMSA", "MSH|^~\\&|L\rMSA|OK|1"):
        with pytest.raises(ValueError):
            parse_ack(garbage)


# --- examples and the interface specification ---------------------------------------------


def masked(message: str) -> list[str]:
    """Segments with what is made fresh for each message blanked: MSH-7 and OBR-22 (now),
    and an ACK's own MSH-10."""
    out = []
    for line in normalise_segments(message).split("\r"):
        fields = line.split("|")
        if fields[0] == "MSH":
            fields[6] = ""
            if fields[8].startswith("ACK"):
                fields[9] = ""
        if fields[0] == "OBR" and len(fields) > 22:
            fields[22] = ""
        out.append("|".join(fields))
    return out


@pytest.mark.parametrize(("name", "status"), [("ORU_R01_final", "F"), ("ORU_R01_preliminary", "P")])
def test_oru_examples_validate_and_match_the_code(name: str, status: str) -> None:
    text = (EXAMPLES / f"{name}.hl7").read_text(encoding="utf-8")
    validate_oru(text)
    assert masked(text) == masked(example_oru(status))


def test_ack_example_is_what_build_ack_answers() -> None:
    text = (EXAMPLES / "ACK_AE.hl7").read_text(encoding="utf-8")
    order = (EXAMPLES / "ORM_O01.hl7").read_text(encoding="utf-8").replace("ACC240315-017", "")
    with pytest.raises(OrderRejected) as caught:
        parse_order(order)
    ack = build_ack(order, caught.value, application="LISPLUGIN", facility="HEMATOLOGY")
    assert masked(text) == masked(ack)
    assert parse_ack(text)[:2] == ("AE", "ORD20240315-0042")
    parse_message(normalise_segments(text), validation_level=VALIDATION_LEVEL.STRICT).validate()


def spec_loinc_rows() -> list[list[str]]:
    text = SPEC.read_text(encoding="utf-8")
    table = text.split("<!-- loinc-table:begin -->")[1].split("<!-- loinc-table:end -->")[0]
    rows = [line.strip().strip("|").split("|") for line in table.strip().splitlines()[2:]]
    return [[cell.strip().strip("`") for cell in row] for row in rows]


def test_spec_loinc_table_equals_config() -> None:
    panel = LOINC["panel"]
    expected = [["(panel, OBR-4)", panel["code"], panel["system"], panel["display"], "", ""]]
    expected += [
        [key, e["code"], e["system"], e["display"], e["units"], str(e["decimals"])]
        for key, e in LOINC["results"].items()
    ]
    assert spec_loinc_rows() == expected


def loinc_check_digit(number: str) -> int:
    """LOINC's mod-10 check digit of the part before the hyphen."""
    digits = number[::-1]
    doubled = "".join(str(int(d) * 2) for d in digits[0::2][::-1])
    kept = digits[1::2][::-1]
    return (10 - sum(int(c) for c in kept + doubled) % 10) % 10


def test_loinc_codes_are_well_formed() -> None:
    entries = [LOINC["panel"], *LOINC["results"].values()]
    for entry in entries:
        if entry["system"] == "LN":
            number, check = entry["code"].split("-")
            assert loinc_check_digit(number) == int(check), entry["code"]
        else:
            assert entry["system"] == "L" and not re.fullmatch(r"\d+-\d", entry["code"])
        assert len(entry["code"]) <= 20  # CE.1 length in v2.5.1
    assert loinc_check_digit("26511") == 6  # the method-less neutrophil code is 26511-6


def test_order_dataclass_is_frozen() -> None:
    order = parse_order(order_message())
    assert isinstance(order, Order)
    with pytest.raises(AttributeError):
        order.accession_number = "other"  # type: ignore[misc]


# --- analyser results (ORU^R01, OUL^R22, OUL^R21) -----------------------------------------


def analyser_message(
    message_type: str = "ORU^R01",
    obx: tuple[str, ...] = ("6690-2^WBC^LN||2.4|10*3/uL", "777-3^PLT^LN||151|10*3/uL"),
    specimen: str = "OBR|1|PL0001|ACC0001|58410-2^CBC^LN",
    pid: str = "PID|1||PAT0001^^^HOSP^MR||DOE^JANE",
) -> str:
    lines = [
        f"MSH|^~\\&|XN|LAB|LISPLUGIN|LAB|20240315094200||{message_type}|AN0001|P|2.5.1",
        pid,
        specimen,
        *(f"OBX|{i + 1}|NM|{value}|||||F" for i, value in enumerate(obx)),
    ]
    return "\r".join(line for line in lines if line)


@pytest.mark.parametrize(
    ("name", "message_type"), [("ORU_R01_analyser", "ORU^R01"), ("OUL_R22_analyser", "OUL^R22")]
)
def test_analyser_examples_validate_and_carry_the_counts(name: str, message_type: str) -> None:
    text = (EXAMPLES / f"{name}.hl7").read_text(encoding="utf-8")
    parse_message(
        normalise_segments(text), find_groups=True, validation_level=VALIDATION_LEVEL.STRICT
    ).validate()
    counts = parse_analyser_result(text)
    assert counts.message_type == message_type
    assert (counts.wbc_count, counts.platelet_count) == (1.2, 98.0)  # 10*3/uL is x10^9/L
    assert counts.identifiers[0] == ("OBR-3", "ACC240315-018")
    assert ("OBR-2", "PL-88124") in counts.identifiers
    assert (counts.patient_id, counts.patient_id_authority) == ("PAT0043", "HOSP")
    assert counts.observed_at is not None and counts.observed_at.minute == 40  # OBX-14


@pytest.mark.parametrize(
    ("message_type", "specimen", "first"),
    [
        ("ORU^R01", "OBR|1|PL0001|ACC0001|58410-2^CBC^LN", ("OBR-3", "ACC0001")),
        ("ORU^R01", "OBR|1|PL0001||58410-2^CBC^LN", ("OBR-2", "PL0001")),
        ("OUL^R22", "SPM|1|SP77^ACC0002", ("SPM-2.1", "SP77")),
        ("OUL^R21", "OBR|1|||||||||||||||||ACC0003", ("OBR-18", "ACC0003")),
        ("ORU", "OBR|1|PL0001|ACC0001|58410-2^CBC^LN", ("OBR-3", "ACC0001")),  # MSH-9.2 empty
    ],
)
def test_analyser_result_identifies_its_specimen(
    message_type: str, specimen: str, first: tuple[str, str]
) -> None:
    counts = parse_analyser_result(analyser_message(message_type, specimen=specimen))
    assert counts.identifiers[0] == first
    assert (counts.wbc_count, counts.platelet_count) == (2.4, 151.0)


def test_analyser_result_reads_units_and_skips_void_and_other_observations() -> None:
    counts = parse_analyser_result(
        analyser_message(
            obx=("718-7^HGB^LN||13.1|g/dL", "6690-2^WBC^LN||5400|/uL", "777-3^PLT^LN||0|10*9/L")
        )
    )
    assert (counts.wbc_count, counts.platelet_count) == (5.4, 0.0)
    void = analyser_message().replace("10*3/uL|||||F", "10*3/uL|||||F", 1)
    lines = void.split("\r")
    lines[3] = lines[3].replace("|||||F", "|||||W")  # the WBC count withdrawn (wrong)
    assert parse_analyser_result("\r".join(lines)).wbc_count is None


@pytest.mark.parametrize(
    ("message", "code", "location", "text"),
    [
        (analyser_message(obx=("6690-2^WBC^LN||many|10*3/uL",)), 102, "OBX^1^5", "not a number"),
        (analyser_message(obx=("6690-2^WBC^LN||7|mmol/L",)), 102, "OBX^1^6", "not a count"),
        (analyser_message(obx=("6690-2^WBC^LN||7000|10*3/uL",)), 102, "OBX^1^5", "plausible"),
        (analyser_message(obx=("718-7^HGB^LN||13|g/dL",)), 101, "OBX^1^3", "no WBC or platelet"),
        (analyser_message(obx=()), 101, "OBX^1", "no WBC or platelet"),
        (analyser_message(specimen="OBR|1|||58410-2^CBC^LN"), 101, "OBR^1^3", "no specimen"),
        (analyser_message(specimen=""), 100, "OBR^1", "which specimen"),
        (analyser_message("ORU^R30"), 201, "MSH^1^9^1^2", "ORU must be R01"),
        (analyser_message("OUL^R23"), 201, "MSH^1^9^1^2", "OUL must be R22 or R21"),
        (analyser_message("ADT^A08"), 200, "MSH^1^9", "send ORU^R01, OUL^R22 or OUL^R21"),
    ],
)
def test_unusable_analyser_results_are_refused(
    message: str, code: int, location: str, text: str
) -> None:
    with pytest.raises(MessageRejected) as caught:
        parse_analyser_result(message)
    assert (int(caught.value.code), caught.value.location) == (code, location)
    assert text in caught.value.text
    ack = build_ack(message, caught.value, application="LISPLUGIN")
    assert parse_ack(ack)[0] == ("AR" if code >= 200 else "AE")


def spec_table(heading: str) -> list[list[str]]:
    """The rows of the first table after the line starting with ``heading``."""
    lines = SPEC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    table = []
    for line in lines[start + 2 :]:  # below the header and its separator
        if not line.startswith("|"):
            break
        table.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return table


def test_spec_message_table_lists_what_the_listener_accepts() -> None:
    inbound = {
        row[1].split()[0]
        for row in spec_table("<!-- messages:begin -->")
        if row[0].endswith("→ lisplugin") and not row[1].startswith("ACK")
    }
    accepted = {f"{t}^{e}" for t, e in SUPPORTED_MESSAGES.items()}
    accepted |= {f"{t}^{e}" for t, triggers in RESULT_MESSAGES.items() for e in triggers}
    assert inbound == accepted


def test_spec_error_table_lists_every_error_code() -> None:
    rows = spec_table("| ERR-3 | Text")
    assert [(int(r[0]), r[1]) for r in rows] == [(int(code), code.text) for code in ErrorCode]
