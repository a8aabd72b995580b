"""``lisplugin train quantize``: a models folder's ONNX graphs in 8-bit integers.

Why: per field, most of the analysis time is the two networks (``lisplugin bench``). On the
CPUs a lab runs the daemon on (x86 with AVX2, AVX-512 VNNI or AVX-VNNI; ARM with dot-product
instructions), ONNX Runtime's integer convolutions take about half the time of float ones.
Static quantisation (ONNX Runtime's QDQ format; weights per output channel, activations per
tensor) fixes each activation's range on calibration inputs cut exactly as the daemon cuts
them: training fields for the detector, training crops in the card's colour normalisation for
the classifier. The daemon needs nothing new: the graph is still one ONNX file behind a card.
What the integers cost in accuracy is measured by the same ``evaluate`` commands as the float
models and written into the cards; the float graph stays recoverable from git and from the
integer one (``training/onnx_init.py`` reads dequantised weights, so ``adapt`` and ``--init``
start from an integer model too).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lisplugin.datasets import IMAGE_SUFFIXES
from lisplugin.inference.registry import ModelCard, card_figures, file_sha256, load_card

#: Calibration inputs per graph (fields for the detector, crops for the classifier).
DEFAULT_CALIBRATION = 128


def quantize_graph(
    source: Path, target: Path, input_name: str, inputs: Sequence[np.ndarray]
) -> None:
    """Write ``source`` as a static int8 QDQ graph calibrated on ``inputs`` (network inputs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._inputs: Iterator[np.ndarray] = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._inputs, None)
            return None if x is None else {input_name: x}

    source, target = Path(source).resolve(), Path(target).resolve()
    # onnxruntime's symbolic shape inference, where it gives up, saves its partial graph
    # ("sym_shape_infer_temp.onnx" and its weights) into the working directory: keep that
    # litter in the temporary folder, not in the caller's (it once reached the repository).
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the detector's dynamic padding; ONNX's own
        # shape inference and the graph optimisations are enough for the quantiser.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=float_ends(prepared),
        )


