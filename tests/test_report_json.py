"""The specimen result JSON agrees with its published schema (interfaces/schemas)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np

from lisplugin.core.report import specimen_to_json
from lisplugin.core.types import (
    LEUKOCYTE_CLASSES,
    UNIDENTIFIED,
    Cell,
    FieldQuality,
    FieldResult,
    Flag,
    SpecimenResult,
)

SCHEMA = json.loads(
    (
        Path(__file__).resolve().parent.parent / "interfaces/schemas/specimen-result.schema.json"
    ).read_text()
)


def _specimen() -> SpecimenResult:
    mask = np.zeros((20, 20), bool)
    mask[4:16, 4:16] = True
    probs = dict.fromkeys(LEUKOCYTE_CLASSES, 0.0) | {"neutrophil": 0.9, "monocyte": 0.1}
    cells = (
        Cell(0, "RBC", "RBC", 0.97, (10, 10, 30, 30), mask),
        Cell(0, "WBC", "neutrophil", 0.91, (50, 50, 90, 90), None, probs),
        Cell(0, "PLT", "PLT", 0.6, (5, 100, 12, 107)),
    )
    field = FieldResult(
        0,
        "1.2.3#frame=1",
        640,
        480,
        FieldQuality(120.0, 0.7, 0.01, True),
        cells,
        {"RBC": 1.2, "WBC": 0.9, "PLT": 1.1},
    )
    return SpecimenResult(
        counts={"RBC": 1, "WBC": 1, "PLT": 1},
        differential={"neutrophil": 100.0, UNIDENTIFIED: 0.0},
        class_counts={"neutrophil": 1, UNIDENTIFIED: 0},
        wbc_classified=1,
        flags=(Flag("WBC_FEW", "only 1 leukocyte classified (minimum 100)"),),
        fields=(field,),
        model_versions={"detector": "d1", "classifier": "c1"},
    )


def test_specimen_json_validates_against_the_published_schema() -> None:
    report = specimen_to_json(_specimen())
    jsonschema.validate(report, SCHEMA)
    assert [c["id"] for c in report["cells"]] == [0, 1, 2]
    assert report["needs_review"] is True


def test_schema_rejects_what_the_code_never_writes() -> None:
    report = specimen_to_json(_specimen())
    report["counts"]["RBC"] = -1
    try:
        jsonschema.validate(report, SCHEMA)
    except jsonschema.ValidationError:
        return
    raise AssertionError("a negative count passed the schema")
