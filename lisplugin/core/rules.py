"""A small rules engine: which results go to a technologist for review, and why.

Rules live in the site's ``rules.yaml`` so a laboratory can tune them without code: each has a
``code`` (sent with the flag), a ``description``, a ``severity`` (``info`` is only reported;
``review`` and ``critical`` hold the result for review) and a ``kind`` with its parameters.
Any rule may also carry ``age_years: [from, to)`` and ``sex: F|M`` to apply to some patients
only (an unknown age counts as adult, see :mod:`lisplugin.core.reference`), and
``ack_reason: true``: a reviewer who acknowledges its flag must say why (always so for
``critical`` rules).

Kinds and their parameters (``*`` = required):

* ``min_wbc_classified``: ``minimum`` (default ``AnalysisSettings.min_wbc_classified``).
* ``low_confidence_share``: ``max_share`` (0..1, default 0.1), ``min_probability`` (a cell
  whose top probability is under it is low-confidence; default
  ``AnalysisSettings.min_class_probability``, i.e. the unidentified ones), ``list_max``
  (default 20). Besides the share flag it always lists the low-confidence cells, if any, in an
  ``info`` flag ``<code>_CELLS`` so the reviewer can find them.
* ``field_quality``: ``max_failed_fields`` (default 0).
* ``count_crosscheck``: ``tolerance`` (relative, default ``AnalysisSettings.count_tolerance``),
  ``kinds`` (default RBC, WBC, PLT), ``min_count`` (the regression count below which the
  difference is taken relative to this instead, default 10: 1 vs 2 cells is not 100 % apart).
* ``reference_range``: ``keys`` (result keys, default all ``*_pct`` keys with an interval).
* ``class_present``: ``class``\\*, ``min_count`` (cells, default 1), ``above_pct``.
* ``differential_limit``: ``class``\\*, ``below`` / ``above`` (per 100 leukocytes).
* ``absolute_limit``: ``class``\\*, ``below`` / ``above`` (x10^9/L; needs the WBC count of the
  order, else the rule is silent).
* ``platelet_estimate``: ``below`` / ``above`` (x10^9/L), ``min_rbc_counted`` (default 500),
  ``rbc_count`` (x10^12/L when the reference ranges have no ``rbc_count``, default 4.8),
  ``analyser_tolerance`` (relative, default 0.5): when the order carries the analyser's
  platelet count, a flag ``<code>_XCHECK`` says the estimate is further from it than this.
* ``delta_check``: ``max_change``\\* (class -> percentage points), ``window_hours`` (default 72);
  needs the previous result and both times, else it is silent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, cast, get_args

from lisplugin.config import AnalysisSettings
from lisplugin.core.reference import ASSUMED_AGE_YEARS, ReferenceRanges, normalise_sex
from lisplugin.core.types import (
    CELL_KINDS,
    LEUKOCYTE_CLASSES,
    UNIDENTIFIED,
    Cell,
    FieldResult,
    Flag,
)

Severity = Literal["info", "review", "critical"]
#: Classes a rule may name: the classifier's classes and the unidentified ones.
RULE_CLASSES: tuple[str, ...] = (*LEUKOCYTE_CLASSES, UNIDENTIFIED)


def result_key(cls: str) -> str:
    """Result key (config/loinc.yaml) of a class's share of the leukocytes."""
    return "erythroblast_per_100wbc" if cls == "erythroblast" else f"{cls}_pct"


def report_value(percent: float) -> float:
    """A share as it is reported (one decimal): rules judge the number the LIS will show."""
    return round(percent, 1)


@dataclass(frozen=True)
class PreviousResult:
    """The same patient's earlier verified (F/C) result, for the delta check."""

    analysed_at: datetime
    differential: Mapping[str, float]  # class -> per 100 leukocytes
    case_id: int | None = None  # where people find it
    accession_number: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "accession_number": self.accession_number,
            "analysed_at": self.analysed_at.isoformat(),
            "differential": dict(self.differential),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PreviousResult | None:
        if not data:
            return None
        return cls(
            analysed_at=datetime.fromisoformat(str(data["analysed_at"])),
            differential=dict(data["differential"]),
            case_id=data.get("case_id"),
            accession_number=data.get("accession_number"),
        )


