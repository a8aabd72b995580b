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
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer
from swagger_ui_bundle import swagger_ui_path

from lisplugin import __version__
from lisplugin.http import dicomweb, errors, pages, reports
from lisplugin.http import review as review_api
from lisplugin.http.auth import PrincipalDep, signed_in_user
from lisplugin.http.deps import RuntimeDep, SessionDep, case_or_404
from lisplugin.http.middleware import install_request_context
from lisplugin.service import review
from lisplugin.service.metrics import REGISTRY, StateCollector
from lisplugin.service.runtime import Runtime
from lisplugin.storage.orm import Case, CaseStatus, Instance, OutboxMessage, OutboxStatus

DOCS_ASSETS = "/docs-assets"


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


def _summary(case: Case, instances: int) -> dict[str, Any]:
    """A case as lists show it; reads the summary columns, never the result's cells."""
    return {
        "id": case.id,
        "case_key": case.case_key,
        "accession_number": case.accession_number,
        "study_instance_uid": case.study_instance_uid,
        "status": case.status,
        "patient_id": (case.patient or {}).get("id"),
        "instances": instances,
        "needs_review": None if case.summary is None else bool(case.summary["needs_review"]),
        "last_instance_at": case.last_instance_at,
        "analysed_at": case.analysed_at,
    }


def instance_counts(session: Session, case_ids: list[int]) -> dict[int, int]:
    """Stored captures per case, for a page of cases in one query."""
    if not case_ids:
        return {}
    rows = session.execute(
        select(Instance.case_id, func.count())
        .where(Instance.case_id.in_(case_ids))
        .group_by(Instance.case_id)
    ).all()
    return {case_id: int(n) for case_id, n in rows}


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
    errors.install(app)
    install_request_context(app)
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

    # Swagger UI from the swagger-ui-bundle package: no CDN, so the docs work on an isolated
    # hospital network. The assets are public files and need no session; the page does.
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False, dependencies=signed_in)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="lisplugin API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz(runtime: RuntimeDep, response: Response) -> dict[str, Any]:
        """Every part needed to accept and report work is up (database, disk space included).

        ``lis`` is "degraded" while results wait for a retry: the daemon still takes work, so
        readiness does not fail on it, but monitoring should alert.
        """
        checks = runtime.readiness()
        ready = all(checks.values())
        response.status_code = 200 if ready else 503
        # Results parked (AE, repeated AR) or long without ACK: still ready to take work, but
        # "degraded" so that monitoring calls someone.
        degraded = (
            {k: v for k, v in runtime.degradations().items() if v} if checks["database"] else {}
        )
        status = ("degraded" if degraded else "ok") if ready else "not ready"
        return {
            "ready": ready,
            "status": status,
            "checks": checks,
            "degraded": degraded,
            "lis": runtime.lis_link(),
            "free_mb": round(runtime.disk_free_mb()),
        }

    state = CollectorRegistry()
    state.register(StateCollector(runtime.db.session, runtime.settings.storage.path))

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(
            generate_latest(REGISTRY) + generate_latest(state), media_type=CONTENT_TYPE_LATEST
        )

    cases = APIRouter(prefix="/api/cases", tags=["cases"], dependencies=signed_in)

    @cases.get("", response_model=list[CaseSummary])
    def list_cases(
        session: SessionDep,
        status: Annotated[CaseStatus | None, Query(description="only cases in this state")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=100_000_000)] = 0,  # SQL OFFSET is 64-bit
    ) -> list[dict[str, Any]]:
        """Newest first, ``limit`` cases from ``offset``."""
        query = (
            select(Case)
            .options(defer(Case.result), defer(Case.order))
            .order_by(Case.id.desc())
            .limit(limit)
            .offset(offset)
        )
        if status is not None:
            query = query.where(Case.status == status)
        found = session.scalars(query).all()
        counts = instance_counts(session, [case.id for case in found])
        return [_summary(case, counts.get(case.id, 0)) for case in found]

    @cases.get("/{case_id}", response_model=CaseDetail)
    def get_case(case_id: int, session: SessionDep) -> dict[str, Any]:
        case = case_or_404(session, case_id)
        messages = session.scalars(
            select(OutboxMessage).where(OutboxMessage.case_id == case.id).order_by(OutboxMessage.id)
        )
        return {
            **_summary(case, len(case.instances)),
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
    app.include_router(dicomweb.router, dependencies=signed_in)
    pages.install(app)
    return app
