"""Cell detector: training step + ONNX parity, shipped model, decoding, masks, WBF, augmentation."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from lisplugin.core.crops import usable_spacing
from lisplugin.evaluation.detection import Boxes, recall_at
from lisplugin.inference.detector import (
    decode,
    foreground_in_field,
    instance_masks,
    nms,
    prepare,
    tiles,
)
from lisplugin.inference.fusion import weighted_boxes_fusion
from lisplugin.training.field_augment import flip_rotate, scale_crop

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_train_steps_then_onnx_matches_torch(shared_data: Path, tmp_path: Path):
    import onnxruntime as ort

    from lisplugin.datasets.fields import read_voc
    from lisplugin.training import detector as td

    torch.manual_seed(0)
    fields = read_voc(shared_data / "bccd", shared_data / "bccd" / "cbc_split.csv", "train")[:4]
    data = td.Preloaded(fields)
    model = td.CellNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(3):
        x, tgt = data.batch(np.arange(4), 128, rng)
        loss = td.detector_loss(model(x), tgt)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        losses.append(loss["total"].item())
    assert all(np.isfinite(losses))
    path = tmp_path / "d.onnx"
    td.export_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in ((256, 320), (320, 224)):  # dynamic height and width
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            ref = [t.numpy() for t in model(x)]
        got = session.run(None, {"image": x.numpy()})
        for r, g in zip(ref, got, strict=True):
            assert r.shape == g.shape
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4)


def test_targets_mark_centres_and_regression_region():
    from lisplugin.training.detector import build_targets

    boxes = np.array([[10, 10, 50, 42], [80, 80, 92, 92]], np.float32)
    t = build_targets(boxes, np.array([0, 2]), 128, 128)
    assert t["heat"][0].max() == 1 and t["heat"][2].max() == 1 and t["heat"][1].max() == 0
    assert t["counts"].tolist() == [1, 0, 1]
    i, j = np.unravel_index(t["heat"][0].argmax(), t["heat"][0].shape)
    px, py = j * 4 + 1.5, i * 4 + 1.5
    np.testing.assert_allclose(t["ltrb"][:, i, j], [px - 10, py - 10, 50 - px, 42 - py])
    assert t["fg"][i, j] == 1 and t["fg"][0, 0] == 0


def test_shipped_model_finds_cells(shared_data: Path):
    if not (MODELS / "cell-detector.md").is_file():
        pytest.skip("no shipped cell detector yet")
    from lisplugin.datasets.fields import read_voc
    from lisplugin.inference.detector import OnnxCellDetector

    detector = OnnxCellDetector.from_models_dir(MODELS)
    f = read_voc(shared_data / "bccd", shared_data / "bccd" / "cbc_split.csv", "test")[0]
    image = f.load_image()
    result = detector.detect(image)
    dets = result.cells
    truth = f.counts()
    found = {k: sum(d.kind == k for d in dets) for k in ("RBC", "WBC", "PLT")}
    # BCCD leaves many red cells unlabelled (border cells above all): the model finds more
    assert 0.8 * truth["RBC"] <= found["RBC"] <= 2 * truth["RBC"] + 3
    assert found["WBC"] == truth["WBC"]
    for d in dets:
        x0, y0, x1, y1 = (round(v) for v in d.box)
        assert d.mask is not None and d.mask.dtype == bool
        assert d.mask.shape == (max(y1 - y0, 1), max(x1 - x0, 1))
        assert 0 <= d.score <= 1
    assert sum(d.mask.any() for d in dets) >= 0.9 * len(dets)
    counts = result.regressed_counts
    assert counts is not None
    assert set(counts) == {"RBC", "WBC", "PLT"}
    assert 0.8 * truth["RBC"] <= counts["RBC"] <= 2 * truth["RBC"] + 3
    assert abs(counts["WBC"] - truth["WBC"]) < 0.5


@pytest.mark.parametrize("length", [300, 512, 700, 1000, 1923, 5000])
def test_tiles_cover_overlap_and_keep_every_centre_once(length: int):
    windows = tiles(length, 512, 160, 4)
    assert windows[0][0] == 0 and windows[-1][1] == length
    assert windows[0][2] == 0 and windows[-1][3] == length
    for (_, end, _, keep_to), (start, _, keep_from, _) in itertools.pairwise(windows):
        assert end - start >= 160 and start % 4 == 0
        assert keep_to == keep_from  # the kept parts partition the length
        assert keep_from - start >= 80 and end - keep_to >= 80  # a kept cell lies whole inside
    assert all(end - start <= 512 + 4 for start, end, _, _ in windows)


def test_absurd_pixel_spacing_is_not_used():
    assert usable_spacing(0.25) == 0.25
    assert usable_spacing(None) is None
    assert usable_spacing(1000.0) is None  # 1 mm: a default, not a microscope
    assert usable_spacing(0.0) is None


def test_large_field_at_the_same_magnification_is_tiled_not_shrunk(shared_data: Path):
    """3 x 3 BCCD fields in one 1920 x 1440 image: shrunk to the 320 px long side its cells
    would be a few pixels wide and nearly all missed; rescaled and tiled they are found."""
    from lisplugin.datasets.fields import mosaics, read_voc
    from lisplugin.inference.detector import OnnxCellDetector

    detector = OnnxCellDetector.from_models_dir(MODELS)
    fields = read_voc(shared_data / "bccd", shared_data / "bccd" / "cbc_split.csv", "test")
    mosaic = mosaics(fields, 3)[0]
    image, truth = mosaic.load_image(), Boxes(mosaic.boxes, mosaic.labels)
    assert image.shape == (3 * 480, 3 * 640, 3) and mosaic.parts == tuple(fields[:9])
    assert detector.input_scale(fields[0].load_image()) == 0.5  # one field: one plain pass
    assert detector.input_scale(image) > 2 * 320 / 1920  # red cells measured, field rescaled
    for spacing in (None, 7.5 / 100):  # measured, or told by the header (red cells 100 px)
        found = detector.detect(image, pixel_spacing_um=spacing)
        assert found.cells[0].mask is not None
        boxes = Boxes(
            np.array([c.box for c in found.cells]),
            np.array([("RBC", "WBC", "PLT").index(c.kind) for c in found.cells]),
            np.array([c.score for c in found.cells]),
        )
        recall = [recall_at([truth], [boxes], k) for k in range(3)]
        assert recall[0] >= 0.9 and recall[1] == 1.0 and recall[2] >= 0.8, recall
        assert found.regressed_counts is None  # the count head knows whole fields only


def test_prepare_pads_to_multiple_of_32():
    x, scale = prepare(np.zeros((480, 640, 3), np.uint8), 320)
    assert x.shape == (1, 3, 256, 320) and scale == 0.5
    x, scale = prepare(np.zeros((100, 50, 3), np.uint8), 320)
    assert x.shape == (1, 3, 320, 160) and x.dtype == np.float32


def test_decode_peaks_and_nms():
    heat = np.zeros((3, 16, 16), np.float32)
    heat[0, 4, 4], heat[0, 4, 5] = 0.9, 0.8  # a plateau neighbour: not a 3x3 maximum
    heat[2, 10, 10] = 0.6
    heat[1, 10, 10] = 0.3  # same cell claimed by a second class with a lower score
    ltrb = np.full((4, 16, 16), 6.0, np.float32)
    boxes, labels, scores = decode(heat, ltrb, np.array([0.5, 0.2, 0.5]), stride=4)
    assert labels.tolist() == [0, 2] and scores.tolist() == pytest.approx([0.9, 0.6])
    np.testing.assert_allclose(boxes[0], [17.5 - 6, 17.5 - 6, 17.5 + 6, 17.5 + 6])
    assert nms(np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float),
               np.array([0.5, 0.9, 0.7]), 0.5).tolist() == [1, 2]  # fmt: skip


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Textbook greedy NMS, one box at a time: the reference for the vectorised one."""
    order = sorted(range(len(scores)), key=lambda k: -scores[k])  # stable: ties keep order
    keep: list[int] = []
    for k in order:
        x0, y0, x1, y1 = boxes[k]
        for j in keep:
            a0, b0, a1, b1 = boxes[j]
            inter = max(min(x1, a1) - max(x0, a0), 0) * max(min(y1, b1) - max(y0, b0), 0)
            union = (x1 - x0) * (y1 - y0) + (a1 - a0) * (b1 - b0) - inter
            if inter / max(union, 1e-9) >= iou:
                break
        else:
            keep.append(k)
    return keep


