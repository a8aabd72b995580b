"""The settings reference (deploy/settings.md), generated from the pydantic settings model.

Every key with its type, default and environment variable comes from ``lisplugin.config``; its
meaning is the ``#:`` comment above the field there, else the line in ``MEANINGS`` below.
``tests/test_settings_doc.py`` keeps the file, this model and ``config/site.yaml`` in step:
a new setting needs a meaning and a line in site.yaml.

    lisplugin settings-reference > deploy/settings.md
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_origin

from pydantic import BaseModel

from lisplugin.config import REPO_ROOT, Settings

ENV_PREFIX = "LISPLUGIN_"

#: Meanings of the settings that have no ``#:`` comment in lisplugin/config.py.
MEANINGS: dict[str, str] = {
    "dicom.ae_title": "Called AE title of the DICOM SCP (C-STORE, C-FIND worklist, C-ECHO).",
    "dicom.host": "Address the DICOM SCP listens on.",
    "dicom.port": "DICOM port (104 is DICOM's well-known port; the systemd unit uses it).",
    "dicom.max_pdu": "Largest PDU the SCP receives, in bytes; 0 = unlimited.",
    "hl7.listen_host": "Address the MLLP order listener binds to.",
    "hl7.listen_port": "MLLP port for ORM^O01 / OML^O21 orders from the LIS.",
    "hl7.lis_host": "Host of the LIS's MLLP receiver, where ORU^R01 results go.",
    "hl7.lis_port": "Port of the LIS's MLLP receiver.",
    "hl7.sending_application": "MSH-3 of outgoing messages and of ACKs.",
    "hl7.sending_facility": "MSH-4 of outgoing messages and of ACKs.",
    "hl7.receiving_application": "MSH-5 of outgoing results.",
    "hl7.receiving_facility": "MSH-6 of outgoing results.",
    "hl7.ack_timeout_seconds": "How long to wait for the LIS's ACK before trying again later.",
    "hl7.retry_initial_seconds": "First retry delay of an undelivered message (doubles each try).",
    "hl7.retry_max_seconds": "Longest retry delay of an undelivered message.",
    "http.host": "Address of the HTTP server (API, review station, health, metrics).",
    "http.port": "HTTP port.",
    "database.url": "",
    "storage.path": "Folder for received instances, quarantine, reports (and SQLite).",
    "cases.stable_seconds": "",
    "analysis.models_dir": "Folder of the model cards and ONNX files; empty: the shipped ones.",
    "analysis.detector": "Model card name of the cell detector.",
    "analysis.classifier": "Model card name of the leukocyte classifier.",
    "analysis.min_wbc_classified": "Fewer classified leukocytes than this flag the case.",
    "analysis.min_sharpness": "Sharpness (Laplacian over fine detail, free of stain contrast "
    "and exposure) at which a field below min_focus still counts as in focus.",
    "analysis.exposure_range": "Mean-brightness range (0-1) a field must fall in to be used.",
    "analysis.max_clipped_fraction": "Largest fraction of clipped pixels a usable field has.",
    "pacs.enabled": "Send SR, annotations and PDF to PACS (C-STORE).",
    "pacs.host": "PACS host.",
    "pacs.port": "PACS DICOM port.",
    "pacs.ae_title": "PACS called AE title.",
    "logging.level": "Log level of lisplugin (libraries stay at WARNING).",
    "config_dir": "Folder of loinc.yaml, reference-ranges.yaml, rules.yaml; empty: the shipped "
    "ones.",
}

MEANINGS.update(
    {
        "dicom.limits.max_frames": "Most frames one instance may declare (more: refused).",
        "hl7.max_connections": "Most MLLP connections at once; more are closed at once.",
        "hl7.max_message_bytes": "Largest MLLP message; a larger one gets one AR, then close.",
        "hl7.allowed_senders": "MSH-3 (or MSH-3^MSH-4) values allowed to send; empty: any.",
        "http.sign_in_failures_per_address": "Failed sign-ins from one address before it is "
        "locked (429) for the lockout window.",
        "http.sign_in_lockout_minutes": "Sign-in lockout window, per user name and address.",
    }
)
#: Every TLS block has the same four keys (``config.TlsSettings``).
_TLS_EDGES = {
    "dicom.tls": "the DICOM SCP (PS3.15 Annex B)",
    "hl7.listen_tls": "the MLLP order listener",
    "hl7.lis_tls": "the connection to the LIS's MLLP receiver",
    "http.tls": "the HTTP server (or use a TLS reverse proxy)",
}
for _edge, _what in _TLS_EDGES.items():
    MEANINGS[f"{_edge}.enabled"] = f"TLS on {_what}."
    MEANINGS[f"{_edge}.cert_file"] = "PEM certificate it presents (a listener needs one)."
    MEANINGS[f"{_edge}.key_file"] = "PEM private key of cert_file."
    MEANINGS[f"{_edge}.ca_file"] = (
        "PEM CA: a listener requires client certificates it signed (mutual TLS); "
        "a client verifies the server with it."
    )


@dataclass(frozen=True)
class SettingDoc:
    key: str
    type: str
    default: Any
    env: str
    meaning: str


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the ``#:`` comment lines just above it in the class body."""
    lines, _start = inspect.getsourcelines(model)
    found: dict[str, str] = {}
    for node in ast.parse("".join(lines)).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: list[str] = []
            index = node.lineno - 2
            while index >= 0 and lines[index].strip().startswith("#:"):
                above.insert(0, lines[index].strip()[2:].strip())
                index -= 1
            if above:
                found[node.target.id] = " ".join(above)
    return found


def _type_name(annotation: Any) -> str:
    text = str(annotation) if get_origin(annotation) else getattr(annotation, "__name__", "")
    return (text or str(annotation)).replace("typing.", "").replace("pathlib.", "")


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        if value.is_absolute():  # the shipped folders: shown as what an empty value means
            return ""
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def settings_docs(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[SettingDoc]:
    """Every leaf setting of ``model``, in declaration order."""
    comments = _comments(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from settings_docs(annotation, f"{key}.")
            continue
        meaning = field.description or comments.get(name) or MEANINGS.get(key, "")
        yield SettingDoc(
            key=key,
            type=_type_name(annotation),
            default=_default(field.get_default(call_default_factory=True)),
            env=ENV_PREFIX + key.upper().replace(".", "__"),
            meaning=meaning,
        )


def render() -> str:
    rows = [
        "# Settings reference",
        "",
        "Generated from `lisplugin/config.py` by `lisplugin settings-reference`; do not edit.",
        "Precedence: built-in default < the YAML file given with `--config` (keys as below,",
        "nested by section) < the environment variable. Lists and pairs are given as JSON in",
        "environment variables (`LISPLUGIN_DICOM__ALLOWED_CALLING_AETS='[\"SCOPE1\"]'`).",
        "",
        "| key | type | default | environment variable | meaning |",
        "|---|---|---|---|---|",
    ]
    for doc in settings_docs():
        default = f"`{doc.default!r}`".replace("|", "\\|")
        type_name = doc.type.replace("|", "\\|")
        rows.append(f"| `{doc.key}` | {type_name} | {default} | `{doc.env}` | {doc.meaning} |")
    return "\n".join(rows) + "\n"


REFERENCE_PATH = REPO_ROOT / "deploy" / "settings.md"
