"""BCCD leukocyte crops for domain adaptation, and fine-tuning from an exported ONNX."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from lisplugin.core.crops import PBC_CROP_PX, centre_window, resize_rgb
from lisplugin.core.types import LEUKOCYTE_CLASSES
from lisplugin.datasets.bccd_wbc import (
    load_field_crops,
    main_leukocyte_crop,
    read_boxes,
    read_field_samples,
)
from lisplugin.datasets.pbc import load_rgb
from lisplugin.training import classifier as training
from lisplugin.training.onnx_init import load_onnx_weights, max_abs_difference


@pytest.fixture(scope="module")
def bccd(shared_data: Path) -> Path:
    path = shared_data / "bccd"
    if not (path / "wbc_labels.csv").is_file():
        pytest.skip(f"BCCD with wbc_labels.csv not found at {path}")
    return path


def test_field_crops_have_pbc_size_and_known_labels(bccd: Path) -> None:
    samples = read_field_samples(bccd)[:6]
    assert samples and all(s.label in LEUKOCYTE_CLASSES for s in samples)
    crop = main_leukocyte_crop(samples[0])
    assert crop is not None and crop.shape == (PBC_CROP_PX, PBC_CROP_PX, 3)
    assert crop.dtype == np.uint8
    boxes = read_boxes(samples[0].annotation)
    assert {d.kind for d in boxes} <= {"RBC", "WBC", "PLT"} and any(d.kind == "WBC" for d in boxes)
    x, y = load_field_crops(samples, LEUKOCYTE_CLASSES, 64)
    assert x.shape == (len(samples), 64, 64, 3) and x.dtype == np.uint8
    assert [LEUKOCYTE_CLASSES[i] for i in y] == [s.label for s in samples]
    centred, _ = load_field_crops(samples[:1], LEUKOCYTE_CLASSES, 64, centre=0.7)
    assert np.array_equal(centred[0], resize_rgb(centre_window(crop, 0.7), 64))


def test_bccd_test_fields_never_reach_training(bccd: Path) -> None:
    with (bccd / "cbc_split.csv").open(newline="") as fh:
        listed = {row["image"]: row["split"] for row in csv.DictReader(fh)}
    samples = read_field_samples(bccd)
    for sample in samples:
        assert sample.split == listed.get(sample.image.stem, "train")
    test = [s for s in samples if s.split == "test"]
    assert len(test) > 40
    # Fields the split file does not list become training fields: none may copy a test field.
    thumbs = {s.image.stem: resize_rgb(load_rgb(s.image), 16).astype(np.int16) for s in test}
    for sample in samples:
        if sample.image.stem not in listed:
            thumb = resize_rgb(load_rgb(sample.image), 16).astype(np.int16)
            closest = min(float(np.abs(thumb - t).mean()) for t in thumbs.values())
            assert closest > 3.0, sample.image.stem


def test_init_from_exported_onnx_reproduces_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = training.LeukocyteNet(8, widths=(8, 16, 16, 16))
    for module in source.modules():  # non-trivial batch norms, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "net.onnx"
    training.export_onnx(source, path, 32)
    target = training.LeukocyteNet(8, widths=(8, 16, 16, 16))
    x = torch.randn(16, 3, 32, 32)
    load_onnx_weights(target, path, x)
    assert max_abs_difference(target, path, x) < 1e-4
    target.train()
    with torch.no_grad():  # train-mode batch norm on the calibration batch: the same function
        assert torch.allclose(target(x), source.eval()(x), atol=1e-3)


def test_group_norm_network_loads_back_from_its_graph_and_starts_from_a_batch_norm_one(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    source = training.ViewAverage(
        training.LeukocyteNet(8, widths=(8, 16, 16, 16), norm="group"), 4
    ).eval()
    for module in source.modules():  # non-trivial scales and shifts, as after training
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "group.onnx"
    training.export_onnx(source, path, 32)
    x = torch.randn(8, 3, 32, 32)
    target = training.LeukocyteNet(8, widths=(8, 16, 16, 16), norm="group")
    load_onnx_weights(target, path, x)  # exact: scales and shifts found after each norm
    assert max_abs_difference(training.ViewAverage(target, 4), path, x) < 1e-4
    with pytest.raises(ValueError, match="unfused"):  # a batch-norm network cannot take it
        load_onnx_weights(training.LeukocyteNet(8, widths=(8, 16, 16, 16)), path, x)
    batch = training.LeukocyteNet(8, widths=(8, 16, 16, 16))
    training.export_onnx(batch, tmp_path / "batch.onnx", 32)
    started = training.LeukocyteNet(8, widths=(8, 16, 16, 16), norm="group")
    load_onnx_weights(started, tmp_path / "batch.onnx", x)  # convolutions and head carried over
    assert torch.equal(started.head.weight, batch.head.weight)
    assert torch.allclose(started.features[0].weight, batch.features[0].weight, atol=1e-4)
