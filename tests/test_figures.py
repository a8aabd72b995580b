"""Model-card figures: the arithmetic behind them, the PNGs they draw, and the cards' links."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lisplugin.config import DEFAULT_MODELS_DIR
from lisplugin.evaluation.detection import Boxes, average_precision, pr_curve
from lisplugin.evaluation.differential import expected_calibration_error
from lisplugin.evaluation.figures import (
    SECTION,
    ece_of,
    loso_groups,
    one_vs_rest_pr,
    reliability_bins,
    with_section,
)
from lisplugin.inference.registry import card_figures, file_sha256, load_card

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHIPPED = ("leukocyte-classifier", "cell-detector")


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# --- arithmetic (numpy only) ------------------------------------------------------------------


def test_one_vs_rest_pr_by_hand() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    positive = np.array([True, False, True, False])
    recall, precision, ap = one_vs_rest_pr(scores, positive)
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3, 0.5])
    assert ap == pytest.approx((1.0 + 2 / 3) / 2)
    assert np.isnan(one_vs_rest_pr(scores, np.zeros(4, bool))[2])


def test_reliability_bins_agree_with_the_ece() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=500)
    y = rng.integers(0, 4, 500)
    rows = reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == y)
    assert sum(r["n"] for r in rows) == 500
    assert all(r["low"] < r["confidence"] <= r["high"] for r in rows)
    assert ece_of(rows) == pytest.approx(expected_calibration_error(y, probs))


def test_detection_pr_curve_matches_its_ap() -> None:
    gt = Boxes(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 0]))
    pred = Boxes(
        np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 31]], float),
        np.array([0, 0, 0]),
        np.array([0.9, 0.8, 0.7]),
    )
    recall, precision, ap = pr_curve([gt], [pred], 0)
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    assert ap == average_precision([gt], [pred], 0, 0.5)
    assert len(pr_curve([gt], [pred], 2)[0]) == 0  # no platelet in the truth: no curve


def test_loso_groups_pair_left_out_and_in_site_accuracy() -> None:
    metrics = {
        "pbc_test_accuracy": 0.95,
        "wbc-seg_test_accuracy": 0.93,
        "leave_out_wbc_seg_accuracy": 0.41,
        "leave_out_pbc_accuracy": 0.37,
        "leave_out_bccd_accuracy": 0.35,
        "val_accuracy": 0.9,
    }
    groups = loso_groups(metrics)
    assert groups["wbc-seg"] == {"left out of training": 0.41, "in-site test": 0.93}
    assert groups["pbc"]["in-site test"] == 0.95
    assert groups["bccd"]["in-site test"] is None and len(groups) == 3


def test_figures_section_is_replaced_not_repeated() -> None:
    body = "\n# Model\n\ntext\n\n## Limits\n\nsome.\n\nSHA-256 of `m.onnx`: `abc`\n"
    once = with_section(body, f"{SECTION}\n\n![a](m.a.png)\n")
    assert once.index(SECTION) < once.index("SHA-256 of") and once.count("![a]") == 1
    twice = with_section(once, f"{SECTION}\n\n![b](m.b.png)\n")
    assert twice.count(SECTION) == 1 and "![a]" not in twice and "![b](m.b.png)" in twice
    assert twice.endswith("SHA-256 of `m.onnx`: `abc`\n") and "## Limits\n\nsome." in twice


def test_the_daemon_never_imports_matplotlib() -> None:
    script = (
        "import sys\n"
        "import lisplugin.service.runtime, lisplugin.service.pipeline, lisplugin.cli\n"
        "import lisplugin.evaluation.detection, lisplugin.evaluation.differential\n"
        "import lisplugin.evaluation.figures\n"
        "print('matplotlib' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"


# --- drawing (matplotlib) ---------------------------------------------------------------------


@pytest.fixture
def figures_module():
    pytest.importorskip("matplotlib", reason="figures need matplotlib (the train extra)")
    from lisplugin.evaluation import figures

    return figures


def test_classifier_figures_are_pngs_from_synthetic_scores(figures_module, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    tests = {}
    for site, n in (("a", 200), ("b", 40)):
        y = rng.integers(0, 4, n)
        logits = rng.normal(size=(n, 4)) + 3 * np.eye(4)[y]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        tests[site] = (y, probs)
    metrics = {"a_test_accuracy": 0.9, "leave_out_a_accuracy": 0.5, "leave_out_b_accuracy": 0.4}
    drawn = figures_module.classifier_figures(tmp_path, "clf", tests, classes, metrics)
    names = sorted(path.name for _, path in drawn)
    assert names == [
        "clf.confusion-a.png",
        "clf.confusion-b.png",
        "clf.leave-one-site-out.png",
        "clf.precision-recall.png",
        "clf.reliability.png",
    ]
    for _, path in drawn:
        width, height = _png_size(path)
        assert 200 < width < 2000 and 200 < height < 2000
        assert path.stat().st_size < 150_000
    without_loso = figures_module.classifier_figures(tmp_path / "x", "clf", tests, classes, {})
    assert len(without_loso) == 4


def test_detector_and_confusion_figures_with_extra_columns(figures_module, tmp_path: Path) -> None:
    curve = one_vs_rest_pr(np.linspace(1, 0, 50), np.arange(50) % 3 != 0)
    curves = {"set one": {"RBC": curve, "WBC": curve}, "set two": {"RBC": curve}}
    metrics = {"set_one": {"map50": 0.9, "recall": {"WBC": 0.97}}, "set_one_tta_wbf": {"map50": 1}}
    drawn = figures_module.detector_figures(tmp_path, "det", curves, metrics)
    assert [path.name for _, path in drawn] == ["det.precision-recall.png", "det.sets.png"]
    # A whole-path confusion: rows are the labelled classes, columns add unidentified and none.
    path = figures_module.confusion_figure(
        [[5, 1, 0, 2], [0, 0, 0, 0], [1, 3, 0, 0]],
        ["neutrophil", "basophil", "lymphocyte"],
        ["neutrophil", "lymphocyte", "unidentified", "none"],
        tmp_path / "cells.png",
        "whole path",
    )
    for _, p in [*drawn, ("", path)]:
        _png_size(p)
        assert p.stat().st_size < 150_000


def test_card_gets_links_and_keeps_its_front_matter(figures_module, tmp_path: Path) -> None:
    card = tmp_path / "m.md"
    card.write_text("---\nname: m\nsha256: abc\n---\n\n# M\n\nSHA-256 of `m.onnx`: `abc`\n")
    path = figures_module.bars_figure({"x": {"s": 0.5}}, tmp_path / "m.bars.png", "t", "y")
    figures_module.update_card(card, [("Bars", path)])
    text = card.read_text()
    assert text.startswith("---\nname: m\nsha256: abc\n---\n")
    assert "![Bars](m.bars.png)" in text
    assert card_figures(card) == [tmp_path / "m.bars.png"]


def test_detector_training_draws_and_links_its_figures(
    figures_module, shared_data: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch", reason="the detector's training module needs torch")
    import shutil

    from lisplugin.datasets.fields import read_voc
    from lisplugin.training import detector as td

    for name in ("cell-detector.md", "cell-detector.onnx"):
        shutil.copy2(DEFAULT_MODELS_DIR / name, tmp_path / name)
    bccd = shared_data / "bccd"
    fields = read_voc(bccd, bccd / "cbc_split.csv", "val")[:3]
    td.draw_figures(
        tmp_path / "cell-detector.md", {"bccd_val": [(f.load_image(), f) for f in fields]}
    )
    linked = card_figures(tmp_path / "cell-detector.md")
    assert [p.name for p in linked] == ["cell-detector.precision-recall.png"]
    _png_size(linked[0])
    assert load_card(tmp_path, "cell-detector").sha256 == file_sha256(
        tmp_path / "cell-detector.onnx"
    )


def test_evaluate_commands_draw_figures_on_request(
    figures_module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from lisplugin.evaluation import cells, differential
    from tests.test_progress import _crop_folder

    data = _crop_folder(tmp_path / "crops")
    out = tmp_path / "figures"
    assert differential.cli(["--data", str(data), "--figures", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(Path(p).name for p in report["figures"]) == [
        "leukocyte-classifier.confusion-crops.png",
        "leukocyte-classifier.precision-recall.png",
        "leukocyte-classifier.reliability.png",
    ]
    assert cells.cli(["--data", str(data), "--figures", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [Path(p).name for p in report["figures"]] == ["cells-crops.confusion.png"]
    for path in out.iterdir():
        _png_size(path)


# --- the shipped cards ------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_links_figures_that_exist(name: str) -> None:
    card = load_card(DEFAULT_MODELS_DIR, name)  # front matter and SHA-256 still whole
    assert file_sha256(card.onnx_path) == card.sha256
    linked = card_figures(DEFAULT_MODELS_DIR / f"{name}.md")
    assert linked, f"{name}.md links no figure"
    for path in linked:
        assert path.is_file(), f"{name}.md links {path.name}, which is missing"
        assert path.name.startswith(f"{name}.") and path.suffix == ".png"
        _png_size(path)
        assert path.stat().st_size < 150_000, f"{path.name} is over 150 KB"
    on_disk = {p.name for p in DEFAULT_MODELS_DIR.glob(f"{name}.*.png")}
    assert on_disk == {p.name for p in linked}, "a figure beside the card is not linked"
