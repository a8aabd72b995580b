"""Expert review as pure data: reclassified cells recounted with the analysis's own semantics,
and occlusion saliency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from lisplugin.config import DEFAULT_CONFIG_DIR, DEFAULT_MODELS_DIR, AnalysisSettings
from lisplugin.core.analysis import aggregate
from lisplugin.core.reference import parse_reference_ranges
from lisplugin.core.report import specimen_to_json
from lisplugin.core.revision import DERIVED_KEYS, RevisionError, reclassify, revise
from lisplugin.core.rules import PatientContext, PreviousResult, parse_rules
from lisplugin.core.saliency import heat_overlay, occlusion_sensitivity
from lisplugin.core.types import LEUKOCYTE_CLASSES, Cell, FieldQuality, FieldResult
from lisplugin.inference.classifier import OnnxLeukocyteClassifier, single_view_graph
from lisplugin.inference.registry import load_card

SETTINGS = AnalysisSettings()
RULES = parse_rules(yaml.safe_load((DEFAULT_CONFIG_DIR / "rules.yaml").read_text()), SETTINGS)
RANGES = parse_reference_ranges(
    yaml.safe_load((DEFAULT_CONFIG_DIR / "reference-ranges.yaml").read_text())
)
ADULT = PatientContext(age_years=40, sex="F")
GOOD = FieldQuality(focus=100.0, exposure=0.6, clipped_fraction=0.0, passed=True)


def leukocyte(label: str, x: float, top: float = 0.9) -> Cell:
    rest = (1.0 - top) / (len(LEUKOCYTE_CLASSES) - 1)
    shown = label if label in LEUKOCYTE_CLASSES else "neutrophil"
    probabilities = {c: (top if c == shown else rest) for c in LEUKOCYTE_CLASSES}
    return Cell(0, "WBC", label, 0.9, (x, 10.0, x + 40.0, 50.0), None, probabilities)


def specimen_json(labels: Sequence[str]) -> dict:
    cells = [leukocyte(label, 50.0 * i) for i, label in enumerate(labels)]
    cells += [Cell(0, "RBC", "RBC", 0.9, (5.0 * i, 300.0, 5.0 * i + 30, 330.0)) for i in range(8)]
    field = FieldResult(0, "1.2.3", 640, 480, GOOD, tuple(cells), None)
    return specimen_to_json(aggregate([field], SETTINGS, {}, RULES, RANGES, ADULT))


def analysed(labels: Sequence[str]) -> dict:
    """What the analysis itself reports for cells with these labels (artefacts left out)."""
    return specimen_json([label for label in labels if label not in ("artefact", "smudge")])


LABELS = ["neutrophil"] * 5 + ["lymphocyte"] * 3 + ["monocyte", "unidentified"]


def test_an_unchanged_result_is_recounted_exactly_as_analysed() -> None:
    result = specimen_json(LABELS)
    _, revised = revise(result, RULES, RANGES, ADULT)
    for key in DERIVED_KEYS:
        assert revised[key] == result[key], key
    assert revised["excluded_counts"] == {"artefact": 0, "smudge": 0}
    assert revised["cells"] == result["cells"]


@pytest.mark.parametrize(
    ("cell", "new_class"),
    [(0, "lymphocyte"), (9, "neutrophil"), (1, "erythroblast"), (2, "platelet"), (3, "ig")],
)
def test_reclassified_counts_equal_an_analysis_of_the_new_labels(cell: int, new_class: str) -> None:
    specimen, revised = revise(
        reclassify(specimen_json(LABELS), cell, new_class), RULES, RANGES, ADULT
    )
    labels = list(LABELS)
    labels[cell] = new_class
    expected = analysed(labels)
    for key in ("counts", "differential", "class_counts", "wbc_classified"):
        assert revised[key] == expected[key], key
    assert revised["cells"][cell]["original_class"] == LABELS[cell]
    assert specimen.wbc_classified == expected["wbc_classified"]


@pytest.mark.parametrize("excluded", ["artefact", "smudge"])
def test_artefacts_and_smudge_cells_leave_the_leukocyte_count(excluded: str) -> None:
    result = specimen_json(LABELS)
    _, revised = revise(reclassify(result, 0, excluded), RULES, RANGES, ADULT)
    labels = [excluded, *LABELS[1:]]
    expected = analysed(labels)
    for key in ("counts", "differential", "class_counts", "wbc_classified"):
        assert revised[key] == expected[key], key
    assert revised["counts"]["WBC"] == result["counts"]["WBC"] - 1
    assert revised["wbc_classified"] == result["wbc_classified"] - 1
    assert revised["excluded_counts"][excluded] == 1
    assert sum(revised["differential"][c] for c in ("neutrophil", "lymphocyte")) == pytest.approx(
        100.0 * 7 / 9, abs=0.02
    )


def test_the_classifiers_class_is_kept_through_several_changes() -> None:
    once = reclassify(specimen_json(LABELS), 0, "monocyte")
    twice = reclassify(once, 0, "lymphocyte")
    assert twice["cells"][0]["class"] == "lymphocyte"
    assert twice["cells"][0]["original_class"] == "neutrophil"
    assert "original_class" not in twice["cells"][1]
    assert "original_class" not in specimen_json(LABELS)["cells"][0]  # the input is not changed


def test_rules_judge_the_reviewed_result() -> None:
    result = specimen_json(["neutrophil"] * 6 + ["unidentified"] * 4)
    assert {"LOW_CONF", "WBC_FEW"} <= {f["code"] for f in result["flags"]}
    for cell in range(6, 10):  # a person placed every unidentified cell
        result = reclassify(result, cell, "lymphocyte")
    _, revised = revise(result, RULES, RANGES, ADULT)
    codes = {f["code"] for f in revised["flags"]}
    assert "LOW_CONF" not in codes and "LOW_CONF_CELLS" not in codes
    assert "WBC_FEW" in codes  # still ten leukocytes
    _, revised = revise(reclassify(result, 0, "ig"), RULES, RANGES, ADULT)
    assert "IG_PRESENT" in {f["code"] for f in revised["flags"]}


def test_delta_check_text_follows_the_current_values() -> None:
    """LABELS: 5 of 10 neutrophils (50 %); the verified result a day before had 10 %."""
    now = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
    previous = PreviousResult(now - timedelta(hours=24), {"neutrophil": 10.0}, 41, "ACC41")
    context = replace(ADULT, analysed_at=now, previous=previous)

    def delta(result: dict) -> str:
        return next(f["text"] for f in result["flags"] if f["code"] == "DELTA_DIFF")

    _, analysed_json = revise(specimen_json(LABELS), RULES, RANGES, context)
    assert "(case ACC41)" in delta(analysed_json)
    assert "neutrophil 10.0 -> 50.0 (+40.0, limit 20)" in delta(analysed_json)
    _, revised = revise(reclassify(analysed_json, 0, "monocyte"), RULES, RANGES, context)
    assert "neutrophil 10.0 -> 40.0 (+30.0, limit 20)" in delta(revised)
    _, revised = revise(reclassify(revised, 1, "monocyte"), RULES, RANGES, context)
    _, revised = revise(reclassify(revised, 2, "monocyte"), RULES, RANGES, context)
    assert "DELTA_DIFF" not in {f["code"] for f in revised["flags"]}  # 20 %: within 20 points


@pytest.mark.parametrize(
    ("cell", "new_class", "reason"),
    [(12, "neutrophil", "detected as RBC"), (0, "blast", "unknown class"), (99, "ig", "no cell")],
)
def test_impossible_reclassifications_are_refused(cell: int, new_class: str, reason: str) -> None:
    with pytest.raises(RevisionError, match=reason):
        reclassify(specimen_json(LABELS), cell, new_class)


class DarkCentreClassifier:
    """Says "lymphocyte" the more, the darker the crop's centre: its evidence is known."""

    version = "test"
    classes = ("neutrophil", "lymphocyte")

    def classify(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> np.ndarray:
        darkness = np.array([1.0 - c[70:90, 70:90].mean() / 255.0 for c in crops])
        lymphocyte = 1.0 / (1.0 + np.exp(-8.0 * (darkness - 0.3)))
        return np.stack([1.0 - lymphocyte, lymphocyte], axis=1)


def test_occlusion_saliency_finds_what_the_answer_rests_on() -> None:
    crop = np.full((160, 160, 3), 220, dtype=np.uint8)
    crop[65:95, 65:95] = 40  # the dark "nucleus" the classifier looks at
    crop[10:30, 120:150] = 40  # dark, but ignored by the classifier
    found = occlusion_sensitivity(crop, DarkCentreClassifier())
    assert found.top_class == "lymphocyte" and found.probability > 0.9
    y, x = np.unravel_index(np.argmax(found.heat), found.heat.shape)
    assert 60 <= y <= 100 and 60 <= x <= 100
    assert found.heat[20, 135] < 0.1 * found.heat.max()

    overlay = heat_overlay(crop, found.heat)
    assert overlay.shape == crop.shape and overlay.dtype == np.uint8
    assert np.array_equal(overlay[0, 0], crop[0, 0])  # no evidence there: left as it is
    assert not np.array_equal(overlay[80, 80], crop[80, 80])


class CountingClassifier:
    """The shipped classifier, counting how often and with how many windows it is asked."""

    def __init__(self, inner: OnnxLeukocyteClassifier) -> None:
        self.inner = inner
        self.version, self.classes, self.centre = inner.version, inner.classes, inner.centre
        self.input_size = inner.input_size
        self.seen_batches: list[int] = []

    def classify(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> np.ndarray:
        return self.inner.classify(crops, nucleus)

    def seen_colours(self, crop: np.ndarray, nucleus: np.ndarray | None = None) -> np.ndarray:
        return self.inner.seen_colours(crop, nucleus)

    def classify_seen(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        self.seen_batches.append(len(windows))
        assert {w.shape for w in windows} == {(self.input_size, self.input_size, 3)}
        return self.inner.classify_seen(windows)


@pytest.fixture(scope="module")
def shipped_classifier() -> OnnxLeukocyteClassifier:
    return OnnxLeukocyteClassifier(load_card(DEFAULT_MODELS_DIR, "leukocyte-classifier"))


def test_saliency_of_the_shipped_model_covers_what_it_sees_in_one_batch(
    shipped_classifier: OnnxLeukocyteClassifier,
) -> None:
    crop = np.full((160, 160, 3), (228, 222, 232), dtype=np.uint8)
    yy, xx = np.mgrid[:160, :160]
    crop[(yy - 80) ** 2 + (xx - 80) ** 2 < 26**2] = (150, 110, 190)  # cytoplasm
    crop[(yy - 80) ** 2 + (xx - 74) ** 2 < 14**2] = (70, 40, 120)  # nucleus
    counting = CountingClassifier(shipped_classifier)
    found = occlusion_sensitivity(crop, counting)
    side = round(shipped_classifier.centre * 160)  # the centre window the model sees
    offset = (160 - side) // 2
    assert found.window == (offset, offset, side)
    assert found.heat.shape == (side, side) == found.seen(crop).shape[:2]
    assert np.isfinite(found.heat).all()
    # one batch: the unoccluded window and the 5 x 5 occluded copies of it
    assert counting.seen_batches == [1 + 5 * 5]
    answer = shipped_classifier.classify([crop])[0]
    assert found.top_class == shipped_classifier.classes[int(np.argmax(answer))]
    assert found.probability == pytest.approx(float(answer.max()))


def test_saliency_explains_the_answer_given_against_the_specimens_stain_reference(
    shipped_classifier: OnnxLeukocyteClassifier, shared_data: Path
) -> None:
    """A cell classified against its specimen's chromatin is explained against it too: the
    probability shown beside the map is the one in the result, not the crop's own-reference one."""
    from PIL import Image

    from lisplugin.core.crops import crop_nucleus

    path = sorted((shared_data / "pbc" / "monocyte").glob("*.jpg"))[0]
    crop = np.asarray(Image.open(path).convert("RGB"))
    own = crop_nucleus(crop)
    assert own is not None
    specimen = (own * 0.6).astype(np.float32)  # a specimen whose chromatin is paler
    answer = shipped_classifier.classify([crop], specimen)[0]
    alone = shipped_classifier.classify([crop])[0]
    assert abs(float(answer.max()) - float(alone[int(np.argmax(answer))])) > 0.01
    found = occlusion_sensitivity(crop, shipped_classifier, nucleus=specimen)
    assert found.top_class == shipped_classifier.classes[int(np.argmax(answer))]
    assert found.probability == pytest.approx(float(answer.max()), abs=1e-6)


def test_single_view_graph_is_one_of_the_models_test_time_views(
    shipped_classifier: OnnxLeukocyteClassifier,
) -> None:
    """The views the whole graph makes, each run through the cut-out graph and averaged, give
    the whole graph's logits: the cut-out is exactly its backbone and head."""
    onnx = pytest.importorskip("onnx")
    path = load_card(DEFAULT_MODELS_DIR, "leukocyte-classifier").onnx_path
    single = single_view_graph(path)
    assert single is not None
    model = onnx.load(str(path))
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(concat.output[0], onnx.TensorProto.FLOAT, None)
    )
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, 3, 96, 96)).astype(np.float32)
    logits, views = whole.run(None, {"input": x})
    assert views.shape == (4 * 3, 3, 96, 96)
    one = ort.InferenceSession(single, providers=["CPUExecutionProvider"])
    per_view = one.run(None, {one.get_inputs()[0].name: views})[0]
    assert np.allclose(per_view.reshape(4, 3, -1).mean(axis=0), logits, atol=1e-4)
    # and the adapter's single view agrees with the whole model on what it sees
    window = np.full((112, 112, 3), 225, dtype=np.uint8)
    assert shipped_classifier.classify_seen([window]).shape == (1, 8)
