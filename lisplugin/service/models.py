"""The two models of the analysis, found through their cards and loaded once per process.

Loading an ONNX session takes seconds and a few hundred MB, so the daemon, ``lisplugin
analyze`` and the bench share one pair per models folder and card names.
"""

from __future__ import annotations

import threading
from pathlib import Path

from lisplugin.config import AnalysisSettings, Settings
from lisplugin.core.types import CellDetector, LeukocyteClassifier
from lisplugin.inference.classifier import OnnxLeukocyteClassifier
from lisplugin.inference.detector import OnnxCellDetector
from lisplugin.inference.registry import load_card
from lisplugin.inference.store import active_models_dir

_Key = tuple[Path, str, str, tuple[tuple[str, float], ...]]
_loaded: dict[_Key, tuple[CellDetector, LeukocyteClassifier]] = {}
_lock = threading.Lock()


def lab_classifier(models_dir: Path, analysis: AnalysisSettings) -> OnnxLeukocyteClassifier:
    """The classifier of ``models_dir`` with this lab's class prevalence, if it set one."""
    return OnnxLeukocyteClassifier(
        load_card(models_dir, analysis.classifier), prevalence=analysis.leukocyte_prevalence
    )


def load_models(settings: Settings | AnalysisSettings) -> tuple[CellDetector, LeukocyteClassifier]:
    """Detector and classifier named by the analysis settings, each checked against its card.

    Raises ``ModelCardError`` when a card or its ONNX file is missing or does not match.
    """
    if isinstance(settings, Settings):  # a daemon's settings: the promoted models, if any
        analysis, models_dir = settings.analysis, active_models_dir(settings)
    else:
        analysis, models_dir = settings, settings.models_dir
    prevalence = tuple(sorted(analysis.leukocyte_prevalence.items()))
    key = (Path(models_dir).resolve(), analysis.detector, analysis.classifier, prevalence)
    with _lock:
        if key not in _loaded:
            detector = OnnxCellDetector(load_card(key[0], analysis.detector))
            classifier = lab_classifier(key[0], analysis)
            _loaded[key] = (detector, classifier)
        return _loaded[key]
