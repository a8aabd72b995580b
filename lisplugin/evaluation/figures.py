"""Figures for model cards: confusion matrix, reliability diagram, precision-recall, site bars.

A card's tables say how good a model is; its figures show where it fails (which classes it
mixes up, whether a 0.9 probability means 90 %, how precision falls as recall rises, how much
is lost at a lab it never saw) at a glance for a pathologist or an auditor. They are PNG files
beside the card (``<model>.<kind>.png``), linked from its "Figures" section, written by
``lisplugin train ...``, ``lisplugin evaluate ... --figures DIR`` and ``lisplugin evaluate
card-figures`` (which regenerates those of the shipped models).

matplotlib (the ``train`` extra) draws them on its Agg canvas, imported only when a figure is
drawn: the daemon never imports this module's drawing code. The curve and bin arithmetic is
plain numpy and needs no matplotlib.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Equal-width confidence bins, as ``expected_calibration_error`` counts them.
RELIABILITY_BINS = 15
#: Pixels per inch of every figure: legible on a card page, each PNG well under 150 KB.
DPI = 90
#: Heading of the section of a card that links its figures.
SECTION = "## Figures"


class FiguresUnavailable(RuntimeError):
    """matplotlib is not installed (it comes with the ``train`` extra)."""


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas: no display, no pyplot global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # the daemon's install has no matplotlib
        raise FiguresUnavailable("figures need matplotlib: pip install 'lisplugin[train]'") from exc
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


# ----------------------------------------------------------------------------- arithmetic


def one_vs_rest_pr(
    scores: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Recall, precision after each item by descending score, and average precision (the area
    under the step curve, sum of precision at each true positive / positives); NaN without any
    positive."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return np.zeros(0), np.zeros(0), float("nan")
    order = np.argsort(-scores, kind="mergesort")
    hit = positive[order]
    tp = np.cumsum(hit)
    precision = tp / np.arange(1, len(hit) + 1)
    return tp / n_pos, precision, float(precision[hit].sum() / n_pos)


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS
) -> list[dict[str, float]]:
    """Per non-empty equal-width confidence bin: its edges, size, accuracy and mean confidence
    (the same bins as ``expected_calibration_error``, so the diagram and the ECE agree)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        if members.any():
            rows.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "n": int(members.sum()),
                    "accuracy": float(correct[members].mean()),
                    "confidence": float(confidence[members].mean()),
                }
            )
    return rows


def ece_of(bins: Sequence[Mapping[str, float]]) -> float:
    """Expected calibration error from :func:`reliability_bins`."""
    total = sum(b["n"] for b in bins)
    if not total:
        return 0.0
    return float(sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins))


# ----------------------------------------------------------------------------- drawing


