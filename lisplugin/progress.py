"""Progress bars for long commands (training, evaluation, bench, purge): tqdm on a terminal only.

Under systemd, cron, CI or a pipe the bar would be noise in a log, so it is off unless standard
error is a TTY (tqdm's ``disable=None``); ``LISPLUGIN_PROGRESS=0`` turns it off everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str = "", **kwargs: Any) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar when standard error is a terminal, else as it is."""
    off = os.environ.get("LISPLUGIN_PROGRESS", "") == "0"
    return tqdm(iterable, desc=desc, disable=True if off else None, leave=False, **kwargs)
