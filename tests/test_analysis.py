"""Fields to a specimen result: labelling, the differential's arithmetic, result values, flags.

The detector and classifier here are test doubles implementing the core's protocols; the
shipped ONNX models are exercised in test_synthetic.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import yaml

from lisplugin.config import DEFAULT_CONFIG_DIR, AnalysisSettings
from lisplugin.core.analysis import (
    DIFFERENTIAL_CLASSES,
    aggregate,
    analyse_field,
    analyse_fields,
    detect_folder,
    leukocyte_crops,
    median_rbc_diameter,
    result_values,
)
from lisplugin.core.crops import (
    PBC_CROP_PX,
    crop_nucleus,
    in_view,
    pbc_scale,
    shared_nucleus,
    shared_scale,
    white_point,
)
from lisplugin.core.reference import parse_reference_ranges
from lisplugin.core.report import field_to_json, specimen_to_json
from lisplugin.core.rules import PatientContext, parse_rules
from lisplugin.core.types import (
    LEUKOCYTE_CLASSES,
    UNIDENTIFIED,
    Cell,
    CellKind,
    Detection,
    Field,
    FieldDetections,
    FieldQuality,
    FieldResult,
)
from lisplugin.synthetic import synthetic_field

SETTINGS = AnalysisSettings()
CLASSES = LEUKOCYTE_CLASSES
GOOD = FieldQuality(focus=70.0, exposure=0.7, clipped_fraction=0.0, passed=True)


class ListDetector:
    """Returns fixed detections and regression counts, and remembers how often it ran."""

    version = "test-detector-1"

    def __init__(self, detections: list[Detection], counts: dict[str, float] | None = None):
        self.detections = detections
        self.counts = counts
        self.calls = 0

    def detect(self, image: np.ndarray, pixel_spacing_um: float | None = None) -> FieldDetections:
        self.calls += 1
        return FieldDetections(tuple(self.detections), self.counts)


class RowClassifier:
    """Gives the next prepared probability rows; records every batch of crops it saw."""

    version = "test-classifier-1"
    classes: Sequence[str] = CLASSES

    def __init__(self, rows: list[list[float]]):
        self.rows = [np.asarray(r, dtype=float) for r in rows]
        self.batches: list[list[np.ndarray]] = []
        self.nuclei: list[np.ndarray | None] = []

    def classify(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> np.ndarray:
        self.batches.append(list(crops))
        self.nuclei.append(nucleus)
        out, self.rows = self.rows[: len(crops)], self.rows[len(crops) :]
        return np.stack(out)


def one_hot(cls: str, p: float = 0.9) -> list[float]:
    rest = (1.0 - p) / (len(CLASSES) - 1)
    return [p if c == cls else rest for c in CLASSES]


def wbc(field_index: int, label: str, top: float = 0.9) -> Cell:
    probs = dict(
        zip(CLASSES, one_hot(label if label != UNIDENTIFIED else "neutrophil", top), strict=True)
    )
    return Cell(field_index, "WBC", label, 0.9, (10.0, 10.0, 150.0, 150.0), None, probs)


def other(field_index: int, kind: CellKind) -> Cell:
    return Cell(field_index, kind, kind, 0.9, (0.0, 0.0, 100.0, 100.0))


def field_result(
    index: int, cells: list[Cell], counts: dict[str, float] | None = None
) -> FieldResult:
    return FieldResult(index, f"f{index}", 640, 480, GOOD, tuple(cells), counts)


@pytest.fixture(scope="module")
def smear() -> tuple[np.ndarray, list]:
    return synthetic_field(5, wbc_types=["neutrophil", "lymphocyte"])


def detections_of(truth: list) -> list[Detection]:
    return [Detection(kind, 0.9, box) for kind, box in truth]


def test_aggregate_arithmetic() -> None:
    """6 neutrophils, 2 lymphocytes, 1 unidentified: 9 leukocytes; NRBC and platelet per 100."""
    cells = [wbc(0, "neutrophil")] * 4 + [wbc(0, "lymphocyte")] * 2 + [other(0, "RBC")] * 10
    more = [wbc(1, "neutrophil")] * 2 + [wbc(1, UNIDENTIFIED, 0.4)]
    more += [wbc(1, "erythroblast"), wbc(1, "platelet"), other(1, "PLT")]
    specimen = aggregate(
        [field_result(0, cells), field_result(1, more)], SETTINGS, {"detector": "d1"}, rules=[]
    )
    assert specimen.counts == {"RBC": 10, "WBC": 11, "PLT": 1}
    assert specimen.wbc_classified == 9
    assert specimen.class_counts["neutrophil"] == 6
    assert specimen.class_counts[UNIDENTIFIED] == 1
    assert specimen.differential["neutrophil"] == pytest.approx(600 / 9)
    assert specimen.differential["lymphocyte"] == pytest.approx(200 / 9)
    assert specimen.differential[UNIDENTIFIED] == pytest.approx(100 / 9)
    # not leukocytes: per 100 leukocytes, outside the 100 %
    assert specimen.differential["erythroblast"] == pytest.approx(100 / 9)
    assert specimen.differential["platelet"] == pytest.approx(100 / 9)
    assert sum(specimen.differential[c] for c in DIFFERENTIAL_CLASSES) == pytest.approx(100.0)
    assert specimen.model_versions == {"detector": "d1"}
    assert specimen.flags == ()
    assert len(specimen.cells) == len(cells) + len(more)


def test_no_leukocytes_gives_empty_differential() -> None:
    specimen = aggregate([field_result(0, [other(0, "RBC")])], SETTINGS, {}, rules=[])
    assert specimen.wbc_classified == 0
    assert specimen.differential == {}
    values = {v.key: v.value for v in result_values(specimen)}
    assert values == {
        "wbc_classified": 0,
        "rbc_counted": 1,
        "wbc_counted": 0,
        "plt_counted": 0,
        "plt_per_field": 0,
    }


def test_result_values_match_the_loinc_map() -> None:
    loinc = yaml.safe_load((DEFAULT_CONFIG_DIR / "loinc.yaml").read_text(encoding="utf-8"))
    cells = [wbc(0, c) for c in (*CLASSES, UNIDENTIFIED)] + [other(0, "RBC")] * 500
    specimen = aggregate([field_result(0, cells)], SETTINGS, {}, rules=[])
    values = result_values(specimen, patient=PatientContext(wbc_count=8.0))
    assert [v.key for v in values] == list(loinc["results"])
    for value in values:
        assert value.units == loinc["results"][value.key]["units"], value.key


def test_result_values_rounded_with_reference_intervals() -> None:
    ranges = parse_reference_ranges(
        yaml.safe_load((DEFAULT_CONFIG_DIR / "reference-ranges.yaml").read_text(encoding="utf-8"))
    )
    cells = [wbc(0, "neutrophil")] * 2 + [wbc(0, "lymphocyte")]
    specimen = aggregate([field_result(0, cells)], SETTINGS, {}, rules=[])
    adult = {v.key: v for v in result_values(specimen, ranges, PatientContext(age_years=40))}
    assert adult["neutrophil_pct"].value == 66.7
    assert (adult["neutrophil_pct"].reference_low, adult["neutrophil_pct"].reference_high) == (
        40,
        75,
    )
    assert adult["neutrophil_pct"].abnormal_flag == "N"
    assert adult["lymphocyte_pct"].value == 33.3
    assert adult["monocyte_pct"].abnormal_flag == "L"  # 0 % against 2-10 %
    assert adult["wbc_classified"].abnormal_flag == ""
    infant = {v.key: v for v in result_values(specimen, ranges, PatientContext(age_years=1))}
    assert infant["neutrophil_pct"].abnormal_flag == "H"  # 15-50 % under 2 years


def test_analyse_field_labels_and_batches(smear: tuple[np.ndarray, list]) -> None:
    image, truth = smear
    detector = ListDetector(detections_of(truth), {"RBC": 20.0, "WBC": 2.0, "PLT": 1.0})
    classifier = RowClassifier([one_hot("neutrophil", 0.95), one_hot("lymphocyte", 0.55)])
    result = analyse_field(3, Field(image, "syn#3"), detector, classifier, SETTINGS)
    assert result.quality.passed
    assert (result.index, result.source, result.width, result.height) == (3, "syn#3", 640, 480)
    assert len(classifier.batches) == 1  # every leukocyte of the field in one batch
    assert [c.shape for c in classifier.batches[0]] == [(PBC_CROP_PX, PBC_CROP_PX, 3)] * 2
    wbcs = [c for c in result.cells if c.kind == "WBC"]
    assert [c.label for c in wbcs] == ["neutrophil", UNIDENTIFIED]  # 0.55 < 0.6
    assert wbcs[1].probabilities is not None
    assert wbcs[1].probabilities["lymphocyte"] == pytest.approx(0.55)
    assert all(
        c.label == c.kind and c.probabilities is None for c in result.cells if c.kind != "WBC"
    )
    assert len(result.cells) == len(truth)
    assert all(c.field_index == 3 for c in result.cells)
    assert result.regressed_counts == {"RBC": 20.0, "WBC": 2.0, "PLT": 1.0}


def test_a_slide_window_is_quality_checked_on_its_own_block(smear: tuple[np.ndarray, list]) -> None:
    """A window of a whole slide is judged on the block it owns, not on the margins it shares
    with its neighbours: a good block beside dark margins passes, the same window without an
    owned block (mostly dark) fails. (The margins are dark grey, not black: black touching the
    image's edge would be taken for the outside of a circular field stop.)"""
    image, truth = smear
    pad = 480
    window = np.full((480 + 2 * pad, 640 + 2 * pad, 3), 41, np.uint8)
    window[pad : pad + 480, pad : pad + 640] = image
    shifted = [
        Detection(kind, 0.9, (b[0] + pad, b[1] + pad, b[2] + pad, b[3] + pad)) for kind, b in truth
    ]
    wbcs = sum(1 for kind, _ in truth if kind == "WBC")
    classifier = RowClassifier([one_hot("neutrophil", 0.95)] * wbcs)
    block = (float(pad), float(pad), float(pad + 640), float(pad + 480))
    owned = analyse_field(0, Field(window, "w"), ListDetector(shifted), classifier, SETTINGS, block)
    assert owned.quality.passed and len(owned.cells) == len(truth)
    whole = analyse_field(0, Field(window, "w"), ListDetector(shifted), RowClassifier([]), SETTINGS)
    assert not whole.quality.passed and whole.cells == ()


def test_failed_field_is_not_analysed(smear: tuple[np.ndarray, list]) -> None:
    image, truth = smear
    detector = ListDetector(detections_of(truth))
    dark = (image * 0.2).astype(np.uint8)
    result = analyse_field(0, Field(dark, "dark"), detector, RowClassifier([]), SETTINGS)
    assert not result.quality.passed
    assert result.cells == ()
    assert result.regressed_counts is None
    assert detector.calls == 1  # once: its red cells give the scale that focus is measured at


def test_focus_is_judged_at_the_fields_own_magnification(smear: tuple[np.ndarray, list]) -> None:
    """The same smear at twice the magnification (no Pixel Spacing) is as sharp as before: its
    red cells, twice as large, set the scale that quality control measures focus at."""
    from PIL import Image

    image, truth = smear
    h, w = image.shape[:2]
    big = np.asarray(Image.fromarray(image).resize((2 * w, 2 * h), Image.Resampling.BICUBIC))
    scaled_truth = [(kind, tuple(2 * v for v in box)) for kind, box in truth]
    rows = [[1.0] + [0.0] * (len(CLASSES) - 1)] * 2
    detector = ListDetector(detections_of(scaled_truth))
    result = analyse_field(0, Field(big, "x2"), detector, RowClassifier(rows), SETTINGS)
    assert result.quality.passed, result.quality.reasons
    native = analyse_field(
        0, Field(image, "x1"), ListDetector(detections_of(truth)), RowClassifier(rows), SETTINGS
    )
    assert result.quality.focus == pytest.approx(native.quality.focus, rel=0.35)


def test_field_without_leukocytes_skips_the_classifier(smear: tuple[np.ndarray, list]) -> None:
    image, truth = smear
    rbcs = [d for d in detections_of(truth) if d.kind == "RBC"]
    classifier = RowClassifier([])
    result = analyse_field(0, Field(image, "x"), ListDetector(rbcs), classifier, SETTINGS)
    assert classifier.batches == []
    assert len(result.cells) == len(rbcs)


def test_unknown_classifier_class_is_refused(smear: tuple[np.ndarray, list]) -> None:
    classifier = RowClassifier([])
    classifier.classes = ("neutrophil", "blast")
    with pytest.raises(ValueError, match="blast"):
        analyse_field(0, Field(smear[0], "x"), ListDetector([]), classifier, SETTINGS)


def test_median_rbc_diameter_ignores_cells_cut_by_the_edge() -> None:
    whole = [Detection("RBC", 0.9, (100.0 + i, 100.0, 200.0 + i, 190.0)) for i in range(3)]
    cut = [
        Detection("RBC", 0.9, (0.0, 10.0, 40.0, 110.0)),
        Detection("WBC", 0.9, (300, 300, 460, 460)),
    ]
    assert median_rbc_diameter(whole + cut, 640, 480) == 100.0
    assert median_rbc_diameter(whole[:2] + cut, 640, 480) is None


def test_analyse_fields_flags_and_versions(smear: tuple[np.ndarray, list]) -> None:
    image, truth = smear
    rules = parse_rules(
        {
            "rules": [
                {"code": "FEW", "kind": "min_wbc_classified", "severity": "review"},
                {"code": "QC", "kind": "field_quality", "severity": "review"},
            ]
        },
        SETTINGS,
    )
    fields = [Field(image, "a"), Field((image * 0.2).astype(np.uint8), "b")]
    classifier = RowClassifier([one_hot("monocyte")] * 2)
    specimen = analyse_fields(
        fields, ListDetector(detections_of(truth)), classifier, SETTINGS, rules
    )
    assert specimen.model_versions == {
        "detector": "test-detector-1",
        "classifier": "test-classifier-1",
    }
    assert specimen.differential["monocyte"] == 100.0
    assert [f.code for f in specimen.flags] == ["FEW", "QC"]
    assert "only 2 leukocytes classified (minimum 100)" in specimen.flags[0].text
    assert "1 of 2 fields failed" in specimen.flags[1].text
    assert "under-exposed (mean grey 0.15 < 0.25)" in specimen.flags[1].text
    assert specimen.needs_review


class QueueDetector:
    """Gives each call the next field's detections (analysis detects a specimen's fields in
    order), so that every field can show its own leukocyte."""

    version = "test-detector-queue"

    def __init__(self, per_field: list[list[Detection]]):
        self.per_field = list(per_field)

    def detect(self, image: np.ndarray, pixel_spacing_um: float | None = None) -> FieldDetections:
        return FieldDetections(tuple(self.per_field.pop(0)))


def _crop_of_one_cell(diameter: int) -> tuple[np.ndarray, Detection]:
    """A 240 px crop of a single dark leukocyte of ``diameter`` px, no red cells around it."""
    image = np.full((240, 240, 3), 230, np.uint8)
    yy, xx = np.mgrid[:240, :240]
    image[(yy - 120) ** 2 + (xx - 120) ** 2 <= (diameter / 2) ** 2] = (90, 60, 140)
    half = diameter / 2
    return image, Detection("WBC", 0.9, (120 - half, 120 - half, 120 + half, 120 + half))


def _dark_width(crop: np.ndarray) -> int:
    return int((crop[PBC_CROP_PX // 2, :, 0] < 160).sum())


def test_fields_without_a_scale_share_the_specimens(smear: tuple[np.ndarray, list]) -> None:
    diameters = [40, 40, 60, 60, 80, 80]  # lymphocyte-, neutrophil-, monocyte-sized
    crops = [_crop_of_one_cell(d) for d in diameters]
    fields: list[Field] = [Field(image, f"crop{i}") for i, (image, _) in enumerate(crops)]
    smear_image, truth = smear  # a field with its own red cells keeps its own scale
    fields.append(Field(smear_image, "smear"))
    detector = QueueDetector([[d] for _, d in crops] + [detections_of(truth)])
    wbcs_in_smear = sum(1 for kind, _ in truth if kind == "WBC")
    classifier = RowClassifier([one_hot("neutrophil")] * (len(crops) + wbcs_in_smear))
    specimen = analyse_fields(fields, detector, classifier, SETTINGS, rules=[])
    # median leukocyte 60 px -> 60 PBC px: each crop keeps its cell's size relative to the rest
    assert [f.shared_scale for f in specimen.fields] == [pytest.approx(1.0)] * 6 + [None]
    assert [f.source for f in specimen.fields] == [f.source for f in fields]  # in their order
    assert [f.index for f in specimen.fields] == list(range(len(fields)))
    # the smear (its own scale) was classified as it came, the crops after: one batch each
    crop_batches = [b for b in classifier.batches if len(b) == 1]
    widths = [_dark_width(batch[0]) for batch in crop_batches]
    assert widths == [pytest.approx(d, abs=3) for d in diameters]
    assert specimen_to_json(specimen)["fields"][0]["shared_scale"] == 1.0


def test_one_cell_alone_is_cut_at_the_assumed_leukocyte_size() -> None:
    """Too few leukocytes for a shared median: each is taken as 60 PBC px (as before)."""
    crops = [_crop_of_one_cell(d) for d in (40, 80)]
    classifier = RowClassifier([one_hot("neutrophil")] * 2)
    specimen = analyse_fields(
        [Field(image, f"crop{i}") for i, (image, _) in enumerate(crops)],
        QueueDetector([[d] for _, d in crops]),
        classifier,
        SETTINGS,
        rules=[],
    )
    assert [f.shared_scale for f in specimen.fields] == [None, None]
    widths = [_dark_width(batch[0]) for batch in classifier.batches]
    assert widths == [pytest.approx(60, abs=3)] * 2


def test_shared_scale_needs_five_leukocytes_and_takes_their_median() -> None:
    assert shared_scale([50.0] * 4) is None
    assert shared_scale([30.0, 50.0, 120.0, 40.0, 60.0]) == pytest.approx(60.0 / 50.0)
    box = (0.0, 0.0, 30.0, 30.0)
    assert pbc_scale(None, None, box, shared=2.0) == 2.0
    assert pbc_scale(None, 74.0, box, shared=2.0) == pytest.approx(0.5)  # red cells win
    assert pbc_scale(None, None, box) == pytest.approx(2.0)  # 60 px / 30 px


def _three_fields() -> tuple[list[Field], list[list[Detection]]]:
    """Three synthetic fields of three leukocytes each, and their detections."""
    fields, per_field = [], []
    for seed in range(3):
        image, truth = synthetic_field(seed, n_wbc=3)
        fields.append(Field(image, f"f{seed}"))
        per_field.append(detections_of(truth))
    return fields, per_field


def test_every_field_of_a_specimen_takes_its_chromatin_reference() -> None:
    """One stain reference per specimen: the median chromatin of all its leukocytes, given
    with every field's crops (a field alone, or too few leukocytes: each crop its own)."""
    fields, per_field = _three_fields()
    classifier = RowClassifier([one_hot("lymphocyte")] * 9)
    result = analyse_fields(fields, QueueDetector(per_field), classifier, SETTINGS, rules=[])
    expected = shared_nucleus([crop_nucleus(c) for batch in classifier.batches for c in batch])
    assert expected is not None and len(classifier.nuclei) == 3
    for nucleus, field in zip(classifier.nuclei, result.fields, strict=True):
        assert np.allclose(nucleus, expected, atol=1e-5)
        # kept with the result, exactly as the classifier got it (review and saliency re-use it)
        assert field.stain_reference is not None
        assert np.array_equal(np.asarray(field.stain_reference, np.float32), nucleus)
        assert field_to_json(field)["stain_reference"] == list(field.stain_reference)
    alone = RowClassifier([one_hot("lymphocyte")] * 3)
    single = analyse_fields(fields[:1], QueueDetector(per_field[:1]), alone, SETTINGS, rules=[])
    assert alone.nuclei == [None]  # 3 leukocytes: fewer than a shared median needs
    assert single.fields[0].stain_reference is None


def test_crops_near_a_circular_field_stop_see_glass_not_black() -> None:
    """A field captured through a circular stop is cut as the same field on glass: the stop's
    black corners are painted in the glass's colour before crops are cut, so a leukocyte by
    the stop keeps the stain reference (chromatin density) of the field without the stop."""
    image, truth = synthetic_field(1, n_wbc=3)
    detections = detections_of(truth)
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    stopped = image.copy()
    stopped[np.hypot(yy - h / 2, xx - w / 2) > 0.45 * max(h, w)] = 0
    filled = in_view(stopped)
    assert filled is not stopped and filled.min(axis=2).max() > 150
    assert in_view(image) is image
    glass = white_point(image)
    corner = filled[0, 0].astype(float)
    assert np.abs(corner - glass).max() < 12
    plain = leukocyte_crops(Field(image, "f"), detections, None)
    cut = leukocyte_crops(Field(stopped, "f"), detections, None)
    assert len(cut) == len(plain) == 3
    for a, b in zip(plain, cut, strict=True):
        assert np.allclose(crop_nucleus(a), crop_nucleus(b), atol=0.05)
        assert b.min(axis=2).max() > 0  # no crop is black


class SpecimenRowClassifier(RowClassifier):
    """A classifier that normalises its features on a specimen (``for_specimen``): it records
    the crops it was given and answers for the specimen with another classifier."""

    def __init__(self, rows: list[list[float]], specimen: RowClassifier) -> None:
        super().__init__(rows)
        self.specimen = specimen
        self.given: list[list[np.ndarray]] = []

    def specimen_sample(self, count: int) -> list[int]:
        return list(range(0, count, 2))  # every other crop

    def for_specimen(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> RowClassifier:
        self.given.append(list(crops))
        return self.specimen


def test_a_specimen_is_classified_with_features_normalised_on_its_own_leukocytes() -> None:
    """The daemon hands every leukocyte crop of a case (in field and detection order) to the
    classifier's ``for_specimen`` and classifies every field with what it returns; a lab's
    folder hands the sample the classifier asks for."""
    fields, per_field = _three_fields()
    specimen = RowClassifier([one_hot("monocyte")] * 9)
    classifier = SpecimenRowClassifier([], specimen)
    result = analyse_fields(fields, QueueDetector(per_field), classifier, SETTINGS, rules=[])
    assert [len(g) for g in classifier.given] == [9] and classifier.batches == []
    given = classifier.given[0]
    cut = [c for batch in specimen.batches for c in batch]  # what was classified, in order
    assert len(cut) == 9 and all(np.array_equal(a, b) for a, b in zip(given, cut, strict=True))
    assert {c.label for c in result.cells if c.kind == "WBC"} == {"monocyte"}

    folder = detect_folder(lambda: iter(fields), QueueDetector(per_field), classifier=classifier)
    assert folder.classifier is specimen
    assert len(classifier.given[1]) == 5  # crops 0, 2, 4, 6, 8 of the folder's 9
    assert all(np.array_equal(a, b) for a, b in zip(classifier.given[1], given[::2], strict=True))