def confusion_figure(
    matrix: Sequence[Sequence[int]],
    rows: Sequence[str],
    columns: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """Confusion matrix, colour = share of the true class (row), the count printed in each
    cell. Rows without any image and columns nobody was called are dropped (a site labelling 5
    classes shows 5 rows), unless the column is also a row."""
    m = np.asarray(matrix, dtype=np.int64).reshape(len(rows), len(columns))
    keep_rows = [i for i in range(len(rows)) if m[i].sum() > 0] or list(range(len(rows)))
    row_names = [rows[i] for i in keep_rows]
    keep_cols = [
        j for j, c in enumerate(columns) if m[keep_rows, j].sum() > 0 or c in row_names
    ] or list(range(len(columns)))
    m = m[np.ix_(keep_rows, keep_cols)]
    shares = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    figure = _figure(1.6 + 0.62 * len(keep_cols), 1.4 + 0.5 * len(keep_rows))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                colour = "white" if shares[i, j] > 0.55 else "black"
                axes.text(j, i, str(m[i, j]), ha="center", va="center", color=colour, fontsize=8)
    axes.set_xticks(
        range(len(keep_cols)), [columns[j] for j in keep_cols], rotation=40, ha="right", fontsize=8
    )
    axes.set_yticks(range(len(keep_rows)), row_names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    total = int(m.sum())
    right = int(
        sum(
            m[i, j]
            for i, r in enumerate(row_names)
            for j, c in enumerate([columns[k] for k in keep_cols])
            if r == c
        )
    )
    axes.set_title(f"{title}\naccuracy {right / max(total, 1):.3f}, n = {total}", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
    return _save(figure, path)


def reliability_figure(
    sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    title: str,
    bins: int = RELIABILITY_BINS,
) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, one line per set
    (``name -> (confidence, correct)``), the diagonal a perfectly calibrated model; below, how
    many predictions fall in each bin (log scale: most sit near 1)."""
    figure = _figure(5.6, 5.4)
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    edges = np.linspace(0, 1, bins + 1)
    for name, (confidence, correct) in sets.items():
        rows = reliability_bins(confidence, correct, bins)
        if not rows:
            continue
        x = [r["confidence"] for r in rows]
        y = [r["accuracy"] for r in rows]
        label = f"{name}: ECE {ece_of(rows):.3f}, n = {len(confidence)}"
        (line,) = top.plot(x, y, marker="o", markersize=4, linewidth=1.2, label=label)
        counts, _ = np.histogram(np.asarray(confidence, dtype=np.float64), bins=edges)
        bottom.step(edges[:-1], counts, where="post", color=line.get_color(), linewidth=1.2)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy in the bin")
    top.set_title(title, fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_xlabel(f"confidence (top-class probability, {bins} bins)")
    bottom.set_ylabel("predictions")
    bottom.grid(alpha=0.3)
    return _save(figure, path)


def precision_recall_figure(
    panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, float]]],
    path: Path,
    title: str,
) -> Path:
    """Precision against recall: one panel per key of ``panels``, one curve per inner key
    (``name -> (recall, precision, AP)``), AP in the legend. Curves without ground truth are
    left out."""
    n = len(panels)
    figure = _figure(min(4.2 * n, 12.6), 4.2 if n > 1 else 4.6)
    axes_list = np.atleast_1d(figure.subplots(1, n, sharey=True))
    for axes, (panel, curves) in zip(axes_list, panels.items(), strict=True):
        for name, (recall, precision, ap) in curves.items():
            if not len(recall):
                continue
            axes.plot(recall, precision, linewidth=1.2, label=f"{name} (AP {ap:.3f})")
        axes.set_xlim(0, 1.01)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("recall")
        axes.set_title(panel, fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower left")
    axes_list[0].set_ylabel("precision")
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def bars_figure(
    groups: Mapping[str, Mapping[str, float | None]],
    path: Path,
    title: str,
    ylabel: str,
) -> Path:
    """Grouped bars (``group -> series -> value``), each bar labelled with its value; a series
    missing from a group leaves a gap."""
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    figure = _figure(1.8 + 1.3 * len(groups) * max(len(series), 1) ** 0.5, 3.9)
    axes = figure.add_subplot()
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for k, name in enumerate(series):
        values = [groups[g].get(name) for g in groups]
        heights = [np.nan if v is None else float(v) for v in values]
        positions = x - 0.4 + width * (k + 0.5)
        drawn = axes.bar(positions, heights, width * 0.92, label=name)
        axes.bar_label(
            drawn, labels=["" if v is None else f"{v:.2f}" for v in values], fontsize=7, padding=1
        )
    axes.set_xticks(x, list(groups), fontsize=8)
    axes.set_ylim(0, 1.12)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="upper right", ncols=min(len(series), 3))
    return _save(figure, path)


# ----------------------------------------------------------------------------- card figures


def classifier_figures(
    folder: Path,
    model: str,
    tests: Mapping[str, tuple[np.ndarray, np.ndarray]],
    classes: Sequence[str],
    metrics: Mapping[str, Any] | None = None,
    label: str = "test",
) -> list[tuple[str, Path]]:
    """A classifier's figures from its scored test sets (``site -> (true class indices,
    probabilities)``): a confusion matrix per set, one reliability diagram and one
    precision-recall figure over them, and the leave-one-site-out bars when ``metrics`` hold
    ``leave_out_<site>_accuracy`` values (a card's front matter). Returns (caption, file)."""
    folder = Path(folder)
    out: list[tuple[str, Path]] = []
    classes = list(classes)
    for site, (y_true, probs) in tests.items():
        y_true = np.asarray(y_true, dtype=int)
        predicted = np.asarray(probs).argmax(axis=1)
        matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(matrix, (y_true, predicted), 1)
        path = confusion_figure(
            matrix,
            classes,
            classes,
            folder / f"{model}.confusion-{site}.png",
            f"{model}: {site} {label}",
        )
        out.append((f"Confusion matrix, {site} {label} (rows: true class)", path))
    reliability = {
        site: (np.asarray(p).max(axis=1), np.asarray(p).argmax(axis=1) == np.asarray(y))
        for site, (y, p) in tests.items()
    }
    path = reliability_figure(
        reliability,
        folder / f"{model}.reliability.png",
        f"{model}: calibration on {label} sets (after temperature)",
    )
    out.append((f"Reliability diagram, {label} sets", path))
    y_all = np.concatenate([np.asarray(y, dtype=int) for y, _ in tests.values()])
    p_all = np.concatenate([np.asarray(p) for _, p in tests.values()])
    curves = {name: one_vs_rest_pr(p_all[:, k], y_all == k) for k, name in enumerate(classes)}
    sets = ", ".join(tests)
    path = precision_recall_figure(
        {f"one class against the rest, {sets} {label} pooled": curves},
        folder / f"{model}.precision-recall.png",
        model,
    )
    out.append((f"Precision-recall per class, {label} sets pooled", path))
    bars = loso_groups(metrics or {})
    if bars:
        path = bars_figure(
            bars,
            folder / f"{model}.leave-one-site-out.png",
            f"{model}: accuracy at a site left out of training",
            "accuracy",
        )
        out.append(("Leave-one-site-out accuracy against in-site test accuracy", path))
    return out


def loso_groups(metrics: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``site -> {"left out of training": acc, "in-site test": acc}`` from a card's metrics
    (``leave_out_<site>_accuracy``, ``<site>_test_accuracy``; ``_`` and ``-`` in a site's name
    are the same site)."""
    groups: dict[str, dict[str, float | None]] = {}
    for key, value in metrics.items():
        found = re.fullmatch(r"leave_out_(.+)_accuracy", key)
        if not found or value is None:
            continue
        site = found.group(1)
        in_site = next(
            (v for k, v in metrics.items() if k.replace("-", "_") == f"{site}_test_accuracy"),
            None,
        )
        groups[site.replace("_", "-")] = {
            "left out of training": float(value),
            "in-site test": None if in_site is None else float(in_site),
        }
    return groups


def detector_figures(
    folder: Path,
    model: str,
    curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, float]]],
    metrics: Mapping[str, Any] | None = None,
) -> list[tuple[str, Path]]:
    """A detector's figures: precision-recall at IoU 0.5 with one panel per cell kind and one
    curve per scored set (``set -> kind -> curve``), and, from a card's ``metrics``
    (``set -> {"map50" or "map50_rbc_wbc", "recall": {kind: ...}}``), mAP@0.5 per set."""
    folder = Path(folder)
    kinds = list(dict.fromkeys(k for per_set in curves.values() for k in per_set))
    panels = {
        kind: {name: per_set[kind] for name, per_set in curves.items() if kind in per_set}
        for kind in kinds
    }
    out = [
        (
            "Precision-recall per cell kind at IoU 0.5 (every candidate, score >= 0.05)",
            precision_recall_figure(
                panels,
                folder / f"{model}.precision-recall.png",
                f"{model}: precision-recall at IoU 0.5",
            ),
        )
    ]
    groups: dict[str, dict[str, float | None]] = {}
    for name, m in (metrics or {}).items():
        if not isinstance(m, Mapping) or name.endswith(("_tta_wbf", "_mosaic_2x2", "_mosaic_3x3")):
            continue
        value = m.get("map50", m.get("map50_rbc_wbc"))
        if value is not None:
            recall = m.get("recall") or {}
            groups[name.replace("_", " ")] = {
                "mAP@0.5": float(value),
                "WBC recall": recall.get("WBC"),
            }
    if groups:
        path = bars_figure(
            groups, folder / f"{model}.sets.png", f"{model}: per evaluation set (card metrics)", ""
        )
        out.append(("mAP@0.5 and leukocyte recall per evaluation set", path))
    return out


def markdown_section(figures: Sequence[tuple[str, Path]], card_dir: Path, note: str = "") -> str:
    """The card's "Figures" section: a markdown image link per figure, relative to the card."""
    lines = [SECTION, ""]
    if note:
        lines += [note, ""]
    for caption, path in figures:
        lines.append(f"![{caption}]({Path(path).resolve().relative_to(Path(card_dir).resolve())})")
        lines.append("")
    return "\n".join(lines)


def with_section(body: str, section: str) -> str:
    """The card text with its "Figures" section replaced by ``section``, or inserted before
    the closing SHA-256 line (at the end when there is none). The front matter is untouched."""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |^SHA-256 of |\Z)", re.M | re.S)
    block = section.rstrip("\n") + "\n\n"
    if pattern.search(body):
        return pattern.sub(lambda _m: block, body, count=1)
    closing = re.search(r"^SHA-256 of ", body, re.M)
    if closing:
        return body[: closing.start()] + block + body[closing.start() :]
    return body.rstrip("\n") + "\n\n" + block


def update_card(card: Path, figures: Sequence[tuple[str, Path]], note: str = "") -> None:
    """Link ``figures`` from ``card`` (its "Figures" section rewritten, nothing else)."""
    card = Path(card)
    text = card.read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    section = markdown_section(figures, card.parent, note)
    card.write_text(f"---\n{front}---\n{with_section(body, section)}", encoding="utf-8")
