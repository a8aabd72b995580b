"""Leukocytes of labs without class labels, labelled by a teacher model (self-training).

The labelled sites are three labs. The box-annotated sets in ``../shared/data`` hold well over
a thousand leukocytes of other labs (Raabin-WBC, BCD, draaslan) whose classes nobody wrote down.
A teacher classifier names each of them, as the daemon would (cut at the PBC scale from the
field's red cells, normalised as its card says); the ones it names with a calibrated
probability of at least ``threshold`` join the student's training as one more site (noisy
student, Xie et al. 2020), so that the student learns those labs' cells and not only their
colour statistics (``styles``).

Only labs that are no labelled site are used (TXL-PBC's copies of BCCD and PBC are left out),
and the teacher must not have seen a left-out site: a leave-one-site-out figure stays honest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lisplugin.core.crops import classifier_input
from lisplugin.training.styles import SOURCE_SITE, STYLE_SOURCES, leukocyte_crops

#: Unlabelled labs that are not a labelled site under another name.
PSEUDO_SOURCES = tuple(s for s in STYLE_SOURCES if s.name not in SOURCE_SITE)


@dataclass
class PseudoLabels:
    """Classifier inputs and teacher labels of the kept leukocytes, and what was kept."""

    x: np.ndarray
    y: np.ndarray
    teacher: str
    threshold: float
    #: source -> [kept, seen]
    sources: dict[str, list[int]] = field(default_factory=dict)

    def per_class(self, classes: Sequence[str]) -> dict[str, int]:
        return {c: int((self.y == i).sum()) for i, c in enumerate(classes) if (self.y == i).any()}


def pseudo_labelled(
    root: Path,
    teacher_dir: Path,
    classes: Sequence[str],
    size: int,
    centre: float,
    colour: str | None,
    threshold: float = 0.9,
    per_source: int | None = None,
    log: Callable[[str], None] = print,
) -> PseudoLabels:
    """Every annotated leukocyte of the unlabelled labs under ``root`` that the teacher of
    ``teacher_dir`` names with probability >= ``threshold``, as the student's inputs."""
    from lisplugin.inference.classifier import OnnxLeukocyteClassifier
    from lisplugin.inference.registry import load_card

    card = load_card(teacher_dir, "leukocyte-classifier")
    teacher = OnnxLeukocyteClassifier(card)
    if list(teacher.classes) != list(classes):
        raise ValueError(f"teacher classes {list(teacher.classes)} are not {list(classes)}")
    xs: list[np.ndarray] = []
    ys: list[int] = []
    kept: dict[str, list[int]] = {}
    for source in PSEUDO_SOURCES:
        crops = leukocyte_crops(Path(root), source, per_source)
        if not crops:
            continue
        probabilities = teacher.classify(crops)
        sure = np.flatnonzero(probabilities.max(axis=1) >= threshold)
        for i in sure:
            xs.append(classifier_input(crops[i], size, centre, colour))
            ys.append(int(probabilities[i].argmax()))
        kept[source.name] = [len(sure), len(crops)]
        log(f"pseudo-labels {source.name}: {len(sure)} of {len(crops)} leukocytes at p >= "
            f"{threshold}")  # fmt: skip
    x = np.stack(xs) if xs else np.zeros((0, size, size, 3), np.uint8)
    return PseudoLabels(x, np.asarray(ys, np.int64), card.version, threshold, kept)
