"""Train the leukocyte classifier on PBC, calibrate it, export ONNX and write its model card.

``lisplugin train classifier --data ../shared/data/pbc --out models/`` reproduces the shipped
model: a small ResNet trained from scratch on the ``train`` split with geometric and
photometric augmentation, the epoch with the best ``val`` accuracy kept, a temperature fitted
on ``val``, and the ``test`` split scored once at the end for the card.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lisplugin.core.crops import COLOUR_NORMALISATIONS
from lisplugin.core.prevalence import REFERENCE_PREVALENCE, calibrated, label_mix, prior_shift
from lisplugin.core.types import LEUKOCYTE_CLASSES
from lisplugin.datasets.sites import SITES
from lisplugin.progress import progress
from lisplugin.training.augment import photometric
from lisplugin.training.pseudo import PseudoLabels
from lisplugin.training.styles import restyle

MODEL_NAME = "leukocyte-classifier"


#: ``--norm`` choices: normalisation layers after each convolution.
NORM_LAYERS = ("batch", "group")
#: Groups of the ``group`` normalisation, whatever the width (4 to 32 channels a group).
GROUPS = 8


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Batch norm, or group norm, which normalises each image by its own statistics.

    Batch statistics are those of the training labs; a new lab's stain and camera shift every
    activation away from them. Group norm (Wu & He 2018) has no dataset statistics to go stale:
    on white-cell classification across labs it kept 49-78 % where batch norm fell to 23-35 %
    (Tsutsui et al., ICASSP 2023). Measured here by leave-one-site-out (the card says).
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(GROUPS, channels)
    raise ValueError(f"unknown normalisation layer {kind!r}; choose from {NORM_LAYERS}")


class SpecimenBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that, while training on ``groups`` > 1, normalises each of that many equal runs
    of the batch (a specimen: crops of one site in one stain) by the run's own statistics.

    The daemon normalises the first layers' features on each specimen's own leukocytes
    (``lisplugin.inference.specimen_norms``, AdaBN); a network trained on mixed batches never
    met features normalised that way. Trained like this it has (as domain-specific batch norm,
    Chang et al. CVPR 2019). The running statistics are the runs' means, so that the folded
    network averaged over a site's specimens is the one trained.
    """

    groups: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if not self.training or g <= 1:
            return super().forward(x)
        b, c, h, w = x.shape
        runs = x.reshape(g, b // g, c, h, w)
        mean = runs.mean(dim=(1, 3, 4), keepdim=True)
        var = runs.var(dim=(1, 3, 4), keepdim=True, unbiased=False)
        with torch.no_grad():
            n = (b // g) * h * w
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(m * mean.mean(0).flatten())
            self.running_var.mul_(1 - m).add_(m * var.mean(0).flatten() * n / max(n - 1, 1))
            self.num_batches_tracked += 1
        y = ((runs - mean) / torch.sqrt(var + self.eps)).reshape(b, c, h, w)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def specimen_batch_norms(model: nn.Module, groups: int, layers: int = 3) -> int:
    """Make the first ``layers`` batch norms of ``model`` normalise per specimen run
    (``SpecimenBatchNorm2d``) while training; returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if replaced >= layers:
            break
        if type(module) is not nn.BatchNorm2d:
            continue
        swapped = SpecimenBatchNorm2d(module.num_features, module.eps, module.momentum)
        swapped.load_state_dict(module.state_dict())
        swapped.groups = groups
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, swapped)
        replaced += 1
    return replaced


def specimen_order(
    weights: np.ndarray,
    site_of: np.ndarray,
    runs: int,
    per_run: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``runs`` runs of ``per_run`` draws, each run from one site (chosen by the site's share of
    ``weights``), the crops within it in proportion to their weights."""
    members = [torch.as_tensor(np.flatnonzero(site_of == s)) for s in np.unique(site_of)]
    member_w = [torch.as_tensor(weights[m.numpy()], dtype=torch.float64) for m in members]
    site_w = torch.stack([w.sum() for w in member_w])
    chosen = torch.multinomial(site_w, runs, replacement=True, generator=generator)
    picks = [
        members[s][torch.multinomial(member_w[s], per_run, replacement=True, generator=generator)]
        for s in chosen.tolist()
    ]
    return torch.cat(picks)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class LeukocyteNet(nn.Module):
    """Small ResNet: stride-2 stem, four stages of basic blocks, global pooling, linear head."""

    def __init__(
        self,
        n_classes: int,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (1, 1, 2, 1),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
            norm_layer(norm, widths[0]),
            nn.ReLU(inplace=True),
        ]
        cin = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(count):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and j == 0 else 1, norm))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, n_classes)

        #: Probability of MixStyle after the first two stages while training (0: off).
        self.mix_style = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.mix_style > 0):
            # one call, so that exported node names keep their ``features/features.N`` scope
            # (``onnx_init`` finds convolutions by it)
            return self.head(self.features(x).mean(dim=(2, 3)))
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in MIX_STYLE_AFTER:
                x = mix_style(x, self.mix_style)
        return self.head(x.mean(dim=(2, 3)))


#: Indices in ``LeukocyteNet.features`` after which MixStyle mixes: the first two stages' blocks,
#: whose channel statistics carry stain and camera (later ones carry the class).
MIX_STYLE_AFTER = (3, 4)
#: Batch norms trained per specimen with ``--specimen-runs``: those of the convolutions the
#: daemon normalises on each specimen (the stem and the first block; ``train norms --layers``).
SPECIMEN_LAYERS = 3


