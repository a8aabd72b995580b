"""The classifier's feature statistics re-estimated on each specimen's own leukocytes.

A network with batch norms normalises every feature with statistics of its training crops. At a
lab it has never seen (another stain, camera, optics) the features of every cell are shifted
alike, which the classes of the training sites never were: AdaBN (Li et al., Pattern
Recognition 2018; Schneider et al., NeurIPS 2020) normalises with the statistics of the target
images instead. Here the target is the specimen (the daemon: all leukocytes of a case; ``evaluate
cells`` and ``adapt --data``: a lab's folder), and its statistics are mixed with the training
sites' (``alpha``): a specimen is a few dozen cells of one patient, mostly neutrophils, whose
statistics also carry its class mix.

The shipped graph has its batch norms folded into the convolutions, so everything is done on
each convolution's output ``o``: its training-site mean and variance (``m_s``, ``v_s``, measured
once by ``lisplugin train norms`` and shipped beside the graph) and the specimen's (``m_t``,
``v_t``) give ``o' = sqrt(v_s / v) * (o - m) + m_s`` with ``m = a m_t + (1 - a) m_s`` and
``v = a v_t + (1 - a) v_s``: batch normalisation with the mixed statistics, in the folded graph.
One pass of a statistics graph over (at most ``max_cells`` of) the specimen's crops measures
every layer on the layers before it already adapted, as a batch norm in training mode does; the
classifier graph then takes the per-channel scale and shift as inputs.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

EPS = 1e-5


def _channels(graph: object, node: object) -> int:
    """Output channels of a Conv node (its weight, maybe behind a DequantizeLinear)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}  # type: ignore[attr-defined]
    weight = node.input[1]  # type: ignore[attr-defined]
    if weight not in inits:
        producer = next(n for n in graph.node if weight in n.output)  # type: ignore[attr-defined]
        weight = producer.input[0]
    return int(numpy_helper.to_array(inits[weight]).shape[0])


