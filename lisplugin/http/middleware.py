"""Per-request context: a request id in every log line and the response, latency in metrics.

The id is the caller's ``X-Request-ID`` when it is a short token (a reverse proxy's), else a new
one. One log line per request replaces uvicorn's access log, so that it carries the id too; the
path is logged without its query string.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from starlette.routing import Match

from lisplugin.http.errors import server_error
from lisplugin.logging_setup import bound_contextvars
from lisplugin.service.metrics import HTTP_SECONDS

log = logging.getLogger("lisplugin.http.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _route(request: Request) -> str:
    """The route template (``/api/cases/{case_id}``): a bounded label set for the histogram."""
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "other"))
    return "unmatched"


def install_request_context(app: FastAPI) -> None:
    @app.middleware("http")
    async def request_context(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        request.state.request_id = request_id  # for error pages made outside this middleware
        started = time.perf_counter()
        with bound_contextvars(request_id=request_id):
            status = 500
            try:
                try:
                    response = await call_next(request)
                except Exception as exc:  # answered here, so the connection stays usable
                    response = server_error(request, exc)
                status = response.status_code
            finally:
                elapsed = time.perf_counter() - started
                HTTP_SECONDS.labels(request.method, _route(request), str(status)).observe(elapsed)
                log.info(
                    "%s %s %d %.1f ms",
                    request.method,
                    request.url.path,
                    status,
                    elapsed * 1000,
                    extra={"status": status, "duration_ms": round(elapsed * 1000, 1)},
                )
        response.headers["X-Request-ID"] = request_id
        return response