@dataclass(frozen=True)
class PatientContext:
    """What the order and the LIS tell about the patient; every part is optional."""

    age_years: float | None = None
    sex: str | None = None  # HL7 administrative sex; only F and M select sex-specific limits
    wbc_count: float | None = None  # x10^9/L, the analyser's count sent with the order
    platelet_count: float | None = None  # x10^9/L, likewise
    analysed_at: datetime | None = None  # this result's time, for the delta check
    previous: PreviousResult | None = None


class SpecimenLike(Protocol):
    """What the rules read of a specimen result (a ``SpecimenResult`` before its flags)."""

    @property
    def counts(self) -> Mapping[str, int]: ...
    @property
    def differential(self) -> Mapping[str, float]: ...
    @property
    def class_counts(self) -> Mapping[str, int]: ...
    @property
    def wbc_classified(self) -> int: ...
    @property
    def fields(self) -> Sequence[FieldResult]: ...


@dataclass(frozen=True)
class Rule:
    code: str
    description: str
    severity: Severity
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def applies_to(self, patient: PatientContext) -> bool:
        ages = self.params.get("age_years")
        if ages is not None:
            age = ASSUMED_AGE_YEARS if patient.age_years is None else patient.age_years
            if age < ages[0] or (ages[1] is not None and age >= ages[1]):
                return False
        sex = self.params.get("sex")
        return sex is None or normalise_sex(sex) == normalise_sex(patient.sex)

    def flag(self, text: str, severity: Severity | None = None, suffix: str = "") -> Flag:
        return Flag(code=self.code + suffix, text=text, severity=severity or self.severity)


Evaluator = Callable[[Rule, SpecimenLike, PatientContext, ReferenceRanges | None], list[Flag]]


def _pct(specimen: SpecimenLike, cls: str) -> float | None:
    value = specimen.differential.get(cls)
    return None if value is None else report_value(value)


def _limit_text(value: float, rule: Rule, unit: str) -> str | None:
    below, above = rule.params.get("below"), rule.params.get("above")
    if below is not None and value < below:
        return f"{value:g} {unit} < {below:g}"
    if above is not None and value > above:
        return f"{value:g} {unit} > {above:g}"
    return None


def _min_wbc_classified(rule: Rule, s: SpecimenLike, p: PatientContext, r: Any) -> list[Flag]:
    minimum = int(rule.params["minimum"])
    if s.wbc_classified >= minimum:
        return []
    return [rule.flag(f"only {s.wbc_classified} leukocytes classified (minimum {minimum})")]


def _top(cell: Cell) -> tuple[str, float]:
    probabilities = cell.probabilities or {}
    if not probabilities:
        return UNIDENTIFIED, 0.0
    best = max(probabilities, key=lambda k: probabilities[k])
    return best, probabilities[best]


def _low_confidence_share(rule: Rule, s: SpecimenLike, p: PatientContext, r: Any) -> list[Flag]:
    classified = [c for f in s.fields for c in f.cells if c.probabilities is not None]
    low = [
        c
        for c in classified
        if c.label == UNIDENTIFIED or _top(c)[1] < rule.params["min_probability"]
    ]
    if not low:
        return []
    flags = []
    share = len(low) / len(classified)
    if share > rule.params["max_share"]:
        flags.append(
            rule.flag(
                f"{len(low)} of {len(classified)} classified cells ({share:.0%}) are "
                f"low-confidence (limit {rule.params['max_share']:.0%})"
            )
        )
    shown = low[: int(rule.params["list_max"])]
    items = []
    for c in shown:
        best, prob = _top(c)
        x0, y0, x1, y1 = (round(v) for v in c.box)
        items.append(f"field {c.field_index} ({x0},{y0})-({x1},{y1}) {best}? {prob:.2f}")
    more = f"; and {len(low) - len(shown)} more" if len(low) > len(shown) else ""
    flags.append(
        rule.flag("low-confidence cells: " + "; ".join(items) + more, "info", suffix="_CELLS")
    )
    return flags


def _field_quality(rule: Rule, s: SpecimenLike, p: PatientContext, r: Any) -> list[Flag]:
    failed = [f for f in s.fields if not f.quality.passed]
    if len(failed) <= int(rule.params["max_failed_fields"]):
        return []
    details = "; ".join(f"field {f.index}: {', '.join(f.quality.reasons)}" for f in failed)
    return [
        rule.flag(
            f"{len(failed)} of {len(s.fields)} fields failed quality control and were not "
            f"counted ({details})"
        )
    ]


