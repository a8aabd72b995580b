"""``lisplugin adapt``: fit the leukocyte classifier to one lab from its own labelled cells.

Every lab stains, lights and magnifies differently, and every reviewer decision is a label. A
lab's cells come either from class folders (``--data DIR``: ``DIR/<class>/<image>``, each image
a whole field or a crop showing one leukocyte at any magnification; the detector finds it and
the most confident leukocyte is the labelled one) or from the daemon's signed-out cases
(``--from-reviews``: every leukocyte of a case a pathologist signed out, with the class it was
released with, cut again exactly as the classifier saw it).

Part of the site's cells is held back (stratified by class, seeded) and never trained on: the
model in use and the adapted one are both scored on it. The adapted model is a short
fine-tune on the CPU (the site's crops with the lab-to-lab augmentations, mixed with reference
crops when a reference set is given, so that classes the site lacks are not forgotten), its
temperature refitted, and it is written with the detector it was adapted for into a new models
folder whose card gives lineage, data and before/after figures. It is not used until an admin
runs ``lisplugin models promote``, which checks those figures again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lisplugin.core.types import LEUKOCYTE_CLASSES
from lisplugin.evaluation.differential import score_crops
from lisplugin.inference.store import HELD_BACK_FILE, stain_rows
from lisplugin.progress import progress


@dataclass
class SiteCells:
    """A site's labelled leukocytes as the classifier sees them: PBC-scale crops, their
    labels, each crop's specimen stain reference (``core.crops.shared_nucleus``; None: the
    crop's own), and how many images or cells could not be used."""

    crops: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    nuclei: list[np.ndarray | None] = field(default_factory=list)
    skipped: int = 0


def collect_folder(data: Path, detector: Any, log: Callable[[str], None] = print) -> SiteCells:
    """PBC-scale crops and labels of a lab's class folders, cut by the daemon's own path; and
    the number of images in which no leukocyte was found (left out). The folder is one lab:
    images without a scale of their own share the folder's, and all crops its chromatin as
    stain reference, as ``evaluate cells`` does."""
    from lisplugin.core.analysis import detect_folder, most_confident_leukocyte
    from lisplugin.core.types import Field
    from lisplugin.datasets import TolerantReader, folder_fields, read_samples

    samples = read_samples(data, classes=LEUKOCYTE_CLASSES)
    reader = TolerantReader()  # a file that cannot be read is one image without a leukocyte
    folder = detect_folder(
        folder_fields(samples, progress(samples, desc="cells", unit="img"), reader), detector
    )
    found, shared, nucleus = folder.found, folder.scale, folder.nucleus
    cells = SiteCells()
    for sample, detections in zip(samples, found, strict=True):
        image = Field(reader(sample.path), str(sample.path))
        cut = most_confident_leukocyte(image, detector, found=detections, shared=shared)
        if cut is None:
            cells.skipped += 1
            continue
        cells.crops.append(cut[1])
        cells.labels.append(sample.label)
        cells.nuclei.append(nucleus)
    log(
        f"{len(cells.crops)} cells from {len(samples)} images in {data} "
        f"({cells.skipped} without a leukocyte, {len(reader.unreadable)} of them unreadable)"
    )
    return cells


def collect_reviews(settings: Any, log: Callable[[str], None] = print) -> SiteCells:
    """Crops and released classes of every leukocyte of the signed-out cases in the database,
    each with the stain reference it was classified against (stored with the result; results
    stored before it was kept: the case's leukocytes' median chromatin, measured again)."""
    from sqlalchemy import select

    from lisplugin.core.crops import crop_nucleus, shared_nucleus
    from lisplugin.service.review import cell_crop, cell_stain_reference
    from lisplugin.storage.db import Database
    from lisplugin.storage.orm import Case, CaseStatus

    db = Database(settings.database_url)
    cells = SiteCells()
    try:
        with db.session() as session:
            cases = session.scalars(select(Case).where(Case.status == CaseStatus.FINAL)).all()
            for case in progress(cases, desc="signed-out cases", unit="case"):
                crops: list[np.ndarray] = []
                stored: list[np.ndarray | None] = []
                decoded: dict[int, Any] = {}  # each field of the case decoded once
                for cell in (case.result or {}).get("cells") or []:
                    if cell.get("kind") != "WBC" or cell.get("class") not in LEUKOCYTE_CLASSES:
                        continue
                    try:
                        crop = cell_crop(case, int(cell["id"]), decoded=decoded)
                        reference = cell_stain_reference(case, int(cell["id"]))
                    except Exception as exc:  # an image purged or unreadable: skip that cell
                        cells.skipped += 1
                        log(f"case {case.id} cell {cell['id']}: not cut again ({exc})")
                        continue
                    crops.append(crop)
                    stored.append(reference)
                    cells.labels.append(str(cell["class"]))
                fields = (case.result or {}).get("fields") or []
                if any("stain_reference" in f for f in fields):
                    cells.nuclei += stored
                else:
                    nucleus = shared_nucleus([crop_nucleus(c) for c in crops])
                    cells.nuclei += [nucleus] * len(crops)
                cells.crops += crops
            log(f"{len(cells.crops)} reviewed leukocytes from {len(cases)} signed-out cases")
    finally:
        db.dispose()
    return cells


