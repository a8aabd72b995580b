"""HTTP API (FastAPI): health, metrics, the case API for LIS vendors and IT, the review station.

Everything but ``/healthz``, ``/readyz`` and ``/metrics`` (left open for Prometheus and the
service manager; they reveal no patient data), the sign-in page, its static files and
``POST /api/session`` itself needs a signed-in user (:mod:`lisplugin.http.auth`), the
OpenAPI description included.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import func, select, text

from lisplugin import __version__
from lisplugin.http import pages, reports
from lisplugin.http import review as review_api
from lisplugin.http.auth import PrincipalDep, signed_in_user
from lisplugin.http.deps import RuntimeDep, SessionDep, case_or_404
from lisplugin.service import review
from lisplugin.service.metrics import OUTBOX_PENDING, REGISTRY
from lisplugin.service.runtime import Runtime
from lisplugin.storage.orm import Case, CaseStatus, OutboxMessage, OutboxStatus


class CaseSummary(BaseModel):
    id: int
    case_key: str
    accession_number: str | None
    study_instance_uid: str | None
    status: CaseStatus
    patient_id: str | None
    instances: int
    needs_review: bool | None
    last_instance_at: datetime | None
    analysed_at: datetime | None


class OutboxEntry(BaseModel):
    channel: str
    control_id: str
    result_status: str
    status: OutboxStatus
    attempts: int
    ack_code: str | None
    last_error: str | None
    delivered_at: datetime | None


class CaseDetail(CaseSummary):
    patient: dict[str, Any]
    order: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    version: int
    messages: list[OutboxEntry]
    captures_after_analysis: int


class AnalyzeAccepted(BaseModel):
    id: int
    status: CaseStatus


def _summary(case: Case) -> dict[str, Any]:
    return {
        "id": case.id,
        "case_key": case.case_key,
        "accession_number": case.accession_number,
        "study_instance_uid": case.study_instance_uid,
        "status": case.status,
        "patient_id": (case.patient or {}).get("id"),
        "instances": len(case.instances),
        "needs_review": None if case.result is None else bool(case.result.get("needs_review")),
        "last_instance_at": case.last_instance_at,
        "analysed_at": case.analysed_at,
    }


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="lisplugin",
        version=__version__,
        description=(
            "Digital-morphology plugin: blood-smear captures in, differential out. Sign in with "
            "`POST /api/session` and send `Authorization: Bearer <token>`."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.runtime = runtime
    signed_in = [Depends(signed_in_user)]

    @app.middleware("http")
    async def no_caching_or_framing(request: Request, call_next: Any) -> Any:
        """Every answer may carry PHI (cases, images, reports): never cached, sniffed or framed."""
        response = await call_next(request)
        for name in ("Cache-Control", "X-Content-Type-Options", "Referrer-Policy"):
            response.headers.setdefault(name, pages.SECURITY_HEADERS[name])
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        return response

    @app.get("/openapi.json", include_in_schema=False, dependencies=signed_in)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=signed_in)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="lisplugin API")

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz(runtime: RuntimeDep, response: Response) -> dict[str, Any]:
        """Every part needed to accept and report work is up."""
        checks = dict(runtime.readiness())
        try:
            with runtime.db.session() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = True
        except Exception:
            checks["database"] = False
        ready = all(checks.values())
        response.status_code = 200 if ready else 503
        # Results parked (AE, repeated AR) or long without ACK: still ready to take work, but
        # "degraded" so that monitoring calls someone.
        degraded = (
            {k: v for k, v in runtime.degradations().items() if v} if checks["database"] else {}
        )
        status = ("degraded" if degraded else "ok") if ready else "not ready"
        return {"ready": ready, "status": status, "checks": checks, "degraded": degraded}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics(session: SessionDep) -> Response:
        """Prometheus text exposition."""
        pending = session.execute(
            select(OutboxMessage.channel, func.count())
            .where(OutboxMessage.status == OutboxStatus.PENDING)
            .group_by(OutboxMessage.channel)
        ).all()
        OUTBOX_PENDING.clear()
        for channel in ("hl7", "dicom"):
            OUTBOX_PENDING.labels(channel).set(dict(pending).get(channel, 0))
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    cases = APIRouter(prefix="/api/cases", tags=["cases"], dependencies=signed_in)

    @cases.get("", response_model=list[CaseSummary])
    def list_cases(
        session: SessionDep,
        status: Annotated[CaseStatus | None, Query(description="only cases in this state")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        query = select(Case).order_by(Case.id.desc()).limit(limit)
        if status is not None:
            query = query.where(Case.status == status)
        return [_summary(case) for case in session.scalars(query)]

    @cases.get("/{case_id}", response_model=CaseDetail)
    def get_case(case_id: int, session: SessionDep) -> dict[str, Any]:
        case = case_or_404(session, case_id)
        messages = session.scalars(
            select(OutboxMessage).where(OutboxMessage.case_id == case.id).order_by(OutboxMessage.id)
        )
        return {
            **_summary(case),
            "patient": case.patient or {},
            "order": case.order,
            "result": case.result,
            "error": case.error,
            "version": case.version,
            "messages": [OutboxEntry.model_validate(m, from_attributes=True) for m in messages],
            "captures_after_analysis": review.captures_after_analysis(case),
        }

    @cases.post("/{case_id}/analyze", response_model=AnalyzeAccepted, status_code=202)
    def analyze_case(
        case_id: int, principal: PrincipalDep, runtime: RuntimeDep, session: SessionDep
    ) -> dict[str, Any]:
        """Analyse now, without waiting for the case to be stable."""
        case = case_or_404(session, case_id)
        if not case.instances:
            raise HTTPException(status_code=409, detail=f"case {case_id} has no captures yet")
        review.audit(
            session,
            principal.username,
            "case.analyze",
            case.id,
            before={"status": case.status.value},
            after={"status": CaseStatus.QUEUED.value},
        )
        case.status = CaseStatus.QUEUED
        session.flush()
        runtime.wake_scheduler()
        return {"id": case.id, "status": case.status}

    app.include_router(cases)
    app.include_router(reports.router, dependencies=signed_in)
    app.include_router(review_api.router)
    pages.install(app)
    return app