def _rewired(path: Path, build: object, layers: int | None = None) -> bytes:
    """The graph at ``path`` with ``build(graph, k, raw, out, channels)`` inserted after each
    Conv (the first ``layers`` of them; None: all): the Conv now writes ``raw``, and the
    inserted nodes must write its old output. The others stay as they are (integer
    convolutions stay fused)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    nodes, k = [], 0
    for node in list(graph.node):
        nodes.append(node)
        if node.op_type != "Conv" or (layers is not None and k >= layers):
            continue
        channels = _channels(graph, node)
        out, raw = node.output[0], f"norms_raw_{k}"
        node.output[0] = raw
        nodes += build(graph, k, raw, out, channels)  # type: ignore[operator]
        k += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return bytes(model.SerializeToString())


def affine_graph(path: Path, layers: int | None = None) -> bytes:
    """Each Conv output (of the first ``layers``) scaled and shifted per channel by graph
    inputs ``norms_scale_K`` and ``norms_shift_K`` (1, C, 1, 1); its raw output is a graph
    output too."""
    from onnx import TensorProto, helper

    def build(graph, k, raw, out, channels):  # type: ignore[no-untyped-def]
        for name in (f"norms_scale_{k}", f"norms_shift_{k}"):
            graph.input.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, 1, 1])
            )
        graph.output.append(helper.make_tensor_value_info(raw, TensorProto.FLOAT, None))
        return [
            helper.make_node("Mul", [raw, f"norms_scale_{k}"], [f"norms_scaled_{k}"]),
            helper.make_node("Add", [f"norms_scaled_{k}", f"norms_shift_{k}"], [out]),
        ]

    return _rewired(path, build, layers)


def statistics_graph(
    path: Path,
    source: Sequence[tuple[np.ndarray, np.ndarray]],
    alpha: float,
    layers: int | None = None,
) -> bytes:
    """Each Conv output (of the first ``layers``) normalised with the batch's statistics mixed
    with the source's and put back at the source's (a batch norm in training mode, folded);
    the mixed mean and variance of each are outputs ``norms_mean_K``, ``norms_var_K``."""
    from onnx import TensorProto, helper, numpy_helper

    def const(graph, name, value):  # type: ignore[no-untyped-def]
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def build(graph, k, raw, out, channels):  # type: ignore[no-untyped-def]
        m_s, v_s = (np.asarray(v, np.float32).reshape(1, channels, 1, 1) for v in source[k])
        if k == 0:
            const(graph, "norms_alpha", alpha)
            const(graph, "norms_rest", 1.0 - alpha)
            const(graph, "norms_eps", EPS)
        ms, vs = const(graph, f"norms_ms_{k}", m_s), const(graph, f"norms_vs_{k}", v_s)
        sd = const(graph, f"norms_sd_{k}", np.sqrt(v_s + EPS))
        p = f"norms{k}_"
        mean, var = f"norms_mean_{k}", f"norms_var_{k}"
        for name in (mean, var):
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        reduce = {"axes": [0, 2, 3], "keepdims": 1}
        a, rest = "norms_alpha", "norms_rest"
        return [
            helper.make_node("ReduceMean", [raw], [p + "mb"], **reduce),
            helper.make_node("Sub", [raw, p + "mb"], [p + "d"]),
            helper.make_node("Mul", [p + "d", p + "d"], [p + "d2"]),
            helper.make_node("ReduceMean", [p + "d2"], [p + "vb"], **reduce),
            helper.make_node("Mul", [p + "mb", a], [p + "m1"]),
            helper.make_node("Mul", [ms, rest], [p + "m2"]),
            helper.make_node("Add", [p + "m1", p + "m2"], [mean]),
            helper.make_node("Mul", [p + "vb", a], [p + "v1"]),
            helper.make_node("Mul", [vs, rest], [p + "v2"]),
            helper.make_node("Add", [p + "v1", p + "v2"], [var]),
            helper.make_node("Add", [var, "norms_eps"], [p + "ve"]),
            helper.make_node("Sqrt", [p + "ve"], [p + "sdm"]),
            helper.make_node("Div", [sd, p + "sdm"], [p + "a"]),
            helper.make_node("Sub", [raw, mean], [p + "c"]),
            helper.make_node("Mul", [p + "c", p + "a"], [p + "y"]),
            helper.make_node("Add", [p + "y", ms], [out]),
        ]

    return _rewired(path, build, layers)


def _session(graph: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def identity(layers: Sequence[int]) -> dict[str, np.ndarray]:
    """The affine inputs that leave the graph as it is."""
    feed = {}
    for k, channels in enumerate(layers):
        feed[f"norms_scale_{k}"] = np.ones((1, channels, 1, 1), np.float32)
        feed[f"norms_shift_{k}"] = np.zeros((1, channels, 1, 1), np.float32)
    return feed


def measure_source(
    path: Path,
    batches: Sequence[tuple[np.ndarray, float]],
    threads: int = 2,
    within: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mean and variance of every Conv output of the graph at ``path`` over weighted batches
    of normalised inputs (each site's crops, weighted by its share of the training draws).

    ``within``: the variance is the weighted mean of each batch's own variance (the spread
    inside one site, as inside one specimen) instead of that of all batches pooled, which adds
    the spread between sites."""
    graph = affine_graph(path)
    session = _session(graph, threads)
    layers = [int(i.shape[1]) for i in session.get_inputs()[1::2]]
    name = session.get_inputs()[0].name
    total = sum(w for _, w in batches)
    per_batch = []  # (share, [(mean, variance) per layer]) of each batch
    for x, weight in batches:
        moments = [[np.zeros(c), np.zeros(c)] for c in layers]
        count = 0
        for start in range(0, len(x), 32):
            raws = session.run(None, {name: x[start : start + 32], **identity(layers)})[1:]
            for k, r in enumerate(raws):
                r64 = r.astype(np.float64)
                moments[k][0] += r64.sum((0, 2, 3))
                moments[k][1] += (r64**2).sum((0, 2, 3))
            count += raws[0].shape[0] * raws[0].shape[2] * raws[0].shape[3]
        stats = [(s / count, q / count - (s / count) ** 2) for s, q in moments]
        per_batch.append((weight / total, stats))
    source = []
    for k in range(len(layers)):
        mean = sum(w * stats[k][0] for w, stats in per_batch)
        var = sum(w * stats[k][1] for w, stats in per_batch)  # the spread inside each batch
        if not within:  # pooled: plus the spread of the batches' means
            var = var + sum(w * (stats[k][0] - mean) ** 2 for w, stats in per_batch)
        source.append((np.asarray(mean, np.float32), np.asarray(var, np.float32)))
    return source


