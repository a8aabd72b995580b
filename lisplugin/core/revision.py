"""Expert review of a case result: reclassified cells, and the counts and flags that follow.

Works on the result JSON stored with the case (:mod:`lisplugin.core.report`), since that is
what the reviewer saw; outlines and probabilities are kept as they are, only classes change.
A changed cell keeps the classifier's class as ``original_class``.

Besides the classifier's classes a reviewer may call a detection an ``artefact`` (not a cell:
stain debris, a platelet clump seen as a leukocyte) or a ``smudge`` cell (a leukocyte broken
in smearing, not classifiable). Both leave the leukocyte count: they are not counted as WBC
and are not in the differential's denominator, and ``excluded_counts`` says how many there
are. Everything else is counted by :func:`lisplugin.core.analysis.tally`, the same code that
counts at analysis time, so a reviewed differential has exactly the analysis's semantics.

The rules are evaluated again on the revised result, counting a class a person gave as
certain (probability 1), so ``LOW_CONF`` only counts the cells still nobody has looked at.
``delta_check`` too: the previous result it compares with is kept in the result JSON
(``previous``), so its text follows the current values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from lisplugin.core.analysis import tally
from lisplugin.core.reference import ReferenceRanges
from lisplugin.core.report import specimen_to_json
from lisplugin.core.rules import PatientContext, Rule, evaluate_rules
from lisplugin.core.types import (
    LEUKOCYTE_CLASSES,
    Cell,
    FieldQuality,
    FieldResult,
    SpecimenResult,
)

#: Classes only a reviewer gives; such detections leave the leukocyte count.
REVIEW_ONLY_CLASSES: tuple[str, ...] = ("artefact", "smudge")
#: Every class a reviewer may give a leukocyte detection.
REVIEW_CLASSES: tuple[str, ...] = (*LEUKOCYTE_CLASSES, *REVIEW_ONLY_CLASSES)
#: Top-level keys of the result JSON that follow from the cells' classes.
DERIVED_KEYS = ("counts", "differential", "class_counts", "wbc_classified", "needs_review", "flags")


class RevisionError(ValueError):
    """A reclassification that cannot be made (unknown cell, not a leukocyte, unknown class)."""


def reclassify(result: Mapping[str, Any], cell_id: int, new_class: str) -> dict[str, Any]:
    """A copy of ``result`` in which cell ``cell_id`` has class ``new_class``.

    The derived keys are not updated here: :func:`revise` does that for every change at once.
    """
    if new_class not in REVIEW_CLASSES:
        raise RevisionError(f"unknown class {new_class!r}; one of {', '.join(REVIEW_CLASSES)}")
    revised = copy.deepcopy(dict(result))
    cells = revised.get("cells") or []
    if not 0 <= cell_id < len(cells) or cells[cell_id]["id"] != cell_id:
        raise RevisionError(f"no cell {cell_id} in this result")
    cell = cells[cell_id]
    if cell["kind"] != "WBC":
        raise RevisionError(
            f"cell {cell_id} was detected as {cell['kind']}; only leukocyte detections are "
            "classified"
        )
    cell.setdefault("original_class", cell["class"])
    cell["class"] = new_class
    return revised


def reclassified(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The cells of ``result`` whose class a person changed (their work, which re-analysis
    would discard)."""
    return [
        c for c in result.get("cells") or [] if c.get("original_class", c["class"]) != c["class"]
    ]


def carry_decisions(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """``after`` (a new analysis of the same captures and more) with the reviewer's work on
    ``before``: the classes people gave, matched by capture and box (the models are
    deterministic, so a field analysed again gives the same cells), and the acknowledged flags.
    The technical review is not carried: it approved a smaller result.
    """

    def sources(result: Mapping[str, Any]) -> dict[int, str]:
        return {int(f["index"]): str(f["source"]) for f in result.get("fields") or []}

    old_sources, new_sources = sources(before), sources(after)
    decided = {
        (old_sources[int(c["field"])], tuple(c["box"])): c
        for c in before.get("cells") or []
        if "original_class" in c
    }
    carried = copy.deepcopy(dict(after))
    for cell in carried.get("cells") or []:
        old = decided.get((new_sources[int(cell["field"])], tuple(cell["box"])))
        if old is not None and cell["kind"] == "WBC":
            cell["original_class"] = cell["class"]
            cell["class"] = old["class"]
    review = {k: v for k, v in (before.get("review") or {}).items() if k != "technical_review"}
    if review:
        carried["review"] = review
    return carried


def _cell(data: Mapping[str, Any]) -> Cell:
    """A stored cell as the rules see it: a class a person gave is certain."""
    probabilities = data.get("probabilities")
    if "original_class" in data:
        probabilities = {data["class"]: 1.0}
    return Cell(
        field_index=int(data["field"]),
        kind=data["kind"],
        label=data["class"],
        score=float(data["score"]),
        box=tuple(data["box"]),  # type: ignore[arg-type]
        probabilities=probabilities,
    )


def field_from_json(data: Mapping[str, Any], cells: Sequence[Cell] = ()) -> FieldResult:
    """A stored field (with those of ``cells`` that lie in it) as the core's type."""
    quality = data["quality"]
    return FieldResult(
        index=int(data["index"]),
        source=data["source"],
        width=int(data["width"]),
        height=int(data["height"]),
        quality=FieldQuality(
            focus=float(quality["focus"]),
            exposure=float(quality["exposure"]),
            clipped_fraction=float(quality["clipped_fraction"]),
            passed=bool(quality["passed"]),
            reasons=tuple(quality["reasons"]),
            sharpness=None if quality.get("sharpness") is None else float(quality["sharpness"]),
        ),
        cells=tuple(c for c in cells if c.field_index == int(data["index"])),
        regressed_counts=data.get("regressed_counts"),
        shared_scale=data.get("shared_scale"),
        stain_reference=None
        if data.get("stain_reference") is None
        else tuple(float(v) for v in data["stain_reference"]),
    )


def revise(
    result: Mapping[str, Any],
    rules: Sequence[Rule],
    ranges: ReferenceRanges | None,
    patient: PatientContext | None,
) -> tuple[SpecimenResult, dict[str, Any]]:
    """Counts, differential and flags of a (reclassified) result, as data and as JSON.

    The specimen result is exact (for the reported values); the JSON is ``result`` with its
    derived keys recomputed and ``excluded_counts`` added.
    """
    stored = result.get("cells") or []
    counted = [_cell(c) for c in stored if c["class"] not in REVIEW_ONLY_CLASSES]
    fields = tuple(field_from_json(f, counted) for f in result.get("fields") or [])
    specimen = tally(counted).specimen(fields, result.get("model_versions") or {})
    flags = evaluate_rules(specimen, rules, patient, ranges)
    specimen = replace(specimen, flags=tuple(flags))
    summary = specimen_to_json(replace(specimen, fields=()))
    revised = {**copy.deepcopy(dict(result)), **{k: summary[k] for k in DERIVED_KEYS}}
    revised["excluded_counts"] = {
        cls: sum(1 for c in stored if c["class"] == cls) for cls in REVIEW_ONLY_CLASSES
    }
    return specimen, revised
