"""Stain styles of real labs, to train the classifier for labs it will never see.

Synthetic stain jitter (``augment.stain_jitter``) varies each dye's uptake around the training
sites' own stains; it does not know what other labs' stains look like. Unlabelled images of
other labs do: every annotated leukocyte there, cut at the PBC scale as the daemon cuts it,
gives one *style*, the mean and spread of its colours in Reinhard's decorrelated l-alpha-beta
space. Training then re-renders crops in a random real lab's style (the colour statistics of
the crop mapped onto those of the style, RandStainNA: Shen et al., MICCAI 2022), so that the
classifier meets, for example, Raabin-WBC's and draaslan's stains without a single label of
theirs.

Style sources (``STYLE_SOURCES``) are the box-annotated sets in ``../shared/data`` that carry no
leukocyte classes, split by origin: TXL-PBC's four sources are told apart by image size. A
source that is the same lab as a left-out site is left out with it (``SOURCE_SITE``), so a
leave-one-site-out figure never sees the held-out lab's stain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lisplugin.core.analysis import median_rbc_diameter
from lisplugin.core.crops import classifier_input, leukocyte_crop, pbc_scale
from lisplugin.core.types import CELL_KINDS, Detection


@dataclass(frozen=True)
class StyleSource:
    """One lab's unlabelled, box-annotated images: a YOLO folder and the image sizes that are
    that lab's (None: all)."""

    name: str
    folder: str
    sizes: tuple[tuple[int, int], ...] | None = None


STYLE_SOURCES: tuple[StyleSource, ...] = (
    StyleSource("raabin", "txl-pbc", ((575, 575),)),
    StyleSource("bcd", "txl-pbc", ((416, 416),)),
    StyleSource("txl-bccd", "txl-pbc", ((640, 480),)),
    StyleSource("txl-pbc", "txl-pbc", ((360, 363), (366, 369))),
    StyleSource("draaslan", "draaslan"),
)
#: Sources that are the same lab as a labelled site: left out with that site.
SOURCE_SITE = {"txl-bccd": "bccd", "txl-pbc": "pbc"}

# Reinhard et al. 2001: RGB -> LMS cone space, log, then decorrelated l-alpha-beta axes.
_RGB_TO_LMS = torch.tensor(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
)
_LOG_LMS_TO_LAB = torch.diag(
    torch.tensor([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)])
) @ torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])
_LMS_TO_RGB = torch.linalg.inv(_RGB_TO_LMS)
_LAB_TO_LOG_LMS = torch.linalg.inv(_LOG_LMS_TO_LAB)


