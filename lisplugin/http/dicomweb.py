"""DICOMweb STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies`` with multipart/related parts.

Each part is one DICOM Part 10 instance (``application/dicom``) of a class the C-STORE SCP
takes; it goes through the SCP's own ingest (``StorageSCP.receive``): the same checks, the same
durable store or quarantine, the same statuses. The answer is the PS3.18 Store Instances
Response in DICOM JSON: 200 when all were stored, 202 when some failed, 409 when none was.
The body is bounded by ``http.max_stow_mb``; a request must be signed in (bearer token of a
review-station account, e.g. one made for the scanner with ``lisplugin user add``).
"""

from __future__ import annotations

import io
import logging
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence

from lisplugin.dicom.scp import SUCCESS
from lisplugin.dicom.sop import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from lisplugin.http.auth import Principal, PrincipalDep
from lisplugin.http.deps import RuntimeDep
from lisplugin.service.runtime import Runtime

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
STOW_SOURCE = "DICOMWEB"
#: PS3.18 Table 10.5.3-2 failure reasons beyond the C-STORE statuses.
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xA900  # "Data Set does not match SOP Class" is the nearest standard code


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body over the {limit // 2**20} MB STOW-RS limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over the {limit // 2**20} MB STOW-RS limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a multipart/related body."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise HTTPException(400, "the body is not a multipart/related message")
    parts = [
        (part.get_content_type(), part.get_payload(decode=True) or b"")
        for part in message.iter_parts()
    ]
    if not parts:
        raise HTTPException(400, "the multipart/related body has no parts")
    return parts


def _failed(ds: Dataset | None, reason: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = str(ds.get("SOPClassUID", "")) if ds is not None else ""
    item.ReferencedSOPInstanceUID = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
    item.FailureReason = reason
    return item


def _store_part(
    runtime: Runtime, part_type: str, data: bytes, study: str | None, who: str
) -> tuple[Dataset, bool]:
    """(Referenced or Failed SOP Sequence item, stored?) for one part."""
    if part_type != "application/dicom":
        return _failed(None, CANNOT_UNDERSTAND), False
    try:
        ds = dcmread(io.BytesIO(data))
    except Exception:  # not Part 10 (InvalidDicomError), or truncated and unreadable
        return _failed(None, CANNOT_UNDERSTAND), False
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in STORAGE_SOP_CLASSES:
        return _failed(ds, SOP_CLASS_NOT_SUPPORTED), False
    if str(ds.file_meta.get("TransferSyntaxUID", "")) not in TRANSFER_SYNTAXES:
        return _failed(ds, TRANSFER_SYNTAX_NOT_SUPPORTED), False
    if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
        return _failed(ds, STUDY_MISMATCH), False
    # Recorded where C-STORE records the calling AE title (an AE title has at most 16 chars).
    ds.file_meta.SourceApplicationEntityTitle = STOW_SOURCE
    status, comment = runtime.scp.receive(
        ds, data, STOW_SOURCE, sop_class, str(ds.get("SOPInstanceUID", ""))
    )
    if status != SUCCESS:
        log.warning("STOW-RS part from %s refused (0x%04X): %s", who, status, comment)
        return _failed(ds, status), False
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = str(ds.SOPInstanceUID)
    return item, True


async def _stow(
    request: Request, runtime: Runtime, principal: Principal, study: str | None
) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/related":
        raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    body = await _body(request, runtime.settings.http.max_stow_mb * 2**20)
    parts = _parts(content_type, body)
    who = principal.username
    results = [
        await run_in_threadpool(_store_part, runtime, part_type, data, study, who)
        for part_type, data in parts
    ]
    response = Dataset()
    stored = [item for item, ok in results if ok]
    failed = [item for item, ok in results if not ok]
    response.ReferencedSOPSequence = Sequence(stored)
    if failed:
        response.FailedSOPSequence = Sequence(failed)
    status = 200 if not failed else 202 if stored else 409
    log.info("STOW-RS: %d stored, %d failed", len(stored), len(failed))
    body_json: dict[str, Any] = response.to_json_dict()
    return JSONResponse(body_json, status_code=status, media_type=DICOM_JSON)


@router.post("/studies", summary="STOW-RS: store instances (multipart/related application/dicom)")
async def store_instances(
    request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    return await _stow(request, runtime, principal, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def store_study_instances(
    study: str, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse:
    return await _stow(request, runtime, principal, study)
