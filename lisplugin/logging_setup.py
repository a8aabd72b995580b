"""One log format for lisplugin, uvicorn and the libraries: text for people, JSON for collectors.

structlog renders every stdlib record (ours, uvicorn's, pynetdicom's) through one
``ProcessorFormatter``, adding the timestamp (UTC), level, logger and the ids bound to the
current context: ``request_id`` for an HTTP request, ``case_id`` while a case is analysed.
Libraries that narrate at INFO (highdicom, alembic, pynetdicom, PIL) are kept to WARNING.

Log lines carry identifiers (case id, accession number, SOP Instance UID, HL7 control id), never
patient names, ids or birth dates: those stay in the database.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

LogFormat = Literal["text", "json"]

#: Libraries whose INFO lines are noise for a laboratory's log (563 of 893 lines were highdicom's).
QUIET_LOGGERS = ("highdicom", "alembic", "pynetdicom", "PIL", "multipart", "onnxruntime")


def _drop_colour(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """uvicorn adds a terminal-coloured copy of its message as ``color_message``: not logged."""
    event.pop("color_message", None)
    return event


_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.stdlib.ExtraAdder(),
    _drop_colour,
]


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (a test's capture, a redirected stream)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(fmt: LogFormat = "text", level: str = "INFO") -> None:
    """Send every logger of the process to standard error in ``fmt``; safe to call again."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
    quiet = max(logging.WARNING, root.level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


bind_contextvars = structlog.contextvars.bind_contextvars
bound_contextvars = structlog.contextvars.bound_contextvars
clear_contextvars = structlog.contextvars.clear_contextvars
