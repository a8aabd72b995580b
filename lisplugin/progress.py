"""Progress bars for long commands (training, evaluation, bench, adapt, purge): tqdm on a terminal.

Under systemd, cron, CI or a pipe the bar would be noise in a log, so it is off unless standard
error is a TTY (tqdm's ``disable=None``). ``LISPLUGIN_PROGRESS=0`` turns it off everywhere;
``LISPLUGIN_PROGRESS=1`` forces it on (a pipe that a person watches, and the tests that check
the bar renders at all).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

#: The environment variable that overrides the TTY check: ``0`` off, ``1`` on.
ENV = "LISPLUGIN_PROGRESS"


def _disable() -> bool | None:
    """tqdm's ``disable``: True (off), False (forced on) or None (on only for a TTY)."""
    value = os.environ.get(ENV, "").strip()
    if value == "0":
        return True
    if value == "1":
        return False
    return None


def progress(iterable: Iterable[T], desc: str = "", **kwargs: Any) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar when standard error is a terminal, else as it is."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, desc=desc, disable=_disable(), **kwargs)


def bar(total: int | None, desc: str = "", **kwargs: Any) -> tqdm:
    """A bar advanced by hand (``.update(n)``) for loops that work in chunks or steps; the same
    terminal rule as :func:`progress`. Use it as a context manager so that it is closed."""
    kwargs.setdefault("leave", False)
    return tqdm(total=total, desc=desc, disable=_disable(), **kwargs)
