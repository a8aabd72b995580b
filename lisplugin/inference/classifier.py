"""ONNX Runtime adapter for the leukocyte classifier, configured entirely by its model card.

The card front matter gives the input size, the central part of the crop the model looks at
(``centre_crop``, a fraction of the PBC window), the colour normalisation of the crop
(``colour_normalisation``: none, or ``white-point``), the normalisation, the order of the output
classes and the temperature fitted on the validation split; the graph outputs raw logits and the
calibrated probabilities are ``softmax(logits / temperature)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from lisplugin.core.crops import COLOUR_NORMALISATIONS, classifier_input
from lisplugin.inference.registry import ModelCard, ModelCardError


class OnnxLeukocyteClassifier:
    """Calibrated class probabilities for PBC-scale leukocyte crops (any size, RGB uint8)."""

    def __init__(self, card: ModelCard, threads: int = 2, batch_size: int = 64) -> None:
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

    def logits(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Uncalibrated logits, (N, len(classes)), computed in batches."""
        out = [np.zeros((0, len(self.classes)), dtype=np.float32)]
        for start in range(0, len(crops), self.batch_size):
            batch = np.stack(
                [
                    classifier_input(c, self.input_size, self.centre, self.colour)
                    for c in crops[start : start + self.batch_size]
                ]
            )
            x = batch.transpose(0, 3, 1, 2).astype(np.float32) * self._scale + self._shift
            out.append(self._session.run(None, {self._input: x})[0])
        return np.concatenate(out)

    def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated probabilities, (N, len(classes)); each row sums to 1."""
        z = self.logits(crops).astype(np.float64) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)
