"""The review API: sessions, the worklist, reclassification, comments, sign-out, audit, images.

Changes name the case ``version`` the client saw; a stale version answers 409 (see
:mod:`lisplugin.service.review`). Reviewers (technologist, pathologist) change cells and
comment; only a pathologist signs out; an admin may look but not change.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from lisplugin.core.crops import PBC_CROP_PX
from lisplugin.core.report import value_to_json
from lisplugin.core.revision import DERIVED_KEYS, REVIEW_CLASSES
from lisplugin.http.auth import (
    COOKIE,
    Pathologist,
    PrincipalDep,
    Reviewer,
    ThrottleDep,
    authenticate,
    open_session,
    refuse_locked,
)
from lisplugin.http.deps import RuntimeDep, SessionDep, case_or_404
from lisplugin.service import review
from lisplugin.storage.orm import CaseStatus
from lisplugin.storage.orm_review import AuditEvent, CaseComment, Role, UserSession

log = logging.getLogger(__name__)

PNG = {200: {"content": {"image/png": {}}}}
#: Case images do not change while the case keeps its analysis; the browser may keep them.
IMAGE_HEADERS = {"Cache-Control": "private, max-age=600"}

router = APIRouter(prefix="/api", tags=["review"])
saliency_cache = review.SaliencyCache()


class SignIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class UserInfo(BaseModel):
    username: str
    role: Role


class SessionInfo(BaseModel):
    token: str = Field(description="bearer token for the API; browsers use the cookie instead")
    csrf_token: str = Field(description="send as X-CSRF-Token with cookie-authenticated changes")
    expires_at: datetime = Field(description="renewed by every request (idle timeout)")
    user: UserInfo


class CurrentSession(BaseModel):
    csrf_token: str
    expires_at: datetime
    user: UserInfo


class FlagInfo(BaseModel):
    code: str
    text: str
    severity: Literal["info", "review", "critical"]


class WorklistEntry(BaseModel):
    id: int
    accession_number: str | None
    patient_id: str | None
    patient_name: str
    stat: bool = Field(description="the order's priority is STAT (HL7 table 0027: S)")
    reasons: list[FlagInfo] = Field(description="the flags that hold the result for review")
    waiting_seconds: float
    waiting_since: datetime
    wbc_classified: int
    version: int


class Reclassify(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    cell_class: Literal[REVIEW_CLASSES] = Field(  # type: ignore[valid-type]
        alias="class", description="a leukocyte class, artefact or smudge"
    )
    version: int = Field(description="the case version the change was made on")


class ReportedValue(BaseModel):
    """A value as the LIS would get it now (OBX-5, OBX-7 and OBX-8)."""

    key: str = Field(description="result key of config/loinc.yaml, e.g. neutrophil_pct")
    value: float
    units: str
    reference_low: float | None
    reference_high: float | None
    abnormal_flag: Literal["", "N", "L", "H"]


class ReviewedCase(BaseModel):
    """The case after a change: its new version and everything derived from the classes."""

    id: int
    version: int
    status: CaseStatus
    cell: dict[str, Any]
    counts: dict[str, int]
    class_counts: dict[str, int]
    excluded_counts: dict[str, int]
    differential: dict[str, float]
    wbc_classified: int
    needs_review: bool
    flags: list[FlagInfo]
    values: list[ReportedValue]


class NewComment(BaseModel):
    text: str = Field(default="", max_length=review.MAX_COMMENT)
    canned: str | None = Field(
        default=None, description="code of a canned comment (GET /api/canned-comments)"
    )


class CannedComment(BaseModel):
    code: str
    text: str


class Acknowledge(BaseModel):
    version: int
    reason: str = Field(
        default="", max_length=review.MAX_COMMENT, description="required where the rule asks"
    )


class ReviewStep(BaseModel):
    version: int


class ReviewState(BaseModel):
    """The case after a review decision: its version and the decisions so far."""

    id: int
    version: int
    review: dict[str, Any]
    open_flags: list[FlagInfo]


class Comment(BaseModel):
    id: int
    username: str
    text: str
    created_at: datetime


class SignOut(BaseModel):
    version: int
    override: str = Field(
        default="",
        max_length=review.MAX_COMMENT,
        description="why the result goes out below the minimum leukocyte count (sent as NTE)",
    )


class SignedOut(BaseModel):
    id: int
    status: CaseStatus
    version: int
    result_status: Literal["F", "C"]
    control_id: str = Field(description="MSH-10 of the ORU^R01 put in the outbox")


class AuditEntry(BaseModel):
    id: int
    at: datetime
    username: str
    case_id: int | None
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def _errors(exc: review.ReviewError) -> HTTPException:
    return HTTPException(exc.status, detail=exc.detail)


@router.post(
    "/session",
    response_model=SessionInfo,
    tags=["session"],
    responses={
        401: {"description": "wrong username or password, or account disabled"},
        429: {"description": "too many failed sign-ins for this name or address: locked"},
    },
)
def sign_in(
    body: SignIn, request: Request, response: Response, runtime: RuntimeDep, throttle: ThrottleDep
) -> Any:
    """Sign in: sets the session cookie and returns the bearer token and the CSRF token."""
    idle = timedelta(minutes=runtime.settings.http.session_idle_minutes)
    address = request.client.host if request.client else ""
    info: SessionInfo | None = None
    if wait := throttle.locked_for(body.username, address):
        with runtime.db.session() as session:
            refuse_locked(session, body.username)
        raise HTTPException(
            429,
            detail="too many failed sign-ins; try again later",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    with runtime.db.session() as session:
        user = authenticate(session, body.username, body.password)
        if user is None:
            throttle.failed(body.username, address)
        else:
            throttle.succeeded(body.username)
            token, row = open_session(session, user, idle)
            info = SessionInfo(
                token=token,
                csrf_token=row.csrf_token,
                expires_at=row.expires_at,
                user=UserInfo(username=user.username, role=user.role),
            )
    if info is None:  # outside the transaction, so the refusal stays in the audit trail
        raise HTTPException(401, detail="wrong username or password, or account disabled")
    response.set_cookie(
        COOKIE,
        info.token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return info


@router.get("/session", response_model=CurrentSession, tags=["session"])
def current_session(principal: PrincipalDep) -> Any:
    """Who is signed in, and the CSRF token for cookie-authenticated changes."""
    return CurrentSession(
        csrf_token=principal.csrf_token,
        expires_at=principal.expires_at,
        user=UserInfo(username=principal.username, role=principal.role),
    )


@router.delete("/session", status_code=204, tags=["session"])
def sign_off(principal: PrincipalDep, session: SessionDep, response: Response) -> Response:
    """End the session (the token stops working at once) and clear the cookie."""
    row = session.get(UserSession, principal.session_id)
    if row is not None:
        session.delete(row)
    review.audit(session, principal.username, "session.close")
    response.status_code = 204
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/worklist", response_model=list[WorklistEntry])
def get_worklist(
    principal: PrincipalDep,
    session: SessionDep,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=review.WORKLIST_MAX)] = 100,
    offset: Annotated[int, Query(ge=0, le=100_000_000)] = 0,  # SQL OFFSET is 64-bit
) -> Any:
    """Cases waiting for review, STAT first, then the longest waiting; ``limit`` entries from
    ``offset``. Header ``X-Total-Count`` says how many cases wait in all."""
    page = review.worklist(session, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(page.total)
    return page.entries


@router.patch(
    "/cases/{case_id}/cells/{cell_id}",
    response_model=ReviewedCase,
    responses={409: {"description": "the case changed since the version sent"}},
)
def reclassify_cell(
    case_id: int,
    cell_id: int,
    body: Reclassify,
    principal: Reviewer,
    runtime: RuntimeDep,
    session: SessionDep,
) -> Any:
    """Give a leukocyte detection a class; counts, differential and flags are recomputed."""
    pipeline = runtime.pipeline()
    try:
        case = review.reclassify_cell(
            session,
            pipeline,
            case_id,
            cell_id,
            body.cell_class,
            body.version,
            principal.username,
        )
    except review.ReviewError as exc:
        raise _errors(exc) from None
    result = case.result or {}
    return {
        "id": case.id,
        "version": case.version,
        "status": case.status,
        "cell": result["cells"][cell_id],
        "excluded_counts": result.get("excluded_counts", {}),
        **{k: result[k] for k in DERIVED_KEYS},
        "values": [value_to_json(v) for v in review.reported_values(pipeline, case)],
    }


@router.get("/cases/{case_id}/comments", response_model=list[Comment])
def list_comments(case_id: int, principal: PrincipalDep, session: SessionDep) -> Any:
    case_or_404(session, case_id)
    return session.scalars(
        select(CaseComment).where(CaseComment.case_id == case_id).order_by(CaseComment.id)
    ).all()


@router.post("/cases/{case_id}/comments", response_model=Comment, status_code=201)
def add_comment(
    case_id: int, body: NewComment, principal: Reviewer, runtime: RuntimeDep, session: SessionDep
) -> Any:
    """A result comment, free text or canned: the PDF and SR show it, and the ORU carries it
    as NTE once the case is signed out."""
    try:
        return review.add_comment(
            session, case_id, body.text, principal.username, body.canned, runtime.settings
        )
    except review.ReviewError as exc:
        raise _errors(exc) from None


@router.get("/canned-comments", response_model=list[CannedComment])
def canned_comments(principal: PrincipalDep, runtime: RuntimeDep) -> Any:
    """The site's canned result comments (config/comments.yaml)."""
    return [
        {"code": code, "text": text}
        for code, text in review.canned_comments(runtime.settings).items()
    ]


