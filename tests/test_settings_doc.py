"""The settings reference is generated from the model and agrees with config/site.yaml."""

from __future__ import annotations

from typing import Any

import yaml

from lisplugin.config import DEFAULT_CONFIG_DIR, Settings, load_settings
from lisplugin.settings_doc import REFERENCE_PATH, render, settings_docs


def _keys(mapping: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in mapping.items():
        if isinstance(value, dict) and value:  # an empty mapping is a setting's own value
            keys |= _keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_reference_is_current() -> None:
    assert REFERENCE_PATH.read_text() == render(), (
        "deploy/settings.md is stale: lisplugin settings-reference > deploy/settings.md"
    )


def test_every_setting_is_documented_and_in_site_yaml() -> None:
    docs = list(settings_docs())
    assert len(docs) > 30
    assert not [d.key for d in docs if not d.meaning], "settings without a meaning"
    site = yaml.safe_load((DEFAULT_CONFIG_DIR / "site.yaml").read_text())
    assert _keys(site) == {d.key for d in docs}


def test_site_yaml_holds_the_defaults() -> None:
    shipped = load_settings(DEFAULT_CONFIG_DIR / "site.yaml").model_dump()
    assert shipped == Settings().model_dump()


def test_environment_variable_names_work(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for doc in settings_docs():
        if doc.type == "int":
            monkeypatch.setenv(doc.env, "4321")
    settings = Settings()
    assert settings.dicom.port == 4321 and settings.storage.min_free_mb == 4321
