"""The classifier's features normalised on a specimen's own leukocytes (``specimen_norms``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from lisplugin.config import DEFAULT_MODELS_DIR
from lisplugin.inference.classifier import OnnxLeukocyteClassifier, SpecimenClassifier
from lisplugin.inference.registry import ModelCardError, load_card
from lisplugin.inference.specimen_norms import (
    affine_graph,
    identity,
    measure_source,
    save_source,
    statistics_graph,
)
from lisplugin.training.norms import NORMS_FILE, _set_front_matter, site_weights

CARD = "leukocyte-classifier"


def _crops(seed: int, count: int, tint: tuple[int, int, int] = (0, 0, 0)) -> list[np.ndarray]:
    """Leukocyte-like crops (a violet nucleus in pink cytoplasm among red cells), tinted."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:160, :160]
    out = []
    for _ in range(count):
        crop = np.full((160, 160, 3), (232, 226, 236), dtype=np.int16)
        for _ in range(6):
            cy, cx = rng.integers(0, 160, 2)
            crop[(yy - cy) ** 2 + (xx - cx) ** 2 < 18**2] = (215, 140, 150)
        r = rng.integers(22, 30)
        crop[(yy - 80) ** 2 + (xx - 80) ** 2 < r**2] = (190, 160, 200)
        crop[(yy - 80) ** 2 + (xx - rng.integers(70, 90)) ** 2 < (r // 2) ** 2] = (90, 50, 140)
        crop += rng.integers(-8, 9, crop.shape) + np.asarray(tint)
        out.append(np.clip(crop, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def normed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped models, the classifier with statistics measured on plain synthetic crops."""
    folder = tmp_path_factory.mktemp("models")
    for path in DEFAULT_MODELS_DIR.iterdir():
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    classifier = OnnxLeukocyteClassifier(load_card(folder, CARD))
    x = classifier.inputs(_crops(0, 48))
    source = measure_source(classifier._onnx_path, [(x[:24], 0.5), (x[24:], 0.5)])
    sha = save_source(folder / NORMS_FILE, source)
    described = {"file": NORMS_FILE, "sha256": sha, "alpha": 0.5, "min_cells": 8, "max_cells": 16}
    _set_front_matter(folder / f"{CARD}.md", described, ["pbc"])
    return folder


def _logits(graph: bytes, x: np.ndarray, feed: dict[str, np.ndarray] | None = None) -> list:
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x, **(feed or {})})


def test_the_rewired_graphs_are_the_network_when_nothing_moves(normed: Path) -> None:
    """With an identity scale and shift, or a specimen weighted 0, both graphs are the
    shipped network (its integer convolutions included)."""
    classifier = OnnxLeukocyteClassifier(load_card(normed, CARD))
    x = classifier.inputs(_crops(1, 6))
    plain = classifier._session.run(None, {classifier._input: x})[0]
    path = classifier._onnx_path
    layers = [int(i.shape[1]) for i in ort.InferenceSession(affine_graph(path)).get_inputs()[1::2]]
    assert len(layers) == 14  # every convolution, shortcuts included
    # (the plain graph's integer convolutions are fused into QLinearConv; once rewired they run
    # in float on the dequantised weights: a hundredth of a logit apart)
    assert np.allclose(_logits(affine_graph(path), x, identity(layers))[0], plain, atol=0.03)
    source = classifier.norms.source  # type: ignore[union-attr]
    assert np.allclose(_logits(statistics_graph(path, source, 0.0), x)[0], plain, atol=0.03)
    # the specimen fully weighted, but on no layer (``layers``: only the first N adapt)
    assert np.allclose(_logits(statistics_graph(path, source, 1.0, 0), x)[0], plain, atol=0.03)
    assert not np.allclose(_logits(statistics_graph(path, source, 1.0, 1), x)[0], plain, atol=0.03)


def test_one_statistics_pass_gives_the_scale_and_shift_of_every_layer(normed: Path) -> None:
    """The statistics graph normalises each layer with the batch's statistics as it goes (a
    batch norm in training mode); the classifier graph fed the scale and shift it measured
    gives the same logits for the same batch."""
    classifier = OnnxLeukocyteClassifier(load_card(normed, CARD))
    norms = classifier.norms
    assert norms is not None
    x = classifier.inputs(_crops(2, 12, tint=(-40, 10, -30)))  # another lab's stain
    through = _logits(statistics_graph(classifier._onnx_path, norms.source, 0.5), x)[0]
    feed = norms.affine(x)
    assert np.allclose(norms.logits(x, feed), through, atol=5e-3)
    plain = classifier._session.run(None, {classifier._input: x})[0]
    assert np.abs(through - plain).max() > 0.05  # the tint moved the features: they were normalised


def test_a_specimen_is_normalised_only_with_enough_leukocytes(normed: Path) -> None:
    classifier = OnnxLeukocyteClassifier(load_card(normed, CARD))
    few = _crops(3, 7, tint=(-40, 10, -30))
    assert classifier.for_specimen(few) is classifier  # fewer than min_cells (8)
    many = _crops(3, 40, tint=(-40, 10, -30))
    specimen = classifier.for_specimen(many)
    assert isinstance(specimen, SpecimenClassifier)
    assert classifier.specimen_sample(40) == sorted(set(classifier.specimen_sample(40)))
    assert len(classifier.specimen_sample(40)) == 16
    assert classifier.specimen_sample(7) == []  # too few: nothing to cut
    # the same 16 crops of 40, evenly spread, give the statistics: the order sets which
    chosen = [many[i] for i in classifier.specimen_sample(40)]
    again = classifier.for_specimen(chosen)
    probabilities = specimen.classify(many[:5])
    assert np.allclose(again.classify(many[:5]), probabilities, atol=1e-6)  # type: ignore[union-attr]
    assert probabilities.shape == (5, len(classifier.classes))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(probabilities, classifier.classify(many[:5]), atol=1e-3)
    assert specimen.version == classifier.version and specimen.classes == classifier.classes


def test_a_card_whose_norms_do_not_match_is_refused(normed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(normed, folder)
    (folder / NORMS_FILE).write_bytes(b"not the statistics")
    with pytest.raises(ModelCardError, match="specimen_norms"):
        OnnxLeukocyteClassifier(load_card(folder, CARD))
    card = folder / f"{CARD}.md"
    _, front, body = card.read_text().split("---\n", 2)
    meta = yaml.safe_load(front)
    meta["specimen_norms"]["alpha"] = 1.5
    card.write_text(f"---\n{yaml.safe_dump(meta)}---\n{body}")
    with pytest.raises(ModelCardError, match="alpha"):
        OnnxLeukocyteClassifier(load_card(folder, CARD))


def test_the_spread_within_sites_leaves_out_the_spread_between_them(normed: Path) -> None:
    """Measured within sites, a layer's variance is the weighted mean of each site's own; pooled,
    it adds the spread between the sites' means (here a tinted and a plain site)."""
    classifier = OnnxLeukocyteClassifier(load_card(normed, CARD))
    a, b = classifier.inputs(_crops(3, 16)), classifier.inputs(_crops(4, 16, (30, -20, 10)))
    pooled = measure_source(classifier._onnx_path, [(a, 0.75), (b, 0.25)])
    within = measure_source(classifier._onnx_path, [(a, 0.75), (b, 0.25)], within=True)
    alone = [measure_source(classifier._onnx_path, [(x, 1.0)])[0] for x in (a, b)]
    np.testing.assert_allclose(within[0][0], pooled[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        within[0][1], 0.75 * alone[0][1] + 0.25 * alone[1][1], rtol=1e-4, atol=1e-6
    )
    assert (pooled[0][1] >= within[0][1] - 1e-5).all()
    assert (pooled[0][1] > within[0][1] + 1e-4).any()


def test_sites_weigh_as_in_the_training_draws() -> None:
    assert site_weights(["pbc", "bccd", "wbc-seg"]) == {"pbc": 0.5, "bccd": 0.25, "wbc-seg": 0.25}
    assert site_weights(["bccd", "wbc-seg"]) == {"bccd": 0.5, "wbc-seg": 0.5}
    assert site_weights(["pbc"]) == {"pbc": 1.0}
