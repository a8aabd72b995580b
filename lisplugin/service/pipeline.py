"""One analysis path for the daemon and ``lisplugin analyze``: the same fields give the same
result values, whichever way they came in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pydicom
from PIL import Image, UnidentifiedImageError

from lisplugin.config import Settings
from lisplugin.core.analysis import analyse_fields, result_values
from lisplugin.core.reference import ReferenceRanges, parse_reference_ranges
from lisplugin.core.report import specimen_to_json
from lisplugin.core.rules import PatientContext, PreviousResult, Rule, parse_rules
from lisplugin.core.slide import TiledImage
from lisplugin.core.types import (
    CellDetector,
    Field,
    LeukocyteClassifier,
    ResultValue,
    SpecimenResult,
)
from lisplugin.dicom.decode import (
    _is_wsi,
    analysable,
    field_from_image_file,
    fields_from_dataset,
)
from lisplugin.dicom.frames import whole_slide_levels
from lisplugin.service.models import load_models

__all__ = ["ANALYSER_KEY", "Pipeline", "PreviousResult", "read_fields"]

#: Key in a case's order (``Case.order``) of the counts the analyser sent in a result message
#: of its own (``lisplugin.service.analyser``); an order update keeps them.
ANALYSER_KEY = "analyser_counts"


def age_in_years(birth_date: str, on: date) -> float | None:
    """Age from a DICOM/HL7 date (YYYYMMDD or ISO); None when unknown."""
    text = birth_date.replace("-", "")[:8]
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        born = date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    return (on - born).days / 365.25


def patient_context(
    patient: dict[str, Any],
    order: dict[str, Any] | None,
    at: datetime,
    previous: PreviousResult | None = None,
) -> PatientContext:
    """What the rules and values know of the patient: age and sex, the analyser's counts (from
    its own result message, else those the order carried), and the earlier result to compare
    with."""
    order = order or {}
    analyser = order.get(ANALYSER_KEY) or {}

    def count(key: str) -> Any:
        return analyser[key] if analyser.get(key) is not None else order.get(key)

    return PatientContext(
        age_years=age_in_years(str(patient.get("birth_date") or ""), at.date()),
        sex=str(patient.get("sex") or "") or None,
        wbc_count=count("wbc_count"),
        platelet_count=count("platelet_count"),
        analysed_at=at,
        previous=previous,
    )


@dataclass(frozen=True)
class Pipeline:
    settings: Settings
    detector: CellDetector
    classifier: LeukocyteClassifier
    rules: Sequence[Rule]
    ranges: ReferenceRanges
    loinc_map: dict[str, Any]

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        detector, classifier = load_models(settings)
        return cls(
            settings=settings,
            detector=detector,
            classifier=classifier,
            rules=parse_rules(settings.load_yaml("rules.yaml"), settings.analysis),
            ranges=parse_reference_ranges(settings.load_yaml("reference-ranges.yaml")),
            loinc_map=settings.load_yaml("loinc.yaml"),
        )

    def analyse(
        self,
        fields: Sequence[Field | TiledImage],
        patient: dict[str, Any],
        previous: PreviousResult | None,
        order: dict[str, Any] | None = None,
    ) -> SpecimenResult:
        return analyse_fields(
            fields,
            self.detector,
            self.classifier,
            self.settings.analysis,
            self.rules,
            self.ranges,
            patient_context(patient, order, datetime.now(UTC), previous),
        )

    def values(
        self,
        result: SpecimenResult,
        patient: dict[str, Any],
        order: dict[str, Any] | None = None,
    ) -> list[ResultValue]:
        return result_values(
            result, self.ranges, patient_context(patient, order, datetime.now(UTC))
        )

    @staticmethod
    def to_json(result: SpecimenResult) -> dict[str, Any]:
        return specimen_to_json(result)


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def _files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def read_fields(paths: Iterable[Path]) -> list[Field | TiledImage]:
    """Fields of every image file and analysable DICOM instance in ``paths`` (folders walked,
    sorted): images first in path order, then the DICOM frames in path order, then each whole
    slide as one tiled level, read tile by tile during the analysis (never decoded whole).
    """
    images: list[Field] = []
    datasets = []
    dicom_paths = []
    for path in _files(paths):
        if _is_dicom(path):
            datasets.append(pydicom.dcmread(path, defer_size="1 MB"))
            dicom_paths.append(path)
            continue
        try:
            with Image.open(path):
                pass
        except UnidentifiedImageError:
            continue  # not an image: folders may hold other files
        images.append(field_from_image_file(path))
    fields = [f for ds in analysable(datasets) if not _is_wsi(ds) for f in fields_from_dataset(ds)]
    return [*images, *fields, *whole_slide_levels(dicom_paths, datasets)]
