"""Original-mode HL7 acknowledgements (ACK, v2.5.1) and the errors they report.

MSA-1 follows HL7 v2.5.1 section 2.9.2: AR when the message itself is unacceptable (MSH-9,
MSH-11, MSH-12, unparseable) or cannot be processed now for reasons unrelated to its content
(internal error: the sender should retry later); AE when the content is wrong (missing or
malformed fields, unknown table values). One ERR segment carries the HL7 table 0357 code, the
location and a readable message; ERR-1 and MSA-3 repeat them for v2.3/v2.4 receivers.

Also here: the small helpers every HL7 builder and reader of this package shares.
"""

from __future__ import annotations

from datetime import datetime
from enum import IntEnum
from typing import Any, Literal

import hl7
from hl7.util import generate_message_control_id
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.factories import datatype_factory

ACK_VERSION = "2.5.1"


class ErrorCode(IntEnum):
    """HL7 table 0357 (message error condition codes) as used by this interface."""

    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    UNKNOWN_KEY_IDENTIFIER = 204
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        return _ERROR_TEXT[self]


_ERROR_TEXT = {
    ErrorCode.SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE_ERROR: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCode.UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}

#: Codes answered with AR: the message as a whole is not acceptable, or not acceptable *now*.
_REJECT_CODES = {
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
    ErrorCode.UNSUPPORTED_EVENT_CODE,
    ErrorCode.UNSUPPORTED_PROCESSING_ID,
    ErrorCode.UNSUPPORTED_VERSION_ID,
    ErrorCode.APPLICATION_INTERNAL_ERROR,
}


class MessageRejected(Exception):
    """A received message cannot be accepted; holds what the ACK's ERR segment reports.

    ``location`` is an HL7 ERL string, ``SEG^sequence^field[^repetition^component]``
    (e.g. ``OBR^1^18``); empty when the error is not tied to one field.
    """

    def __init__(
        self,
        code: ErrorCode | int,
        text: str,
        location: str = "",
        *,
        ack_code: Literal["AE", "AR"] | None = None,
    ) -> None:
        self.code = ErrorCode(code)
        self.text = text
        self.location = location
        self.ack_code: Literal["AE", "AR"] = ack_code or (
            "AR" if self.code in _REJECT_CODES else "AE"
        )
        where = f" at {location}" if location else ""
        super().__init__(f"{self.ack_code} {int(self.code)} {self.code.text}{where}: {text}")


def build_ack(
    received: str,
    error: MessageRejected | None = None,
    *,
    application: str,
    facility: str = "",
) -> str:
    """The ER7 ACK answering ``received``: AA without ``error``, else its AE/AR and one ERR.

    ``received`` may be anything that came off the wire; whatever of its MSH can be read is
    echoed (MSA-2 = its MSH-10, MSH-5/6 = its MSH-3/4, the trigger event of MSH-9). The ACK is
    validated strictly with hl7apy, except that MSA-2 stays empty when the received message
    had no readable control id (nothing to echo; strict validation requires MSA-2).
    """
    header = ReceivedHeader(received)
    ack = Message("ACK", version=ACK_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = ack.msh
    for field, value in (
        (msh.msh_3, application),
        (msh.msh_4, facility),
        (msh.msh_5, header.application),
        (msh.msh_6, header.facility),
    ):
        if value:
            field.hd_1.value = text_value("IS", value)
    msh.msh_7 = hl7_timestamp(datetime.now().astimezone())
    msh.msh_9 = f"ACK^{header.trigger}^ACK" if header.trigger.isalnum() else "ACK^^ACK"
    msh.msh_10 = generate_message_control_id()
    msh.msh_11 = header.processing_id if header.processing_id in ("P", "T", "D") else "P"
    ack.msa.msa_1 = error.ack_code if error else "AA"
    if header.control_id:
        ack.msa.msa_2.value = text_value("ST", header.control_id)
    if error is not None:
        _add_err(ack, error)
    if header.control_id:
        ack.validate()
    return ack.to_er7()


def _add_err(ack: Message, error: MessageRejected) -> None:
    code = f"{int(error.code)}^{error.code.text}^HL70357"
    ack.msa.msa_3.value = text_value("ST", error.text[:80])
    err = ack.add_segment("ERR")
    segment, sequence, field = [*error.location.split("^"), "", ""][:3]
    if segment:
        err.err_1 = f"{segment}^{sequence}^{field}^{code.replace('^', '&')}"
        err.err_2 = error.location
    err.err_3 = code
    err.err_4 = "E"
    err.err_8.value = text_value("TX", error.text)


class ReceivedHeader:
    """The parts of a received MSH an answer echoes; blanks where they cannot be read."""

    def __init__(self, received: str) -> None:
        self.application = self.facility = self.trigger = ""
        self.control_id = self.processing_id = ""
        self._message: hl7.Message | None = None
        try:
            self._message = hl7.parse(normalise_segments(received))
        except Exception:  # unparseable input simply has no header to echo
            return
        self.application = self.field(3)
        self.facility = self.field(4)
        self.trigger = self.field(9, 2)
        self.control_id = self.field(10)
        self.processing_id = self.field(11)

    def field(self, number: int, component: int = 1) -> str:
        if self._message is None:  # not HL7 at all: no header to read
            return ""
        try:
            return str(self._message.extract_field("MSH", 1, number, 1, component))
        except (IndexError, KeyError):
            return ""


def normalise_segments(text: str) -> str:
    """Segments separated by CR only; blank lines and surrounding whitespace dropped.

    Files and some senders use LF or CRLF between segments; MLLP peers use CR.
    """
    lines = text.strip().replace("\r\n", "\r").replace("\n", "\r").split("\r")
    return "\r".join(line for line in lines if line.strip())


def text_value(datatype: str, value: str) -> Any:
    """A text value hl7apy escapes (| ^ ~ \\ &) rather than parses; line breaks become spaces."""
    return datatype_factory(
        datatype,
        " ".join(value.split()),
        version=ACK_VERSION,
        validation_level=VALIDATION_LEVEL.TOLERANT,
    )


def set_field(field: Any, *components: str) -> None:
    """Assign components, escaping HL7 delimiters in each; nothing when all are empty."""
    escaped = "^".join(text_value("ST", c).to_er7() if c else "" for c in components)
    if escaped.rstrip("^"):
        field.value = escaped.rstrip("^")


def hl7_timestamp(moment: datetime) -> str:
    """HL7 DTM to the second, with the UTC offset when ``moment`` knows it."""
    return moment.strftime("%Y%m%d%H%M%S%z" if moment.tzinfo else "%Y%m%d%H%M%S")
