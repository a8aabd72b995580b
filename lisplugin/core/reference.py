"""Reference intervals by age band and sex, read from the site's ``reference-ranges.yaml``.

Intervals are keyed like the result values (``neutrophil_pct``, ``rbc_count``...), so the same
table feeds the HL7 reference range (OBX-7), the abnormal flag and the ``reference_range`` rule.
Bands are tried in file order and, per key, the first band that matches the patient and defines
that key wins: a sex-specific band can override a few keys and leave the rest to a later
band for both sexes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: An unknown age is looked up as an adult's: most patients are adults, and the adult smear
#: review limits are the stricter ones.
ASSUMED_AGE_YEARS = 30.0


@dataclass(frozen=True)
class Interval:
    low: float | None
    high: float | None

    def contains(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        low = "" if self.low is None else f"{self.low:g}"
        high = "" if self.high is None else f"{self.high:g}"
        return f"{low}-{high}"


@dataclass(frozen=True)
class Band:
    """Intervals for patients aged ``min_age_years`` up to (not including) ``max_age_years``."""

    name: str
    min_age_years: float
    max_age_years: float | None
    sex: str | None  # "F" or "M"; None for both
    intervals: Mapping[str, Interval]

    def matches(self, age_years: float, sex: str | None) -> bool:
        in_age = self.min_age_years <= age_years and (
            self.max_age_years is None or age_years < self.max_age_years
        )
        return in_age and (self.sex is None or self.sex == sex)


@dataclass(frozen=True)
class ReferenceRanges:
    bands: tuple[Band, ...]

    def lookup(self, key: str, age_years: float | None, sex: str | None) -> Interval | None:
        """The interval of ``key`` for this patient; None when no band gives one."""
        found = self.lookup_band(key, age_years, sex)
        return found[1] if found else None

    def lookup_band(
        self, key: str, age_years: float | None, sex: str | None
    ) -> tuple[str, Interval] | None:
        """The name of the band that gives ``key`` for this patient, and its interval."""
        age = ASSUMED_AGE_YEARS if age_years is None else age_years
        for band in self.bands:
            if key in band.intervals and band.matches(age, normalise_sex(sex)):
                return band.name, band.intervals[key]
        return None


def normalise_sex(sex: str | None) -> str | None:
    """HL7 administrative sex (table 0001) to "F", "M" or None (unknown, other, ambiguous)."""
    value = (sex or "").strip().upper()[:1]
    return value if value in ("F", "M") else None


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: {value!r} is not a number")
    return float(value)


def _interval(value: Any, where: str) -> Interval:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{where}: an interval is [low, high] (null for open)")
    interval = Interval(_number(value[0], where), _number(value[1], where))
    if interval.low is not None and interval.high is not None and interval.low > interval.high:
        raise ValueError(f"{where}: low {interval.low:g} is above high {interval.high:g}")
    return interval


def parse_reference_ranges(data: Mapping[str, Any]) -> ReferenceRanges:
    """Build the table from the parsed YAML (``{"bands": [...]}``), checking every entry."""
    raw_bands = data.get("bands") if isinstance(data, Mapping) else None
    if not isinstance(raw_bands, list) or not raw_bands:
        raise ValueError("reference ranges: 'bands' must be a non-empty list")
    bands = []
    for i, raw in enumerate(raw_bands):
        name = str(raw.get("name", f"band {i}"))
        ages = raw.get("age_years", [0, None])
        if not isinstance(ages, list) or len(ages) != 2:
            raise ValueError(f"reference ranges, {name}: age_years is [min, max)")
        sex = raw.get("sex")
        if sex is not None and normalise_sex(sex) is None:
            raise ValueError(f"reference ranges, {name}: sex must be F, M or absent")
        intervals = raw.get("intervals")
        if not isinstance(intervals, Mapping):
            raise ValueError(f"reference ranges, {name}: 'intervals' must be a mapping")
        bands.append(
            Band(
                name=name,
                min_age_years=_number(ages[0], name) or 0.0,
                max_age_years=_number(ages[1], name),
                sex=normalise_sex(sex),
                intervals={
                    str(k): _interval(v, f"reference ranges, {name}, {k}")
                    for k, v in intervals.items()
                },
            )
        )
    return ReferenceRanges(tuple(bands))