def save_source(path: Path, source: Sequence[tuple[np.ndarray, np.ndarray]]) -> str:
    """Write the training-site statistics beside the graph; returns the file's SHA-256."""
    arrays = {f"mean_{k}": m for k, (m, _) in enumerate(source)}
    arrays |= {f"var_{k}": v for k, (_, v) in enumerate(source)}
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class NormsSettings:
    """The card's ``specimen_norms``."""

    file: str
    sha256: str
    alpha: float
    min_cells: int
    max_cells: int
    layers: int | None = None  # only the first N convolutions (None: all)

    @classmethod
    def from_card(cls, described: dict[str, object]) -> NormsSettings:
        """The card's fields (others, such as the sites measured, are for people)."""
        settings = cls(
            file=str(described["file"]),
            sha256=str(described["sha256"]),
            alpha=float(described["alpha"]),  # type: ignore[arg-type]
            min_cells=int(described["min_cells"]),  # type: ignore[call-overload]
            max_cells=int(described["max_cells"]),  # type: ignore[call-overload]
            layers=None if described.get("layers") is None else int(described["layers"]),  # type: ignore[call-overload]
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError unless 0 <= alpha <= 1 and 1 <= min_cells <= max_cells."""
        if not 0.0 <= self.alpha <= 1.0 or not 1 <= self.min_cells <= self.max_cells:
            raise ValueError("needs 0 <= alpha <= 1 and 1 <= min_cells <= max_cells")


class SpecimenNorms:
    """Per-specimen scale and shift of every feature of one classifier graph."""

    def __init__(self, onnx_path: Path, settings: NormsSettings, threads: int = 2) -> None:
        norms_path = onnx_path.parent / settings.file
        data = norms_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != settings.sha256:
            raise ValueError(f"{norms_path.name}: SHA-256 differs from the card's")
        with np.load(norms_path) as arrays:
            count = sum(1 for key in arrays.files if key.startswith("mean_"))
            self.source = [(arrays[f"mean_{k}"], arrays[f"var_{k}"]) for k in range(count)]
        self.settings = settings
        self._path = onnx_path
        self._threads = threads
        self._lock = threading.Lock()
        self._affine: ort.InferenceSession | None = None
        self._statistics: ort.InferenceSession | None = None

    def _sessions(self) -> tuple[ort.InferenceSession, ort.InferenceSession]:
        with self._lock:
            if self._affine is None or self._statistics is None:
                layers = self.settings.layers
                self._affine = _session(affine_graph(self._path, layers), self._threads)
                self._statistics = _session(
                    statistics_graph(self._path, self.source, self.settings.alpha, layers),
                    self._threads,
                )
            return self._affine, self._statistics

    def sample(self, count: int) -> list[int]:
        """Which of a specimen's ``count`` crops give its statistics: all, or ``max_cells``
        spread evenly (their order is the analysis's, so the same cells every time)."""
        if count <= self.settings.max_cells:
            return list(range(count))
        return sorted({round(v) for v in np.linspace(0, count - 1, self.settings.max_cells)})

    def affine(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The scale and shift of every layer for a specimen whose (sampled) normalised inputs
        are ``x``, from one pass of the statistics graph."""
        _, statistics = self._sessions()
        out = statistics.run(None, {statistics.get_inputs()[0].name: x})[1:]
        feed = {}
        for k, (m_s, v_s) in enumerate(self.source[: len(out) // 2]):
            mean, var = out[2 * k].reshape(-1), out[2 * k + 1].reshape(-1)
            scale = np.sqrt(v_s + EPS) / np.sqrt(var + EPS)
            feed[f"norms_scale_{k}"] = scale.reshape(1, -1, 1, 1).astype(np.float32)
            feed[f"norms_shift_{k}"] = (m_s - scale * mean).reshape(1, -1, 1, 1).astype(np.float32)
        return feed

    def logits(self, x: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's logits for inputs ``x`` under a specimen's scale and shift."""
        session, _ = self._sessions()
        return np.asarray(
            session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: x, **feed})[
                0
            ]
        )
