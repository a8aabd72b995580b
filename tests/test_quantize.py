"""``lisplugin train quantize``: integer graphs behind the same cards, close to the float ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lisplugin.datasets import load_rgb
from lisplugin.inference.classifier import OnnxLeukocyteClassifier
from lisplugin.inference.detector import OnnxCellDetector
from lisplugin.inference.registry import ModelCard, file_sha256, load_card
from lisplugin.training import classifier as training
from lisplugin.training.onnx_init import load_onnx_weights, max_abs_difference
from lisplugin.training.quantize import cli, float_ends

MODELS = Path(__file__).resolve().parent.parent / "models"


def _float_models(shipped: Path, out: Path) -> Path:
    """A models folder with float graphs: each shipped one that is float; a shipped integer
    classifier rebuilt in float from its dequantised weights (an integer detector left out)."""
    out.mkdir()
    for name in ("cell-detector", "leukocyte-classifier"):
        card = load_card(shipped, name)
        if card.get("precision") != "int8":
            for path in (shipped / f"{name}.md", card.onnx_path):
                (out / path.name).symlink_to(path)
        elif name == "leukocyte-classifier":
            _rebuilt_classifier(card, shipped / f"{name}.md", out)
    return out


def _rebuilt_classifier(card: ModelCard, card_path: Path, out: Path) -> None:
    model = training.LeukocyteNet(len(card["classes"]), norm=card.get("norm_layers", "batch"))
    size = int(card["input_size"])
    load_onnx_weights(model, card.onnx_path, torch.randn(8, 3, size, size) * 0.5)
    views = int(card.get("test_time_views", 1))
    graph = out / "leukocyte-classifier.onnx"
    training.export_onnx(training.ViewAverage(model, views) if views > 1 else model, graph, size)
    text = card_path.read_text()
    text = text.replace(f"sha256: {card.sha256}", f"sha256: {file_sha256(graph)}", 1)
    (out / "leukocyte-classifier.md").write_text(text.replace("precision: int8", "", 1))
    norms = card.get("specimen_norms")
    if norms:  # the training sites' feature statistics travel with the card
        (out / norms["file"]).symlink_to(card_path.parent / norms["file"])


def test_quantized_models_run_behind_their_cards_and_agree_with_the_float_ones(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "cwd"  # onnxruntime's shape inference may drop files into the cwd
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    source = _float_models(MODELS, tmp_path / "float")
    names = [n for n in ("cell-detector", "leukocyte-classifier") if (source / f"{n}.md").exists()]
    out = tmp_path / "int8"
    for name in names:
        argv = ["--models", str(source), "--out", str(out), "--data", str(shared_data)]
        assert cli([*argv, "--calibration", "16", "--only", name]) == 0
    for name in names:
        card = load_card(out, name)  # the SHA-256 of the new graph is the card's
        float_card = load_card(source, name)
        assert card["precision"] == "int8" and card.version == f"{float_card.version}+int8"
        assert card["quantization"]["float_sha256"] == float_card.sha256
        assert card.onnx_path.stat().st_size < 0.6 * float_card.onnx_path.stat().st_size
        assert f"## {card.version}" in (out / f"{name}.md").read_text()
    if "cell-detector" in names:
        field = load_rgb(next((shared_data / "bccd" / "JPEGImages").glob("*.jpg")))
        cells = OnnxCellDetector.from_models_dir(out).detect(field).cells
        reference = OnnxCellDetector.from_models_dir(source).detect(field).cells
        assert abs(len(cells) - len(reference)) <= max(2, len(reference) // 10)
    assert sorted(p.name for p in workdir.iterdir()) == []  # nothing left where it was run
    crops = [load_rgb(p) for p in sorted((shared_data / "pbc").rglob("*.jpg"))[::500][:12]]
    p8 = OnnxLeukocyteClassifier(load_card(out, "leukocyte-classifier")).classify(crops)
    p32 = OnnxLeukocyteClassifier(load_card(source, "leukocyte-classifier")).classify(crops)
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.9
    assert np.abs(p8 - p32).max() < 0.3
    # an integer graph still starts a fine-tuning (adapt, --init): its weights dequantised
    graph = load_card(out, "leukocyte-classifier").onnx_path
    model = training.LeukocyteNet(8)
    x = torch.randn(4, 3, 96, 96) * 0.5
    load_onnx_weights(model, graph, x)
    assert max_abs_difference(training.ViewAverage(model, 4), graph, x) < 1.0
    with pytest.raises(SystemExit, match="quantised already"):
        cli(["--models", str(out), "--out", str(tmp_path / "again"), "--data", str(shared_data),
             "--only", "leukocyte-classifier"])  # fmt: skip


def test_the_convolutions_reading_the_pixels_stay_float() -> None:
    assert float_ends(MODELS / "leukocyte-classifier.onnx") == ["/model/features/features.0/Conv"]
    assert float_ends(MODELS / "cell-detector.onnx")  # the detector's stem