def count_disagreement(detected: float, regressed: float, min_count: float) -> float:
    """How far the detected count is from the regressed one, relative to the regressed count
    (or to ``min_count`` when that is larger, so that a few cells do not make a large share)."""
    return abs(detected - regressed) / max(regressed, min_count)


def _count_crosscheck(rule: Rule, s: SpecimenLike, p: PatientContext, r: Any) -> list[Flag]:
    checked = [f for f in s.fields if f.regressed_counts is not None and f.quality.passed]
    if not checked:
        return []
    tolerance = float(rule.params["tolerance"])
    problems = []
    for kind in rule.params["kinds"]:
        detected = sum(1 for f in checked for c in f.cells if c.kind == kind)
        regressed = sum(float((f.regressed_counts or {}).get(kind, 0.0)) for f in checked)
        apart = count_disagreement(detected, regressed, float(rule.params["min_count"]))
        if apart > tolerance:
            problems.append(
                f"{kind} detected {detected} vs regression {regressed:.1f} ({apart:.0%} apart)"
            )
    if not problems:
        return []
    return [rule.flag(f"cell counts disagree beyond {tolerance:.0%}: " + "; ".join(problems))]


def _reference_range(
    rule: Rule, s: SpecimenLike, p: PatientContext, ranges: ReferenceRanges | None
) -> list[Flag]:
    if ranges is None or not s.differential:
        return []
    keys = rule.params.get("keys") or [result_key(c) for c in RULE_CLASSES]
    outside = []
    for cls in RULE_CLASSES:
        key = result_key(cls)
        value = _pct(s, cls)
        found = ranges.lookup_band(key, p.age_years, p.sex) if key in keys else None
        if value is None or found is None:
            continue
        band, interval = found
        if not interval.contains(value):
            outside.append(f"{cls} {value:g} ({interval}, {band})")
    if not outside:
        return []
    return [rule.flag("outside the reference interval: " + "; ".join(outside))]


def _class_present(rule: Rule, s: SpecimenLike, p: PatientContext, r: Any) -> list[Flag]:
    cls = rule.params["class"]
    count = int(s.class_counts.get(cls, 0))
    value = _pct(s, cls) or 0.0
    above = rule.params.get("above_pct")
    if count < int(rule.params["min_count"]) or (above is not None and value <= above):
        return []
    limit = f" (> {above:g})" if above is not None else ""
    return [rule.flag(f"{cls}: {count} cells, {value:g} per 100 leukocytes{limit}")]


def _differential_limit(rule: Rule, s: SpecimenLike, p: PatientContext, r: Any) -> list[Flag]:
    cls = rule.params["class"]
    value = _pct(s, cls)
    text = None if value is None else _limit_text(value, rule, "%")
    return [rule.flag(f"{cls} {text}")] if text else []


def _absolute_limit(rule: Rule, s: SpecimenLike, p: PatientContext, r: Any) -> list[Flag]:
    cls = rule.params["class"]
    value = s.differential.get(cls)
    if p.wbc_count is None or value is None:
        return []
    absolute = round(value / 100.0 * p.wbc_count, 2)
    text = _limit_text(absolute, rule, "x10^9/L")
    if not text:
        return []
    return [rule.flag(f"{cls} {text} ({value:.1f} % of WBC {p.wbc_count:g} x10^9/L)")]


#: Fewer red cells counted than this give no platelet estimate (about 25 platelets: +/-20 %).
MIN_RBC_FOR_PLATELET_ESTIMATE = 500
#: Red cell count (x10^12/L) assumed when the reference ranges have none for the patient.
TYPICAL_RBC_COUNT = 4.8


def typical_rbc_count(
    ranges: ReferenceRanges | None, patient: PatientContext, default: float = TYPICAL_RBC_COUNT
) -> float:
    """The middle of the patient's red cell interval (x10^12/L), else ``default``."""
    interval = ranges.lookup("rbc_count", patient.age_years, patient.sex) if ranges else None
    if interval is not None and interval.low is not None and interval.high is not None:
        return (interval.low + interval.high) / 2.0
    return default