@pytest.mark.parametrize("n", [0, 1, 7, 120, 400])
def test_nms_keeps_what_greedy_suppression_keeps(n: int) -> None:
    rng = np.random.default_rng(n)
    corner = rng.random((n, 2)) * 300
    boxes = np.concatenate([corner, corner + rng.random((n, 2)) * 40 + 4], axis=1)
    scores = rng.random(n).round(1)  # many ties
    for iou in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, iou).tolist() == _greedy_nms(boxes, scores, iou)


def test_masks_split_touching_cells():
    boxes = np.array([[0, 0, 40, 40], [30, 0, 70, 40]], float)
    fg = foreground_in_field(np.ones((10, 18), np.float32), scale=1.0, stride=4, h=40, w=70)
    assert fg.shape == (40, 70) and fg.min() == 1
    masks = instance_masks(boxes, fg)
    assert masks[0].shape == (40, 40) and masks[1].shape == (40, 40)
    # overlap columns 30..39 of the field: each pixel goes to one cell only
    overlap = masks[0][:, 30:40] & masks[1][:, 0:10]
    assert not overlap.any()
    assert masks[0][20, 20] and masks[1][20, 20] and not masks[0][0, 0]


def test_wbf_hand_made_boxes():
    a = (
        np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float),
        np.array([0, 0]),
        np.array([0.9, 0.8]),
    )
    b = (np.array([[1, 1, 11, 11], [0, 0, 10, 10]], float), np.array([0, 1]), np.array([0.6, 0.5]))
    boxes, labels, scores = weighted_boxes_fusion([a[0], b[0]], [a[1], b[1]], [a[2], b[2]])
    assert len(boxes) == 3
    np.testing.assert_allclose(boxes[0], [0.4, 0.4, 10.4, 10.4])  # (0.9 * A + 0.6 * B) / 1.5
    assert scores[0] == pytest.approx(0.75) and labels[0] == 0  # both passes agree
    assert scores.tolist()[1:] == pytest.approx([0.4, 0.25])  # single-pass boxes halved
    assert labels.tolist()[1:] == [0, 1]  # the other class is never fused in