def to_lab(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> l-alpha-beta."""
    lms = torch.einsum("ij,bjhw->bihw", _RGB_TO_LMS.to(images), images).clamp(min=1.0 / 255.0)
    return torch.einsum("ij,bjhw->bihw", _LOG_LMS_TO_LAB.to(images), torch.log10(lms))


def from_lab(lab: torch.Tensor) -> torch.Tensor:
    """l-alpha-beta -> (B, 3, H, W) RGB (not clipped)."""
    lms = 10.0 ** torch.einsum("ij,bjhw->bihw", _LAB_TO_LOG_LMS.to(lab), lab)
    return torch.einsum("ij,bjhw->bihw", _LMS_TO_RGB.to(lab), lms)


def _lab_stats(lab: torch.Tensor) -> torch.Tensor:
    """(B, 6): mean and standard deviation of each channel of l-alpha-beta images."""
    flat = lab.flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2).clamp(min=1e-3)], dim=1)


def style_of(images: torch.Tensor) -> torch.Tensor:
    """(B, 6): mean and standard deviation of each l-alpha-beta channel of each image."""
    return _lab_stats(to_lab(images))


def restyle(
    images: torch.Tensor,
    styles: torch.Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
    jitter: float = 0.05,
    groups: int = 1,
) -> torch.Tensor:
    """Re-render a random ``p`` of the images in a style drawn from ``styles`` (N, 6).

    Each chosen image's l-alpha-beta statistics are mapped onto the drawn style's, moved a
    random 50-100 % of the way and jittered by ``jitter`` (relative), so that the model sees the
    real labs' stains and what lies between them. With ``groups`` > 1 the batch is that many
    equal runs of images (specimens): each run is re-rendered whole or not at all, in one style,
    as one lab's slide is stained alike.
    """
    b = images.shape[0]
    if len(styles) == 0 or p <= 0:
        return images
    if groups > 1:
        per = b // groups
        picked = torch.rand(groups, generator=generator) < p
        chosen = torch.nonzero(picked.repeat_interleave(per)).flatten()
        k = int(picked.sum())
        if k == 0:
            return images
        drawn = styles[torch.randint(len(styles), (k,), generator=generator)]
        shake = 1 + jitter * (2 * torch.rand((k, 6), generator=generator) - 1)
        amount = 0.5 + 0.5 * torch.rand((k, 1), generator=generator)
        target = (drawn * shake).repeat_interleave(per, dim=0).to(images)
        amount = amount.repeat_interleave(per, dim=0).to(images)
        return _moved(images, chosen, target, amount)
    chosen = torch.nonzero(torch.rand(b, generator=generator) < p).flatten()
    if chosen.numel() == 0:
        return images
    n = chosen.numel()
    target = styles[torch.randint(len(styles), (n,), generator=generator)].to(images)
    target = target * (1 + jitter * (2 * torch.rand((n, 6), generator=generator) - 1)).to(images)
    amount = (0.5 + 0.5 * torch.rand((n, 1), generator=generator)).to(images)
    return _moved(images, chosen, target, amount)


def _moved(
    images: torch.Tensor, chosen: torch.Tensor, target: torch.Tensor, amount: torch.Tensor
) -> torch.Tensor:
    """The ``chosen`` images' l-alpha-beta statistics moved ``amount`` of the way to ``target``."""
    lab = to_lab(images[chosen])
    own = _lab_stats(lab)
    goal = own + amount * (target - own)
    normed = (lab - own[:, :3, None, None]) / own[:, 3:, None, None]
    out = images.clone()
    out[chosen] = from_lab(normed * goal[:, 3:, None, None] + goal[:, :3, None, None]).clamp(0, 1)
    return out


def leukocyte_crops(
    root: Path, source: StyleSource, limit: int | None = None, seed: int = 0
) -> list[np.ndarray]:
    """PBC-scale crops (160 px) of one source's annotated leukocytes, cut as the daemon cuts
    them (scale from the field's red cells): one per field, fields in a seeded random order, at
    most ``limit``; ``None``: every leukocyte of every field."""
    from lisplugin.datasets.fields import read_yolo

    folder = root / source.folder
    if not folder.is_dir():
        return []
    fields = [f for f in read_yolo(folder) if source.sizes is None or (f.width, f.height) in
              source.sizes]  # fmt: skip
    crops: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for index in rng.permutation(len(fields)):
        field = fields[index]
        cells = [
            Detection(CELL_KINDS[int(k)], 1.0, tuple(b))  # type: ignore[arg-type]
            for b, k in zip(field.boxes.tolist(), field.labels.tolist(), strict=True)
        ]
        wbcs = [c.box for c in cells if c.kind == "WBC"]
        if not wbcs:
            continue
        image = field.load_image()
        rbc = median_rbc_diameter(cells, field.width, field.height)
        chosen = wbcs if limit is None else [wbcs[int(rng.integers(len(wbcs)))]]
        crops += [leukocyte_crop(image, box, pbc_scale(None, rbc, box)) for box in chosen]
        if limit is not None and len(crops) >= limit:
            break
    return crops


def _source_crops(
    root: Path, source: StyleSource, per_source: int, size: int, centre: float, colour: str | None
) -> list[np.ndarray]:
    """Classifier inputs of the annotated leukocytes of one source, cut as the daemon cuts."""
    return [classifier_input(c, size, centre, colour) for c in
            leukocyte_crops(root, source, per_source)]  # fmt: skip


def style_pool(
    root: Path,
    size: int,
    centre: float,
    colour: str | None,
    leave_out: str | None = None,
    per_source: int = 150,
    log: Callable[[str], None] = print,
) -> tuple[list[torch.Tensor], list[str]]:
    """Styles (n, 6) of each available source but the left-out site's, and their names."""
    styles, names = [], []
    for source in STYLE_SOURCES:
        if leave_out is not None and SOURCE_SITE.get(source.name) == leave_out:
            continue
        crops = _source_crops(Path(root), source, per_source, size, centre, colour)
        if not crops:
            continue
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
        styles.append(style_of(x))
        names.append(source.name)
        log(f"style source {source.name}: {len(crops)} leukocytes")
    return styles, names


def balanced(styles: Sequence[torch.Tensor]) -> torch.Tensor:
    """Styles of several sources, each repeated to the largest one's count, so that a random
    draw picks every source equally often."""
    largest = max((len(s) for s in styles), default=0)
    parts = [s.repeat(math.ceil(largest / len(s)), 1)[:largest] for s in styles if len(s)]
    return torch.cat(parts) if parts else torch.zeros((0, 6))
