"""ONNX Runtime adapter for the leukocyte classifier, configured entirely by its model card.

The card front matter gives the input size, the central part of the crop the model looks at
(``centre_crop``, a fraction of the PBC window), the colour normalisation of the crop
(``colour_normalisation``: none, ``white-point``, ``white-point+rbc`` or ``white-point+stains``,
see ``lisplugin.core.crops``), the normalisation, the order of the output
classes and the temperature fitted on the validation split; the graph outputs raw logits and the
calibrated probabilities are ``softmax(logits / temperature)``, moved from the class mix of the
training draws (``training_prior``) to the one expected where the model is used
(``prevalence``, or the lab's setting; see ``lisplugin.core.prevalence``).

For occlusion saliency the adapter also runs the graph without its test-time views
(``classify_seen``): the shipped graph averages the logits of four rotated/mirrored copies of
each input, which makes every occluded view cost four; the backbone alone is cut out of the graph
once, on first use (needs the ``onnx`` package; a graph of another shape runs whole).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lisplugin.core.crops import (
    COLOUR_NORMALISATIONS,
    classifier_input,
    colour_normalised,
    resize_rgb,
)
from lisplugin.core.prevalence import PrevalenceError, calibrated, prior_shift
from lisplugin.inference.registry import ModelCard, ModelCardError
from lisplugin.inference.specimen_norms import NormsSettings, SpecimenNorms

log = logging.getLogger(__name__)


def single_view_graph(path: Path) -> bytes | None:
    """The graph at ``path`` without its test-time views: the backbone's logits of one view.

    The exported graph concatenates the input with its rotated/mirrored copies, runs the
    backbone on all of them and averages the logits (Reshape to views x N, ReduceMean). The
    part from that Concat's output to the Reshape's input is one view's backbone and head.
    ``None`` when the graph is not of that shape (then the whole graph is used).
    """
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(path))
    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    mean = producers.get(graph.output[0].name)
    reshape = producers.get(mean.input[0]) if mean is not None else None
    source = graph.input[0].name
    concat = next((n for n in graph.node if n.op_type == "Concat" and source in n.input), None)
    if (
        mean is None
        or mean.op_type != "ReduceMean"
        or reshape is None
        or reshape.op_type != "Reshape"
        or concat is None
    ):
        return None
    inferred = onnx.shape_inference.infer_shapes(model)
    single = Extractor(inferred).extract_model([concat.output[0]], [reshape.input[0]])
    return bytes(single.SerializeToString())


class OnnxLeukocyteClassifier:
    """Calibrated class probabilities for PBC-scale leukocyte crops (any size, RGB uint8)."""

    def __init__(
        self,
        card: ModelCard,
        threads: int = 2,
        batch_size: int = 64,
        prevalence: Mapping[str, float] | None = None,
    ) -> None:
        """``prevalence``: the lab's class mix, instead of the card's (its setting)."""
        try:
            self.input_size = int(card["input_size"])
            self.classes: Sequence[str] = tuple(str(c) for c in card["classes"])
            mean = np.asarray(card["mean"], dtype=np.float32)
            std = np.asarray(card["std"], dtype=np.float32)
        except KeyError as exc:
            raise ModelCardError(f"{card.name}: card lacks {exc}") from exc
        self.temperature = float(card.get("temperature", 1.0))
        self.centre = float(card.get("centre_crop", 1.0))
        self.colour = card.get("colour_normalisation")
        if self.colour not in COLOUR_NORMALISATIONS:
            raise ModelCardError(f"{card.name}: unknown colour_normalisation {self.colour!r}")
        self.version = card.version
        self.batch_size = batch_size
        self.training_prior = card.get("training_prior")
        self.prevalence = prevalence or card.get("prevalence")
        try:
            self._prior_shift = prior_shift(self.classes, self.training_prior, self.prevalence)
        except PrevalenceError as exc:
            raise ModelCardError(f"{card.name}: {exc}") from exc
        # Images are 0..255; fold the /255 and the normalisation into one scale and shift.
        self._scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1)
        self._shift = (-mean / std).reshape(1, 3, 1, 1)
        options = ort.SessionOptions()
        # Idle pool threads sleep instead of spinning: on a CPU shared with ingest, the web
        # server and other work, spinning threads took the cores the computation needed.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(card.onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._options = options
        self._onnx_path = Path(card.onnx_path)
        self._views = int(card.get("test_time_views", 1))
        self._single: ort.InferenceSession | None = None
        self._single_lock = threading.Lock()
        described = card.get("specimen_norms")
        self.norms: SpecimenNorms | None = None
        if described:
            try:
                self.norms = SpecimenNorms(
                    self._onnx_path, NormsSettings.from_card(described), threads=threads
                )
            except (KeyError, OSError, TypeError, ValueError) as exc:
                raise ModelCardError(f"{card.name}: specimen_norms: {exc}") from exc

    def inputs(self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None) -> np.ndarray:
        """The graph's input for ``crops``: (N, 3, size, size) float32, normalised."""
        return self.normalised(
            np.stack(
                [
                    classifier_input(c, self.input_size, self.centre, self.colour, nucleus)
                    for c in crops
                ]
            )
        )

    def normalised(self, batch: np.ndarray) -> np.ndarray:
        """Prepared crops (N, size, size, 3) uint8 as the graph's input (N, 3, size, size)."""
        return batch.transpose(0, 3, 1, 2).astype(np.float32) * self._scale + self._shift

    def logits(
        self,
        crops: Sequence[np.ndarray],
        nucleus: np.ndarray | None = None,
        feed: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Uncalibrated logits, (N, len(classes)), computed in batches (``nucleus``: the
        specimen's chromatin density, see ``core.crops.shared_nucleus``; ``feed``: the
        specimen's feature scale and shift, see :meth:`for_specimen`)."""
        out = [np.zeros((0, len(self.classes)), dtype=np.float32)]
        for start in range(0, len(crops), self.batch_size):
            x = self.inputs(crops[start : start + self.batch_size], nucleus)
            if feed is not None and self.norms is not None:
                out.append(self.norms.logits(x, feed))
            else:
                out.append(self._session.run(None, {self._input: x})[0])
        return np.concatenate(out)

    def specimen_sample(self, count: int) -> list[int]:
        """Which of a specimen's ``count`` crops :meth:`for_specimen` needs (none: no norms,
        or too few leukocytes to normalise on)."""
        if self.norms is None or count < self.norms.settings.min_cells:
            return []
        return self.norms.sample(count)

    def for_specimen(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> OnnxLeukocyteClassifier | SpecimenClassifier:
        """This classifier with its features normalised on the specimen's own leukocytes
        (``crops``, all of them, in the analysis's order; see ``specimen_norms``), or itself
        where the card has no ``specimen_norms`` or the specimen too few leukocytes."""
        norms = self.norms
        if norms is None or len(crops) < norms.settings.min_cells:
            return self
        chosen = [crops[i] for i in norms.sample(len(crops))]
        return SpecimenClassifier(self, norms.affine(self.inputs(chosen, nucleus)))

    def classify(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> np.ndarray:
        """Calibrated probabilities, (N, len(classes)); each row sums to 1."""
        return self._calibrated(self.logits(crops, nucleus))

    def _calibrated(self, logits: np.ndarray) -> np.ndarray:
        return calibrated(logits, self.temperature, self._prior_shift)

    def seen_colours(self, crop: np.ndarray, nucleus: np.ndarray | None = None) -> np.ndarray:
        """``crop`` in the colours the model sees it (its card's colour normalisation).

        Occluded copies of a crop are made from this, so that all share the unoccluded
        crop's white point and stains (a patch of glass would otherwise shift their colours);
        ``nucleus``: the stain reference it was classified against.
        """
        return colour_normalised(crop, self.colour, nucleus=nucleus)

    def _single_view(self) -> ort.InferenceSession:
        """The graph without its test-time views, cut out once (the whole graph if it cannot)."""
        with self._single_lock:
            if self._single is None:
                graph = single_view_graph(self._onnx_path) if self._views > 1 else None
                if graph is None:
                    self._single = self._session
                    if self._views > 1:
                        log.warning(
                            "%s: test-time views not found; saliency runs all views",
                            self._onnx_path.name,
                        )
                else:
                    self._single = ort.InferenceSession(
                        graph, self._options, providers=["CPUExecutionProvider"]
                    )
            return self._single

    def classify_seen(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated probabilities of one view of each window, all in one run.

        ``windows`` are the part of a crop the model looks at (its ``centre`` window of
        :meth:`seen_colours`), any size: occluded copies for saliency. One view instead of the
        card's test-time views makes each copy cost a quarter.
        """
        session = self._single_view()
        batch = np.stack([resize_rgb(w[..., :3], self.input_size) for w in windows])
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) * self._scale + self._shift
        name = session.get_inputs()[0].name
        return self._calibrated(session.run(None, {name: x})[0])


class SpecimenClassifier:
    """A classifier whose features are normalised on one specimen's leukocytes
    (:meth:`OnnxLeukocyteClassifier.for_specimen`); everything else is its base's."""

    def __init__(self, base: OnnxLeukocyteClassifier, feed: dict[str, np.ndarray]) -> None:
        self.base = base
        self.feed = feed

    def __getattr__(self, name: str) -> object:
        return getattr(self.base, name)

    def logits(self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None) -> np.ndarray:
        return self.base.logits(crops, nucleus, self.feed)

    def classify(
        self, crops: Sequence[np.ndarray], nucleus: np.ndarray | None = None
    ) -> np.ndarray:
        """Calibrated probabilities under the specimen's feature statistics."""
        return self.base._calibrated(self.logits(crops, nucleus))
