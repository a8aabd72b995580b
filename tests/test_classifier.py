"""Leukocyte classifier: training and ONNX export, the shipped model, metrics, crop geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lisplugin.config import DEFAULT_MODELS_DIR
from lisplugin.core.crops import (
    CLASS_BOX_PX,
    COLOUR_NORMALISATIONS,
    PBC_RBC_PX,
    PBC_UM_PER_PX,
    centre_window,
    classifier_input,
    leukocyte_crop,
    pbc_scale,
    resize_rgb,
)
from lisplugin.core.prevalence import (
    REFERENCE_PREVALENCE,
    PrevalenceError,
    lab_mix,
    label_mix,
    prior_shift,
    shares,
)
from lisplugin.core.types import LEUKOCYTE_CLASSES
from lisplugin.evaluation.differential import differential_metrics, expected_calibration_error
from lisplugin.inference.classifier import OnnxLeukocyteClassifier
from lisplugin.inference.registry import (
    ModelCard,
    ModelCardError,
    card_figures,
    file_sha256,
    load_card,
)
from lisplugin.training import classifier as training
from lisplugin.training.augment import photometric

# --- training and export -------------------------------------------------------------------


def test_train_few_steps_and_onnx_matches_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size = 32
    images = rng.integers(0, 256, (24, size, size, 3), dtype=np.uint8)
    labels = np.arange(24) % len(LEUKOCYTE_CLASSES)
    model = training.LeukocyteNet(len(LEUKOCYTE_CLASSES))
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    before = [p.detach().clone() for p in model.parameters()]
    model, history = training.train(
        model, images, labels, images[:8], labels[:8], mean, std, epochs=1, batch_size=8,
        max_steps=3, log=lambda _: None,
    )  # fmt: skip
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    model = training.ViewAverage(model, 8).eval()
    path = tmp_path / "m.onnx"
    training.export_onnx(model, path, size)
    x = torch.randn(5, 3, size, size)  # batch of 5: the exported batch axis must be dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_view_average_is_rotation_invariant() -> None:
    torch.manual_seed(0)
    model = training.ViewAverage(training.LeukocyteNet(len(LEUKOCYTE_CLASSES)), 8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        assert base.shape == (3, len(LEUKOCYTE_CLASSES))
        for view in (torch.rot90(x, 1, (2, 3)), torch.rot90(x, 3, (2, 3)), x.flip(3)):
            torch.testing.assert_close(model(view), base, rtol=1e-4, atol=1e-5)


def test_mix_style_mixes_feature_statistics_only_while_training(tmp_path: Path) -> None:
    """MixStyle gives each image a mix of its own and another image's channel statistics while
    training; in evaluation the network is the plain one and exports under the same node names
    (``onnx_init`` finds convolutions by them)."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 8, 8) * torch.arange(1, 7).view(6, 1, 1, 1) + torch.arange(6).view(
        6, 1, 1, 1
    )
    assert training.mix_style(x, 0.0) is x
    mixed = training.mix_style(x, 1.0)
    means, new = x.mean(dim=(2, 3)), mixed.mean(dim=(2, 3))
    lo, hi = means.min(dim=0).values, means.max(dim=0).values
    assert ((new >= lo - 1e-4) & (new <= hi + 1e-4)).all() and not torch.allclose(new, means)
    model = training.LeukocyteNet(8)
    model.mix_style = 1.0
    batch = torch.randn(4, 3, 32, 32)
    model.train()
    model(batch).sum().backward()  # trains through the mixing
    model.eval()
    mixing = model(batch)
    model.mix_style = 0.0
    assert torch.equal(model(batch), mixing)  # evaluation never mixes
    training.export_onnx(training.ViewAverage(model, 4), tmp_path / "m.onnx", 32)
    import onnx

    names = [n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Conv"]
    assert "/model/features/features.0/Conv" in names


def test_specimen_batch_norms_normalise_each_run_by_its_own_statistics() -> None:
    """Trained with specimen runs, the first batch norms normalise each run of the batch as a
    batch norm would that run alone; in evaluation they are plain (folded) batch norms whose
    running statistics are the runs' means."""
    torch.manual_seed(0)
    model = training.LeukocyteNet(8)
    assert training.specimen_batch_norms(model, 2) == training.SPECIMEN_LAYERS
    kinds = [type(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert kinds[:3] == [training.SpecimenBatchNorm2d] * 3
    assert training.SpecimenBatchNorm2d not in kinds[3:]
    bn = training.SpecimenBatchNorm2d(3, momentum=1.0)
    bn.groups = 2
    x = torch.cat([torch.randn(4, 3, 5, 5) * 3 + 1, torch.randn(4, 3, 5, 5) - 2])
    alone = [torch.nn.BatchNorm2d(3, momentum=1.0).train() for _ in range(2)]
    expected = torch.cat([alone[0](x[:4]), alone[1](x[4:])])
    torch.testing.assert_close(bn.train()(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, (alone[0].running_mean + alone[1].running_mean) / 2)
    torch.testing.assert_close(bn.running_var, (alone[0].running_var + alone[1].running_var) / 2)
    plain = torch.nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn.eval()(x), plain.eval()(x))


def test_specimen_order_draws_each_run_from_one_site() -> None:
    site_of = np.array([0] * 50 + [1] * 10 + [2] * 40)
    weights = np.where(site_of == 0, 0.5 / 50, np.where(site_of == 1, 0.25 / 10, 0.25 / 40))
    order = training.specimen_order(weights, site_of, 400, 8, torch.Generator().manual_seed(0))
    runs = site_of[order.numpy()].reshape(400, 8)
    assert (runs == runs[:, :1]).all()
    shares = np.bincount(runs[:, 0], minlength=3) / 400
    assert abs(shares[0] - 0.5) < 0.08 and abs(shares[1] - 0.25) < 0.08


def test_fit_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(4000, 4)) * 2
    labels = np.array([rng.choice(4, p=p) for p in training.softmax(true_logits)])
    assert training.fit_temperature(true_logits * 3, labels) == pytest.approx(3, rel=0.1)


def test_train_cli_on_a_handful_of_pbc_images(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    argv = ["--data", str(shared_data / "pbc"), "--out", str(out), "--limit", "16"]
    argv += ["--epochs", "1", "--input-size", "32", "--batch-size", "8"]
    assert training.cli([*argv, "--runtime-colour", "white-point+stains"]) == 0
    card = load_card(out, "leukocyte-classifier")
    assert card["input_size"] == 32 and card["classes"] == list(LEUKOCYTE_CLASSES)
    # trained white-balanced, run with the stain normalisation: the card says which; only the
    # scored splits are cut again, the training crops stay counted
    assert card["colour_normalisation"] == "white-point+stains"
    row = next(r for r in (out / "leukocyte-classifier.md").read_text().splitlines()
               if r.startswith("| pbc |"))  # fmt: skip
    assert [int(n) for n in row.strip("| ").split(" | ")[1:]] == [16, 16, 16]
    probs = OnnxLeukocyteClassifier(card).classify([np.zeros((160, 160, 3), np.uint8)])
    assert probs.shape == (1, 8) and probs.sum() == pytest.approx(1.0)
    # the draws' class mix is written down (PBC alone here: shares of its 16 training crops),
    # and the prevalence the probabilities are moved to
    prior = card["training_prior"]
    assert list(prior) == list(LEUKOCYTE_CLASSES) and sum(prior.values()) == pytest.approx(1)
    assert all(16 * v == pytest.approx(round(16 * v), abs=1e-3) for v in prior.values())
    assert card["prevalence"] == REFERENCE_PREVALENCE
    linked = {p.name for p in card_figures(out / "leukocyte-classifier.md") if p.is_file()}
    assert linked == {  # drawn beside the card, linked from it (matplotlib: the train extra)
        "leukocyte-classifier.confusion-pbc.png",
        "leukocyte-classifier.reliability.png",
        "leukocyte-classifier.precision-recall.png",
    }


def test_specimen_runs_train_and_export_a_plain_network(shared_data: Path, tmp_path: Path) -> None:
    """``--specimen-runs`` draws runs of one site by the sites' shares, so it needs
    ``--epoch-size``; the exported graph runs as any classifier's and the card says how it was
    trained."""
    out = tmp_path / "models"
    argv = ["--data", str(shared_data / "pbc"), "--out", str(out), "--limit", "12"]
    argv += ["--epochs", "1", "--input-size", "32", "--batch-size", "8", "--specimen-runs", "2"]
    with pytest.raises(SystemExit):
        training.cli(argv)  # no --epoch-size: no draws by site
    assert training.cli([*argv, "--epoch-size", "32"]) == 0
    card = load_card(out, "leukocyte-classifier")
    assert card["specimen_runs"] == 2
    probs = OnnxLeukocyteClassifier(card).classify([np.zeros((160, 160, 3), np.uint8)] * 2)
    assert probs.shape == (2, 8) and np.allclose(probs.sum(axis=1), 1.0)


def test_mix_colour_trains_on_both_normalisations_of_each_crop(
    shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "models"
    argv = ["--data", str(shared_data / "pbc"), "--out", str(out), "--limit", "12"]
    argv += ["--epochs", "1", "--input-size", "32", "--batch-size", "8"]
    argv += ["--mix-colour", "white-point+stains", "--runtime-colour", "white-point+stains"]
    assert training.cli(argv) == 0
    card = load_card(out, "leukocyte-classifier")
    assert card["training_colours"] == ["white-point", "white-point+stains"]
    assert card["colour_normalisation"] == "white-point+stains"
    text = (out / "leukocyte-classifier.md").read_text()
    row = next(r for r in text.splitlines() if r.startswith("| pbc |"))
    # each training image twice (once per normalisation), the scored splits once
    assert [int(n) for n in row.strip("| ").split(" | ")[1:]] == [24, 12, 12]
    assert "`--mix-colour`" in text


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_fine_tune_from_a_shipped_onnx_at_another_size(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], norm: str
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["--data", str(shared_data / "pbc"), "--limit", "16", "--epochs", "1"]
    argv += ["--batch-size", "8"]
    assert training.cli([*argv, "--out", str(first), "--input-size", "32", "--norm", norm]) == 0
    init = first / "leukocyte-classifier.onnx"
    capsys.readouterr()
    tune = ["--out", str(second), "--input-size", "40", "--init", str(init), "--lr", "1e-4"]
    assert training.cli([*argv, *tune]) == 0
    log = capsys.readouterr().out
    # the 4-view graph at 32 px is rebuilt exactly before training at 40 px
    difference = float(log.split("max |logit - onnx| ")[1].split()[0])
    assert "(32 px, 4 views)" in log and difference < 1e-4
    parent = load_card(first, "leukocyte-classifier")
    child = load_card(second, "leukocyte-classifier")
    assert child["input_size"] == 40
    # the child is built with the parent's normalisation layers, which its card names again
    assert parent.get("norm_layers", "batch") == child.get("norm_layers", "batch") == norm
    assert (child["mean"], child["std"]) == (parent["mean"], parent["std"])
    text = (second / "leukocyte-classifier.md").read_text()
    assert "## Lineage" in text and parent["sha256"][:16] in text


def test_photometric_keeps_shape_range_and_is_reproducible() -> None:
    x = torch.rand(6, 3, 37, 45)
    a = photometric(x, torch.Generator().manual_seed(3))
    b = photometric(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.allclose(a, x)
    assert torch.allclose(photometric(x, torch.Generator().manual_seed(3), strength=0.0), x)


# --- the shipped model ---------------------------------------------------------------------


def test_shipped_model_loads_through_its_card_and_gives_probabilities() -> None:
    card = load_card(DEFAULT_MODELS_DIR, "leukocyte-classifier")
    assert file_sha256(card.onnx_path) == card.sha256
    assert card.onnx_path.stat().st_size < 8_000_000
    assert sorted(card["classes"]) == sorted(LEUKOCYTE_CLASSES)
    assert card["temperature"] > 0 and len(card["mean"]) == len(card["std"]) == 3
    classifier = OnnxLeukocyteClassifier(card)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (160, 160, 3), dtype=np.uint8) for _ in range(3)]
    crops.append(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))  # any size is resized
    probs = classifier.classify(crops)
    assert probs.shape == (4, len(card["classes"]))
    assert np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1.0)
    assert classifier.classify([]).shape == (0, len(card["classes"]))


def test_prevalence_moves_probabilities_by_bayes_rule(tmp_path: Path) -> None:
    """Two cards of the one shipped graph, with and without a prevalence: the probabilities
    differ exactly by prevalence / training prior, renormalised; a lab's setting wins."""
    shipped = load_card(DEFAULT_MODELS_DIR, "leukocyte-classifier")
    assert shipped["prevalence"] == REFERENCE_PREVALENCE and shipped["training_prior"]
    plain = ModelCard(**{**shipped.__dict__, "meta": {
        k: v for k, v in shipped.meta.items() if k not in ("prevalence", "training_prior")
    }})  # fmt: skip
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (160, 160, 3), dtype=np.uint8) for _ in range(6)]
    p = OnnxLeukocyteClassifier(plain, threads=1).classify(crops)
    moved = OnnxLeukocyteClassifier(shipped, threads=1).classify(crops)
    classes = list(shipped["classes"])
    prior = shares(shipped["training_prior"], classes)
    ratio = lab_mix(REFERENCE_PREVALENCE, shipped["training_prior"], classes) / prior
    expected = p * ratio
    assert np.allclose(moved, expected / expected.sum(axis=1, keepdims=True), atol=1e-9)
    # the classes the card leaves out keep their training proportions among themselves
    assert np.allclose(ratio[:5], ratio[0]) and (ratio[5:] < 0.5).all()
    lab = {"neutrophil": 0.5, "lymphocyte": 0.5}  # the rest count as rare, not absent
    own = OnnxLeukocyteClassifier(shipped, threads=1, prevalence=lab).classify(crops)
    ratio = shares(lab, classes) / shares(shipped["training_prior"], classes)
    expected = p * ratio
    assert np.allclose(own, expected / expected.sum(axis=1, keepdims=True), atol=1e-9)
    assert (own[:, 2:] > 0).all()
    same = {c: float(v) for c, v in shipped["training_prior"].items()}
    assert np.allclose(OnnxLeukocyteClassifier(shipped, prevalence=same).classify(crops), p)
    with pytest.raises(ModelCardError, match="blast"):
        OnnxLeukocyteClassifier(shipped, prevalence={"blast": 0.1})


