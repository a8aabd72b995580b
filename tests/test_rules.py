"""The rules engine: every kind raises its flag when it should and stays quiet otherwise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from lisplugin.config import DEFAULT_CONFIG_DIR, AnalysisSettings
from lisplugin.core.analysis import aggregate
from lisplugin.core.reference import parse_reference_ranges
from lisplugin.core.rules import (
    EVALUATORS,
    PatientContext,
    PreviousResult,
    evaluate_rules,
    parse_rules,
)
from lisplugin.core.types import (
    LEUKOCYTE_CLASSES,
    UNIDENTIFIED,
    Cell,
    CellKind,
    FieldQuality,
    FieldResult,
    Flag,
    SpecimenResult,
)

SETTINGS = AnalysisSettings()
GOOD = FieldQuality(focus=70.0, exposure=0.7, clipped_fraction=0.0, passed=True)
BLURRED = FieldQuality(
    focus=3.0,
    exposure=0.7,
    clipped_fraction=0.0,
    passed=False,
    reasons=("out of focus (3.0 < 20)",),
)
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def load_config(name: str) -> Any:
    return yaml.safe_load((DEFAULT_CONFIG_DIR / name).read_text(encoding="utf-8"))


RANGES = parse_reference_ranges(load_config("reference-ranges.yaml"))


def cell(kind: CellKind, label: str | None = None, top: float = 0.95) -> Cell:
    probs = None
    if kind == "WBC":
        best = label if label in LEUKOCYTE_CLASSES else "neutrophil"
        rest = (1 - top) / (len(LEUKOCYTE_CLASSES) - 1)
        probs = {c: top if c == best else rest for c in LEUKOCYTE_CLASSES}
    return Cell(0, kind, label or kind, 0.9, (10.0, 20.0, 110.0, 120.0), None, probs)


def specimen(
    classes: dict[str, int] | None = None,
    rbc: int = 0,
    plt: int = 0,
    failed_fields: int = 0,
    regressed: dict[str, float] | None = None,
    low: dict[str, int] | None = None,
) -> SpecimenResult:
    """One good field with these leukocytes (``low``: labelled with top probability 0.65)."""
    cells = [cell("WBC", c) for c, n in (classes or {}).items() for _ in range(n)]
    cells += [cell("WBC", c, 0.65) for c, n in (low or {}).items() for _ in range(n)]
    cells += [cell("RBC")] * rbc + [cell("PLT")] * plt
    fields = [FieldResult(0, "f0", 640, 480, GOOD, tuple(cells), regressed)]
    fields += [FieldResult(i + 1, "f", 640, 480, BLURRED, ()) for i in range(failed_fields)]
    return aggregate(fields, SETTINGS, {}, rules=[])


def flags(
    rule: dict[str, Any], spec: SpecimenResult, context: PatientContext | None = None
) -> list[Flag]:
    entry = {"code": "R", "severity": "review", "description": "test", **rule}
    return evaluate_rules(spec, parse_rules({"rules": [entry]}, SETTINGS), context, RANGES)


NORMAL = {"neutrophil": 60, "lymphocyte": 30, "monocyte": 6, "eosinophil": 3, "basophil": 1}


def test_shipped_rules_and_ranges_parse() -> None:
    rules = parse_rules(load_config("rules.yaml"), SETTINGS)
    assert {r.kind for r in rules} == set(EVALUATORS)
    assert len({r.code for r in rules}) == len(rules)
    # a normal adult differential of 100 cells raises nothing with the shipped rules
    spec = specimen(NORMAL, rbc=1000, plt=50, regressed={"RBC": 1000, "WBC": 100, "PLT": 50})
    assert evaluate_rules(spec, rules, PatientContext(age_years=40, sex="F"), RANGES) == []


def test_min_wbc_classified() -> None:
    assert flags({"kind": "min_wbc_classified"}, specimen(NORMAL)) == []
    (flag,) = flags({"kind": "min_wbc_classified"}, specimen({"neutrophil": 99}))
    assert flag == Flag("R", "only 99 leukocytes classified (minimum 100)", "review")
    assert flags({"kind": "min_wbc_classified", "minimum": 50}, specimen({"neutrophil": 60})) == []


def test_low_confidence_share() -> None:
    rule = {"kind": "low_confidence_share", "max_share": 0.1}
    assert flags(rule, specimen(NORMAL)) == []
    # 10 of 100 unidentified: at the limit, only the listing
    (listing,) = flags(rule, specimen({"neutrophil": 90, UNIDENTIFIED: 10}))
    assert listing.code == "R_CELLS"
    assert listing.severity == "info"
    assert listing.text.startswith(
        "low-confidence cells: field 0 (10,20)-(110,120) neutrophil? 0.95"
    )
    assert listing.text.endswith("and 0 more") is False
    share, listing = flags(rule, specimen({"neutrophil": 80, UNIDENTIFIED: 30}))
    assert share.code == "R"
    assert "30 of 110 classified cells (27%)" in share.text
    assert listing.text.endswith("; and 10 more")  # 20 listed by default


def test_low_confidence_counts_labelled_cells_under_min_probability() -> None:
    spec = specimen({"neutrophil": 80}, low={"lymphocyte": 20})
    assert flags({"kind": "low_confidence_share"}, spec) == []  # 0.65 >= 0.6 threshold
    raised = flags({"kind": "low_confidence_share", "min_probability": 0.8}, spec)
    assert [f.code for f in raised] == ["R", "R_CELLS"]
    assert "lymphocyte? 0.65" in raised[1].text


def test_field_quality() -> None:
    assert flags({"kind": "field_quality"}, specimen(NORMAL)) == []
    (flag,) = flags({"kind": "field_quality"}, specimen(NORMAL, failed_fields=2))
    assert flag.text.startswith("2 of 3 fields failed quality control")
    assert "field 1: out of focus (3.0 < 20)" in flag.text
    assert flags({"kind": "field_quality", "max_failed_fields": 2}, specimen(failed_fields=2)) == []


def test_count_crosscheck() -> None:
    rule = {"kind": "count_crosscheck"}
    agree = specimen(NORMAL, rbc=200, plt=10, regressed={"RBC": 180, "WBC": 110, "PLT": 12})
    assert flags(rule, agree) == []
    assert flags(rule, specimen(NORMAL, rbc=200)) == []  # no regression counts: nothing to check
    apart = specimen(NORMAL, rbc=100, plt=2, regressed={"RBC": 200, "WBC": 100, "PLT": 4})
    (flag,) = flags(rule, apart)
    assert "RBC detected 100 vs regression 200.0 (50% apart)" in flag.text
    assert "PLT" not in flag.text  # 2 vs 4 is under min_count 10: 2/10 apart
    assert flags({**rule, "tolerance": 0.6}, apart) == []


def test_reference_range_by_age_and_sex() -> None:
    rule = {"kind": "reference_range", "severity": "info"}
    assert flags(rule, specimen(NORMAL), PatientContext(age_years=40)) == []
    child = {"neutrophil": 30, "lymphocyte": 60, "monocyte": 6, "eosinophil": 3, "basophil": 1}
    (flag,) = flags(rule, specimen(child), PatientContext(age_years=40))
    assert flag.severity == "info"
    assert flag.text == (
        "outside the reference interval: neutrophil 30 (40-75, adult); lymphocyte 60 (20-45, adult)"
    )
    assert flags(rule, specimen(child), PatientContext(age_years=1.5)) == []  # infant band
    # unknown age is looked up as an adult
    assert len(flags(rule, specimen(child), PatientContext())) == 1


def test_reference_lookup_by_age_band_and_sex() -> None:
    assert str(RANGES.lookup("neutrophil_pct", 0.01, None)) == "30-70"  # neonate
    assert str(RANGES.lookup("neutrophil_pct", 1.0, "F")) == "15-50"
    assert str(RANGES.lookup("lymphocyte_pct", 8, "M")) == "25-55"
    assert str(RANGES.lookup("neutrophil_pct", 12, None)) == "40-75"  # bands are [from, to)
    assert str(RANGES.lookup("rbc_count", 40, "M")) == "4.5-5.5"
    assert str(RANGES.lookup("rbc_count", 40, "female")) == "3.8-4.8"
    assert str(RANGES.lookup("rbc_count", 40, "U")) == "3.8-5.5"  # unknown sex: both
    assert str(RANGES.lookup("erythroblast_per_100wbc", 0.01, None)) == "0-10"
    assert RANGES.lookup("no_such_key", 40, None) is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "'bands' must be a non-empty list"),
        ({"bands": [{"name": "a", "intervals": {"x": [5, 1]}}]}, "low 5 is above high 1"),
        ({"bands": [{"name": "a", "intervals": {"x": [1]}}]}, r"\[low, high\]"),
        ({"bands": [{"name": "a", "sex": "X", "intervals": {}}]}, "sex must be F, M"),
        ({"bands": [{"name": "a", "intervals": {"x": ["a", 1]}}]}, "not a number"),
    ],
)
def test_reference_ranges_are_checked(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_reference_ranges(data)


def test_class_present() -> None:
    nrbc = {"kind": "class_present", "class": "erythroblast"}
    assert flags(nrbc, specimen(NORMAL)) == []
    (flag,) = flags(nrbc, specimen({**NORMAL, "erythroblast": 2}))
    assert flag.text == "erythroblast: 2 cells, 2 per 100 leukocytes"
    ig = {"kind": "class_present", "class": "ig", "above_pct": 2.0}
    assert flags(ig, specimen({"neutrophil": 98, "ig": 2})) == []
    (flag,) = flags(ig, specimen({"neutrophil": 97, "ig": 3}))
    assert flag.text == "ig: 3 cells, 3 per 100 leukocytes (> 2)"


def test_class_present_age_filter() -> None:
    rule = {"kind": "class_present", "class": "erythroblast", "age_years": [0.077, None]}
    spec = specimen({**NORMAL, "erythroblast": 5})
    assert flags(rule, spec, PatientContext(age_years=0.01)) == []  # newborn
    assert len(flags(rule, spec, PatientContext(age_years=30))) == 1


def test_differential_limit() -> None:
    rule = {"kind": "differential_limit", "class": "eosinophil", "above": 20}
    assert flags(rule, specimen({"neutrophil": 80, "eosinophil": 20})) == []
    (flag,) = flags(rule, specimen({"neutrophil": 79, "eosinophil": 21}))
    assert flag.text == "eosinophil 21 % > 20"
    low = {"kind": "differential_limit", "class": "neutrophil", "below": 10}
    (flag,) = flags(low, specimen({"neutrophil": 9, "lymphocyte": 91}))
    assert flag.text == "neutrophil 9 % < 10"
    assert flags(low, specimen()) == []  # no leukocytes: nothing to judge


def test_absolute_limit_needs_the_wbc_count() -> None:
    rule = {"kind": "absolute_limit", "class": "neutrophil", "below": 1.0, "above": 20.0}
    spec = specimen(NORMAL)  # 60 % neutrophils
    assert flags(rule, spec) == []  # no WBC count with the order
    assert flags(rule, spec, PatientContext(wbc_count=7.0)) == []
    (flag,) = flags(rule, spec, PatientContext(wbc_count=1.5))
    assert flag.text == "neutrophil 0.9 x10^9/L < 1 (60.0 % of WBC 1.5 x10^9/L)"
    (flag,) = flags(rule, spec, PatientContext(wbc_count=40.0))
    assert flag.text.startswith("neutrophil 24 x10^9/L > 20")


def test_absolute_limit_by_age() -> None:
    rule = {"kind": "absolute_limit", "class": "lymphocyte", "above": 5.0, "age_years": [12, None]}
    spec = specimen({"neutrophil": 40, "lymphocyte": 60})  # 6.0 at WBC 10
    assert len(flags(rule, spec, PatientContext(age_years=30, wbc_count=10))) == 1
    assert flags(rule, spec, PatientContext(age_years=5, wbc_count=10)) == []


def test_platelet_estimate() -> None:
    rule = {"kind": "platelet_estimate", "below": 100, "above": 1000}
    # 1 platelet per 20 red cells x 4.65 (middle of 3.8-5.5) = 232 x10^9/L
    assert flags(rule, specimen(NORMAL, rbc=1000, plt=50), PatientContext(age_years=40)) == []
    (flag,) = flags(rule, specimen(NORMAL, rbc=1000, plt=12), PatientContext(age_years=40))
    assert flag.text.startswith("platelet estimate 56 x10^9/L < 100 (12 platelets per 1000")
    # a man's typical red cell count is higher: 10/1000 x 5.0 = 50
    (flag,) = flags(rule, specimen(NORMAL, rbc=1000, plt=10), PatientContext(age_years=40, sex="M"))
    assert flag.text.startswith("platelet estimate 50 x10^9/L")
    assert flags(rule, specimen(NORMAL, rbc=400, plt=1)) == []  # too few red cells to judge


def test_platelet_estimate_is_cross_checked_with_the_analyser_count() -> None:
    rule = {"kind": "platelet_estimate", "below": 100, "above": 1000}
    spec = specimen(NORMAL, rbc=1000, plt=50)  # 233 x10^9/L, within the limits
    assert flags(rule, spec, PatientContext(age_years=40, platelet_count=250.0)) == []
    (flag,) = flags(rule, spec, PatientContext(age_years=40, platelet_count=90.0))
    assert flag.code == "R_XCHECK"
    assert flag.text.startswith("platelet estimate 233 x10^9/L vs analyser 90 x10^9/L (159% apart")


def test_delta_check_within_and_outside_72_hours() -> None:
    rule = {"kind": "delta_check", "max_change": {"neutrophil": 20, "lymphocyte": 20}}
    spec = specimen(NORMAL)  # 60 % neutrophils, 30 % lymphocytes
    before = {"neutrophil": 35.0, "lymphocyte": 55.0}
    recent = PatientContext(
        analysed_at=NOW, previous=PreviousResult(NOW - timedelta(hours=24), before)
    )
    (flag,) = flags(rule, spec, recent)
    assert flag.text == (
        "changed since the verified result 24 h ago: neutrophil 35.0 -> 60.0 (+25.0, limit 20); "
        "lymphocyte 55.0 -> 30.0 (-25.0, limit 20)"
    )
    old = PatientContext(
        analysed_at=NOW, previous=PreviousResult(NOW - timedelta(hours=73), before)
    )
    assert flags(rule, spec, old) == []
    close = PatientContext(
        analysed_at=NOW, previous=PreviousResult(NOW - timedelta(hours=2), {"neutrophil": 45.0})
    )
    assert flags(rule, spec, close) == []  # 15 points: within the limit
    assert flags(rule, spec, PatientContext(previous=recent.previous)) == []  # no time for this one


def test_rule_sex_filter_and_severity() -> None:
    rule = {"kind": "min_wbc_classified", "sex": "F", "severity": "critical"}
    (flag,) = flags(rule, specimen({"neutrophil": 1}), PatientContext(sex="F"))
    assert flag.severity == "critical"
    assert flags(rule, specimen({"neutrophil": 1}), PatientContext(sex="M")) == []


def test_info_flags_do_not_hold_the_result() -> None:
    spec = specimen({"neutrophil": 90, UNIDENTIFIED: 5})
    raised = flags({"kind": "low_confidence_share"}, spec)
    assert [f.severity for f in raised] == ["info"]
    held = aggregate(
        list(spec.fields),
        SETTINGS,
        {},
        parse_rules({"rules": [{"code": "L", "kind": "low_confidence_share"}]}, SETTINGS),
    )
    assert held.flags and not held.needs_review


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"code": "X", "kind": "nonsense"}, "needs a 'code' and a 'kind'"),
        ({"kind": "field_quality"}, "needs a 'code'"),
        ({"code": "X", "kind": "field_quality", "severity": "urgent"}, "severity must be"),
        ({"code": "X", "kind": "field_quality", "limit": 3}, "unknown parameters limit"),
        ({"code": "X", "kind": "class_present"}, "missing class"),
        ({"code": "X", "kind": "class_present", "class": "blast"}, "'class' must be one of"),
        ({"code": "X", "kind": "differential_limit", "class": "ig"}, "'below' and/or 'above'"),
        ({"code": "X", "kind": "delta_check", "max_change": {"blast": 5}}, "max_change"),
        ({"code": "X", "kind": "count_crosscheck", "kinds": ["RBC", "EOS"]}, "'kinds' must be"),
        ({"code": "X", "kind": "field_quality", "age_years": [1]}, "age_years is"),
        ({"code": "X", "kind": "field_quality", "sex": "Q"}, "sex must be F or M"),
    ],
)
def test_bad_rules_are_refused(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rules({"rules": [entry]}, SETTINGS)


def test_rule_codes_are_unique_and_defaults_follow_settings() -> None:
    twice = {"rules": [{"code": "A", "kind": "field_quality"}] * 2}
    with pytest.raises(ValueError, match="unique"):
        parse_rules(twice)
    (rule,) = parse_rules(
        {"rules": [{"code": "A", "kind": "count_crosscheck"}]},
        AnalysisSettings(count_tolerance=0.5),
    )
    assert rule.params["tolerance"] == 0.5
