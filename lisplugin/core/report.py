"""The specimen result as JSON (API, ``lisplugin analyze --json``, stored with the case)."""

from __future__ import annotations

from typing import Any

from lisplugin.core.geometry import ellipse_outline, mask_outline
from lisplugin.core.types import Cell, FieldResult, ResultValue, SpecimenResult


def _box(box: tuple[float, float, float, float]) -> list[float]:
    return [round(float(v), 1) for v in box]


def cell_to_json(cell_id: int, cell: Cell) -> dict[str, Any]:
    return {
        "id": cell_id,
        "field": cell.field_index,
        "kind": cell.kind,
        "class": cell.label,
        "score": round(float(cell.score), 4),
        "box": _box(cell.box),
        "outline": [
            list(p)
            for p in (
                ellipse_outline(cell.box)
                if cell.mask is None
                else mask_outline(cell.mask, cell.box)
            )
        ],
        "probabilities": None
        if cell.probabilities is None
        else {k: round(float(v), 4) for k, v in cell.probabilities.items()},
    }


def field_to_json(field: FieldResult) -> dict[str, Any]:
    quality = field.quality
    return {
        "index": field.index,
        "source": field.source,
        "width": field.width,
        "height": field.height,
        "quality": {
            "focus": round(quality.focus, 2),
            "exposure": round(quality.exposure, 4),
            "clipped_fraction": round(quality.clipped_fraction, 4),
            "sharpness": None if quality.sharpness is None else round(quality.sharpness, 4),
            "passed": quality.passed,
            "reasons": list(quality.reasons),
        },
        "regressed_counts": None
        if field.regressed_counts is None
        else {k: round(float(v), 2) for k, v in field.regressed_counts.items()},
        "cells": len(field.cells),
        "shared_scale": None if field.shared_scale is None else round(field.shared_scale, 5),
        "stain_reference": None if field.stain_reference is None else list(field.stain_reference),
    }


def specimen_to_json(result: SpecimenResult) -> dict[str, Any]:
    return {
        "counts": {kind: int(n) for kind, n in result.counts.items()},
        "differential": {k: round(float(v), 2) for k, v in result.differential.items()},
        "class_counts": {k: int(v) for k, v in result.class_counts.items()},
        "wbc_classified": int(result.wbc_classified),
        "needs_review": result.needs_review,
        "flags": [{"code": f.code, "text": f.text, "severity": f.severity} for f in result.flags],
        "fields": [field_to_json(f) for f in result.fields],
        "cells": [cell_to_json(i, c) for i, c in enumerate(result.cells)],
        "model_versions": dict(result.model_versions),
    }


def value_to_json(value: ResultValue) -> dict[str, Any]:
    """A reportable value as the LIS gets it: rounded value, units, interval, HL7 0078 flag."""
    return {
        "key": value.key,
        "value": value.value,
        "units": value.units,
        "reference_low": value.reference_low,
        "reference_high": value.reference_high,
        "abnormal_flag": value.abnormal_flag,
    }


def result_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """What lists show of a result, kept apart from its cells so that a list of a thousand
    cases reads a few hundred bytes each instead of every cell outline."""
    if result is None:
        return None
    return {
        "needs_review": bool(result.get("needs_review")),
        "wbc_classified": int(result.get("wbc_classified", 0)),
        "counts": dict(result.get("counts") or {}),
        "differential": dict(result.get("differential") or {}),
        "reasons": [f for f in result.get("flags") or [] if f.get("severity") != "info"],
        "fields": len(result.get("fields") or []),
    }