def mix_style(x: torch.Tensor, p: float, alpha: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """MixStyle (Zhou et al., ICLR 2021): with probability ``p``, each image's per-channel
    feature mean and spread are replaced by a random mix of its own and another image's.

    Those statistics are where a lab's stain and optics live in early layers; mixing them across
    the batch (whose images come from several sites and rendered stains) synthesises styles
    between the ones seen, so the classes must be read from what the statistics leave. No
    parameters: the exported graph and its weights are unchanged.
    """
    if float(torch.rand(())) > p or x.shape[0] < 2:
        return x
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sigma = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((x.shape[0], 1, 1, 1)).to(x.dtype)
    perm = torch.randperm(x.shape[0])
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
    return (x - mu) / sigma * sigma_mix + mu_mix


class ViewAverage(nn.Module):
    """Averages the logits over 4 rotations (8 with mirrors) of each crop.

    A blood cell has no preferred orientation, so every view is another look at the same cell;
    baking the views into the exported graph keeps the runtime adapter unchanged.
    """

    def __init__(self, model: nn.Module, views: int) -> None:
        super().__init__()
        if views not in (4, 8):
            raise ValueError("views must be 4 or 8")
        self.model = model
        self.views = views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        turns = [x, x.transpose(2, 3).flip(3), x.flip(2).flip(3), x.transpose(2, 3).flip(2)]
        if self.views == 8:
            turns += [t.flip(3) for t in turns]
        logits = self.model(torch.cat(turns))
        return logits.reshape(self.views, -1, logits.shape[-1]).mean(dim=0)


def geometric(
    x: torch.Tensor, generator: torch.Generator, scale_jitter: float = 0.1
) -> torch.Tensor:
    """Any rotation, mirror, +-``scale_jitter`` scale and a few pixels of shift: cells have no
    orientation, and a lab's magnification is only known as well as its red cells measure it."""
    b = x.shape[0]
    angle = 2 * math.pi * torch.rand(b, generator=generator)
    scale = torch.exp(math.log1p(scale_jitter) * (2 * torch.rand(b, generator=generator) - 1))
    mirror = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    shift = 0.08 * (torch.rand(b, 2, generator=generator) - 0.5)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * mirror, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * mirror, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> np.ndarray:
    model.eval()
    out = [
        model(normalise(to_tensor(images[i : i + batch_size]), mean, std))
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy()


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature that minimises the validation negative log-likelihood (Guo et al. 2017).

    A bounded search over log T (0.05 .. 20) stays sane even for degenerate logits.
    """
    from scipy.optimize import minimize_scalar

    z = logits.astype(np.float64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        top = scaled.max(axis=1)
        log_norm = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
        return float(np.mean(log_norm - scaled[rows, labels]))

    best = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(np.exp(best.x))


#: The adapter's calibration, so that training scores crops as the daemon does.
softmax = calibrated


def _ema_step(average: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    decay = min(0.999, (1.0 + float(count)) / (10.0 + float(count)))
    return decay * average + (1.0 - decay) * current


def train(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
    photometric_strength: float = 0.8,
    stain_strength: float = 0.0,
    scale_jitter: float = 0.1,
    sample_weights: np.ndarray | None = None,
    epoch_size: int | None = None,
    styles: torch.Tensor | None = None,
    style_p: float = 0.5,
    keep_best: bool = True,
    site_of: np.ndarray | None = None,
    specimen_runs: int = 1,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """AdamW with warm-up and cosine decay; returns the weight-averaged (EMA) model of the epoch
    with the best validation accuracy (``keep_best``; otherwise of the last epoch), and the
    per-epoch history.

    With ``sample_weights`` an epoch is ``epoch_size`` draws with replacement in proportion to
    them (how small sites get their share next to PBC); otherwise every image once. With
    ``styles`` (``training.styles``) a share ``style_p`` of the crops is re-rendered in real
    labs' stains before the synthetic photometric augmentation. With ``specimen_runs`` > 1 (and
    ``site_of``, each crop's site, and ``sample_weights``) a batch is that many runs, each of one
    site and re-rendered in one style: specimens for ``SpecimenBatchNorm2d``.
    """
    if specimen_runs > 1 and (site_of is None or sample_weights is None):
        raise ValueError("specimen runs need each crop's site and draw weights")
    if batch_size % max(specimen_runs, 1):
        raise ValueError(f"batch size {batch_size} is not {specimen_runs} equal specimen runs")
    generator = torch.Generator().manual_seed(seed)
    per_epoch = epoch_size or len(images)
    steps_per_epoch = max(per_epoch // batch_size, 1)
    total = (
        epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    )
    warmup = min(steps_per_epoch, max(total // 10, 1))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
        ),
    )
    # The EMA of the weights generalises better than the last iterate of a short schedule. Its
    # decay ramps up from 0.1 so that the random initial weights are forgotten quickly.
    ema = torch.optim.swa_utils.AveragedModel(model, avg_fn=_ema_step, use_buffers=True)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    best: tuple[float, dict[str, Any]] = (-1.0, copy.deepcopy(ema.module.state_dict()))
    history = []
    step = 0
    for epoch in progress(range(epochs), desc="epochs", unit="epoch"):
        model.train()
        started = time.perf_counter()
        if sample_weights is None:
            order = torch.randperm(len(images), generator=generator)
        elif specimen_runs > 1:
            assert site_of is not None
            order = specimen_order(
                sample_weights,
                site_of,
                steps_per_epoch * specimen_runs,
                batch_size // specimen_runs,
                generator,
            )
        else:
            order = torch.multinomial(
                torch.as_tensor(sample_weights, dtype=torch.float64),
                steps_per_epoch * batch_size,
                replacement=True,
                generator=generator,
            )
        loss_sum, done = 0.0, 0
        batches = range(steps_per_epoch)
        for i in progress(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch"):
            if step >= total:
                break
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = geometric(x_all[idx].float().div_(255.0), generator, scale_jitter)
            if styles is not None:
                x = restyle(x, styles, generator, style_p, groups=specimen_runs)
            x = photometric(x, generator, strength=photometric_strength, stain=stain_strength)
            x = normalise(x, mean, std)
            loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=0.05)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            ema.update_parameters(model)
            loss_sum += float(loss.detach())
            step += 1
            done += 1
        seconds = time.perf_counter() - started
        val_pred = predict_logits(ema.module, val_images, mean, std).argmax(axis=1)
        val_acc = float((val_pred == val_labels).mean()) if len(val_labels) else 0.0
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(done, 1),
            "val_accuracy": val_acc,
            "seconds": seconds,
            "images_per_second": done * batch_size / seconds,
        }
        history.append(row)
        log(json.dumps(row))
        if val_acc > best[0] or not keep_best:
            best = (val_acc, copy.deepcopy(ema.module.state_dict()))
        if step >= total:
            break
    final = copy.deepcopy(ema.module)
    final.load_state_dict(best[1])
    return final.eval(), history


def export_onnx(model: nn.Module, path: Path, input_size: int) -> None:
    """ONNX graph with a dynamic batch axis; input ``input`` (N,3,S,S) normalised, output logits."""
    model.eval()
    dummy = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but still exact
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def _balanced_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` samples spread over all classes (for quick runs and tests)."""
    per_class = max(limit // max(len(np.unique(labels)), 1), 1)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return np.sort(keep)


def _markdown_table(result: dict[str, Any]) -> str:
    lines = ["| class | recall | precision | F1 | n |", "|---|---|---|---|---|"]
    for name, row in result["per_class"].items():
        lines.append(
            f"| {name} | {row['recall']:.3f} | {row['precision']:.3f} | {row['f1']:.3f} "
            f"| {row['support']} |"
        )
    labels = result["confusion"]["labels"]
    lines += ["", "Confusion (rows: true, columns: predicted):", ""]
    lines.append("| | " + " | ".join(labels) + " |")
    lines.append("|---" * (len(labels) + 1) + "|")
    for name, row in zip(labels, result["confusion"]["matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def write_card(path: Path, meta: dict[str, Any], body: str) -> None:
    import yaml

    front = yaml.safe_dump(meta, sort_keys=False, default_flow_style=None, width=100)
    path.write_text(f"---\n{front}---\n{body}", encoding="utf-8")


def time_inference(card_dir: Path, crops: np.ndarray) -> dict[str, float]:
    """Milliseconds per crop through the shipped adapter: batched and one crop at a time."""
    from lisplugin.inference.classifier import OnnxLeukocyteClassifier
    from lisplugin.inference.registry import load_card

    classifier = OnnxLeukocyteClassifier(load_card(card_dir, MODEL_NAME))
    batch = list(crops[:256])
    classifier.classify(batch[:8])  # warm-up
    started = time.perf_counter()
    classifier.classify(batch)
    batched = (time.perf_counter() - started) / len(batch) * 1000
    started = time.perf_counter()
    for crop in batch[:64]:
        classifier.classify([crop])
    single = (time.perf_counter() - started) / min(len(batch), 64) * 1000
    return {"batched_ms_per_crop": round(batched, 3), "single_ms_per_crop": round(single, 3)}


#: ``--colour`` names: the run-time normalisations of ``core.crops``, "none" for None.
COLOUR_CHOICES = tuple(c or "none" for c in COLOUR_NORMALISATIONS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisplugin train classifier",
        description="Train the leukocyte classifier on every labelled site together (PBC, BCCD "
        "leukocytes, Zheng et al.'s crops), or leave one site out to measure it there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, help="PBC folder with split.csv (site pbc)")
    parser.add_argument("--field-data", type=Path, help="BCCD folder (site bccd)")
    parser.add_argument("--wbc-seg", type=Path, help="Zheng et al. folder (site wbc-seg)")
    parser.add_argument(
        "--leave-out",
        choices=SITES,
        help="train without this site and score the model on all of it (leave-one-site-out)",
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder for ONNX + card")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument(
        "--epoch-size", type=int, help="draws per epoch, sites weighted by --site-share"
    )
    parser.add_argument(
        "--site-share",
        type=float,
        default=0.5,
        help="share of each epoch drawn from PBC when other sites train too (rest split evenly)",
    )
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument(
        "--centre", type=float, default=0.7, help="central fraction of the 160 px crop to use"
    )
    parser.add_argument(
        "--colour",
        choices=COLOUR_CHOICES,
        default="white-point",
        help="colour normalisation of every crop (train and run time)",
    )
    parser.add_argument(
        "--runtime-colour",
        choices=COLOUR_CHOICES,
        help="colour normalisation the card names for run time, if not --colour's: validation "
        "(temperature), test and leave-one-site-out crops are cut with it",
    )
    parser.add_argument(
        "--mix-colour",
        choices=COLOUR_CHOICES,
        help="also cut the training crops in this normalisation; each draw takes either copy "
        "with p = 0.5, so one network learns both (e.g. tight crops without red cells, which "
        "the stain normalisation leaves white-balanced, and fields, which it re-stains)",
    )
    parser.add_argument(
        "--norm",
        choices=NORM_LAYERS,
        help="normalisation layers: batch statistics, or each image's own (group norm); "
        "default: those of the --init model's card, else batch",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--views", type=int, choices=(1, 4, 8), default=4, help="test-time views in the graph"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (share the CPU)")
    parser.add_argument("--limit", type=int, help="use at most N images per split (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--field-repeat",
        type=int,
        default=20,
        help="oversampling of the other sites' training crops (without --epoch-size)",
    )
    parser.add_argument(
        "--init", type=Path, help="start from these weights (.pt state dict or exported .onnx)"
    )
    parser.add_argument("--photometric-strength", type=float, default=0.8)
    parser.add_argument(
        "--stain-strength", type=float, default=1.0, help="stain/hue/tone-curve jitter (0 = off)"
    )
    parser.add_argument("--scale-jitter", type=float, default=0.25, help="+- relative scale")
    parser.add_argument(
        "--style-data",
        type=Path,
        help="folder with unlabelled box-annotated sets (txl-pbc/, draaslan/): their labs' "
        "stains re-render training crops (training/styles.py); off when not given",
    )
    parser.add_argument(
        "--style-p", type=float, default=0.5, help="share of crops re-rendered in a lab's style"
    )
    parser.add_argument(
        "--no-prevalence",
        action="store_true",
        help="leave the card without a prevalence: probabilities keep the training draws' class "
        "mix instead of PBC's rare classes being moved to their share in a lab "
        "(lisplugin.core.prevalence)",
    )
    parser.add_argument(
        "--mix-style",
        type=float,
        default=0.0,
        help="probability of MixStyle (feature statistics mixed across the batch) after the "
        "first two stages while training; 0: off",
    )
    parser.add_argument(
        "--specimen-runs",
        type=int,
        default=1,
        help="train the first batch norms as the daemon runs them (per specimen): each batch is "
        "this many runs of one site and one rendered stain, normalised each by its own "
        "statistics (needs --epoch-size); 1: off",
    )
    parser.add_argument(
        "--pseudo-teacher",
        type=Path,
        help="models folder whose classifier labels the unlabelled labs' leukocytes under "
        "--style-data (training/pseudo.py); the confident ones train as one more site",
    )
    parser.add_argument(
        "--pseudo-threshold", type=float, default=0.9, help="teacher probability to keep a label"
    )
    parser.add_argument("--version", default=dt.date.today().strftime("%Y.%m.%d") + "-1")
    return parser


def cli(argv: list[str]) -> int:
    from lisplugin.datasets.sites import load_site
    from lisplugin.evaluation.differential import differential_metrics, score_folder
    from lisplugin.inference.registry import file_sha256

    parser = _parser()
    args = parser.parse_args(argv)
    paths = {"pbc": args.data, "bccd": args.field_data, "wbc-seg": args.wbc_seg}
    if args.leave_out and paths[args.leave_out] is None:
        parser.error(f"--leave-out {args.leave_out} needs that site's folder to score it on")
    trained = [name for name in SITES if paths[name] is not None and name != args.leave_out]
    if not trained:
        parser.error("no site to train on: give --data, --field-data and/or --wbc-seg")
    colour = None if args.colour == "none" else args.colour

    def log(text: str) -> None:
        print(text, flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    classes = list(LEUKOCYTE_CLASSES)
    pseudo = _pseudo_labels(args, parser, classes, colour, log)
    detector = _shipped_detector() if args.wbc_seg is not None else None
    sites = {
        name: load_site(
            name, paths[name].parent, classes, args.input_size, args.centre, colour,
            detector, args.limit, log,
        )
        for name in SITES
        if paths[name] is not None and name in trained
    }  # fmt: skip
    mixing = args.mix_colour is not None and args.mix_colour != args.colour
    if mixing:
        mix = None if args.mix_colour == "none" else args.mix_colour
        for name in sites:
            again = load_site(
                name, paths[name].parent, classes, args.input_size, args.centre, mix,
                detector, args.limit, log, splits=("train",),
            )["train"]  # fmt: skip
            x, y = sites[name]["train"]
            sites[name]["train"] = (np.concatenate([x, again[0]]), np.concatenate([y, again[1]]))
    train_x, train_y, weights, site_of = _training_set(sites, args, pseudo)
    val_x = np.concatenate([v["val"][0] for v in sites.values()])
    val_y = np.concatenate([v["val"][1] for v in sites.values()])
    if not len(val_y):
        parser.error("no validation crops in the training sites")
    # A fine-tuned model keeps the normalisation of the model it starts from; a new one takes
    # the statistics of its first site.
    init_card = _init_card(args.init)
    first = sites[trained[0]]["train"][0]
    if init_card is not None:
        mean, std = list(init_card["mean"]), list(init_card["std"])
    else:
        mean = [round(float(v), 4) for v in first.reshape(-1, 3).mean(axis=0) / 255.0]
        std = [round(float(v), 4) for v in first.reshape(-1, 3).std(axis=0) / 255.0]
    calibration = normalise(to_tensor(first[:: max(len(first) // 512, 1)]), mean, std)

    styles, style_names = _styles(args, sites, colour, log)
    if args.norm is None:
        args.norm = str((init_card or {}).get("norm_layers", "batch"))
    model = LeukocyteNet(len(classes), norm=args.norm)
    model.mix_style = args.mix_style
    if args.init is not None:
        _initialise(model, args.init, init_card, calibration, log)
    if args.specimen_runs > 1:
        if weights is None:
            parser.error("--specimen-runs needs --epoch-size (draws by site)")
        specimen_batch_norms(model, args.specimen_runs, SPECIMEN_LAYERS)
    model, history = train(
        model, train_x, train_y, val_x, val_y, mean, std, args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, log=log,
        photometric_strength=args.photometric_strength, stain_strength=args.stain_strength,
        scale_jitter=args.scale_jitter, sample_weights=weights, epoch_size=args.epoch_size,
        styles=styles, style_p=args.style_p, site_of=site_of, specimen_runs=args.specimen_runs,
    )  # fmt: skip
    train_seconds = time.perf_counter() - started
    if args.views > 1:
        model = ViewAverage(model, args.views).eval()

    runtime_colour = colour
    if args.runtime_colour is not None and args.runtime_colour != args.colour:
        runtime_colour = None if args.runtime_colour == "none" else args.runtime_colour
        sites = {  # only what is scored is cut again: validation (temperature) and test
            name: sites[name] | load_site(
                name, paths[name].parent, classes, args.input_size, args.centre, runtime_colour,
                detector, args.limit, log, splits=("val", "test"),
            )
            for name in sites
        }  # fmt: skip
        val_x = np.concatenate([v["val"][0] for v in sites.values()])
        val_y = np.concatenate([v["val"][1] for v in sites.values()])
    val_logits = predict_logits(model, val_x, mean, std)
    temperature = fit_temperature(val_logits, val_y)
    # The class mix the network learned under, and the one it is used under (Bayes' rule
    # between the two at run time: lisplugin.core.prevalence).
    training_prior = label_mix(train_y, classes, weights)
    prevalence = None if args.no_prevalence else dict(REFERENCE_PREVALENCE)
    shift = prior_shift(classes, training_prior, prevalence)
    val_raw = differential_metrics(val_y, softmax(val_logits), classes)
    val_cal = differential_metrics(val_y, softmax(val_logits, temperature), classes)
    log(f"temperature {temperature:.3f}: val ECE {val_raw['ece']:.4f} -> {val_cal['ece']:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / f"{MODEL_NAME}.onnx"
    export_onnx(model, onnx_path, args.input_size)
    meta: dict[str, Any] = {
        "name": MODEL_NAME,
        "version": args.version,
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "task": "leukocyte classification of PBC-scale crops (160 px window, RBC ~37 px)",
        "input_size": args.input_size,
        "centre_crop": args.centre,
        "colour_normalisation": runtime_colour,
        "input_layout": "NCHW float32 RGB, (pixel/255 - mean) / std; output: logits",
        "mean": mean,
        "std": std,
        "classes": classes,
        "temperature": round(temperature, 4),
        "training_prior": training_prior,
        **({"prevalence": prevalence} if prevalence else {}),
        "test_time_views": args.views,
        "sites": trained,
        **({"specimen_runs": args.specimen_runs} if args.specimen_runs > 1 else {}),
        "metrics": {},
    }
    if args.norm != "batch":  # adapt and --init rebuild the network the card names
        meta["norm_layers"] = args.norm
    if args.mix_style > 0:
        meta["mix_style"] = args.mix_style
    if style_names:
        meta["style_sources"] = style_names
    if mixing:
        meta["training_colours"] = [args.colour, args.mix_colour]
    if pseudo is not None:
        meta["pseudo_labels"] = {
            "teacher": pseudo.teacher,
            "threshold": pseudo.threshold,
            "sources": pseudo.sources,
            "per_class": pseudo.per_class(classes),
        }
    card_path = args.out / f"{MODEL_NAME}.md"
    write_card(card_path, meta, "")  # provisional card: the evaluation loads the model by it

    site_tests: dict[str, dict[str, Any]] = {}
    site_scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # for the card's figures
    for name, splits in sites.items():
        x, y = splits["test"]
        if not len(y):
            continue
        if name == "pbc" and args.limit is None:  # scored exactly as `evaluate differential`
            scored = score_folder(args.data, args.out, args.data / "split.csv", "test")
            site_scores[name] = (scored.y_true, scored.probabilities)
        else:
            logits = predict_logits(model, x, mean, std)
            site_scores[name] = (y, softmax(logits, temperature, shift))
        site_tests[name] = differential_metrics(*site_scores[name], classes)
        log(f"{name} test (crops): accuracy {site_tests[name]['accuracy']:.4f}")
    held_out = (
        _leave_one_site_out(args.leave_out, paths[args.leave_out], args.out, args.limit, log)
        if args.leave_out
        else None
    )
    timing = time_inference(args.out, val_x)
    meta["metrics"] = {
        **{
            f"{name}_test_{k}": round(float(v[k]), 4)
            for name, v in site_tests.items()
            for k in ("accuracy", "macro_f1", "ece")
        },
        **{f"{name}_test_n": v["n"] for name, v in site_tests.items()},
        "val_accuracy": round(val_cal["accuracy"], 4),
        "val_ece_uncalibrated": round(val_raw["ece"], 4),
        "val_ece": round(val_cal["ece"], 4),
        **timing,
    }
    if held_out is not None:
        meta["metrics"][f"leave_out_{args.leave_out}_accuracy"] = held_out["accuracy"]
        meta["metrics"][f"leave_out_{args.leave_out}_macro_f1"] = held_out["macro_f1"]
        meta["metrics"][f"leave_out_{args.leave_out}_n"] = held_out["n"]
    command = "lisplugin train classifier " + shlex.join(argv)
    params = sum(p.numel() for p in model.parameters())
    counts = {n: {k: len(v[1]) for k, v in sp.items()} for n, sp in sites.items()}
    body = _card_body(
        meta, history, site_tests, held_out, args, command, train_seconds, params,
        onnx_path.stat().st_size, counts, init_card,
    )  # fmt: skip
    body = _with_figures(body, site_scores, classes, meta["metrics"], args.out, log)
    write_card(card_path, meta, body)
    log(json.dumps(meta["metrics"]))
    log(f"wrote {onnx_path} and {card_path} in {time.perf_counter() - started:.0f} s")
    return 0


def _styles(
    args: argparse.Namespace,
    sites: dict[str, dict[str, Any]],
    colour: str | None,
    log: Callable[[str], None],
) -> tuple[torch.Tensor | None, list[str]]:
    """The stain styles crops are re-rendered in: unlabelled labs' and the training sites' own,
    each source drawn equally often; none without ``--style-data``."""
    if args.style_data is None:
        return None, []
    from lisplugin.training.styles import balanced, style_of, style_pool

    external, names = style_pool(
        args.style_data, args.input_size, args.centre, colour, args.leave_out, log=log
    )
    own = []
    for name, splits in sites.items():
        x = splits["train"][0]
        sample = x[:: max(len(x) // 150, 1)][:150]
        own.append(style_of(torch.from_numpy(sample).permute(0, 3, 1, 2).float() / 255.0))
        names.append(name)
    return balanced([*external, *own]), names


def _with_figures(
    body: str,
    scores: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    metrics: dict[str, Any],
    out: Path,
    log: Callable[[str], None],
) -> str:
    """The card body with its figures (confusion, reliability, PR, leave-one-site-out) drawn
    beside it and linked; as it was when matplotlib is missing."""
    from lisplugin.evaluation.figures import (
        FiguresUnavailable,
        classifier_figures,
        markdown_section,
        with_section,
    )

    try:
        drawn = classifier_figures(out, MODEL_NAME, scores, classes, metrics)
    except FiguresUnavailable as exc:
        log(f"card without figures: {exc}")
        return body
    return with_section(body, markdown_section(drawn, out))


def _shipped_detector() -> Any:
    """The shipped cell detector: sites of whole images are cut through it, as a lab's are."""
    from lisplugin.config import load_settings
    from lisplugin.inference.detector import OnnxCellDetector
    from lisplugin.inference.registry import load_card

    analysis = load_settings().analysis
    return OnnxCellDetector(load_card(analysis.models_dir, analysis.detector))


def _training_set(
    sites: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    args: argparse.Namespace,
    pseudo: PseudoLabels | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """All sites' training crops, the draw weight of each (None: every crop once, the small
    sites repeated ``--field-repeat`` times) and the index of its site; pseudo-labelled
    leukocytes count as one site."""
    names = list(sites)
    xs = [sites[n]["train"][0] for n in names]
    ys = [sites[n]["train"][1] for n in names]
    if pseudo is not None and len(pseudo.y):
        names.append("pseudo")
        xs.append(pseudo.x)
        ys.append(pseudo.y)
    if args.epoch_size is None:
        for i, name in enumerate(names):
            if name != "pbc":
                xs[i] = np.concatenate([xs[i]] * args.field_repeat)
                ys[i] = np.concatenate([ys[i]] * args.field_repeat)
        return np.concatenate(xs), np.concatenate(ys), None, _site_of(ys)
    others = [n for n in names if n != "pbc"]
    share = {n: 1.0 / len(names) for n in names}
    if "pbc" in names and others:
        rest = (1 - args.site_share) / len(others)
        share = {n: args.site_share if n == "pbc" else rest for n in names}
    weights = np.concatenate(
        [np.full(len(y), share[n] / max(len(y), 1)) for n, y in zip(names, ys, strict=True)]
    )
    return np.concatenate(xs), np.concatenate(ys), weights, _site_of(ys)


def _site_of(ys: Sequence[np.ndarray]) -> np.ndarray:
    """Each crop's site, as the index of its block in ``ys``."""
    return np.concatenate([np.full(len(y), i, dtype=np.int64) for i, y in enumerate(ys)])


def _pseudo_labels(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    classes: list[str],
    colour: str | None,
    log: Callable[[str], None],
) -> PseudoLabels | None:
    """The unlabelled labs' leukocytes the ``--pseudo-teacher`` names confidently (None without
    one). A teacher that saw the left-out site would leak it into the student: refused."""
    if args.pseudo_teacher is None:
        return None
    if args.style_data is None:
        parser.error("--pseudo-teacher needs --style-data (the folder of the unlabelled sets)")
    from lisplugin.inference.registry import load_card
    from lisplugin.training.pseudo import pseudo_labelled

    seen = load_card(args.pseudo_teacher, MODEL_NAME).get("sites")
    if args.leave_out is not None and (seen is None or args.leave_out in seen):
        said = "does not say which sites it" if seen is None else "was"
        parser.error(f"the teacher in {args.pseudo_teacher} {said} trained on {args.leave_out}")
    return pseudo_labelled(
        args.style_data, args.pseudo_teacher, classes, args.input_size, args.centre, colour,
        args.pseudo_threshold, per_source=args.limit, log=log,
    )  # fmt: skip


def _leave_one_site_out(
    site: str, folder: Path, models: Path, limit: int | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """The new classifier (with the shipped detector) on every labelled image of the site it
    never saw, through the daemon's whole path, as ``lisplugin evaluate cells`` scores it."""
    from lisplugin.datasets.sites import site_samples
    from lisplugin.evaluation.cells import evaluate_samples

    samples = site_samples(site, folder)
    if site == "pbc":  # PBC's test split: the same images as the in-site figure of other models
        samples = [s for s in samples if s.split == "test"]
    report = evaluate_samples(samples, classifier_dir=models, limit=limit, progress=True)
    log(f"leave-one-site-out {site}: accuracy {report['accuracy']} on {report['n']} images")
    return report


def _init_card(path: Path | None) -> dict[str, Any] | None:
    """The model card beside an ``--init`` ONNX file (``NAME.md`` for ``NAME.onnx``), if any."""
    if path is None or path.suffix != ".onnx" or not path.with_suffix(".md").is_file():
        return None
    from lisplugin.inference.registry import read_front_matter

    return read_front_matter(path.with_suffix(".md"))


def _initialise(
    model: nn.Module,
    path: Path,
    card: dict[str, Any] | None,
    calibration: torch.Tensor,
    log: Callable[[str], None],
) -> None:
    """Load starting weights: a torch state dict, or the convolutions of an exported ONNX.

    An exported model may have been trained at another input size (the network is size-agnostic
    thanks to global pooling) and may average test-time views in its graph (its card says how
    many); the check against the ONNX runs at the graph's size through the same views.
    """
    if path.suffix == ".onnx":
        from lisplugin.training.onnx_init import load_onnx_weights, max_abs_difference

        size = int(card["input_size"]) if card else calibration.shape[-1]
        if size != calibration.shape[-1]:
            calibration = F.interpolate(
                calibration, size=(size, size), mode="bilinear", antialias=True
            )
        load_onnx_weights(model, path, calibration)
        views = int(card.get("test_time_views", 1)) if card else 1
        check = ViewAverage(model, views) if views > 1 else model
        difference = max_abs_difference(check, path, calibration)
        log(f"init from {path} ({size} px, {views} views): max |logit - onnx| {difference:.2e}")
    else:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log(f"init from {path}")


def _style_text(meta: dict[str, Any], args: argparse.Namespace) -> str:
    text = ""
    if meta.get("style_sources"):
        text += (
            f" Before those, {args.style_p:.0%} of the crops are re-rendered in the stain of a "
            f"real lab drawn from {', '.join(meta['style_sources'])} (each equally often; the "
            "colour statistics of leukocyte crops in l-alpha-beta space, "
            "`lisplugin/training/styles.py`), most of them labs whose images carry no class "
            "labels."
        )
    pseudo = meta.get("pseudo_labels")
    if pseudo:
        kept = ", ".join(f"{name} {k} of {n}" for name, (k, n) in pseudo["sources"].items())
        classes = ", ".join(f"{c} {n}" for c, n in pseudo["per_class"].items())
        text += (
            f" The leukocytes of those unlabelled labs that the teacher (classifier "
            f"{pseudo['teacher']}) names with a probability of at least {pseudo['threshold']} "
            f"train as one more site under its labels ({kept}; {classes}; "
            "`lisplugin/training/pseudo.py`)."
        )
    return text


def _card_body(
    meta: dict[str, Any],
    history: list[dict[str, float]],
    site_tests: dict[str, dict[str, Any]],
    held_out: dict[str, Any] | None,
    args: argparse.Namespace,
    command: str,
    train_seconds: float,
    params: int,
    onnx_bytes: int,
    counts: dict[str, dict[str, int]],
    init: dict[str, Any] | None = None,
) -> str:
    m = meta["metrics"]
    best = max(history, key=lambda r: r["val_accuracy"])
    lineage = ""
    if init is not None:
        lineage = f"""
## Lineage

Fine-tuned from {init["name"]} {init["version"]} ({init["input_size"]} px, SHA-256
`{init["sha256"][:16]}...`), the `--init` file of the command below with its card beside it
(the chain back to the model trained from scratch is in this repository's history,
`git log -- models/{MODEL_NAME}.md`; each card there gives its own command and wall time).
"""
    split_rows = "\n".join(
        f"| {name} | {c['train']} | {c['val']} | {c['test']} |" for name, c in counts.items()
    )
    sampling = (
        f"each epoch draws {args.epoch_size} crops with replacement, {args.site_share:.0%} from "
        "PBC when other sites train too and the rest evenly from the other sites"
        if args.epoch_size
        else f"every crop once per epoch, other sites' crops repeated {args.field_repeat}x"
    )
    tests = "\n\n".join(
        f"### {name} (test split, in-site)\n\naccuracy **{r['accuracy']:.4f}**, macro-F1 "
        f"**{r['macro_f1']:.4f}**, ECE {r['ece']:.4f}, n = {r['n']}.\n\n{_markdown_table(r)}"
        for name, r in site_tests.items()
    )
    loso = ""
    if held_out is not None:
        recall = ", ".join(
            f"{c} {v['recall']:.2f} (n {v['n']})" for c, v in held_out["per_class"].items()
        )
        loso = f"""
## Leave-one-site-out: {args.leave_out}

This model never saw site `{args.leave_out}`. Every labelled image of it through the daemon's
whole path (quality control, shipped detector, crop, this classifier; most confident leukocyte
per image), as `lisplugin evaluate cells` scores a lab's folders: accuracy
**{held_out["accuracy"]}**, macro-F1 {held_out["macro_f1"]}, n = {held_out["n"]}, leukocyte
found in {held_out["found"]}. Recall per class: {recall}.
"""
    mixed = ""
    if meta.get("training_colours"):
        mixed = (
            "\nTraining crops were cut in each of the normalisations "
            f"{' and '.join(meta['training_colours'])} (`--mix-colour`); every draw took either "
            "copy with p = 0.5, so the train counts below hold both copies."
        )
    return f"""
# Leukocyte classifier {meta["version"]}

Classifies one leukocyte crop into the eight PBC classes ({", ".join(meta["classes"])}).
The crop is a PBC-scale window (160 x 160 px, a red cell ~37 px across; see
`lisplugin/core/crops.py`), colour-normalised as the card's `colour_normalisation` says (now:
{meta["colour_normalisation"]}; `white-point`: white-balanced against its own glass;
`white-point+stains`: then re-expressed in PBC's two stains, measured on the crop's red cells and
chromatin, `stain_normalised`); the adapter takes its
central {meta["centre_crop"]:.0%} and resizes that to {meta["input_size"]} px. The output is logits
averaged over {meta["test_time_views"]} rotated/mirrored views (test-time augmentation inside
the graph); `lisplugin/inference/classifier.py` returns `softmax(logits / temperature)`{
        ", each class's probability then moved by Bayes' rule from the training draws' class mix"
        " (`training_prior`) to the card's `prevalence` or the lab's setting"
        " (`lisplugin/core/prevalence.py`); test figures below include it"
        if meta.get("prevalence")
        else ""
    }.

## Data: sites and splits

Trained on the sites {", ".join(meta["sites"])} together (`lisplugin/datasets/sites.py`: PBC's
`split.csv`, BCCD's `cbc_split.csv` with unlisted labelled fields as train, Zheng et al.'s
Dataset 1 split by image number); {sampling}. Val crops of all sites choose the epoch and fit
the temperature; test crops are scored once, below.{mixed}

| site | train | val | test |
|---|---|---|---|
{split_rows}

## Architecture and why

A small ResNet ({params:,} parameters, {onnx_bytes / 1e6:.1f} MB ONNX): stride-2 3x3 stem, four
stages of basic blocks (32, 64, 128, 256 channels; 1, 1, 2, 1 blocks), {
        "group norms (8 groups, each image normalised by its own statistics)"
        if args.norm == "group"
        else "batch norms"
    } after each convolution, global average
pooling, linear head; fast on two CPU cores. What makes it travel between labs is mostly the
input: crops scale-normalised by the field's red cells, white-balanced against the glass,
and training augmentation for what differs between labs: stain uptake (colour deconvolution,
each dye's density scaled and shifted, strength {args.stain_strength}), hue, saturation, tone
curve, colour cast, illumination, defocus, sensor noise, JPEG, debris (strength
{args.photometric_strength}), any rotation and mirror, and +-{args.scale_jitter:.0%} scale.{
        _style_text(meta, args)
    }

Training: AdamW (lr {args.lr}, weight decay 0.05), warm-up then cosine decay, label smoothing
0.05, batch {args.batch_size}, EMA of the weights. Best validation accuracy
{best["val_accuracy"]:.4f} at epoch {best["epoch"]} of {len(history)}.
{lineage}
## Reproduce

```
{command}
```

Wall time {train_seconds / 60:.1f} min for loading and training ({
        platform.processor() or platform.machine()
    }, torch {torch.__version__}, {torch.get_num_threads()} thread(s)), seed fixed.
{loso}
## Test metrics per site

{tests}

## Calibration

Temperature {meta["temperature"]} fitted on val by NLL. ECE (15 bins): val
{m["val_ece_uncalibrated"]:.4f} -> {m["val_ece"]:.4f}.

## Inference time

ONNX Runtime, 2 intra-op threads, through `OnnxLeukocyteClassifier` including the colour
normalisation and resize: {m["batched_ms_per_crop"]:.2f} ms per crop in batches,
{m["single_ms_per_crop"]:.2f} ms for a single crop.

## Limits

Healthy-donor cells; no blasts, atypical/reactive lymphocytes or smudge cells among the
classes, so such cells are forced into one of the eight (low calibrated probability sends them
to "unidentified"). BCCD and Zheng et al. label only 5 classes. A lab whose cells still differ
adapts the model on its own reviewed cells (`lisplugin adapt`).

SHA-256 of `{meta["file"]}`: `{meta["sha256"]}`
"""


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