def platelet_estimate(
    counts: Mapping[str, int],
    rbc_count: float,
    min_rbc_counted: int = MIN_RBC_FOR_PLATELET_ESTIMATE,
) -> float | None:
    """Platelets per red cell x a red cell count (x10^12/L), in x10^9/L; None when too few
    red cells were counted for the ratio to mean anything."""
    rbc, plt = counts.get("RBC", 0), counts.get("PLT", 0)
    if rbc < min_rbc_counted:
        return None
    return float(round(plt / rbc * rbc_count * 1000.0))  # x10^12/L -> x10^9/L


def _platelet_estimate(
    rule: Rule, s: SpecimenLike, p: PatientContext, ranges: ReferenceRanges | None
) -> list[Flag]:
    rbc, plt = s.counts.get("RBC", 0), s.counts.get("PLT", 0)
    rbc_count = typical_rbc_count(ranges, p, float(rule.params["rbc_count"]))
    estimate = platelet_estimate(s.counts, rbc_count, int(rule.params["min_rbc_counted"]))
    if estimate is None:
        return []
    how = f"{plt} platelets per {rbc} red cells at a typical {rbc_count:g} x10^12/L"
    flags = []
    text = _limit_text(estimate, rule, "x10^9/L")
    if text:
        flags.append(rule.flag(f"platelet estimate {text} ({how})"))
    tolerance = float(rule.params["analyser_tolerance"])
    if p.platelet_count is not None:
        apart = count_disagreement(estimate, p.platelet_count, 10.0)
        if apart > tolerance:
            flags.append(
                rule.flag(
                    f"platelet estimate {estimate:g} x10^9/L vs analyser {p.platelet_count:g} "
                    f"x10^9/L ({apart:.0%} apart, limit {tolerance:.0%}; {how})",
                    suffix="_XCHECK",
                )
            )
    return flags


def _delta_check(rule: Rule, s: SpecimenLike, p: PatientContext, r: Any) -> list[Flag]:
    previous = p.previous
    if previous is None or p.analysed_at is None or not s.differential:
        return []
    hours = float(rule.params["window_hours"])
    elapsed = p.analysed_at - previous.analysed_at
    if not timedelta(0) <= elapsed <= timedelta(hours=hours):
        return []
    changes = []
    for cls, limit in rule.params["max_change"].items():
        now, before = s.differential.get(cls), previous.differential.get(cls)
        if now is None or before is None:
            continue
        change = report_value(now) - report_value(float(before))
        if abs(change) > limit:
            changes.append(
                f"{cls} {report_value(float(before)):.1f} -> {report_value(now):.1f} "
                f"({change:+.1f}, limit {limit:g})"
            )
    if not changes:
        return []
    elapsed_h = elapsed.total_seconds() / 3600.0
    where = f" (case {previous.accession_number or previous.case_id})" if previous.case_id else ""
    return [
        rule.flag(
            f"changed since the verified result {elapsed_h:.0f} h ago{where}: " + "; ".join(changes)
        )
    ]


EVALUATORS: dict[str, Evaluator] = {
    "min_wbc_classified": _min_wbc_classified,
    "low_confidence_share": _low_confidence_share,
    "field_quality": _field_quality,
    "count_crosscheck": _count_crosscheck,
    "reference_range": _reference_range,
    "class_present": _class_present,
    "differential_limit": _differential_limit,
    "absolute_limit": _absolute_limit,
    "platelet_estimate": _platelet_estimate,
    "delta_check": _delta_check,
}

#: Parameters each kind takes, with their defaults (None: required or may be absent).
_PARAMS: dict[str, dict[str, Any]] = {
    "min_wbc_classified": {"minimum": None},
    "low_confidence_share": {"max_share": 0.1, "min_probability": None, "list_max": 20},
    "field_quality": {"max_failed_fields": 0},
    "count_crosscheck": {"tolerance": None, "kinds": list(CELL_KINDS), "min_count": 10},
    "reference_range": {"keys": None},
    "class_present": {"class": None, "min_count": 1, "above_pct": None},
    "differential_limit": {"class": None, "below": None, "above": None},
    "absolute_limit": {"class": None, "below": None, "above": None},
    "platelet_estimate": {
        "below": None,
        "above": None,
        "min_rbc_counted": MIN_RBC_FOR_PLATELET_ESTIMATE,
        "rbc_count": TYPICAL_RBC_COUNT,
        "analyser_tolerance": 0.5,
    },
    "delta_check": {"max_change": None, "window_hours": 72},
}
_COMMON = {"age_years", "sex", "ack_reason"}
_ENTRY = {"code", "description", "severity", "kind"}


