"""Which models folder is in use: the shipped one, or one an admin promoted.

Promoted folders (adapted or retrained models) are copied under ``<storage>/models/`` and
``active.json`` there names the one in use and the ones before it. The daemon reads that file
before each analysis and loads a newly promoted folder on its next case, without a restart; a
rollback pops the stack. Only files here: who may promote, and the checks before it, live in
``lisplugin.service.model_admin``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lisplugin.config import Settings

ACTIVE_FILE = "active.json"
#: File of a candidate models folder with the site's held-back crops (written by ``adapt``,
#: scored again by ``models promote``).
HELD_BACK_FILE = "held-back.npz"


class ModelStoreError(RuntimeError):
    pass


class ModelStore:
    """The promoted models folders of one daemon and which one is in use."""

    def __init__(self, root: Path, shipped: Path) -> None:
        self.root = Path(root)
        self.shipped = Path(shipped)

    @classmethod
    def of(cls, settings: Settings) -> ModelStore:
        return cls(settings.storage.path / "models", settings.analysis.models_dir)

    def _state(self) -> dict[str, Any]:
        path = self.root / ACTIVE_FILE
        if not path.is_file():
            return {"current": None, "previous": [], "history": []}
        return json.loads(path.read_text(encoding="utf-8"))

    def _write(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{ACTIVE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        os.replace(tmp, self.root / ACTIVE_FILE)  # atomic: a reader sees old or new, never half

    def active(self) -> Path:
        """The folder in use: the last promoted one, else the shipped models."""
        current = self._state().get("current")
        if current and (self.root / current).is_dir():
            return self.root / current
        return self.shipped

    def history(self) -> list[dict[str, Any]]:
        return list(self._state().get("history", []))

    def promote(self, candidate: Path, version: str, by: str, checks: dict[str, Any]) -> Path:
        """Copy ``candidate`` into the store and make it the folder in use."""
        state = self._state()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{''.join(c if c.isalnum() or c in '.-' else '_' for c in version)}"
        target = self.root / name
        shutil.copytree(candidate, target)
        if state.get("current"):
            state["previous"].append(state["current"])
        else:
            state["previous"].append(None)  # None: the shipped models
        state["current"] = name
        state["history"].append(
            {"action": "promote", "at": stamp, "by": by, "folder": name, "version": version,
             "checks": checks}
        )  # fmt: skip
        self._write(state)
        return target

    def rollback(self, by: str) -> Path:
        """Put the folder used before the last promotion back in use."""
        state = self._state()
        if not state.get("previous"):
            raise ModelStoreError("nothing to roll back: no model was promoted")
        left = state["current"]
        state["current"] = state["previous"].pop()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        state["history"].append(
            {"action": "rollback", "at": stamp, "by": by, "from": left, "to": state["current"]}
        )
        self._write(state)
        return self.active()


def active_models_dir(settings: Settings) -> Path:
    """The models folder the daemon analyses with now (see :class:`ModelStore`)."""
    return ModelStore.of(settings).active()


def stain_rows(nuclei: Sequence[np.ndarray | None]) -> np.ndarray:
    """Stain references as an (N, 3) array for the held-back file, NaN where a crop has none."""
    return np.asarray([[np.nan] * 3 if n is None else list(n) for n in nuclei], dtype=np.float32)


def stain_list(rows: np.ndarray | None, n: int) -> list[np.ndarray | None]:
    """The references of :func:`stain_rows` again (all None for a file written without)."""
    if rows is None:
        return [None] * n
    return [None if np.isnan(r).any() else r for r in np.asarray(rows, dtype=np.float32)]
