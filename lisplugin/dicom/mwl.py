"""Modality Worklist SCP (C-FIND, PS3.4 K.6): scanners learn the orders the LIS sent over HL7.

A microscope or slide scanner queries the worklist, the operator picks the specimen, and the
capture carries its Accession Number, Patient ID and Study Instance UID: it meets its order
without anybody typing the accession number. Each scheduled order is one item with one
Scheduled Procedure Step (modality SM). Matching follows PS3.4 C.2.2.2 for the keys listed in
``MATCHED`` (single value, ``*``/``?`` wildcards, date ranges, UID lists, universal matching);
other requested keys are returned, empty when unknown. Names may be non-ASCII: responses are
UTF-8 (Specific Character Set ISO_IR 192). Statuses and keys are in
interfaces/dicom-conformance.md.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset
from pydicom.sequence import Sequence
from pynetdicom.events import Event

log = logging.getLogger(__name__)

#: At most this many items answer one query (a peer cannot make us stream the whole database).
MAX_MATCHES = 500
PENDING = 0xFF00
SUCCESS = 0x0000
CANCELLED = 0xFE00
#: The identifier cannot be processed (PS3.4 C.4.1.1.4: "Identifier does not match SOP Class").
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
#: Attributes matched as PS3.4 C.2.2.2 says; every other key is universal (returned as known).
MATCHED = (
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "RequestedProcedureID",
    "StudyInstanceUID",
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepID",
)


@dataclass(frozen=True)
class WorklistItem:
    """One scheduled order, as the LIS sent it (strings empty when the order left them out)."""

    accession_number: str
    patient_id: str
    patient_id_issuer: str
    patient_family_name: str
    patient_given_name: str
    patient_birth_date: str  # YYYYMMDD
    patient_sex: str
    study_instance_uid: str
    requested_procedure_id: str
    requested_procedure_code: str
    requested_procedure_coding_scheme: str
    requested_procedure_description: str
    priority: str  # HL7 0027: S, A, R
    scheduled_at: datetime
    referring_physician: str  # family^given
    modality: str = "SM"
    station_ae_title: str = ""


WorklistSource = Callable[[], list[WorklistItem]]

_PRIORITY = {"S": "STAT", "A": "HIGH", "R": "ROUTINE"}


def item_dataset(item: WorklistItem) -> Dataset:
    """The full worklist item (PS3.4 K.6.1.2.2 attributes this interface knows)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = item.accession_number
    ds.ReferringPhysicianName = item.referring_physician
    ds.PatientName = "^".join([item.patient_family_name, item.patient_given_name]).rstrip("^")
    ds.PatientID = item.patient_id
    ds.IssuerOfPatientID = item.patient_id_issuer
    ds.PatientBirthDate = item.patient_birth_date
    ds.PatientSex = item.patient_sex if item.patient_sex in ("M", "F", "O") else ""
    ds.StudyInstanceUID = item.study_instance_uid
    ds.RequestedProcedureID = item.requested_procedure_id
    ds.RequestedProcedureDescription = item.requested_procedure_description
    ds.RequestedProcedurePriority = _PRIORITY.get(item.priority, "")
    code = Dataset()
    code.CodeValue = item.requested_procedure_code
    code.CodingSchemeDesignator = item.requested_procedure_coding_scheme or "L"
    code.CodeMeaning = item.requested_procedure_description
    ds.RequestedProcedureCodeSequence = Sequence([code] if item.requested_procedure_code else [])
    step = Dataset()
    step.Modality = item.modality
    step.ScheduledStationAETitle = item.station_ae_title
    step.ScheduledProcedureStepStartDate = item.scheduled_at.strftime("%Y%m%d")
    step.ScheduledProcedureStepStartTime = item.scheduled_at.strftime("%H%M%S")
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepDescription = item.requested_procedure_description
    step.ScheduledProcedureStepID = item.accession_number
    step.ScheduledProcedureStepStatus = "SCHEDULED"
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def _matches_value(keyword: str, wanted: object, have: object) -> bool:
    text = str(wanted if wanted is not None else "").strip()
    if text in ("", "*"):
        return True  # universal matching
    value = str(have if have is not None else "").strip()
    if keyword.endswith("Date") and "-" in text:  # range matching, either end open
        low, _, high = text.partition("-")
        return (not low or value >= low) and (not high or value <= high)
    if keyword.endswith("UID") and "\\" in text:  # list of UID matching
        return value in text.split("\\")
    if "*" in text or "?" in text:
        return fnmatch.fnmatchcase(value.upper(), text.upper())
    if keyword == "PatientName":  # names are compared without case (common practice)
        return value.upper() == text.upper()
    return value == text


def matches(identifier: Dataset, item: Dataset) -> bool:
    for keyword in MATCHED:
        if keyword in identifier and not _matches_value(
            keyword, identifier.get(keyword), item.get(keyword)
        ):
            return False
    wanted_steps = identifier.get("ScheduledProcedureStepSequence")
    if wanted_steps:
        step = item.ScheduledProcedureStepSequence[0]
        for keyword in MATCHED:
            if keyword in wanted_steps[0] and not _matches_value(
                keyword, wanted_steps[0].get(keyword), step.get(keyword)
            ):
                return False
    return True


def project(identifier: Dataset, item: Dataset) -> Dataset:
    """The response: every key of the identifier, with the item's value (empty if unknown)."""
    answer = Dataset()
    answer.SpecificCharacterSet = "ISO_IR 192"
    for element in identifier:
        if element.keyword in ("SpecificCharacterSet", ""):
            continue
        if element.VR == "SQ":
            have = item.get(element.keyword)
            template = element.value[0] if element.value else Dataset()
            items = [project(template, sub) for sub in (have or [])]
            for sub in items:
                del sub.SpecificCharacterSet
            answer[element.tag] = element.__class__(element.tag, "SQ", Sequence(items))
        elif element.keyword in item:
            answer[element.tag] = item[element.tag]
        else:
            answer.add_new(element.tag, element.VR, None)
    return answer


class WorklistSCP:
    """The C-FIND handler; ``source`` lists the scheduled orders (read from the database)."""

    def __init__(self, source: WorklistSource) -> None:
        self._source = source

    def handle(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        calling = event.assoc.requestor.ae_title
        try:
            identifier = event.identifier
        except Exception as exc:  # undecodable identifier
            log.warning("worklist query from %s: unreadable identifier: %s", calling, exc)
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        try:
            items = [item_dataset(item) for item in self._source()]
        except Exception:
            log.exception("worklist query from %s: the scheduled orders could not be read", calling)
            yield UNABLE_TO_PROCESS, None
            return
        found = [item for item in items if matches(identifier, item)][:MAX_MATCHES]
        log.info("worklist query from %s: %d of %d items", calling, len(found), len(items))
        for item in found:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, project(identifier, item)