def _settings_defaults(kind: str, settings: AnalysisSettings) -> dict[str, Any]:
    return {
        "min_wbc_classified": {"minimum": settings.min_wbc_classified},
        "low_confidence_share": {"min_probability": settings.min_class_probability},
        "count_crosscheck": {"tolerance": settings.count_tolerance},
    }.get(kind, {})


def _check(rule: Rule) -> None:
    where = f"rule {rule.code}"
    params = rule.params
    missing = [k for k in ("class", "max_change") if k in params and params[k] is None]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    if "class" in _PARAMS[rule.kind] and params.get("class") not in RULE_CLASSES:
        raise ValueError(f"{where}: 'class' must be one of {', '.join(RULE_CLASSES)}")
    if rule.kind in ("differential_limit", "absolute_limit", "platelet_estimate") and (
        params.get("below") is None and params.get("above") is None
    ):
        raise ValueError(f"{where}: needs 'below' and/or 'above'")
    if rule.kind == "delta_check":
        changes = params.get("max_change")
        if not isinstance(changes, Mapping) or not set(changes) <= set(RULE_CLASSES):
            raise ValueError(f"{where}: 'max_change' maps classes to percentage points")
    if rule.kind == "count_crosscheck" and not set(params["kinds"]) <= set(CELL_KINDS):
        raise ValueError(f"{where}: 'kinds' must be among {', '.join(CELL_KINDS)}")
    ages = params.get("age_years")
    if ages is not None and (not isinstance(ages, list) or len(ages) != 2 or ages[0] is None):
        raise ValueError(f"{where}: age_years is [from, to), to may be null")
    if params.get("sex") is not None and normalise_sex(params["sex"]) is None:
        raise ValueError(f"{where}: sex must be F or M")


def parse_rules(data: Any, settings: AnalysisSettings | None = None) -> list[Rule]:
    """Rules from the parsed ``rules.yaml`` (``{"rules": [...]}``), checked and with defaults.

    Parameters that are also analysis settings (minimum leukocytes, class-probability
    threshold, count tolerance) default to ``settings`` when the YAML leaves them out.
    """
    raw_rules = data.get("rules") if isinstance(data, Mapping) else None
    if not isinstance(raw_rules, list):
        raise ValueError("rules: 'rules' must be a list")
    settings = settings or AnalysisSettings()
    rules: list[Rule] = []
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, Mapping) or not raw.get("code") or raw.get("kind") not in _PARAMS:
            raise ValueError(f"rules[{i}]: needs a 'code' and a 'kind' among {', '.join(_PARAMS)}")
        kind = str(raw["kind"])
        severity = raw.get("severity", "review")
        if severity not in get_args(Severity):
            raise ValueError(f"rule {raw['code']}: severity must be info, review or critical")
        unknown = set(raw) - _ENTRY - _COMMON - set(_PARAMS[kind])
        if unknown:
            raise ValueError(f"rule {raw['code']}: unknown parameters {', '.join(sorted(unknown))}")
        params = {**_PARAMS[kind], **_settings_defaults(kind, settings)}
        params.update({k: v for k, v in raw.items() if k not in _ENTRY})
        rule = Rule(
            code=str(raw["code"]),
            description=str(raw.get("description", "")),
            severity=cast(Severity, severity),
            kind=kind,
            params=params,
        )
        _check(rule)
        rules.append(rule)
    codes = [r.code for r in rules]
    if len(set(codes)) != len(codes):
        raise ValueError("rules: codes must be unique")
    return rules


def reason_required(rules: Sequence[Rule], flag: Flag) -> bool:
    """Whether acknowledging ``flag`` needs a reason: critical, or its rule asks for one."""
    if flag.severity == "critical":
        return True
    rule = next(
        (r for r in rules if flag.code == r.code or flag.code.startswith(f"{r.code}_")), None
    )
    return bool(rule and rule.params.get("ack_reason"))


def evaluate_rules(
    specimen: SpecimenLike,
    rules: Sequence[Rule],
    context: PatientContext | None = None,
    ranges: ReferenceRanges | None = None,
) -> list[Flag]:
    """The flags raised by ``rules`` for this specimen and patient, in rule order."""
    context = context or PatientContext()
    flags: list[Flag] = []
    for rule in rules:
        if rule.applies_to(context):
            flags.extend(EVALUATORS[rule.kind](rule, specimen, context, ranges))
    return flags
