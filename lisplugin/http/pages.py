"""The review station's pages: sign-in, worklist and case, rendered on the server (Jinja2).

The pages carry the data they show; every change goes through the JSON API
(:mod:`lisplugin.http.review`) with the session's CSRF token, which each page embeds. A
strict Content-Security-Policy (scripts and styles only from ``/static``) keeps injected
markup from running.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from lisplugin.core.report import value_to_json
from lisplugin.core.revision import REVIEW_CLASSES
from lisplugin.core.rules import reason_required, result_key
from lisplugin.core.types import UNIDENTIFIED, Flag
from lisplugin.http.auth import Principal, optional_user
from lisplugin.http.deps import RuntimeDep, SessionDep
from lisplugin.service import review
from lisplugin.service.outbox import as_utc
from lisplugin.storage.orm import Case, CaseStatus
from lisplugin.storage.orm_review import CaseComment, Role

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

#: Display name, colour (Okabe-Ito and Tol palettes: told apart with colour-vision
#: deficiencies) and keyboard shortcut of every class a leukocyte detection can have.
CLASS_STYLE: dict[str, tuple[str, str, str]] = {
    "neutrophil": ("Neutrophil", "#0072B2", "1"),
    "lymphocyte": ("Lymphocyte", "#009E73", "2"),
    "monocyte": ("Monocyte", "#CC79A7", "3"),
    "eosinophil": ("Eosinophil", "#E69F00", "4"),
    "basophil": ("Basophil", "#56B4E9", "5"),
    "ig": ("Immature granulocyte", "#D55E00", "6"),
    "erythroblast": ("Erythroblast (NRBC)", "#882255", "7"),
    "platelet": ("Platelet / clump", "#999933", "8"),
    "artefact": ("Artefact", "#7A7A7A", "A"),
    "smudge": ("Smudge cell", "#332288", "S"),
    UNIDENTIFIED: ("Unidentified", "#1A1A1A", ""),
}
#: Red cells in Tol's grey and platelets in the platelet class's olive: inside the palette, so
#: no outline is told from another by hue alone; the letters on the outlines say the class.
KIND_STYLE = {"RBC": ("Red cells", "#BBBBBB"), "PLT": ("Platelets", "#999933")}
#: The letter drawn on each outline (colour is never the only cue).
CLASS_LETTER = {
    "neutrophil": "N",
    "lymphocyte": "L",
    "monocyte": "M",
    "eosinophil": "E",
    "basophil": "B",
    "ig": "I",
    "erythroblast": "R",
    "platelet": "P",
    "artefact": "A",
    "smudge": "S",
    UNIDENTIFIED: "?",
    "PLT": "p",
}

router = APIRouter(include_in_schema=False)


def _page(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def _to_sign_in(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def _safe_next(target: str | None) -> str:
    """Only a path on this site: an open redirect would help phishing. Browsers drop tabs and
    line breaks from URLs (``/<TAB>/evil.example`` becomes ``//evil.example``), so any
    control character, space or backslash refuses the target."""
    if (
        target
        and target.startswith("/")
        and not target.startswith("//")
        and all("!" <= c <= "~" and c != "\\" for c in target)
    ):
        return target
    return "/worklist"


def waiting_text(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


def local_time(moment: datetime | None) -> str:
    """A time as people at the laboratory read it: local, with the zone named."""
    if moment is None:
        return ""
    return as_utc(moment).astimezone().strftime("%Y-%m-%d %H:%M %Z")


templates.env.filters["waiting"] = waiting_text
templates.env.filters["localtime"] = local_time


def _chrome(principal: Principal) -> dict[str, Any]:
    return {"user": principal, "csrf_token": principal.csrf_token}


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/login", response_model=None)
def login_page(
    request: Request,
    runtime: RuntimeDep,
    target: Annotated[str | None, Query(alias="next")] = None,
) -> Response:
    if optional_user(request, runtime) is not None:
        return RedirectResponse(_safe_next(target), status_code=303)
    return _page(request, "login.html", {"next": _safe_next(target)})


#: Worklist entries per page of the review station.
WORKLIST_PAGE = 50


@router.get("/worklist", response_model=None)
def worklist_page(
    request: Request,
    runtime: RuntimeDep,
    session: SessionDep,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    principal = optional_user(request, runtime)
    if principal is None:
        return _to_sign_in(request)
    released = session.execute(
        select(Case.id, Case.accession_number, Case.patient, Case.status, Case.updated_at)
        .where(Case.status.in_([CaseStatus.VERIFIED, CaseStatus.FINAL]))
        .order_by(Case.updated_at.desc())
        .limit(15)
    ).all()
    waiting = review.worklist(session, limit=WORKLIST_PAGE, offset=(page - 1) * WORKLIST_PAGE)
    pages = max(1, -(-waiting.total // WORKLIST_PAGE))
    return _page(
        request,
        "worklist.html",
        {
            **_chrome(principal),
            "entries": waiting.entries,
            "total": waiting.total,
            "page": page,
            "pages": pages,
            "released": released,
        },
    )


def _next_case(case_id: int, worklist: list[dict[str, Any]]) -> int | None:
    """The case after this one on the worklist (the first when this one is not on it)."""
    ids = [e["id"] for e in worklist]
    if case_id in ids:
        ids = ids[ids.index(case_id) + 1 :] + ids[: ids.index(case_id)]
    return ids[0] if ids else None


def _case_data(
    case: Case, principal: Principal, runtime: RuntimeDep, worklist: list[dict[str, Any]]
) -> dict[str, Any]:
    """Everything the case page's script needs, embedded in the page as JSON."""
    result = case.result or {}
    pipeline = runtime.pipeline()
    values = review.reported_values(pipeline, case) if case.result else []
    reviewer = principal.role in (Role.TECHNOLOGIST, Role.PATHOLOGIST)
    settings = runtime.settings
    return {
        "id": case.id,
        "version": case.version,
        "status": case.status.value,
        "final_sent": case.final_sent,
        "captures_after_analysis": review.captures_after_analysis(case),
        "can_review": reviewer and case.status in review.REVIEWABLE,
        "can_sign_out": principal.role == Role.PATHOLOGIST,
        "two_stage": settings.review.two_stage,
        "min_wbc": settings.analysis.min_wbc_classified,
        "canned_comments": review.canned_comments(settings),
        "reason_required": [
            f["code"]
            for f in result.get("flags") or []
            if reason_required(pipeline.rules, Flag(**f))
        ],
        "review": result.get("review") or {},
        "previous": result.get("previous"),
        "next_case": _next_case(case.id, worklist),
        "classes": [
            {
                "key": k,
                "name": n,
                "colour": c,
                "shortcut": s,
                "letter": CLASS_LETTER[k],
                "result_key": result_key(k),
            }
            for k, (n, c, s) in CLASS_STYLE.items()
        ],
        "review_classes": list(REVIEW_CLASSES),
        "kinds": {
            k: {"name": n, "colour": c, "letter": CLASS_LETTER.get(k, "")}
            for k, (n, c) in KIND_STYLE.items()
        },
        "values": [value_to_json(v) for v in values],
        "result": {
            "fields": result.get("fields") or [],
            # outlines are fetched per field (/api/cases/{id}/fields/{index}/cells)
            "cells": [{**c, "outline": None} for c in result.get("cells") or []],
            "counts": result.get("counts") or {},
            "class_counts": result.get("class_counts") or {},
            "excluded_counts": result.get("excluded_counts") or {},
            "differential": result.get("differential") or {},
            "wbc_classified": result.get("wbc_classified", 0),
            "flags": result.get("flags") or [],
        },
    }


@router.get("/cases/{case_id}", response_model=None)
def case_page(case_id: int, request: Request, runtime: RuntimeDep, session: SessionDep) -> Response:
    principal = optional_user(request, runtime)
    if principal is None:
        return _to_sign_in(request)
    case = session.get(Case, case_id)
    if case is None:  # the error page (lisplugin.http.errors), with the status it says
        raise HTTPException(404, detail=f"no case {case_id}")
    comments = session.scalars(
        select(CaseComment).where(CaseComment.case_id == case.id).order_by(CaseComment.id)
    ).all()
    since = case.analysed_at or case.updated_at
    return _page(
        request,
        "case.html",
        {
            **_chrome(principal),
            "case": case,
            "patient": case.patient or {},
            "stat": (case.order or {}).get("priority") == "S",
            "waiting": (datetime.now(UTC) - as_utc(since)).total_seconds(),
            "comments": comments,
            "data": _case_data(case, principal, runtime, review.worklist(session).entries),
        },
    )


def install(app: FastAPI) -> None:
    """Add the pages and their static files (scripts, styles) to ``app``."""
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(router)
