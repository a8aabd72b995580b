"""Train the cell detector, export it to ONNX and write its model card.

Design (TTFNet-style anchor-free CenterNet): a small ResNet-like encoder with an FPN decoder to
stride 4 on the field scaled to a 320 px long side. Heads: per-class centre heatmaps (focal
loss), distances to the four box sides at every position near a centre (GIoU loss; dense
regression is what lets this train in minutes rather than hours), a cell-foreground map
(trained from box-inscribed ellipses: the field sets have boxes only, so masks are weak
labels) and a count-density map summed to image-level RBC/WBC/PLT counts (enumeration by
regression, an independent cross-check of the detection counts). One ONNX graph, dynamic H/W.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import Conv2dNormActivation, generalized_box_iou_loss

from lisplugin.core.types import CELL_KINDS
from lisplugin.datasets.fields import AnnotatedField, read_voc, read_yolo
from lisplugin.progress import bar, progress
from lisplugin.training.field_augment import random_geometric

LONG_SIDE = 320
STRIDE = 4
HEAT_ALPHA = 0.54  # Gaussian sigma = alpha * box side / 6 (TTFNet)
REG_RADIUS = 0.05  # regress where the centre Gaussian is above this
MEAN, STD = 0.5, 0.25
MAX_SCALE = 1.4  # random scale range of training crops: 0.7 .. 1.4 x the runtime scale


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (no bias), batch norm, ReLU: the layers (and state-dict keys ``.0``,
    ``.1``) of the hand-written ``nn.Sequential`` it replaces."""
    return Conv2dNormActivation(cin, cout, 3, stride)


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = conv_bn(c, c)
        self.b = Conv2dNormActivation(c, c, 3, 1, activation_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b(self.a(x)))


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class CellNet(nn.Module):
    """Encoder to stride 32 (plain 3x3 convs: fastest per FLOP on CPU at these widths), FPN back
    to stride 4. Input (B, 3, H, W) RGB in [0, 1], H and W multiples of 32."""

    def __init__(
        self, widths: tuple[int, ...] = (16, 32, 64, 96, 128), fpn: int = 64, head: int = 32
    ):
        super().__init__()
        w = widths
        self.s2 = conv_bn(3, w[0], 2)
        self.s4 = conv_bn(w[0], w[1], 2)
        self.s8 = nn.Sequential(conv_bn(w[1], w[2], 2), Residual(w[2]))
        self.s16 = nn.Sequential(conv_bn(w[2], w[3], 2), Residual(w[3]), Residual(w[3]))
        self.s32 = nn.Sequential(conv_bn(w[3], w[4], 2), Residual(w[4]), Residual(w[4]))
        self.lat32, self.lat16 = nn.Conv2d(w[4], fpn, 1), nn.Conv2d(w[3], fpn, 1)
        self.lat8, self.lat4 = nn.Conv2d(w[2], fpn, 1), nn.Conv2d(w[1], head, 1)
        self.reduce8 = nn.Conv2d(fpn, head, 1)
        self.p16, self.p8, self.p4 = conv_bn(fpn, fpn), conv_bn(fpn, fpn), conv_bn(head, head)
        self.head = conv_bn(head, head)
        self.out = nn.Conv2d(head, 8, 1)  # 3 heat, 4 ltrb, 1 foreground
        self.density = nn.Conv2d(fpn, 3, 1)
        with torch.no_grad():
            self.out.bias[:3].fill_(-2.19)  # heat prior 0.1 (CenterNet)
            self.density.bias.fill_(-4.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (x - MEAN) / STD
        c4 = self.s4(self.s2(x))
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        c32 = self.s32(c16)
        p16 = self.p16(self.lat16(c16) + _up(self.lat32(c32)))
        p8 = self.p8(self.lat8(c8) + _up(p16))
        p4 = self.p4(self.lat4(c4) + _up(self.reduce8(p8)))
        o = self.out(self.head(p4))
        heat = torch.sigmoid(o[:, :3])
        ltrb = F.softplus(o[:, 3:7]) * 16.0
        mask = torch.sigmoid(o[:, 7:8])
        counts = F.softplus(self.density(p8)).sum(dim=(2, 3))
        return heat, ltrb, mask, counts


# ---------------------------------------------------------------- targets and losses


def build_targets(
    boxes: np.ndarray, labels: np.ndarray, h: int, w: int, stride: int = STRIDE
) -> dict[str, np.ndarray]:
    """Heatmaps, side distances + weights, ellipse foreground and counts for one crop."""
    oh, ow = h // stride, w // stride
    heat = np.zeros((3, oh, ow), np.float32)
    ltrb = np.zeros((4, oh, ow), np.float32)
    weight = np.zeros((oh, ow), np.float32)
    fg = np.zeros((oh, ow), np.float32)
    off = (stride - 1) / 2
    ys = (np.arange(oh) * stride + off)[:, None]
    xs = (np.arange(ow) * stride + off)[None, :]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for k in np.argsort(-area):  # small cells drawn last win the shared positions
        x0, y0, x1, y1 = boxes[k]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        px = np.clip(np.round((cx - off) / stride), 0, ow - 1) * stride + off
        py = np.clip(np.round((cy - off) / stride), 0, oh - 1) * stride + off
        sx = max(HEAT_ALPHA * (x1 - x0) / 6, stride * 0.5)
        sy = max(HEAT_ALPHA * (y1 - y0) / 6, stride * 0.5)
        g = np.exp(-((xs - px) ** 2) / (2 * sx**2) - (ys - py) ** 2 / (2 * sy**2))
        heat[labels[k]] = np.maximum(heat[labels[k]], g)
        region = g >= REG_RADIUS
        region &= (xs > x0) & (xs < x1) & (ys > y0) & (ys < y1)
        if region.any():
            for side, dist in enumerate((xs - x0, ys - y0, x1 - xs, y1 - ys)):
                ltrb[side][region] = np.broadcast_to(dist, region.shape)[region]
            gw = g[region]
            weight[region] = gw / gw.sum() * math.log(max(area[k], 2.0))
        inside = ((xs - cx) / max((x1 - x0) / 2, 1)) ** 2 + ((ys - cy) / max((y1 - y0) / 2, 1)) ** 2
        fg[inside <= 1] = 1.0
    counts = np.bincount(labels, minlength=3).astype(np.float32)
    return {"heat": heat, "ltrb": ltrb, "weight": weight, "fg": fg, "counts": counts}


def focal_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres."""
    p = pred.clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - gt) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted GIoU loss between side-distance maps (B, 4, h, w) at the weighted positions."""
    sel = weight > 0
    if not sel.any():
        return pred.sum() * 0
    p = pred.permute(0, 2, 3, 1)[sel]
    t = target.permute(0, 2, 3, 1)[sel]
    wt = weight[sel]
    # boxes relative to the position: (-l, -t, r, b); eps 1e-6 as the hand-written loss had
    loss = generalized_box_iou_loss(_relative_box(p), _relative_box(t), eps=1e-6)
    return (loss * wt).sum() / wt.sum().clamp(min=1e-6)


def _relative_box(ltrb: torch.Tensor) -> torch.Tensor:
    return torch.cat([-ltrb[:, :2], ltrb[:, 2:]], dim=1)


def detector_loss(
    out: tuple[torch.Tensor, ...], tgt: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    heat, ltrb, mask, counts = out
    losses = {
        "heat": focal_loss(heat, tgt["heat"]),
        "box": 5.0 * giou_loss(ltrb, tgt["ltrb"], tgt["weight"]),
        "mask": F.binary_cross_entropy(mask[:, 0].clamp(1e-4, 1 - 1e-4), tgt["fg"]),
        "count": 0.5 * ((counts - tgt["counts"]).abs() / (tgt["counts"] + 1)).mean(),
    }
    losses["total"] = sum(losses.values())
    return losses


# ---------------------------------------------------------------- data


def thumbnail(path: Path, size: int = 32) -> np.ndarray:
    """Zero-mean unit-norm grey thumbnail (stretched), for finding re-used images."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), np.float32)
    a = a - a.mean()
    return a / (np.linalg.norm(a) + 1e-6)


def find_reused(
    candidates: list[AnnotatedField],
    references: list[AnnotatedField],
    min_corr: float = 0.6,
    min_margin: float = 0.1,
) -> dict[str, str]:
    """Which candidates are copies of a reference image: {candidate name: reference name}.

    Re-published sets resize, stretch, turn, flip and re-colour images, so each candidate's
    8 flips/quarter turns are compared with every reference by correlation of 32x32 grey
    thumbnails; a copy correlates clearly better with one reference than with any other.
    """
    refs = np.stack([thumbnail(r.image_path).ravel() for r in references])
    found = {}
    for cand in candidates:
        t = thumbnail(cand.image_path)
        variants = [np.rot90(v, k).ravel() for v in (t, t[:, ::-1]) for k in range(4)]
        corr = (np.stack(variants) @ refs.T).max(axis=0)
        order = np.argsort(-corr)
        best, second = corr[order[0]], corr[order[1]] if len(order) > 1 else -1.0
        if best >= min_corr and best - second >= min_margin:
            found[cand.name] = references[order[0]].name
    return found


#: Detector sites: BCCD, and TXL-PBC's sources told apart by their image sizes (as the style
#: sources of the classifier). ``txl-bccd`` is BCCD's own fields re-annotated: one site with it.
DETECTOR_SITES = ("bccd", "raabin", "bcd", "txl-pbc")


def _txl_site(field: AnnotatedField) -> str:
    from lisplugin.training.styles import SOURCE_SITE, STYLE_SOURCES

    for source in STYLE_SOURCES:
        if source.folder == "txl-pbc" and (field.width, field.height) in (source.sizes or ()):
            return SOURCE_SITE.get(source.name, source.name)
    return "txl-pbc"


def training_sets(
    data: Path, leave_out: str | None = None
) -> tuple[list[AnnotatedField], dict[str, list[AnnotatedField]], dict]:
    """BCCD cbc train + TXL-PBC train without copies of BCCD cbc val/test images; val sets.

    ``leave_out`` removes one site from training and validation alike (the epoch is chosen and
    thresholds fitted without it), so that the site can score the model as a new lab would."""
    split = data / "bccd" / "cbc_split.csv"
    bccd = {s: read_voc(data / "bccd", split, s) for s in ("train", "val", "test")}
    txl_train = read_yolo(data / "txl-pbc", split="train")
    txl_val = read_yolo(data / "txl-pbc", split="val")
    held_out = bccd["val"] + bccd["test"]
    reused = find_reused(txl_train, held_out)
    left_out = [f for f in txl_train + txl_val if _txl_site(f) == leave_out]
    if leave_out == "bccd":
        left_out = bccd["train"] + bccd["val"] + bccd["test"] + left_out
        bccd = {s: [] for s in bccd}
    gone = {f.name for f in left_out} | set(reused)
    train = bccd["train"] + [f for f in txl_train if f.name not in gone]
    info = {
        "bccd_train": len(bccd["train"]),
        "txl_train": len(txl_train),
        "txl_train_excluded_copies_of_bccd_val_test": len(reused),
        "left_out_site": leave_out,
        "left_out_images": len(left_out),
        "excluded": reused,
        "left_out": sorted(f.name for f in left_out),
        "bccd_train_names": [f.name for f in bccd["train"]],
    }
    val = {"bccd_val": bccd["val"], "txl_val": [f for f in txl_val if f.name not in gone]}
    return train, {k: v for k, v in val.items() if v}, info


class Preloaded:
    """Training images decoded once, kept as uint8 with boxes at their own resolution."""

    def __init__(self, fields: list[AnnotatedField], repeat: dict[str, int] | None = None) -> None:
        self.images, self.boxes = [], []
        for f in fields:  # store at the largest training scale: cheaper crops, same pixels
            image = f.load_image()
            s = min(1.0, LONG_SIDE * MAX_SCALE / max(image.shape[:2]))
            size = (round(image.shape[1] * s), round(image.shape[0] * s))
            self.images.append(
                np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
            )
            self.boxes.append(f.boxes * np.float32(size[0] / image.shape[1]))
        self.labels = [f.labels for f in fields]
        self.weights = np.array([(repeat or {}).get(f.name, 1) for f in fields], np.float64)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: np.ndarray, size: int, rng: np.random.Generator) -> tuple:
        imgs, tgts = [], []
        for i in idx:
            base = LONG_SIDE / max(self.images[i].shape[:2])
            img, b, lab = random_geometric(
                self.images[i], self.boxes[i], self.labels[i], size, base, rng
            )
            imgs.append(img)
            tgts.append(build_targets(b, lab, size, size))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
        t = {k: torch.from_numpy(np.stack([d[k] for d in tgts])) for k in tgts[0]}
        return x, t


# ---------------------------------------------------------------- validation


@torch.no_grad()
def predict(model: CellNet, image: np.ndarray, threshold: float = 0.05):
    """Torch twin of the ONNX runtime path, used for validation during training."""
    from lisplugin.evaluation.detection import Boxes
    from lisplugin.inference.detector import decode, prepare

    x, scale = prepare(image, LONG_SIDE)
    heat, ltrb, _, counts = model(torch.from_numpy(x))
    boxes, labels, scores = decode(heat[0].numpy(), ltrb[0].numpy(), np.full(3, threshold), STRIDE)
    return Boxes(boxes / scale, labels, scores), counts[0].numpy()


def validate(model: CellNet, sets: dict[str, list[tuple[np.ndarray, AnnotatedField]]]) -> dict:
    from lisplugin.evaluation.detection import Boxes, mean_ap

    model.eval()
    report = {}
    for name, items in sets.items():
        gts, preds = [], []
        for image, f in items:
            pred, _ = predict(model, image)
            gts.append(Boxes(f.boxes, f.labels))
            preds.append(pred)
        report[name] = round(mean_ap(gts, preds), 4)
    model.train()
    return report


def calibrate_thresholds(
    model: CellNet, sets: dict[str, list[tuple[np.ndarray, AnnotatedField]]]
) -> dict[str, float]:
    """Per-class score threshold with the best count accuracy, plus a little recall, averaged
    over the given validation sets (each set weighs the same, whatever its size)."""
    from lisplugin.evaluation.detection import Boxes, count_accuracy, recall_at, threshold

    model.eval()
    per_set = {
        name: (
            [Boxes(f.boxes, f.labels) for _, f in items],
            [predict(model, im)[0] for im, _ in items],
        )
        for name, items in sets.items()
    }
    chosen = {}
    for c, kind in enumerate(CELL_KINDS):
        best = (-np.inf, 0.3)
        for thr in np.round(np.arange(0.1, 0.71, 0.02), 2):
            scores = []
            for gts, preds in per_set.values():
                ops = [threshold(p, dict.fromkeys(CELL_KINDS, thr)) for p in preds]
                acc, n = count_accuracy(
                    [int((g.labels == c).sum()) for g in gts],
                    [int((p.labels == c).sum()) for p in ops],
                )
                if n:
                    scores.append(acc + 0.1 * recall_at(gts, ops, c))
            if scores and np.mean(scores) > best[0]:
                best = (float(np.mean(scores)), float(thr))
        chosen[kind] = best[1]
    return chosen


# ---------------------------------------------------------------- export and card


def export_onnx(model: CellNet, path: Path) -> None:
    model.eval()
    x = torch.rand(1, 3, 256, 320)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["heat", "ltrb", "mask", "counts"],
        dynamic_axes={
            "image": {0: "batch", 2: "height", 3: "width"},
            "heat": {0: "batch", 2: "h4", 3: "w4"},
            "ltrb": {0: "batch", 2: "h4", 3: "w4"},
            "mask": {0: "batch", 2: "h4", 3: "w4"},
            "counts": {0: "batch"},
        },
    )


def write_card(out: Path, onnx_path: Path, version: str, meta: dict, body: str) -> Path:
    import yaml

    from lisplugin.inference.registry import file_sha256

    front = {
        "name": "cell-detector",
        "version": version,
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "input": {
            "name": "image",
            "layout": "NCHW",
            "colour": "RGB",
            "dtype": "float32",
            "range": "[0, 1] (pixel / 255); the graph normalises (x - 0.5) / 0.25",
            "long_side": LONG_SIDE,
            "pad_multiple": 32,
            "padding": "bottom/right with the field's mean colour",
        },
        "output_stride": STRIDE,
        "classes": list(CELL_KINDS),
        **meta,
    }
    card = out / "cell-detector.md"
    card.write_text(
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body, encoding="utf-8"
    )
    return card


# ---------------------------------------------------------------- training loop


def train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(args.checkpoints)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()

    train_fields, val_fields, info = training_sets(Path(args.data), args.leave_out)
    if args.limit:
        train_fields = train_fields[: args.limit]
        val_fields = {k: v[: max(2, args.limit // 2)] for k, v in val_fields.items()}
    data = Preloaded(train_fields, dict.fromkeys(info["bccd_train_names"], args.bccd_repeat))
    val_sets = {k: [(f.load_image(), f) for f in v] for k, v in val_fields.items()}
    log(
        f"data: {json.dumps({k: v for k, v in info.items() if isinstance(v, int)})}, "
        f"training images {len(data)}, loaded in {time.time() - start:.0f}s"
    )

    from lisplugin.training.augment import photometric

    model = CellNet()
    if args.init:
        model.load_state_dict(torch.load(args.init))
    if args.export_only:
        model.load_state_dict(torch.load(ckpt_dir / "best.pt"))
        history = json.loads((ckpt_dir / "history.json").read_text())
        args.command = json.loads((ckpt_dir / "run.json").read_text())["command"]
        return finish(model, out, val_sets, info, args, history[-1]["wall_s"], len(history))
    (ckpt_dir / "run.json").write_text(json.dumps({"command": args.command}))
    samples_per_epoch = int(data.weights.sum())
    steps_per_epoch = max(1, samples_per_epoch // args.batch)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = min(200, total // 10 + 1)

    budget = 60 * args.max_minutes

    def schedule_done(step: int) -> float:
        # the schedule follows steps or the time budget, whichever runs out first, so that a
        # slower (shared) machine still ends with an annealed model inside the budget
        return max((step - warmup) / max(1, total - warmup), (time.time() - start) / budget)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        done = min(1.0, schedule_done(step))
        return args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done)))

    gen = torch.Generator().manual_seed(args.seed)
    prob = data.weights / data.weights.sum()
    best, step = -1.0, 0
    history = []
    epoch = 0
    epochs_bar = bar(args.epochs, desc="epochs", unit="epoch")
    while epoch < args.epochs and (step < warmup or schedule_done(step) < 1.0):
        t0 = time.time()
        sums: dict[str, float] = {}
        batches = range(steps_per_epoch)
        for _ in progress(batches, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch"):
            idx = rng.choice(len(data), size=args.batch, p=prob)
            x, tgt = data.batch(idx, args.crop, rng)
            x = photometric(x, generator=gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            losses = detector_loss(model(x), tgt)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            step += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        epoch += 1
        row = {"epoch": epoch, "s": round(time.time() - t0, 1), "lr": round(lr_at(step), 5)}
        row["wall_s"] = round(time.time() - start)
        row.update({k: round(v / steps_per_epoch, 4) for k, v in sums.items()})
        last = epoch == args.epochs or schedule_done(step) >= 1.0
        if epoch % args.val_every == 0 or last:
            row.update(validate(model, val_sets))
            score = float(np.mean([row[k] for k in val_sets]))
            torch.save(model.state_dict(), ckpt_dir / "last.pt")
            if score >= best:
                best = score
                torch.save(model.state_dict(), ckpt_dir / "best.pt")
        history.append(row)
        epochs_bar.update(1)
        log(json.dumps(row) + f" elapsed {(time.time() - start) / 60:.1f} min")
    epochs_bar.close()
    model.load_state_dict(torch.load(ckpt_dir / "best.pt"))
    (ckpt_dir / "history.json").write_text(json.dumps(history, indent=1))
    return finish(model, out, val_sets, info, args, time.time() - start, epoch)


def card_body(meta: dict) -> str:
    """The human-readable card; the Metrics section is filled from the evaluate commands."""
    t = meta["training"]
    d = t["data"]
    init = f", starting from the weights of `{t['init']}`" if t["init"] else ""
    return f"""
# Cell detector (RBC, WBC, platelets)

Finds and outlines every red cell, leukocyte and platelet of a field: class, score, box and
instance mask per cell, plus an image-level count estimate used as a cross-check.

## Data and split

- BCCD, cleaned "Complete Blood Count" split (`bccd/cbc_split.csv`): `train` ({d["bccd_train"]}
  images, oversampled x2) for training, `val` for model selection, `test`
  only for the reported metrics. BCCD images absent from the CSV (bad RBC labels) are unused.
- TXL-PBC `train` ({d["txl_train"]} images; BCCD, BCD, PBC and Raabin-WBC fields re-annotated)
  for training, `val` for model selection, thresholds and reported metrics.
- TXL-PBC re-publishes BCCD images under UUID names, resized, stretched to 416x416, turned and
  re-coloured. {d["txl_train_excluded_copies_of_bccd_val_test"]} TXL-PBC `train` images are
  copies of BCCD cbc `val`/`test` images and were left out of training (match: best
  correlation of 32x32 grey thumbnails over the 8 flips/quarter turns >= 0.6 and >= 0.1 above
  the second best BCCD image; `find_reused` in `lisplugin/training/detector.py`).
- Masks: the field sets have boxes only. The foreground head is trained on box-inscribed
  ellipses (weak labels), so masks are ellipse-like cell outlines, not pixel-accurate ones.

## Architecture, and why it is fast on CPU

TTFNet-style anchor-free CenterNet, one ONNX graph with dynamic height and width. The field is
scaled to a {LONG_SIDE} px long side (640x480 -> 320x240, padded to 320x256; an RBC is then
~50 px, a platelet ~12-20 px) and goes through a plain-conv ResNet-like encoder (16-32-64-96-128
channels, strides 2-32) and an FPN decoder back to stride {STRIDE}. Outputs at stride 4:
per-class centre heatmaps (`heat`, sigmoid), distances to the four box sides (`ltrb`, input
px), a cell-foreground map (`mask`), and `counts` (1, 3): a count-density map from the stride-8
features summed over the image (enumeration by regression, issue 3 item 4b). About 1.3 M
parameters and ~0.5 GMAC per 640x480 field: plain 3x3 convolutions at small widths are what
onnxruntime's CPU kernels run fastest; no anchors, no NMS-heavy decoding (3x3 max-pool peaks).

Fields of other magnifications: the network knows red cells of about 47 to 83 px at its input
(5th to 95th percentile of the training fields). When the red cells of a field come out under
40 or over 100 px at the {LONG_SIDE} px long side (measured on that first pass, in ever smaller
central windows when too few are found, or from the DICOM pixel spacing), the field is rescaled
so that they are 60 px and, when larger than 512 px, cut into tiles overlapping by 160 px;
each tile keeps the cells centred in its own part (`tiles` in `lisplugin/inference/detector.py`).
The count head is not used on rescaled fields: it is trained on whole fields at the first scale.

Decoding (numpy, `lisplugin/inference/detector.py`): 3x3 local maxima of the heatmaps above
the per-class score threshold, boxes from the side distances, per-class NMS (IoU 0.5) and a
class-agnostic NMS (IoU 0.7) so a cell gets one label. Instance mask = foreground map
(bilinear, >= 0.5) inside the box's inscribed ellipse (x1.1), each pixel given to the nearest
overlapping cell centre in box-size units, which separates touching cells. Cells cut by the
field border are trained as the visible part of their box, as the annotations draw them.

Losses: penalty-reduced focal loss on the heatmaps (Gaussian sigma = 0.54 x side / 6), GIoU
on the side distances at every position near a centre (dense regression, the TTFNet trick
that makes a short CPU training budget enough), BCE on the foreground, relative L1 on counts.
Augmentation: random scale 0.7-1.4, 256x256 crops (cutting cells at the border), flips and
quarter turns (`lisplugin/training/field_augment.py`), photometric stain/illumination/blur/
noise/JPEG/debris (`lisplugin/training/augment.py`).

## Training

`{t["command"]}` (seed {t["seed"]}{init}),
{t["epochs"]} epochs of AdamW with a cosine schedule
bounded by the time budget, {t.get("threads", 1)} CPU thread(s), {t["wall_time_min"]} min
wall time. The checkpoint with the best mean validation mAP@0.5 (BCCD val, TXL-PBC val) is
exported; per-class score thresholds are the ones with the best count accuracy (+0.1 x recall)
on TXL-PBC val, whose labels include every cell (BCCD's leave many red cells out).

## Metrics

Filled in from `lisplugin evaluate detection` (see below).
"""


def finish(
    model: CellNet,
    out: Path,
    val_sets: dict,
    info: dict,
    args: argparse.Namespace,
    seconds: float,
    epochs_done: int,
) -> int:
    """Pick thresholds on validation, export ONNX and write the card."""
    model.eval()
    # TXL-PBC labels every cell; BCCD leaves many (mostly border-cut) red cells unlabelled, and
    # thresholds fitted to that would make the daemon under-count real cells
    thresholds = calibrate_thresholds(model, {"txl_val": val_sets["txl_val"]})
    onnx_path = out / "cell-detector.onnx"
    export_onnx(model, onnx_path)
    meta = {
        "score_thresholds": thresholds,
        "candidate_threshold": 0.05,
        "nms_iou": 0.5,
        "mask_threshold": 0.5,
        "wbf_iou": 0.55,
        "training": {
            "command": args.command,
            "wall_time_min": round(seconds / 60, 1),
            "seed": args.seed,
            "threads": args.threads,
            "init": str(args.init) if args.init else None,
            "epochs": epochs_done,
            "data": {k: v for k, v in info.items() if isinstance(v, int)},
        },
        "validation_map50": validate(model, val_sets),
    }
    card = write_card(out, onnx_path, args.version, meta, card_body(meta))
    draw_figures(card, val_sets)
    log(f"wrote {onnx_path} and {card}; thresholds {thresholds}")
    (Path(args.checkpoints) / "excluded.json").write_text(json.dumps(info["excluded"], indent=1))
    if info["left_out"]:  # a split file for `evaluate detection --format yolo --split left_out`
        rows = "".join(f"{name},left_out\n" for name in info["left_out"])
        (out / "left-out.csv").write_text("image,split\n" + rows, encoding="utf-8")
    return 0


def draw_figures(card: Path, val_sets: dict) -> None:
    """Precision-recall per cell kind of the exported model on the validation sets, drawn
    beside its card and linked from it (skipped, and said so, without matplotlib)."""
    from lisplugin.evaluation.detection import Boxes, candidate_curves
    from lisplugin.evaluation.figures import FiguresUnavailable, detector_figures, update_card
    from lisplugin.inference.detector import OnnxCellDetector

    detector = OnnxCellDetector.from_models_dir(card.parent, card.stem)
    curves = {
        f"{name} (validation)": candidate_curves(
            detector, ((image, Boxes(f.boxes, f.labels)) for image, f in items), desc=name
        )
        for name, items in val_sets.items()
    }
    try:
        figures = detector_figures(card.parent, card.stem, curves)
    except FiguresUnavailable as exc:
        log(f"card without figures: {exc}")
        return
    update_card(card, figures, "Drawn by `lisplugin train detector` on its validation sets.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(argv: list[str]) -> int:
    """``lisplugin train detector``: the command that reproduces the shipped cell detector."""
    parser = argparse.ArgumentParser(prog="lisplugin train detector", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--checkpoints", type=Path, default=Path("runs/detector"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="use only N training images (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bccd-repeat", type=int, default=2, help="oversample BCCD cbc train")
    parser.add_argument("--val-every", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=50.0, help="training-loop budget")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--init", type=Path, help="start from these weights (a previous run)")
    parser.add_argument(
        "--leave-out",
        choices=DETECTOR_SITES,
        help="train and validate without this site (leave-one-site-out); its images are "
        "listed in OUT/left-out.csv for `evaluate detection --split-file ... --split left_out`",
    )
    parser.add_argument(
        "--export-only", action="store_true", help="export best.pt of --checkpoints, no training"
    )
    parser.add_argument(
        "--write-copies",
        type=Path,
        metavar="CSV",
        help="only write which TXL-PBC images re-annotate BCCD cbc test fields, then stop",
    )
    args = parser.parse_args(argv)
    if args.write_copies:
        return write_copies(args.data, args.write_copies)
    args.command = "lisplugin train detector " + " ".join(argv)
    return train(args)


def write_copies(data: Path, out: Path) -> int:
    """TXL-PBC's labels of the BCCD cbc test fields, as a split file (``image,split`` with split
    ``bccd_test_copy``) for ``evaluate detection --format yolo``: the fields it re-publishes at
    their own 640 x 480, an independent re-annotation of the same cells."""
    test = read_voc(data / "bccd", data / "bccd" / "cbc_split.csv", "test")
    same_size = [
        f
        for split in ("train", "val")
        for f in read_yolo(data / "txl-pbc", split=split)
        if (f.width, f.height) == (640, 480)
    ]
    copies = find_reused(same_size, test)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{name},bccd_test_copy\n" for name in sorted(copies))
    out.write_text("image,split\n" + rows, encoding="utf-8")
    log(f"{len(copies)} TXL-PBC images copy BCCD cbc test fields: {out}")
    return 0