def _state(case: Any) -> dict[str, Any]:
    result = case.result or {}
    return {
        "id": case.id,
        "version": case.version,
        "review": result.get("review") or {},
        "open_flags": review.open_flags(result),
    }


@router.post(
    "/cases/{case_id}/flags/{code}/acknowledge",
    response_model=ReviewState,
    responses={
        404: {"description": "no such review flag"},
        409: {"description": "the case changed since the version sent, or is not in review"},
        422: {"description": "the rule asks for a reason"},
    },
)
def acknowledge_flag(
    case_id: int,
    code: str,
    body: Acknowledge,
    principal: Reviewer,
    runtime: RuntimeDep,
    session: SessionDep,
) -> Any:
    """Acknowledge a review flag (audited); every one must be before sign-out."""
    try:
        case = review.acknowledge_flag(
            session,
            runtime.pipeline(),
            case_id,
            code,
            body.reason,
            body.version,
            principal.username,
        )
    except review.ReviewError as exc:
        raise _errors(exc) from None
    return _state(case)


@router.post(
    "/cases/{case_id}/add-captures",
    response_model=ReviewState,
    status_code=202,
    responses={409: {"description": "no newer captures, or the case changed or is not in review"}},
)
def add_captures(
    case_id: int, body: ReviewStep, principal: Reviewer, runtime: RuntimeDep, session: SessionDep
) -> Any:
    """Count captures that arrived after the result (a second slide, more fields) into the
    case: it is analysed again and keeps every reclassification and acknowledgement."""
    try:
        case = review.add_captures(session, case_id, body.version, principal.username)
    except review.ReviewError as exc:
        raise _errors(exc) from None
    runtime.wake_scheduler()
    return _state(case)