def _box_image(box: np.ndarray, h: int, w: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box.astype(int)
    img[y0:y1, x0:x1] = 255
    return img


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_flip_rotate_moves_boxes_with_pixels(k: int, flip: bool):
    box = np.array([[10, 5, 30, 15]], np.float32)
    img, out = flip_rotate(_box_image(box[0], 40, 60), box, k, flip)
    x0, y0, x1, y1 = out[0].astype(int)
    assert img[y0:y1, x0:x1].min() == 255 and img.sum() == 255 * 3 * 200


def test_scale_crop_cuts_cells_at_the_border():
    boxes = np.array([[0, 0, 100, 100], [150, 150, 200, 200]], np.float32)
    image = np.zeros((300, 300, 3), np.uint8)
    rng = np.random.default_rng(0)
    _, b, lab = scale_crop(image, boxes, np.array([0, 1]), (100, 100), 1.0, rng)
    assert (b >= 0).all() and (b <= 100).all() and len(b) == len(lab)


def test_write_copies_lists_txl_relabelled_bccd_test_fields(shared_data: Path, tmp_path: Path):
    from lisplugin.datasets.fields import read_yolo
    from lisplugin.training import detector as td

    out = tmp_path / "copies.csv"
    assert td.cli(["--data", str(shared_data), "--write-copies", str(out)]) == 0
    copies = read_yolo(shared_data / "txl-pbc", out, "bccd_test_copy")
    assert len(copies) >= 40  # most of the 60 test fields are re-published at 640 x 480
    assert all((f.width, f.height) == (640, 480) for f in copies)


@pytest.mark.parametrize("site", ["raabin", "bccd"])
def test_leave_out_removes_a_site_from_training_and_validation(shared_data: Path, site: str):
    """Leave-one-site-out: none of the site's images is trained on or chooses the epoch."""
    from lisplugin.training import detector as td

    every, every_val, _ = td.training_sets(shared_data)
    train, val, info = td.training_sets(shared_data, site)
    gone = set(info["left_out"])
    assert info["left_out_images"] == len(gone) > 100
    seen = {f.name for f in train} | {f.name for fields in val.values() for f in fields}
    assert not seen & gone
    assert len(train) < len(every)
    if site == "raabin":  # its 575 x 575 fields, from TXL-PBC train and val
        assert not any((f.width, f.height) == (575, 575) for f in train)
        assert len(val["txl_val"]) < len(every_val["txl_val"])
    else:  # BCCD with its TXL-PBC re-publications: no BCCD validation set is left
        assert "bccd_val" not in val and not any(f.name.startswith("Blood") for f in train)


def _giou_loss_hand_written(pred, target, weight):
    """The loss as written before torchvision.ops.generalized_box_iou_loss replaced it."""
    sel = weight > 0
    p, t, wt = pred.permute(0, 2, 3, 1)[sel], target.permute(0, 2, 3, 1)[sel], weight[sel]
    area_p = (p[:, 0] + p[:, 2]) * (p[:, 1] + p[:, 3])
    area_t = (t[:, 0] + t[:, 2]) * (t[:, 1] + t[:, 3])
    iw = torch.min(p[:, 0], t[:, 0]) + torch.min(p[:, 2], t[:, 2])
    ih = torch.min(p[:, 1], t[:, 1]) + torch.min(p[:, 3], t[:, 3])
    inter = iw * ih
    union = area_p + area_t - inter
    ew = torch.max(p[:, 0], t[:, 0]) + torch.max(p[:, 2], t[:, 2])
    eh = torch.max(p[:, 1], t[:, 1]) + torch.max(p[:, 3], t[:, 3])
    enclose = ew * eh + 1e-6
    giou = inter / union.clamp(min=1e-6) - (enclose - union) / enclose
    return ((1 - giou) * wt).sum() / wt.sum().clamp(min=1e-6)


def test_giou_loss_is_the_hand_written_one():
    from lisplugin.training.detector import giou_loss

    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 30.0):  # tiny, cell-sized and large side distances
        pred = (torch.rand(2, 4, 16, 20, generator=g) * scale).requires_grad_()
        target = torch.rand(2, 4, 16, 20, generator=g) * 30 + 0.5
        weight = torch.rand(2, 16, 20, generator=g) * (torch.rand(2, 16, 20, generator=g) < 0.3)
        got, ref = giou_loss(pred, target, weight), _giou_loss_hand_written(pred, target, weight)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
        (g_got,) = torch.autograd.grad(got, pred)
        (g_ref,) = torch.autograd.grad(ref, pred)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-8)
    empty = giou_loss(pred, target, torch.zeros(2, 16, 20))
    assert empty.item() == 0 and empty.requires_grad


