"""The package's folders are its architecture: a pure core, adapters at the edges, wiring in
``service/``. Imports only point inwards, so each rule here is checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lisplugin"

#: Folder -> what no module in it may import (prefixes of module names).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the core knows nothing of sockets, SQL, DICOM files or the web
    "core": (
        "lisplugin.service", "lisplugin.http", "lisplugin.dicom", "lisplugin.hl7",
        "lisplugin.storage", "lisplugin.reports", "lisplugin.inference", "lisplugin.training",
        "lisplugin.evaluation", "sqlalchemy", "pynetdicom", "pydicom", "fastapi", "hl7",
    ),
    # adapters at the edges never reach back into the wiring or the web front
    "dicom": ("lisplugin.service", "lisplugin.http"),
    "hl7": ("lisplugin.service", "lisplugin.http"),
    "storage": ("lisplugin.service", "lisplugin.http", "lisplugin.reports"),
    "reports": ("lisplugin.service", "lisplugin.http"),
    "inference": ("lisplugin.service", "lisplugin.http", "lisplugin.training"),
    # the datasets' readers serve training and evaluation alike, and need neither torch nor them
    "datasets": (
        "lisplugin.training", "lisplugin.evaluation", "lisplugin.service", "lisplugin.http",
    ),
    # evaluation runs on the daemon's own dependencies: torch stays in training
    "evaluation": ("lisplugin.training",),
    # the wiring serves the web front, which is mounted on it by the entry points (cli, demo)
    "service": ("lisplugin.http",),
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_inwards(folder: str) -> None:
    files = sorted((PACKAGE / folder).rglob("*.py"))
    assert files, folder
    wrong = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[folder])
    ]
    assert wrong == []


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lisplugin.service.outbox import OutboxWorker\n")
    assert "lisplugin.service.outbox" in imported_modules(source)