@router.post(
    "/cases/{case_id}/technical-review",
    response_model=ReviewState,
    responses={409: {"description": "a flag is open, or the case changed or is not in review"}},
)
def technical_review(
    case_id: int, body: ReviewStep, principal: Reviewer, runtime: RuntimeDep, session: SessionDep
) -> Any:
    """Complete the technical review (two-stage mode: before the pathologist's sign-out)."""
    try:
        case = review.complete_technical_review(
            session, runtime.pipeline(), case_id, body.version, principal.username
        )
    except review.ReviewError as exc:
        raise _errors(exc) from None
    return _state(case)


@router.post(
    "/cases/{case_id}/signout",
    response_model=SignedOut,
    responses={
        403: {"description": "not a pathologist"},
        409: {
            "description": "the case changed since the version sent, is not in review, has an "
            "open flag, or (two-stage) awaits its technical review"
        },
        422: {"description": "below the minimum leukocyte count without an override comment"},
    },
)
def sign_out(
    case_id: int,
    body: SignOut,
    principal: Pathologist,
    runtime: RuntimeDep,
    background: BackgroundTasks,
) -> Any:
    """Release the reviewed result to the LIS: ``F``, or ``C`` if a final went out before.

    Every review flag must be acknowledged; below the minimum leukocyte count an ``override``
    comment is needed (audited, sent as NTE with the reviewers' comments).

    The case's reports (SR, annotations, PDF) are made again after the answer is sent.
    """
    try:
        with runtime.db.session() as session:
            done = review.sign_out(
                session,
                runtime.pipeline(),
                runtime.settings.hl7,
                case_id,
                body.version,
                principal.username,
                body.override,
            )
    except review.ReviewError as exc:
        raise _errors(exc) from None
    runtime.outbox.notify()  # committed: the outbox finds the message at once
    background.add_task(runtime.reports.request, case_id)
    return SignedOut(
        id=case_id,
        status=CaseStatus.FINAL,
        version=done.version,
        result_status=done.result_status,  # type: ignore[arg-type]
        control_id=done.control_id,
    )


