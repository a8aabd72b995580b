"""Reader for class-folder image sets such as PBC: ``DIR/<class>/<image>`` plus a split file.

PBC ships one sub-folder per leukocyte class; ``split.csv`` (``path,label,split``, paths
relative to ``DIR``) fixes the train/val/test split so every run and report uses the same
images. Without a split file every image in a known class folder belongs to one split, "all".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lisplugin.core.crops import classifier_input
from lisplugin.datasets import IMAGE_SUFFIXES, Sample, load_rgb, read_samples, select

__all__ = ["IMAGE_SUFFIXES", "Sample", "load_images", "load_rgb", "read_samples", "select"]


def load_images(
    samples: Sequence[Sample], size: int, centre: float = 1.0, colour: str | None = None
) -> np.ndarray:
    """Decode, colour-normalise, cut the central ``centre`` fraction and resize all samples
    once, into an (N, size, size, 3) uint8 array, exactly as the runtime adapter prepares crops."""
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, sample in enumerate(samples):
        out[i] = classifier_input(load_rgb(sample.path), size, centre, colour)
    return out
