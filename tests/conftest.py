"""Shared fixtures: where the public datasets are, and skipping cleanly when they are not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """``$LISPLUGIN_DATA`` or ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("LISPLUGIN_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"public datasets not found at {path} (set LISPLUGIN_DATA)")
    return path
