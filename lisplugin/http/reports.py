"""HTTP access to a case's reports: the DICOM SR and annotations, the PDF and the JSON report.

The files are those ``lisplugin.service.reports.write_case_reports`` keeps; ``report.json``
names the current DICOM objects. A case with several captures has several annotation objects:
``/ann`` answers them all as ``multipart/related; type="application/dicom"`` (as DICOMweb
WADO-RS does) and ``/ann/{n}`` one of them; with one capture ``/ann`` is that object.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import FileResponse

from lisplugin.http.deps import RuntimeDep, SessionDep, case_or_404
from lisplugin.service.reports import REPORT_JSON, REPORT_PDF, reports_dir

DICOM = "application/dicom"

router = APIRouter(prefix="/api/cases/{case_id}/reports", tags=["reports"])


def _folder(case_id: int, runtime: RuntimeDep, session: SessionDep) -> Path:
    case_or_404(session, case_id)
    return reports_dir(runtime.settings, case_id)


def _report(folder: Path, case_id: int) -> dict[str, Any]:
    try:
        return json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HTTPException(404, f"case {case_id} has no reports yet") from None


def _documents(folder: Path, case_id: int, kind: str) -> list[Path]:
    found = [folder / d["file"] for d in _report(folder, case_id)["documents"] if d["kind"] == kind]
    if not found:
        raise HTTPException(404, f"case {case_id} has no {kind} report (no DICOM captures)")
    return found


@router.get("/sr", response_class=FileResponse, responses={200: {"content": {DICOM: {}}}})
def get_sr(case_id: int, runtime: RuntimeDep, session: SessionDep) -> FileResponse:
    """The Comprehensive 3D SR (TID 1500 measurement report)."""
    folder = _folder(case_id, runtime, session)
    (path,) = _documents(folder, case_id, "sr")
    return FileResponse(path, media_type=DICOM, filename=path.name)


@router.get("/ann", responses={200: {"content": {DICOM: {}, "multipart/related": {}}}})
def get_annotations(case_id: int, runtime: RuntimeDep, session: SessionDep) -> Response:
    """Every Microscopy Bulk Simple Annotations object (one per capture or frame)."""
    paths = _documents(_folder(case_id, runtime, session), case_id, "ann")
    if len(paths) == 1:
        return FileResponse(paths[0], media_type=DICOM, filename=paths[0].name)
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode() + path.read_bytes() + b"\r\n"
            for path in paths
        )
        + f"--{boundary}--\r\n".encode()
    )
    return Response(body, media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}')


@router.get("/ann/{number}", response_class=FileResponse, responses={200: {"content": {DICOM: {}}}})
def get_annotation(
    case_id: int, number: int, runtime: RuntimeDep, session: SessionDep
) -> FileResponse:
    """Annotation object ``number`` (from 1, in the order of the captures)."""
    paths = _documents(_folder(case_id, runtime, session), case_id, "ann")
    if not 1 <= number <= len(paths):
        raise HTTPException(404, f"case {case_id} has {len(paths)} annotation objects")
    return FileResponse(paths[number - 1], media_type=DICOM, filename=paths[number - 1].name)


def _current(path: Path, case_id: int) -> bytes:
    """The whole file as it is now. ``report.pdf`` and ``report.json`` keep their names and
    are replaced by every new report version: a streamed file could be swapped between the
    size the answer announces and the bytes it sends, and the client would get a cut body."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise HTTPException(404, f"case {case_id} has no reports yet") from None


@router.get("/pdf", response_class=Response, responses={200: {"content": {"application/pdf": {}}}})
def get_pdf(case_id: int, runtime: RuntimeDep, session: SessionDep) -> Response:
    """The report for people."""
    folder = _folder(case_id, runtime, session)
    _report(folder, case_id)  # 404 before any report
    return Response(
        _current(folder / REPORT_PDF, case_id),
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="case-{case_id}.pdf"'},
    )


@router.get(
    "/json", response_class=Response, responses={200: {"content": {"application/json": {}}}}
)
def get_json(case_id: int, runtime: RuntimeDep, session: SessionDep) -> Response:
    """The JSON report (interfaces/schemas/case-report.schema.json)."""
    folder = _folder(case_id, runtime, session)
    return Response(_current(folder / REPORT_JSON, case_id), media_type="application/json")
