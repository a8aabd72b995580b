"""Error answers: an HTML page for a browser, JSON for every other client, the same status.

A reviewer who follows a stale link, lacks a role or submits a form twice should see a page
of the review station that says what happened and where to go, not a JSON fragment; the LIS,
scripts and the station's own ``fetch`` calls (which ask for ``*/*`` or JSON) keep FastAPI's
``{"detail": ...}``. A request gets HTML when its ``Accept`` header names ``text/html`` (as
browsers do for a page) at least as strongly as JSON, or names neither (``*/*``) and is for a
page rather than the API (``/api``, ``/dicomweb``, ...). Unexpected failures answer 500 with
the request id and never the exception's text, which may quote patient data.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lisplugin.http.auth import optional_user
from lisplugin.http.pages import SECURITY_HEADERS, templates

log = logging.getLogger(__name__)

#: What a reviewer can do about each status, below the error's own detail.
ADVICE = {
    401: "Your session has ended. Sign in again to continue.",
    403: "Your account's role does not allow this. Ask a pathologist or an administrator.",
    404: "It may have been purged, or the link is mistyped.",
    405: "This address does not take that kind of request; use the pages' own buttons.",
    409: "Someone changed the case after you loaded it, or its state does not allow this. "
    "Reload the case and try again.",
    422: "Some of what was sent is not valid; correct it and try again.",
    500: "Something went wrong inside lisplugin. Tell the laboratory's IT, quoting the request "
    "id below.",
}


#: Paths whose clients are programs: without an explicit wish for HTML they get JSON.
API_PREFIXES = ("/api/", "/dicomweb/", "/openapi.json", "/healthz", "/readyz", "/metrics")


def wants_html(request: Request) -> bool:
    """Whether the answer should be an HTML page: ``text/html`` named in ``Accept`` with a
    quality at least that of ``application/json``; or neither named (``*/*``, as fetch, curl
    and httpx send) on a page's path, not the API's."""
    quality = {"html": 0.0, "json": 0.0}
    for part in request.headers.get("accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = {
            "text/html": "html",
            "application/xhtml+xml": "html",
            "application/json": "json",
        }.get(media.lower())
        if kind:
            quality[kind] = max(quality[kind], q)
    if quality["html"] == quality["json"] == 0.0:
        return not request.url.path.startswith(API_PREFIXES)
    return quality["html"] > 0 and quality["html"] >= quality["json"]


def _messages(detail: Any) -> list[str]:
    """An error detail as lines for people: a string, or FastAPI's list of validation errors."""
    if isinstance(detail, str):
        return [detail]
    if isinstance(detail, list):
        lines = []
        for item in detail:
            if isinstance(item, dict):
                loc = item.get("loc", ())
                where = ".".join(str(p) for p in loc if p not in ("body", "path", "query"))
                lines.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg")))
            else:
                lines.append(str(item))
        return lines
    return [] if detail is None else [str(detail)]


def error_page(
    request: Request,
    status: int,
    detail: Any,
    headers: dict[str, str] | None = None,
    principal: Any = None,
) -> HTMLResponse:
    """The review station's error page for ``status``, with the detail and the request id."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    response = templates.TemplateResponse(
        request,
        "error.html",
        {
            "status": status,
            "title": title,
            "messages": _messages(detail),
            "advice": ADVICE.get(status, ""),
            "request_id": getattr(request.state, "request_id", ""),
            "user": principal,
            "csrf_token": getattr(principal, "csrf_token", None),
            "sign_in": status == 401,
            "next": request.url.path,
        },
        status_code=status,
        headers=headers,
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def _principal(request: Request) -> Any:
    """The signed-in user for the page's top bar, when there is one (never fails)."""
    try:
        return optional_user(request, request.app.state.runtime)
    except Exception:
        return None


def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Any ``HTTPException`` (the routes', and Starlette's own 404 and 405)."""
    headers = dict(exc.headers or {})
    if wants_html(request):
        principal = None if exc.status_code == 401 else _principal(request)
        return error_page(request, exc.status_code, exc.detail, headers, principal)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


def validation_error(request: Request, exc: RequestValidationError) -> Response:
    """A request whose path, query or body does not validate: 422."""
    if wants_html(request):
        return error_page(request, 422, exc.errors(), principal=_principal(request))
    return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)


def server_error(request: Request, exc: Exception) -> Response:
    """An unexpected failure: 500 with the request id; the exception is logged, not shown."""
    request_id = getattr(request.state, "request_id", "")
    log.error(
        "%s %s failed: %s (request %s)",
        request.method,
        request.url.path,
        type(exc).__name__,
        request_id,
        exc_info=exc,
    )
    detail = "internal error; the request id is in the log"
    if wants_html(request):
        response: Response = error_page(request, 500, detail)
    else:
        response = JSONResponse({"detail": detail, "request_id": request_id}, status_code=500)
    # Made outside the other middleware (Starlette's outermost layer): their headers too.
    for name in ("Cache-Control", "X-Content-Type-Options", "Referrer-Policy"):
        response.headers.setdefault(name, SECURITY_HEADERS[name])
    response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
    if request_id:
        response.headers["X-Request-ID"] = request_id
    return response


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` as page or JSON, whichever the client asked for."""
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    # Failures in the routes are answered by the request-context middleware
    # (lisplugin.http.middleware), inside uvicorn's connection; this catches the rest.
    app.add_exception_handler(Exception, server_error)