def held_back_split(
    labels: Sequence[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices to train on and to hold back: ``fraction`` of each class (at least one of a
    class with two or more cells), drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    labels_a = np.asarray(labels)
    train, held = [], []
    for c in sorted(set(labels)):
        idx = rng.permutation(np.flatnonzero(labels_a == c))
        k = round(fraction * len(idx)) if len(idx) >= 2 else 0
        k = max(k, 1) if len(idx) >= 2 and fraction > 0 else k
        held += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.sort(np.asarray(train, dtype=int)), np.sort(np.asarray(held, dtype=int))


def adapt(
    crops: list[np.ndarray],
    labels: list[str],
    base_dir: Path,
    out: Path,
    *,
    source: str,
    held_back: float = 0.25,
    steps: int = 300,
    lr: float = 3e-4,
    batch_size: int = 32,
    reference: Path | None = None,
    threads: int = 2,
    seed: int = 0,
    command: str = "",
    log: Callable[[str], None] = print,
    nuclei: Sequence[np.ndarray | None] | None = None,
) -> dict[str, Any]:
    """Fine-tune the classifier of ``base_dir`` on a site's crops; write ``out``; return the
    before/after figures on the held-back cells."""
    import torch

    from lisplugin.config import load_settings
    from lisplugin.core.crops import classifier_input
    from lisplugin.core.prevalence import label_mix
    from lisplugin.inference.classifier import OnnxLeukocyteClassifier
    from lisplugin.inference.registry import card_figures, file_sha256, load_card
    from lisplugin.training import classifier as trainer

    started = time.perf_counter()
    names = load_settings().analysis
    base_card = load_card(base_dir, names.classifier)
    base = OnnxLeukocyteClassifier(base_card)
    classes = list(base.classes)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not classes of the model ({classes})")
    if len(set(labels)) < 2 or len(crops) < 4:
        raise ValueError("adaptation needs at least 4 cells of at least 2 classes")
    train_idx, held_idx = held_back_split(labels, held_back, seed)
    train_crops = [crops[i] for i in train_idx]
    train_labels = [labels[i] for i in train_idx]
    held_crops = [crops[i] for i in held_idx]
    held_labels = [labels[i] for i in held_idx]
    # each crop's specimen stain reference (None: its own), as the daemon would classify it
    stains = list(nuclei) if nuclei is not None else [None] * len(crops)
    train_stains = [stains[i] for i in train_idx]
    held_stains = [stains[i] for i in held_idx]
    before = score_crops(base, held_crops, held_labels, held_stains)
    log(f"held back {len(held_idx)} of {len(crops)} cells; model in use: {before['accuracy']}")

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    front = dict(base_card.meta)
    size, centre = int(front["input_size"]), float(front.get("centre_crop", 1.0))
    colour = front.get("colour_normalisation")
    x = np.stack(
        [
            classifier_input(c, size, centre, colour, n)
            for c, n in zip(train_crops, train_stains, strict=True)
        ]
    )
    y = np.asarray([classes.index(c) for c in train_labels], dtype=np.int64)
    weights = np.full(len(y), 1.0 / len(y))
    val_x, val_y = x, y
    ref_result = None
    if reference is not None:
        from lisplugin.datasets import read_samples

        ref = read_samples(reference, classes=classes)
        ref_train = [s for s in ref if s.split in ("train", "all")][:: max(len(ref) // 2000, 1)]
        ref_val = [s for s in ref if s.split == "val"][:: max(len(ref) // 4000, 1)]
        from lisplugin.datasets.pbc import load_images

        rx = load_images(ref_train, size, centre, colour)
        ry = np.asarray([classes.index(s.label) for s in ref_train], dtype=np.int64)
        x, y = np.concatenate([x, rx]), np.concatenate([y, ry])
        # Half of every batch is the site's cells, half reference cells (replay).
        weights = np.concatenate([weights * 0.5, np.full(len(ry), 0.5 / max(len(ry), 1))])
        if ref_val:
            val_x = load_images(ref_val, size, centre, colour)
            val_y = np.asarray([classes.index(s.label) for s in ref_val], dtype=np.int64)
        log(f"replaying {len(ry)} reference crops from {reference}")

    model = trainer.LeukocyteNet(len(classes), norm=str(front.get("norm_layers", "batch")))
    calibration = trainer.normalise(
        trainer.to_tensor(x[: min(len(x), 256)]), base_card["mean"], base_card["std"]
    )
    trainer._initialise(model, base_card.onnx_path, front, calibration, log)
    epochs = 3
    model, history = trainer.train(
        model, x, y, val_x, val_y, base_card["mean"], base_card["std"], epochs,
        batch_size=batch_size, lr=lr, seed=seed, log=log, photometric_strength=0.5,
        stain_strength=0.5, scale_jitter=0.15, sample_weights=weights,
        epoch_size=max(steps * batch_size // epochs, batch_size), keep_best=False,
    )  # fmt: skip
    views = int(front.get("test_time_views", 1))
    if views > 1:
        model = trainer.ViewAverage(model, views).eval()
    # The temperature is refitted on the cells trained on plus the reference val crops: the
    # held-back cells stay untouched for the before/after comparison.
    calib_x = np.concatenate([x[: len(train_idx)], val_x]) if reference else x
    calib_y = np.concatenate([y[: len(train_idx)], val_y]) if reference else y
    temperature = trainer.fit_temperature(
        trainer.predict_logits(model, calib_x, base_card["mean"], base_card["std"]), calib_y
    )
    seconds = time.perf_counter() - started

    out.mkdir(parents=True, exist_ok=True)
    detector_card = load_card(base_dir, names.detector)
    shutil.copy2(base_dir / f"{names.detector}.md", out / f"{names.detector}.md")
    for figure in card_figures(base_dir / f"{names.detector}.md"):  # its card's links stay whole
        if figure.is_file():
            shutil.copy2(figure, out / figure.name)
    shutil.copy2(detector_card.onnx_path, out / detector_card.onnx_path.name)
    onnx_path = out / f"{names.classifier}.onnx"
    trainer.export_onnx(model, onnx_path, size)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    meta = {
        # Not the base graph's feature statistics (``specimen_norms``): fine-tuned on the lab's
        # own cells, the adapted network is fitted to its stain; `lisplugin train norms` can
        # measure new ones.
        **{
            k: v
            for k, v in front.items()
            if k not in ("precision", "quantization", "specimen_norms")
        },
        "version": f"{front['version']}+site.{stamp}",
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "temperature": round(temperature, 4),
        # Its draws' class mix: the site's cells (and the replayed reference crops). The
        # card's prevalence stays: the lab's expectation, not its folder's mix.
        "training_prior": label_mix(y, classes, weights),
    }
    if front.get("precision") == "int8":  # as fast as the model it adapts: integer again
        from lisplugin.training.quantize import classifier_inputs, mark_quantized, quantize_graph

        sample = calib_x[:: max(len(calib_x) // 128, 1)][:128]
        inputs = classifier_inputs(sample, base_card["mean"], base_card["std"])
        quantize_graph(onnx_path, onnx_path, "input", inputs)
        calibration = f"{len(inputs)} of the crops it was adapted on"
        mark_quantized(meta, onnx_path, calibration, rename=False)
    card_path = out / f"{names.classifier}.md"
    trainer.write_card(card_path, meta, "")
    adapted = OnnxLeukocyteClassifier(load_card(out, names.classifier))
    after = score_crops(adapted, held_crops, held_labels, held_stains)
    if reference is not None:
        from lisplugin.evaluation.differential import evaluate_folder

        split = "test" if (reference / "split.csv").is_file() else None
        ref_result = {
            "before": round(evaluate_folder(reference, base_dir, None, split)["accuracy"], 4),
            "after": round(evaluate_folder(reference, out, None, split)["accuracy"], 4),
            "split": split,
        }
    if held_crops:  # for `models promote`, which scores both models on them again
        np.savez_compressed(
            out / HELD_BACK_FILE,
            crops=np.stack(held_crops),
            labels=np.asarray(held_labels),
            nuclei=stain_rows(held_stains),
        )
    counts = {c: int(sum(1 for lab in labels if lab == c)) for c in sorted(set(labels))}
    report = {
        "source": source,
        "cells": len(crops),
        "per_class": counts,
        "trained_on": len(train_idx),
        "held_back": len(held_idx),
        "before": before,
        "after": after,
        "reference": ref_result,
        "base": {"version": front["version"], "sha256": front["sha256"], "dir": str(base_dir)},
        "version": meta["version"],
        "seconds": round(seconds, 1),
        "steps": steps,
        "threads": threads,
        "out": str(out),
    }
    meta["adaptation"] = {
        k: report[k]
        for k in ("source", "cells", "per_class", "held_back", "before", "after", "reference")
    }
    meta["adaptation"]["reference_dir"] = str(reference) if reference else None
    meta["metrics"] = {
        **dict(front.get("metrics") or {}),
        "site_held_back_accuracy_before": before["accuracy"],
        "site_held_back_accuracy_after": after["accuracy"],
    }
    trainer.write_card(card_path, meta, _card_body(meta, report, history, command))
    log(f"adapted in {seconds:.0f} s: held-back accuracy {before['accuracy']} -> "
        f"{after['accuracy']}; wrote {out}")  # fmt: skip
    return report


def _card_body(
    meta: dict[str, Any], r: dict[str, Any], history: list[dict[str, float]], command: str
) -> str:
    ref = r["reference"]
    reference = (
        f"Reference set ({meta['adaptation']['reference_dir']}, split {ref['split']}): "
        f"{ref['before']} -> {ref['after']}."
        if ref
        else "No reference set was given: `models promote` asks for one (or an explicit skip)."
    )
    per_class = ", ".join(f"{c} {n}" for c, n in r["per_class"].items())
    per_epoch = ", ".join(f"{h['val_accuracy']:.3f}" for h in history)
    return f"""
# Leukocyte classifier {meta["version"]} (adapted to one site)

## Lineage

Adapted from {meta["name"]} {r["base"]["version"]} (SHA-256 `{r["base"]["sha256"][:16]}...`,
from `{r["base"]["dir"]}`) by `lisplugin adapt`: {r["steps"]} fine-tuning steps on
{r["threads"]} CPU thread(s), {r["seconds"]:.0f} s in all, then the temperature refitted. The
detector in this folder is the one it was adapted with, unchanged.

## Data

{r["cells"]} cells from {r["source"]} ({per_class}); {r["trained_on"]} trained on,
{r["held_back"]} held back (stratified by class, seeded) and never trained on.

## Before and after, on the held-back cells

Model in use: accuracy {r["before"]["accuracy"]} (recall {r["before"]["per_class_recall"]}).
Adapted: accuracy **{r["after"]["accuracy"]}** (recall {r["after"]["per_class_recall"]}).
{reference}

{len(history)} epochs of a fixed schedule, the last weights kept; validation accuracy per epoch
(reference val crops, or the cells trained on): {per_epoch}.

## Reproduce

```
{command}
```

This model is used only after `lisplugin models promote` (admin), which scores it again against
the model in use; `lisplugin models rollback` restores the previous one.

SHA-256 of `{meta["file"]}`: `{meta["sha256"]}`
"""


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin adapt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="class folders of this lab's cells")
    source.add_argument("--from-reviews", action="store_true", help="the daemon's signed-out cases")
    parser.add_argument("--out", type=Path, required=True, help="new models folder to write")
    parser.add_argument("--models", type=Path, help="models to adapt (default: the models in use)")
    parser.add_argument("--config", type=Path, help="site settings YAML (for --from-reviews)")
    parser.add_argument(
        "--held-back", type=float, default=0.25, help="share of each class held back (default 0.25)"
    )
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    parser.add_argument(
        "--reference",
        type=Path,
        help="class folders of reference crops (e.g. PBC) replayed and scored before/after",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    from lisplugin.config import load_settings
    from lisplugin.inference.detector import OnnxCellDetector
    from lisplugin.inference.registry import load_card
    from lisplugin.inference.store import active_models_dir

    settings = load_settings(args.config)
    base_dir = args.models or active_models_dir(settings)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.data is not None:
        detector = OnnxCellDetector(load_card(base_dir, settings.analysis.detector))
        cells = collect_folder(args.data, detector, log)
        source = f"class folders {args.data}"
    else:
        cells = collect_reviews(settings, log)
        source = "signed-out cases of this daemon"
    try:
        report = adapt(
            cells.crops, cells.labels, base_dir, args.out, source=source,
            held_back=args.held_back, steps=args.steps, lr=args.lr, reference=args.reference,
            threads=args.threads, seed=args.seed, nuclei=cells.nuclei,
            command="lisplugin adapt " + shlex.join(argv), log=log,
        )  # fmt: skip
    except ValueError as exc:
        print(f"lisplugin adapt: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else
          f"held-back accuracy {report['before']['accuracy']} -> {report['after']['accuracy']} "
          f"({report['held_back']} cells); wrote {report['out']}")  # fmt: skip
    return 0
