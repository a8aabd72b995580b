"""Model cards: the daemon finds each model by name through its card in the models folder.

A card is ``<models_dir>/<name>.md``: YAML front matter with the runtime facts (ONNX file,
SHA-256, input size, classes, calibration) followed by the human-readable card. Swapping a
model means shipping a new ONNX file and card; no code changes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ModelCardError(RuntimeError):
    """A model card is missing, malformed, or its ONNX file does not match its SHA-256."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    onnx_path: Path
    sha256: str
    meta: dict[str, Any]  # the whole front matter, for model-specific settings

    def __getitem__(self, key: str) -> Any:
        return self.meta[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_front_matter(card_path: Path) -> dict[str, Any]:
    text = card_path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ModelCardError(f"{card_path}: model card has no YAML front matter")
    try:
        _, front, _ = text.split("---\n", 2)
    except ValueError as exc:
        raise ModelCardError(f"{card_path}: unterminated YAML front matter") from exc
    meta = yaml.safe_load(front)
    if not isinstance(meta, dict):
        raise ModelCardError(f"{card_path}: front matter is not a mapping")
    return meta


def replace_front_matter(card_path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` as the card's front matter; its body stays as it is."""
    read_front_matter(card_path)  # a card with front matter to replace
    body = card_path.read_text(encoding="utf-8").split("---\n", 2)[2]
    front = yaml.safe_dump(meta, sort_keys=False, width=100, allow_unicode=True)
    card_path.write_text(f"---\n{front}---\n{body}", encoding="utf-8")


def load_card(models_dir: Path, name: str, verify: bool = True) -> ModelCard:
    """Read the card called ``name`` and check that its ONNX file is the one it describes."""
    card_path = Path(models_dir) / f"{name}.md"
    if not card_path.is_file():
        raise ModelCardError(f"no model card {card_path}")
    meta = read_front_matter(card_path)
    for key in ("name", "version", "file", "sha256"):
        if key not in meta:
            raise ModelCardError(f"{card_path}: front matter lacks '{key}'")
    onnx_path = card_path.parent / str(meta["file"])
    if not onnx_path.is_file():
        raise ModelCardError(f"{card_path}: model file {onnx_path} is missing")
    if verify and file_sha256(onnx_path) != meta["sha256"]:
        raise ModelCardError(f"{onnx_path}: SHA-256 differs from its card {card_path.name}")
    return ModelCard(
        name=str(meta["name"]),
        version=str(meta["version"]),
        onnx_path=onnx_path,
        sha256=str(meta["sha256"]),
        meta=meta,
    )


#: A markdown image link: ``![caption](file)``.
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def card_figures(card_path: Path) -> list[Path]:
    """The files a card's markdown image links point to, relative to the card (its figures):
    copied with the card wherever the card goes, so that its links stay whole."""
    card_path = Path(card_path)
    text = card_path.read_text(encoding="utf-8")
    return [card_path.parent / link for link in _IMAGE_LINK.findall(text) if "://" not in link]
