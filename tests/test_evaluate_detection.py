"""Detection metrics: hand-computed cases, agreement with faster-coco-eval, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lisplugin.datasets.fields import read_fields
from lisplugin.evaluation import detection as ev


def _b(boxes, labels, scores=None) -> ev.Boxes:
    return ev.Boxes(
        np.array(boxes, float).reshape(-1, 4),
        np.array(labels, np.int64),
        None if scores is None else np.array(scores, float),
    )


def test_perfect_predictions_score_one():
    gt = _b([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1])
    pred = _b([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1], [0.9, 0.8])
    assert ev.mean_ap([gt], [pred]) == pytest.approx(1.0)
    assert ev.mean_ap([gt], [pred], ev.IOU_THRESHOLDS) == pytest.approx(1.0)


def test_ap_hand_computed():
    # TP (0.9), FP (0.8), TP (0.7) against two truths: precision 1, 1/2, 2/3 at recall
    # 1/2, 1/2, 1 -> envelope 1 up to recall 0.5 (51 of 101 points), 2/3 after (50 points).
    gt = _b([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])
    pred = _b([[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 60, 61]], [0, 0, 0], [0.9, 0.8, 0.7])
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert ev.average_precision([gt], [pred], 0, 0.5) == pytest.approx(expected)
    # IoU of the third box is 10/11 = 0.909: a TP up to 0.90, a FP at 0.95
    assert ev.average_precision([gt], [pred], 0, 0.95) == pytest.approx(51 / 101)
    assert np.isnan(ev.average_precision([gt], [pred], 2, 0.5))  # no PLT truth: left out


def test_duplicate_detection_is_a_false_positive_and_recall():
    gt = _b([[0, 0, 10, 10], [30, 0, 40, 10]], [1, 1])
    pred = _b([[0, 0, 10, 10], [1, 0, 10, 10]], [1, 1], [0.9, 0.8])
    assert ev.recall_at([gt], [pred], 1) == pytest.approx(0.5)
    # precision 1 at recall 0.5, never reaches recall 1
    assert ev.average_precision([gt], [pred], 1, 0.5) == pytest.approx(51 / 101)


def test_missed_cells_are_those_recall_counts_with_what_was_found_instead():
    gt = _b([[0, 0, 10, 10], [30, 0, 40, 10], [60, 0, 70, 10]], [1, 1, 0])
    # the first WBC is found; the second is called a red cell; the RBC has nothing near it
    pred = _b([[0, 0, 10, 10], [31, 0, 40, 10]], [1, 0], [0.9, 0.6])
    missed = ev.missed_cells(["a"], [gt], [pred])
    assert ev.recall_at([gt], [pred], 1) == pytest.approx(0.5)
    assert [(m["kind"], m["box"]) for m in missed] == [
        ("RBC", [60.0, 0.0, 70.0, 10.0]),
        ("WBC", [30.0, 0.0, 40.0, 10.0]),
    ]
    assert missed[0]["instead"] is None
    assert missed[1]["instead"] == {"kind": "RBC", "score": 0.6, "iou": 0.9}


def test_crosscheck_apart_is_scored_per_specimen_of_fields():
    # two specimens of 2 fields: 30 vs 20 regressed (0.5 apart), 4 vs 1 (3 apart of min 10: 0.3)
    apart = ev.crosscheck_apart_p90([10, 20, 3, 1, 99], [10.0, 10.0, 0.5, 0.5, 1.0], fields=2)
    assert apart == pytest.approx(np.percentile([0.5, 0.3], 90))
    assert np.isnan(ev.crosscheck_apart_p90([1], [1.0], fields=2))


def test_count_accuracy_skips_images_without_truth():
    acc, used = ev.count_accuracy([10, 0, 4], [9, 3, 6])
    assert used == 2
    assert acc == pytest.approx(((1 - 1 / 10) + (1 - 2 / 4)) / 2)
    assert np.isnan(ev.count_accuracy([0, 0], [1, 2])[0])


def test_report_uses_operating_thresholds_for_counts():
    gt = _b([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0])
    pred = _b([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0], [0.9, 0.2])
    rep = ev.detection_report([gt], [pred], {"RBC": 0.5, "WBC": 0.5, "PLT": 0.5})
    assert rep["map50"] == pytest.approx(1.0)
    assert rep["recall"]["RBC"] == pytest.approx(0.5)
    assert rep["count_accuracy"]["RBC"] == pytest.approx(0.5)
    assert rep["n_images"] == 1


def test_matches_faster_coco_eval():
    from faster_coco_eval import COCO, COCOeval_faster

    rng = np.random.default_rng(3)
    gts, preds, images, anns, dets = [], [], [], [], []
    for img in range(12):
        n = int(rng.integers(1, 9))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(10, 120, (n, 2))
        g = np.concatenate([xy, xy + wh], axis=1)
        lab = rng.integers(0, 3, n)
        # predictions: jittered truths, some missed, some spurious
        keep = rng.random(n) > 0.2
        p = g[keep] + rng.normal(0, 6, (int(keep.sum()), 4))
        p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 2)
        plab = lab[keep].copy()
        extra = int(rng.integers(0, 3))
        exy = rng.uniform(0, 400, (extra, 2))
        p = np.concatenate([p, np.concatenate([exy, exy + 30], axis=1)])
        plab = np.concatenate([plab, rng.integers(0, 3, extra)])
        ps = rng.uniform(0.05, 1.0, len(p))
        gts.append(_b(g, lab))
        preds.append(_b(p, plab, ps))
        images.append({"id": img, "width": 600, "height": 600})
        for b, c in zip(g, lab, strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append(
                {"id": len(anns) + 1, "image_id": img, "category_id": int(c) + 1,
                 "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        for b, c, s in zip(p, plab, ps, strict=True):
            dets.append(
                {"image_id": img, "category_id": int(c) + 1, "score": float(s),
                 "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            )  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": k} for i, k in enumerate(("RBC", "WBC", "PLT"))],
    }
    coco.createIndex()
    evaluator = COCOeval_faster(coco, coco.loadRes(dets), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert ev.mean_ap(gts, preds, ev.IOU_THRESHOLDS) == pytest.approx(evaluator.stats[0], abs=1e-6)
    assert ev.mean_ap(gts, preds, (0.5,)) == pytest.approx(evaluator.stats[1], abs=1e-6)


def _write_image(path: Path) -> None:
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(path)


def test_readers_voc_and_yolo(tmp_path: Path):
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    for name in ("a", "b"):
        _write_image(voc / "JPEGImages" / f"{name}.jpg")
        (voc / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename>"
            "<object><name>Platelets</name><bndbox><xmin>5</xmin><ymin>6</ymin>"
            "<xmax>15</xmax><ymax>16</ymax></bndbox></object>"
            "<object><name>rbc</name><bndbox><xmin>30</xmin><ymin>10</ymin>"
            "<xmax>20</xmax><ymax>40</ymax></bndbox></object></annotation>"
        )
    (tmp_path / "split.csv").write_text("image,split\na,test\nb,train\n")
    fields = read_fields(voc, "voc", tmp_path / "split.csv", "test")
    assert [f.name for f in fields] == ["a"]
    assert fields[0].labels.tolist() == [2, 0]
    assert fields[0].boxes[1].tolist() == [20, 10, 30, 40]  # swapped corners are put right

    yolo = tmp_path / "yolo"
    (yolo / "images" / "val").mkdir(parents=True)
    (yolo / "labels" / "val").mkdir(parents=True)
    (yolo / "data.yaml").write_text("names: ['WBC', 'RBC', 'Platelet']\n")
    _write_image(yolo / "images" / "val" / "x.png")
    (yolo / "labels" / "val" / "x.txt").write_text(
        "0 0.5 0.5 0.25 0.5\n2 0.1 0.1 0.1 0.1\n1 0.5 0.25 0.75 0.5 0.5 0.75\n"
    )
    fields = read_fields(yolo, "yolo", split="val")
    assert fields[0].labels.tolist() == [1, 2, 0]
    np.testing.assert_allclose(fields[0].boxes[0], [24, 12, 40, 36])
    np.testing.assert_allclose(fields[0].boxes[2], [32, 12, 48, 36])  # polygon -> its box


def test_cli_on_tiny_voc_and_yolo(tmp_path: Path, capsys, shared_data: Path, shipped_models: Path):
    from lisplugin.datasets.fields import read_voc

    src = shared_data / "bccd"
    bccd = read_voc(src, src / "cbc_split.csv", "test")[:3]
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    yolo = tmp_path / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    (yolo / "classes.txt").write_text("RBC\nWBC\nPLT\n")
    for f in bccd:
        Image.fromarray(f.load_image()).save(voc / "JPEGImages" / f"{f.name}.jpg")
        Image.fromarray(f.load_image()).save(yolo / "images" / f"{f.name}.jpg")
        objs = "".join(
            f"<object><name>{['RBC', 'WBC', 'Platelets'][c]}</name><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for b, c in zip(f.boxes, f.labels, strict=True)
        )
        (voc / "Annotations" / f"{f.name}.xml").write_text(f"<annotation>{objs}</annotation>")
        rows = [
            f"{c} {(b[0] + b[2]) / 2 / f.width} {(b[1] + b[3]) / 2 / f.height} "
            f"{(b[2] - b[0]) / f.width} {(b[3] - b[1]) / f.height}"
            for b, c in zip(f.boxes, f.labels, strict=True)
        ]
        (yolo / "labels" / f"{f.name}.txt").write_text("\n".join(rows))
    reports, misses = [], []
    for folder, fmt in ((voc, "voc"), (yolo, "yolo")):
        argv = ["--data", str(folder), "--format", fmt, "--models", str(shipped_models), "--json"]
        assert ev.cli([*argv, "--misses", str(tmp_path / f"{fmt}-missed.json")]) == 0
        reports.append(json.loads(capsys.readouterr().out))
        misses.append(json.loads((tmp_path / f"{fmt}-missed.json").read_text()))
    found = sum(r * n for r, n in zip(reports[0]["recall"].values(), truths(bccd), strict=True))
    assert len(misses[0]) == round(sum(truths(bccd)) - found)  # recall and the list agree
    for rep in reports:
        assert rep["n_images"] == 3
        assert (
            set(rep["ap"])
            == set(rep["recall"])
            == set(rep["count_accuracy"])
            == {"RBC", "WBC", "PLT"}
        )
        assert 0.5 < rep["map50"] <= 1.0
    assert reports[0]["map50"] == pytest.approx(reports[1]["map50"], abs=0.02)


def truths(fields) -> list[int]:
    """Ground-truth cells per kind over ``fields``."""
    return [sum(int((f.labels == k).sum()) for f in fields) for k in range(3)]


@pytest.fixture
def shipped_models(shared_data: Path) -> Path:
    models = Path(__file__).resolve().parent.parent / "models"
    if not (models / "cell-detector.md").is_file():
        pytest.skip("no shipped cell detector yet")
    return models