def float_ends(path: Path) -> list[str]:
    """Convolutions kept in float: those reading the network input, so that the pixels'
    colour, which tells the classes apart across labs, keeps its full resolution. (Only
    convolutions are quantised: their outputs, and so logits, boxes and scores, stay float.)"""
    import onnx

    graph = onnx.load(str(path)).graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    keep: set[str] = set()
    # forwards from the input, through shape-only operations, to the first convolutions
    frontier = [graph.input[0].name]
    seen: set[str] = set()
    while frontier:
        name = frontier.pop()
        for node in consumers.get(name, []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type == "Conv":
                keep.add(node.name)
            else:
                frontier.extend(node.output)
    return sorted(keep)


def detector_inputs(card: ModelCard, fields: Sequence[Path]) -> list[np.ndarray]:
    """Network inputs of the detector for ``fields``, at the card's long side, padded."""
    from lisplugin.datasets import load_rgb
    from lisplugin.inference.detector import pad_input, resize

    long_side = int(card["input"]["long_side"])
    out = []
    for path in fields:
        image = load_rgb(path)
        out.append(pad_input(resize(image, long_side / max(image.shape[:2]))))
    return out


def classifier_inputs(
    crops: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> list[np.ndarray]:
    """Normalised (1, 3, S, S) classifier inputs of crops already cut as the card says."""
    mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    x = crops.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return [((x[i : i + 1] - mean) / std).astype(np.float32) for i in range(len(x))]


def calibration_fields(data: Path, count: int) -> list[Path]:
    """Training fields of BCCD (its ``train.txt``) and TXL-PBC (``images/train``), spread evenly
    over both sets: no field the detector's figures are measured on."""
    bccd = data / "bccd"
    names = (bccd / "ImageSets" / "Main" / "train.txt").read_text().split()
    sets = [
        [bccd / "JPEGImages" / f"{n}.jpg" for n in sorted(names)],
        sorted(
            p for p in (data / "txl-pbc" / "images" / "train").rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
        ),
    ]  # fmt: skip
    half = max(count // 2, 1)
    return [p for files in sets for p in files[:: max(len(files) // half, 1)][:half] if p.is_file()]


def calibration_crops(card: ModelCard, data: Path, count: int) -> np.ndarray:
    """Training crops of PBC (all eight classes) and BCCD (when the model trained on it), cut as
    the classifier's card says."""
    from lisplugin.datasets.sites import load_site

    classes = list(card["classes"])
    size, centre = int(card["input_size"]), float(card.get("centre_crop", 1.0))
    colour = card.get("colour_normalisation")
    # Only sites the model trained on: a model kept away from a site (leave-one-site-out) is
    # not calibrated on it either.
    trained = card.get("sites", ["pbc", "bccd"])
    shares = {"pbc": 0.75, "bccd": 0.25} if "bccd" in trained else {"pbc": 1.0}
    parts = []
    for site, share in shares.items():
        split = load_site(
            site, data, classes, size, centre, colour, limit=max(int(count * share), 1),
            log=lambda _t: None, splits=("train",),
        )["train"]  # fmt: skip
        parts.append(split[0])
    return np.concatenate(parts)


METHOD = (
    "static QDQ (ONNX Runtime): int8 weights per output channel, uint8 activations per tensor, "
    "MinMax ranges"
)


def mark_quantized(
    meta: dict[str, Any], onnx_path: Path, calibration: str, rename: bool = True
) -> None:
    """A card's front matter (``meta``, of the float graph) made that of its integer graph
    (its version ``+int8`` unless ``rename`` is false: it says so already)."""
    meta["quantization"] = {
        "method": METHOD,
        "calibration": calibration,
        "float_sha256": meta["sha256"],
        "float_version": str(meta["version"]),
    }
    meta["precision"] = "int8"
    meta["sha256"] = file_sha256(onnx_path)
    if rename:
        meta["version"] = f"{meta['version']}+int8"


def quantized_card(card_path: Path, onnx_path: Path, calibration: str) -> None:
    """Rewrite a card's front matter for its integer graph; the float graph's figures stay
    in the body, headed by what changed."""
    text = card_path.read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    meta: dict[str, Any] = yaml.safe_load(front)
    float_sha = meta["sha256"]
    mark_quantized(meta, onnx_path, calibration)
    heading = (
        f"\n## {meta['version']}: the same network in 8-bit integers\n\n"
        f"The graph of {meta['quantization']['float_version']} (SHA-256 `{float_sha[:16]}...`) "
        f"quantised by `lisplugin train quantize` ({meta['quantization']['method']}; "
        f"calibrated on {calibration}). The figures below are the float graph's unless this "
        "section gives the integer graph's.\n"
    )
    lines = body.split("\n")
    title = next(i for i, line in enumerate(lines) if line.startswith("# "))
    lines.insert(title + 1, heading)
    dumped = yaml.safe_dump(meta, sort_keys=False, width=100, allow_unicode=True)
    card_path.write_text(f"---\n{dumped}---\n" + "\n".join(lines), encoding="utf-8")


def quantize_folder(
    models: Path,
    out: Path,
    data: Path,
    count: int = DEFAULT_CALIBRATION,
    names: Sequence[str] = ("cell-detector", "leukocyte-classifier"),
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Copy ``models`` to ``out`` with the named graphs quantised; returns name -> version."""
    if not out.exists():
        shutil.copytree(models, out)
    elif out.resolve() != models.resolve():  # into a folder: only what is quantised now
        for name in names:
            card = load_card(models, name)
            norms = card.get("specimen_norms") or {}
            for path in (
                models / f"{name}.md",
                card.onnx_path,
                *card_figures(models / f"{name}.md"),
                *([models / norms["file"]] if norms.get("file") else []),
            ):
                shutil.copyfile(path, out / path.name)
    versions = {}
    for name in names:
        card = load_card(out, name)
        if card.get("precision") == "int8":
            raise SystemExit(f"{name} {card.version} is quantised already")
        if name == "leukocyte-classifier":
            crops = calibration_crops(card, data, count)
            inputs = classifier_inputs(crops, card["mean"], card["std"])
            what = f"{len(inputs)} training crops of " + (
                "PBC and BCCD" if "bccd" in card.get("sites", ["bccd"]) else "PBC"
            )
            input_name = "input"
        else:
            fields = calibration_fields(data, count)
            inputs = detector_inputs(card, fields)
            what = f"{len(inputs)} training fields of BCCD and TXL-PBC"
            input_name = str(card["input"]["name"])
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / card.onnx_path.name
            quantize_graph(card.onnx_path, target, input_name, inputs)
            shutil.copyfile(target, card.onnx_path)
        quantized_card(out / f"{name}.md", card.onnx_path, what)
        versions[name] = load_card(out, name).version
        log(f"{name}: {versions[name]} ({card.onnx_path.stat().st_size / 1e6:.1f} MB, {what})")
    return versions


def cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lisplugin train quantize",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--models", type=Path, default=Path("models"), help="float models folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the integer models")
    parser.add_argument(
        "--data", type=Path, default=Path("../shared/data"), help="the public data (calibration)"
    )
    parser.add_argument("--calibration", type=int, default=DEFAULT_CALIBRATION)
    parser.add_argument(
        "--only", choices=("cell-detector", "leukocyte-classifier"), help="quantise one model"
    )
    args = parser.parse_args(list(argv))
    names = (args.only,) if args.only else ("cell-detector", "leukocyte-classifier")
    quantize_folder(args.models, args.out, args.data, args.calibration, names)
    return 0