def _flip_rotate_hand_written(image, boxes, k, flip):
    """numpy flips and turns, as written before torchvision's transforms v2 replaced them."""
    img, b = image, boxes.copy()
    if flip:
        w = img.shape[1]
        img = img[:, ::-1]
        b[:, [0, 2]] = w - b[:, [2, 0]]
    for _ in range(k % 4):
        w = img.shape[1]
        img = np.rot90(img)
        b = np.stack([b[:, 1], w - b[:, 2], b[:, 3], w - b[:, 0]], axis=1)
    return np.ascontiguousarray(img), b.astype(np.float32)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("flip", [False, True])
def test_flip_rotate_is_the_hand_written_one(k: int, flip: bool):
    rng = np.random.default_rng(k)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    xy = rng.uniform(0, 1, (50, 2, 2)) * [128, 96]
    boxes = np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1).astype(np.float32)
    img, b = flip_rotate(image, boxes, k, flip)
    ref_img, ref_b = _flip_rotate_hand_written(image, boxes, k, flip)
    assert img.dtype == np.uint8 and img.flags.c_contiguous and b.dtype == np.float32
    np.testing.assert_array_equal(img, ref_img)
    np.testing.assert_array_equal(b, ref_b)
    _, none = flip_rotate(image, np.zeros((0, 4), np.float32), k, flip)
    assert none.shape == (0, 4)


def test_conv_blocks_keep_the_layers_keys_and_initial_weights():
    from torch import nn

    from lisplugin.training.detector import CellNet, conv_bn

    torch.manual_seed(0)
    block = conv_bn(16, 32, 2)
    torch.manual_seed(0)
    hand = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(True))
    assert str(list(block)) == str(list(hand))
    sd, ref = block.state_dict(), hand.state_dict()
    assert list(sd) == list(ref)
    for key in sd:
        torch.testing.assert_close(sd[key], ref[key], rtol=0, atol=0)
    keys = list(CellNet().state_dict())
    assert {"s2.0.weight", "s8.1.b.1.running_var"} <= set(keys)
    assert "s8.1.b.2.weight" not in keys  # the residual's second convolution has no ReLU