@router.get("/cases/{case_id}/audit", response_model=list[AuditEntry])
def case_audit(case_id: int, principal: PrincipalDep, session: SessionDep) -> Any:
    """Every change to the case, oldest first."""
    case_or_404(session, case_id)
    return session.scalars(
        select(AuditEvent).where(AuditEvent.case_id == case_id).order_by(AuditEvent.id)
    ).all()


def _image(render: Any) -> Response:
    try:
        return Response(render(), media_type="image/png", headers=IMAGE_HEADERS)
    except review.ReviewError as exc:
        raise _errors(exc) from None


@router.get("/cases/{case_id}/fields/{index}.png", response_class=Response, responses=PNG)
def field_image(case_id: int, index: int, principal: PrincipalDep, session: SessionDep) -> Any:
    """A field as analysed, decoded from the stored DICOM instance."""
    return _image(lambda: review.field_png(review.get_case(session, case_id), index))


class FieldCells(BaseModel):
    field: int
    cells: list[dict[str, Any]] = Field(description="the field's cells, outlines included")


@router.get("/cases/{case_id}/fields/{index}/cells", response_model=FieldCells)
def field_cells(case_id: int, index: int, principal: PrincipalDep, session: SessionDep) -> Any:
    """The cells of one field with their outlines: the case page loads them field by field."""
    try:
        return {
            "field": index,
            "cells": review.field_cells(review.get_case(session, case_id), index),
        }
    except review.ReviewError as exc:
        raise _errors(exc) from None


@router.get("/cases/{case_id}/cells/{cell_id}.png", response_class=Response, responses=PNG)
def cell_image(case_id: int, cell_id: int, principal: PrincipalDep, session: SessionDep) -> Any:
    """The window the classifier saw around the cell (scale-normalised), at 320 px."""
    return _image(
        lambda: review.png(
            review.cell_crop(review.get_case(session, case_id), cell_id, 2 * PBC_CROP_PX)
        )
    )


@router.get("/cases/{case_id}/cells/{cell_id}/saliency.png", response_class=Response, responses=PNG)
def cell_saliency(
    case_id: int,
    cell_id: int,
    principal: PrincipalDep,
    runtime: RuntimeDep,
    session: SessionDep,
) -> Any:
    """Occlusion sensitivity of the classifier's top class, as a heat overlay (2x).

    Headers ``X-Saliency-Class`` and ``X-Saliency-Probability`` name the class explained.
    """
    try:
        case = review.get_case(session, case_id)
        image, top_class, probability = saliency_cache.render(case, cell_id, runtime.pipeline())
    except review.ReviewError as exc:
        raise _errors(exc) from None
    return Response(
        image,
        media_type="image/png",
        headers={
            **IMAGE_HEADERS,
            "X-Saliency-Class": top_class,
            "X-Saliency-Probability": f"{probability:.4f}",
        },
    )
