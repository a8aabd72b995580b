"""Durable files: an instance is on disk (fsync'd file and directory) before it is acknowledged."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text: str, limit: int = 96) -> str:
    """A file-name-safe form of a UID or reason (never empty)."""
    return (_UNSAFE.sub("_", text) or "_")[:limit]


def write_durably(path: Path, data: bytes) -> Path:
    """Write ``data`` atomically: temp file, fsync, rename, fsync the directory."""
    write_all_durably([(path, data)])
    return path


def write_all_durably(files: list[tuple[Path, bytes]]) -> None:
    """Write each file atomically (temp file, fsync, rename); then fsync each folder once."""
    folders: dict[Path, None] = {}
    for path, data in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        # per process and thread: two associations may carry the same instance at once
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        folders[path.parent] = None
    for folder in folders:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