def test_the_daemon_takes_the_labs_prevalence_from_its_settings() -> None:
    from lisplugin.config import AnalysisSettings
    from lisplugin.service.models import load_models

    lab = {"neutrophil": 0.4, "lymphocyte": 0.4, "eosinophil": 0.2}
    _, classifier = load_models(AnalysisSettings(leukocyte_prevalence=lab))
    assert classifier.prevalence == lab
    _, shipped = load_models(AnalysisSettings())
    assert shipped.prevalence == REFERENCE_PREVALENCE and shipped is not classifier


def test_label_mix_weighs_each_draw() -> None:
    classes = ["a", "b", "c"]
    assert label_mix([0, 0, 1, 2], classes) == {"a": 0.5, "b": 0.25, "c": 0.25}
    # two sites drawn half and half whatever their sizes
    mix = label_mix([0, 0, 0, 1], classes, np.array([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    assert mix == {"a": 0.5, "b": 0.5, "c": 0.0}
    with pytest.raises(PrevalenceError):
        shares({"a": -1.0, "b": 2.0}, classes)
    # the classes a lab leaves out share what it leaves, in their training proportions
    whole = lab_mix({"c": 0.6}, {"a": 0.3, "b": 0.1, "c": 0.6}, classes)
    assert whole == pytest.approx([0.3, 0.1, 0.6])
    assert lab_mix({"c": 0.2}, {"a": 0.3, "b": 0.1, "c": 0.6}, classes) == pytest.approx(
        [0.6, 0.2, 0.2]
    )
    # a class never trained on (a site left out) is not pushed up by its prevalence
    shift = prior_shift(classes, {"a": 0.5, "b": 0.5, "c": 0.0}, {"a": 0.2, "b": 0.2, "c": 0.6})
    assert shift is not None and shift[2] == 0.0 and shift[0] == pytest.approx(shift[1])
    assert prior_shift(classes, None, {"a": 1.0}) is None


def test_shipped_model_recognises_pbc_crops(shared_data: Path) -> None:
    classifier = OnnxLeukocyteClassifier(load_card(DEFAULT_MODELS_DIR, "leukocyte-classifier"))
    from lisplugin.datasets.pbc import load_rgb, read_samples, select

    test = select(read_samples(shared_data / "pbc"), "test")
    picked = [next(s for s in test if s.label == c) for c in classifier.classes]
    probs = classifier.classify([load_rgb(s.path) for s in picked])
    hits = probs.argmax(axis=1) == np.arange(len(picked))
    assert hits.sum() >= len(picked) - 1  # one slip among eight cells is tolerated


# --- metrics -------------------------------------------------------------------------------


def test_differential_metrics_hand_computed() -> None:
    y_true = [0, 0, 1, 2]
    y_prob = np.array(
        [
            [0.9, 0.05, 0.05],  # right, confidence 0.9
            [0.4, 0.6, 0.0],  # wrong (0 -> 1), confidence 0.6
            [0.2, 0.7, 0.1],  # right, confidence 0.7
            [0.0, 0.0, 1.0],  # right, confidence 1.0
        ]
    )
    m = differential_metrics(y_true, y_prob, ["a", "b", "c"])
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion"] == {
        "labels": ["a", "b", "c"],
        "matrix": [[1, 1, 0], [0, 1, 0], [0, 0, 1]],
    }
    assert m["per_class"]["a"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["a"]["precision"] == pytest.approx(1.0)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1.0)
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    # F1: a = b = 2/3, c = 1 -> macro 7/9
    assert m["macro_f1"] == pytest.approx(7 / 9)
    # every sample in its own bin: (|1-.9| + |0-.6| + |1-.7| + |1-1|) / 4
    assert m["ece"] == pytest.approx(0.25)


def test_ece_shares_bins_and_unpredicted_class_scores_zero() -> None:
    # both at confidence 0.8, one right: bin accuracy 0.5 -> ECE 0.3
    probs = np.array([[0.8, 0.2], [0.8, 0.2]])
    assert expected_calibration_error(np.array([0, 1]), probs) == pytest.approx(0.3)
    m = differential_metrics([0, 1], probs, ["x", "y"])
    assert m["per_class"]["y"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 1}
    # a class without support stays out of the macro average
    m = differential_metrics([0, 0], np.array([[0.9, 0.1, 0], [0.7, 0.3, 0]]), ["x", "y", "z"])
    assert m["macro_f1"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        differential_metrics([0], np.ones((1, 2)) / 2, ["x", "y", "z"])


# --- crop geometry -------------------------------------------------------------------------

BACKGROUND = (230, 200, 210)


def _field(size: int = 400) -> np.ndarray:
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    return image


def test_pbc_scale_prefers_spacing_then_rbc_size_then_box() -> None:
    box = (0.0, 0.0, 120.0, 120.0)
    assert pbc_scale(PBC_UM_PER_PX, 50.0, box) == pytest.approx(1.0)
    assert pbc_scale(PBC_UM_PER_PX / 4, None, box) == pytest.approx(0.25)
    assert pbc_scale(None, 4 * PBC_RBC_PX, box) == pytest.approx(0.25)  # BCCD-like magnification
    assert pbc_scale(None, None, box) == pytest.approx(0.5)  # 120 px box -> 60 PBC px


def test_pbc_red_cells_measure_pbc_rbc_px_as_the_daemon_measures_them(shared_data: Path) -> None:
    """The constant that maps field crops to the PBC scale is what the daemon's own measure
    (detector boxes, ``median_rbc_diameter``) gives on PBC crops."""
    from PIL import Image

    from lisplugin.core.analysis import median_rbc_diameter
    from lisplugin.inference.detector import OnnxCellDetector

    detector = OnnxCellDetector.from_models_dir(DEFAULT_MODELS_DIR)
    sizes = []
    for path in sorted((shared_data / "pbc" / "neutrophil").glob("*.jpg"))[:40:2]:
        with Image.open(path) as im:  # x3, so the detector sees its usual magnification
            big = np.asarray(im.convert("RGB").resize((480, 480), Image.Resampling.BICUBIC))
        size = median_rbc_diameter(detector.detect(big, masks=False).cells, 480, 480)
        if size is not None:
            sizes.append(size / 3)
    assert len(sizes) >= 15
    assert float(np.median(sizes)) == pytest.approx(PBC_RBC_PX, abs=2.0)


def test_class_box_sizes_are_what_the_detector_measures_on_pbc(shared_data: Path) -> None:
    """The per-class sizes that stand in for a missing scale are the daemon's own measure of
    PBC cells: the detector's box of the central leukocyte, scaled by the crop's red cells."""
    from lisplugin.core.analysis import median_rbc_diameter
    from lisplugin.datasets import load_rgb
    from lisplugin.inference.detector import OnnxCellDetector

    detector = OnnxCellDetector.from_models_dir(DEFAULT_MODELS_DIR)
    for name in ("lymphocyte", "neutrophil", "monocyte"):
        sides = []
        for path in sorted((shared_data / "pbc" / name).glob("*.jpg"))[:60:3]:
            image = load_rgb(path)
            cells = detector.detect(image, masks=False).cells
            rbc = median_rbc_diameter(cells, image.shape[1], image.shape[0])
            wbcs = [c.box for c in cells if c.kind == "WBC"]
            if rbc is None or not wbcs:
                continue
            x0, y0, x1, y1 = min(wbcs, key=lambda b: abs(b[0] + b[2] - 160) + abs(b[1] - 80))
            sides.append((x1 - x0 + y1 - y0) / 2 * PBC_RBC_PX / rbc)
        assert len(sides) >= 10, name
        assert float(np.median(sides)) == pytest.approx(CLASS_BOX_PX[name], rel=0.1), name


def test_a_labelled_crop_without_scale_is_cut_at_its_class_size() -> None:
    """Training on single-cell crops: the labelled cell keeps PBC's size for its class, while
    the daemon (no label) assumes a 60 px box."""
    from lisplugin.core.analysis import most_confident_leukocyte
    from lisplugin.core.types import Detection, Field, FieldDetections

    class OneCell:
        def detect(self, image, pixel_spacing_um=None, masks=True):  # type: ignore[no-untyped-def]
            return FieldDetections((Detection("WBC", 0.9, (30.0, 30.0, 90.0, 90.0)),))

    image = np.full((120, 120, 3), 230, np.uint8)
    yy, xx = np.mgrid[:120, :120]
    image[(yy - 60) ** 2 + (xx - 60) ** 2 <= 30**2] = 40  # a 60 px cell
    field = Field(image, "crop")

    def width(crop: np.ndarray) -> int:
        return int((crop[80, :, 0] < 128).sum())

    _, daemon = most_confident_leukocyte(field, OneCell())  # type: ignore[misc]
    _, lymphocyte = most_confident_leukocyte(field, OneCell(), "lymphocyte")  # type: ignore[misc]
    assert abs(width(daemon) - 60) <= 2
    assert abs(width(lymphocyte) - CLASS_BOX_PX["lymphocyte"]) <= 2


def test_crop_at_pbc_scale_is_centred_window() -> None:
    image = _field()
    image[180:220, 180:220] = 255  # a 40 px "cell" centred at (200, 200)
    crop = leukocyte_crop(image, (180, 180, 220, 220), scale=1.0)
    assert crop.shape == (160, 160, 3)
    assert (crop[60:100, 60:100] == 255).all()
    assert tuple(crop[59, 80]) == BACKGROUND and tuple(crop[80, 100]) == BACKGROUND


def test_crop_rescales_a_high_magnification_field() -> None:
    image = _field(800)
    yy, xx = np.mgrid[:800, :800]
    image[(yy - 400) ** 2 + (xx - 400) ** 2 <= 50**2] = 0  # a red cell 100 px across
    scale = pbc_scale(None, 100.0, (350, 350, 450, 450))
    crop = leukocyte_crop(image, (350, 350, 450, 450), scale)
    width = int((crop[80].astype(int).sum(axis=1) < 300).sum())
    assert abs(width - PBC_RBC_PX) <= 2  # the cell is now as large as in PBC
    assert crop.shape == (160, 160, 3)
    assert leukocyte_crop(image, (350, 350, 450, 450), scale, out_size=64).shape == (64, 64, 3)


def test_crop_at_the_edge_pads_with_background() -> None:
    image = _field()
    image[0:20, 0:20] = 0  # a dark cell in the top-left corner
    crop = leukocyte_crop(image, (0, 0, 20, 20), scale=1.0)
    assert (crop[70:90, 70:90] == 0).all()  # the cell stays in the centre
    assert tuple(crop[10, 10]) == BACKGROUND and tuple(crop[150, 150]) == BACKGROUND


def test_centre_window_takes_the_middle() -> None:
    image = np.zeros((160, 160, 3), np.uint8)
    image[24:136, 24:136] = 9
    window = centre_window(image, 0.7)
    assert window.shape == (112, 112, 3) and (window == 9).all()
    assert centre_window(image, 1.0).shape == image.shape
    assert centre_window(np.zeros((90, 120, 3), np.uint8), 0.5).shape == (45, 45, 3)
    with pytest.raises(ValueError):
        centre_window(image, 0.0)


def test_resize_rgb_keeps_flat_colour_and_size() -> None:
    flat = np.full((37, 53, 3), 77, np.uint8)
    assert (resize_rgb(flat, 64) == 77).all() and (resize_rgb(flat, 8) == 77).all()
    image = np.arange(160 * 160 * 3, dtype=np.uint8).reshape(160, 160, 3)
    assert resize_rgb(image, 160) is image


# --- colour normalisation against the crop's own red cells and chromatin -----------------------


def _pbc_crops(shared_data: Path, count: int) -> list[np.ndarray]:
    from lisplugin.datasets import load_rgb, read_samples

    samples = read_samples(shared_data / "pbc")
    return [load_rgb(s.path) for s in samples[:: max(len(samples) // count, 1)][:count]]


def test_reference_stain_densities_are_pbcs(shared_data: Path) -> None:
    """The densities crops are mapped to are what PBC's own crops measure (median)."""
    from lisplugin.core.crops import (
        REFERENCE_NUCLEUS_DENSITY,
        REFERENCE_RBC_DENSITY,
        stain_densities,
        white_balanced,
    )

    found = [d for c in _pbc_crops(shared_data, 160) if (d := stain_densities(white_balanced(c)))]
    assert len(found) >= 150
    rbc, nucleus = (np.median(np.array([d[i] for d in found]), axis=0) for i in (0, 1))
    assert rbc == pytest.approx(REFERENCE_RBC_DENSITY, rel=0.1, abs=0.01)
    assert nucleus == pytest.approx(REFERENCE_NUCLEUS_DENSITY, rel=0.1, abs=0.03)


def test_stain_normalisation_undoes_another_labs_stain(shared_data: Path) -> None:
    """A PBC crop re-stained (weaker eosin, paler and bluer chromatin, as BCCD's) comes back
    to PBC's stain; a PBC crop is left almost as it was."""
    from lisplugin.core.crops import (
        REFERENCE_WHITE,
        optical_density,
        stain_normalised,
        white_balanced,
    )

    def restained(image: np.ndarray) -> np.ndarray:
        od = optical_density(image) * np.array([0.45, 0.6, 0.8], np.float32)
        return np.clip(np.rint((REFERENCE_WHITE + 1) * np.exp(-od) - 1), 0, 255).astype(np.uint8)

    before, after, untouched = [], [], []
    for crop in _pbc_crops(shared_data, 40):
        balanced = white_balanced(crop)
        other = restained(balanced)
        reference = balanced.astype(np.float32)
        before.append(np.abs(other.astype(np.float32) - reference).mean())
        after.append(np.abs(stain_normalised(other).astype(np.float32) - reference).mean())
        untouched.append(np.abs(stain_normalised(balanced).astype(np.float32) - reference).mean())
    assert np.median(after) < 0.35 * np.median(before)
    assert np.median(untouched) < 0.35 * np.median(before)


def test_a_specimens_chromatin_reference_keeps_what_tells_cells_apart(shared_data: Path) -> None:
    """Lymphocytes' chromatin is denser than monocytes'. Normalised each to its own chromatin,
    another lab's cells lose that difference; normalised to their specimen's median (one stain
    reference for all), they keep it, and take PBC's stain as well as before."""
    from lisplugin.core.crops import (
        REFERENCE_WHITE,
        colour_normalised,
        crop_nucleus,
        optical_density,
        shared_nucleus,
        stain_normalised,
        white_balanced,
    )
    from lisplugin.datasets import load_rgb

    def restained(image: np.ndarray) -> np.ndarray:  # another lab: paler, bluer chromatin
        od = optical_density(image) * np.array([0.45, 0.6, 0.8], np.float32)
        return np.clip(np.rint((REFERENCE_WHITE + 1) * np.exp(-od) - 1), 0, 255).astype(np.uint8)

    raw = {
        name: [load_rgb(p) for p in sorted((shared_data / "pbc" / name).iterdir())[:12]]
        for name in ("lymphocyte", "monocyte")
    }
    cells = {name: [white_balanced(c) for c in crops] for name, crops in raw.items()}
    other = {name: [restained(c) for c in crops] for name, crops in cells.items()}
    specimen = shared_nucleus([crop_nucleus(c) for crops in other.values() for c in crops])
    assert specimen is not None

    def gap(crops: dict[str, list[np.ndarray]]) -> float:
        """Lymphocytes' chromatin minus monocytes' (summed density, median of each class)."""
        density = {n: np.median([crop_nucleus(c).sum() for c in cs]) for n, cs in crops.items()}
        return float(density["lymphocyte"] - density["monocyte"])

    pbc = gap(cells)
    own = gap({n: [stain_normalised(c) for c in cs] for n, cs in other.items()})
    shared = gap(
        {n: [stain_normalised(c, nucleus=specimen) for c in cs] for n, cs in other.items()}
    )
    assert pbc > 0.2  # PBC's lymphocytes are the denser
    assert abs(shared - pbc) < 0.5 * pbc  # kept
    assert own < 0.5 * shared  # mostly erased by a reference per crop
    # a crop given its own chromatin as the reference comes out as it did without one
    crop, mode = raw["monocyte"][0], "white-point+stains"
    own_reference = colour_normalised(crop, mode, nucleus=crop_nucleus(crop))
    assert np.array_equal(own_reference, colour_normalised(crop, mode))


@pytest.mark.parametrize("colour", COLOUR_NORMALISATIONS)
def test_saliency_windows_are_in_the_colours_the_model_sees(
    shared_data: Path, colour: str | None, tmp_path: Path
) -> None:
    """Occluded copies are cut from ``seen_colours``: their unoccluded window must be exactly
    the classifier's input, whatever the card's colour normalisation (with the stain
    normalisation the raw crop was scored before)."""
    card_dir = tmp_path / "models"
    card_dir.mkdir()
    shipped = load_card(DEFAULT_MODELS_DIR, "leukocyte-classifier")
    text = (DEFAULT_MODELS_DIR / "leukocyte-classifier.md").read_text()
    old = f"colour_normalisation: {shipped['colour_normalisation']}"
    (card_dir / "leukocyte-classifier.md").write_text(
        text.replace(old, f"colour_normalisation: {colour or 'null'}", 1)
    )
    (card_dir / "leukocyte-classifier.onnx").symlink_to(shipped.onnx_path)
    norms = shipped["specimen_norms"]["file"]
    (card_dir / norms).symlink_to(DEFAULT_MODELS_DIR / norms)
    classifier = OnnxLeukocyteClassifier(load_card(card_dir, "leukocyte-classifier"))
    assert classifier.colour == colour
    size, centre = classifier.input_size, classifier.centre
    for crop in _pbc_crops(shared_data, 4):
        seen = resize_rgb(centre_window(classifier.seen_colours(crop), centre), size)
        assert np.array_equal(seen, classifier_input(crop, size, centre, colour))


def test_pseudo_labelled_labs_train_as_one_more_site(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The teacher's confident labels of unlabelled labs' leukocytes join training; the card
    says how many of each lab were kept. A teacher that saw the left-out site is refused."""
    out = tmp_path / "student"
    argv = ["--data", str(shared_data / "pbc"), "--limit", "16", "--epochs", "1"]
    argv += ["--input-size", "32", "--batch-size", "8", "--style-data", str(shared_data)]
    argv += ["--pseudo-teacher", str(DEFAULT_MODELS_DIR), "--pseudo-threshold", "0.5"]
    assert training.cli([*argv, "--out", str(out)]) == 0
    pseudo = load_card(out, "leukocyte-classifier")["pseudo_labels"]
    assert pseudo["teacher"] == load_card(DEFAULT_MODELS_DIR, "leukocyte-classifier").version
    assert set(pseudo["sources"]) <= {"raabin", "bcd", "draaslan"}  # no labelled site's lab
    assert all(0 < kept <= seen <= 16 for kept, seen in pseudo["sources"].values())
    assert sum(pseudo["per_class"].values()) == sum(k for k, _ in pseudo["sources"].values())
    leaky = ["--out", str(tmp_path / "leaky"), "--leave-out", "pbc"]
    leaky += ["--wbc-seg", str(shared_data / "wbc-seg")]
    with pytest.raises(SystemExit) as refused:  # the shipped teacher trained on PBC
        training.cli([*argv, *leaky])
    assert refused.value.code == 2
    assert "was trained on pbc" in capsys.readouterr().err


def test_white_balance_by_lookup_equals_the_float_arithmetic() -> None:
    """8-bit crops are white-balanced through a 256-level table per channel; other dtypes by
    float arithmetic: both give the same pixels, and the white point is the same."""
    from lisplugin.core.crops import REFERENCE_WHITE, white_balanced, white_point

    rng = np.random.default_rng(3)
    crop = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    crop[:20] = (250, 240, 200)  # a tinted glass
    assert np.array_equal(white_point(crop), white_point(crop.astype(np.float32)))
    white = white_point(crop)
    expected = np.clip(np.rint(crop.astype(np.float32) * (REFERENCE_WHITE / white)), 0, 255)
    assert np.array_equal(white_balanced(crop), expected.astype(np.uint8))
    assert np.array_equal(white_balanced(crop.astype(np.float32)), white_balanced(crop))
