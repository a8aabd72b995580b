"""After a case is analysed (and again when it is signed out) its reports are made and kept.

Everything goes to ``<storage>/reports/<case id>/``: the DICOM SR, one annotation object per
capture, the PDF and its DICOM Encapsulated PDF, and ``report.json``, which is written last
and lists the current DICOM objects. DICOM objects are named by their SOP Instance UID and never
overwritten, so an outbox message queued for one still sends exactly that object after a later
report replaced it. When the PACS is enabled, one "dicom" outbox message per object is added in
one transaction, after every file is on disk.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from lisplugin.config import Settings
from lisplugin.core.analysis import result_values
from lisplugin.core.reference import parse_reference_ranges
from lisplugin.core.revision import field_from_json
from lisplugin.core.types import ResultValue, SpecimenResult
from lisplugin.dicom.decode import UnusableInstance
from lisplugin.dicom.frames import FrameFile
from lisplugin.reports.annotations import build_annotations
from lisplugin.reports.coding import Producer, Verification
from lisplugin.reports.json_report import Document, DocumentKind, case_report
from lisplugin.reports.pdf import build_encapsulated_pdf, build_pdf
from lisplugin.reports.sources import read_headers
from lisplugin.reports.sr import build_sr
from lisplugin.service.outbox import as_utc
from lisplugin.service.pipeline import patient_context
from lisplugin.storage.db import Database
from lisplugin.storage.files import write_durably
from lisplugin.storage.orm import Case, CaseStatus, OutboxMessage, OutboxStatus, PendingReport
from lisplugin.storage.orm_review import SIGN_OUT_ACTION, AuditEvent, CaseComment

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_PDF = "report.pdf"


def reports_dir(settings: Settings, case_id: int) -> Path:
    return settings.storage.path / "reports" / str(case_id)


@dataclass(frozen=True)
class _CaseSnapshot:
    """What the reports need of a case, read in one short transaction."""

    identity: dict[str, Any]
    patient: dict[str, Any]
    order: dict[str, Any] | None
    result: dict[str, Any]
    result_status: str
    paths: list[str]
    signed_out: tuple[str, datetime] | None  # who signed the result out, and when
    comments: list[dict[str, Any]]  # username, at (ISO), text; oldest first


def mark_reports_due(session: Session, case_id: int) -> None:
    """In the transaction that releases a result: its reports are owed until written."""
    session.merge(PendingReport(case_id=case_id, due_at=datetime.now(UTC)))


def reports_due(db: Database, older_than: datetime) -> list[int]:
    """Cases owed reports since before ``older_than`` (a write that failed or never ran)."""
    with db.session() as session:
        rows = session.scalars(select(PendingReport)).all()
        return sorted(r.case_id for r in rows if as_utc(r.due_at) <= older_than)


def _reports_written(db: Database, case_id: int, started: datetime) -> None:
    """The owed reports are on disk - unless the result changed again while they were made."""
    with db.session() as session:
        row = session.get(PendingReport, case_id)
        if row is not None and as_utc(row.due_at) <= started:
            session.delete(row)


def write_case_reports(db: Database, case_id: int, settings: Settings) -> list[Path]:
    """Make and store every report of an analysed case; queue its DICOM objects for the PACS.

    Returns the files written. Raises ``ValueError`` for a case without a result.
    """
    snapshot = _snapshot(db, case_id)
    folder = reports_dir(settings, case_id)
    generated_at = datetime.now(UTC)
    existing = [p for p in snapshot.paths if Path(p).is_file()]
    if len(existing) < len(snapshot.paths):
        log.warning(
            "case %s: %d stored captures are missing; reports leave them out",
            case_id,
            len(snapshot.paths) - len(existing),
        )
    headers = read_headers(existing)
    producer = Producer(settings.dicom.ae_title, dict(snapshot.result.get("model_versions", {})))
    values = _values(snapshot, settings, generated_at)
    verification = (
        Verification(snapshot.signed_out[0], settings.hl7.sending_facility, snapshot.signed_out[1])
        if snapshot.signed_out
        else None
    )

    objects: list[tuple[DocumentKind, Dataset]] = []
    if headers:
        sr = build_sr(
            snapshot.result,
            headers,
            loinc_map=settings.load_yaml("loinc.yaml"),
            producer=producer,
            preliminary=snapshot.result_status == "P",
            verification=verification,
            comments=[f"{c['username']}: {c['text']}" for c in snapshot.comments],
        )
        objects.append(("sr", sr))
        objects += [
            ("ann", ann) for ann in build_annotations(snapshot.result, headers, producer=producer)
        ]

    def report(documents: list[Document]) -> dict[str, Any]:
        return case_report(
            case=snapshot.identity,
            patient=snapshot.patient,
            order=snapshot.order,
            result=snapshot.result,
            result_status=snapshot.result_status,
            values=values,
            documents=documents,
            generated_at=generated_at,
            verification=verification,
            comments=snapshot.comments,
        )

    pdf = build_pdf(
        report([_document(kind, ds) for kind, ds in objects]), _images(existing, snapshot.result)
    )
    if headers:
        objects.append(
            (
                "pdf",
                build_encapsulated_pdf(
                    pdf,
                    next(iter(headers.values())),
                    list(headers.values()),
                    producer=producer,
                    created_at=generated_at,
                ),
            )
        )
    documents = [_document(kind, ds) for kind, ds in objects]

    written = [
        write_durably(folder / document.file, _part10(ds))
        for document, (_, ds) in zip(documents, objects, strict=True)
    ]
    written.append(write_durably(folder / REPORT_PDF, pdf))
    body = json.dumps(report(documents), indent=2, ensure_ascii=False).encode()
    written.append(write_durably(folder / REPORT_JSON, body))
    if settings.pacs.enabled and documents:
        _queue(db, case_id, snapshot.result_status, documents, folder)
    _reports_written(db, case_id, generated_at)
    log.info(
        "case %s: %d report files written%s",
        case_id,
        len(written),
        ", DICOM objects queued for the PACS" if settings.pacs.enabled and documents else "",
    )
    return written


def _snapshot(db: Database, case_id: int) -> _CaseSnapshot:
    with db.session() as session:
        case = session.get(Case, case_id)
        if case is None or case.result is None:
            raise ValueError(f"case {case_id} has no result to report")
        latest = session.scalar(
            select(OutboxMessage.result_status)
            .where(OutboxMessage.case_id == case_id, OutboxMessage.channel == "hl7")
            .order_by(OutboxMessage.id.desc())
            .limit(1)
        )
        return _CaseSnapshot(
            identity={
                "id": case.id,
                "case_key": case.case_key,
                "accession_number": case.accession_number,
                "study_instance_uid": case.study_instance_uid,
                "status": case.status.value,
                "analysed_at": as_utc(case.analysed_at) if case.analysed_at else None,
            },
            patient=dict(case.patient or {}),
            order=case.order,
            result=dict(case.result),
            # as the case's ORU says; before any ORU, as the result says
            result_status=latest or ("P" if case.result.get("needs_review") else "F"),
            paths=[instance.path for instance in case.instances],
            signed_out=_signed_out(session, case),
            comments=[
                {"username": c.username, "at": as_utc(c.created_at).isoformat(), "text": c.text}
                for c in session.scalars(
                    select(CaseComment)
                    .where(CaseComment.case_id == case_id)
                    .order_by(CaseComment.id)
                )
            ],
        )


def _signed_out(session: Session, case: Case) -> tuple[str, datetime] | None:
    """The sign-out that made the case's current result final, from the audit trail."""
    if case.status != CaseStatus.FINAL:
        return None
    event = session.scalar(
        select(AuditEvent)
        .where(AuditEvent.case_id == case.id, AuditEvent.action == SIGN_OUT_ACTION)
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    return None if event is None else (event.username, as_utc(event.at))


def _values(snapshot: _CaseSnapshot, settings: Settings, on: datetime) -> list[ResultValue]:
    """The reportable values with the patient's reference intervals, as the ORU has them."""
    result = snapshot.result
    specimen = SpecimenResult(
        counts=result.get("counts", {}),
        differential=result.get("differential", {}),
        class_counts=result.get("class_counts", {}),
        wbc_classified=int(result.get("wbc_classified", 0)),
        flags=(),
        fields=tuple(field_from_json(f) for f in result.get("fields") or []),
    )
    analysed_at = snapshot.identity["analysed_at"] or on
    patient = patient_context(snapshot.patient, snapshot.order, analysed_at)
    ranges = parse_reference_ranges(settings.load_yaml("reference-ranges.yaml"))
    return result_values(specimen, ranges, patient)


def _images(paths: list[str], result: dict[str, Any]) -> dict[str, np.ndarray]:
    """Pixels of the fields that have cells, by field source, for the PDF's gallery."""
    wanted = {str(f["source"]) for f in result.get("fields", []) if f.get("cells")}
    images: dict[str, np.ndarray] = {}
    for path in paths:
        try:  # only the frames that are fields with cells, each decoded alone
            frames = FrameFile(path)
            for number in range(1, frames.frames + 1):
                if frames.source(number) in wanted:
                    images[frames.source(number)] = frames.field(number).image
        except (OSError, InvalidDicomError, UnusableInstance) as exc:
            log.warning("no thumbnails from %s: %s", path, exc)  # the report goes on without
    return images


def _document(kind: DocumentKind, ds: Dataset) -> Document:
    uid = str(ds.SOPInstanceUID)
    return Document(
        kind=kind,
        file=f"{kind}-{uid}.dcm",
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=uid,
        series_instance_uid=str(ds.SeriesInstanceUID),
    )


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _queue(
    db: Database, case_id: int, result_status: str, documents: list[Document], folder: Path
) -> None:
    with db.session() as session:
        for document in documents:
            session.add(
                OutboxMessage(
                    case_id=case_id,
                    channel="dicom",
                    control_id=document.sop_instance_uid,
                    result_status=result_status,
                    payload=str(folder / document.file),
                    status=OutboxStatus.PENDING,
                )
            )
