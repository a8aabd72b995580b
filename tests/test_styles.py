"""Real labs' stain styles for training: colour space round trip, re-rendering, the pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lisplugin.training.styles import (
    STYLE_SOURCES,
    balanced,
    from_lab,
    restyle,
    style_of,
    style_pool,
    to_lab,
)


def _images(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.rand((n, 3, 1, 1), generator=g) * 0.5 + 0.3
    return (base + 0.1 * torch.rand((n, 3, 24, 24), generator=g)).clamp(0, 1)


def test_lab_round_trip_is_exact() -> None:
    x = _images()
    assert torch.allclose(from_lab(to_lab(x)), x, atol=1e-4)


def test_restyle_moves_each_chosen_image_to_the_drawn_style() -> None:
    x = _images(8)
    target = style_of(x[:1])  # every chosen image takes image 0's style (jitter off)
    g = torch.Generator().manual_seed(0)
    out = restyle(x, target, g, p=1.0, jitter=0.0)
    before = (style_of(x) - target).abs().sum(dim=1)
    after = (style_of(out) - target).abs().sum(dim=1)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (after[1:] < 0.6 * before[1:]).all()  # 50-100 % of the way there
    same = restyle(x, target, torch.Generator().manual_seed(0), p=1.0, jitter=0.0)
    assert torch.equal(out, same)  # reproducible from the generator
    assert torch.equal(restyle(x, target, g, p=0.0), x)


def test_a_specimen_run_is_restyled_whole_in_one_style() -> None:
    """With groups, each run of the batch (one specimen) is re-rendered whole or not at all, and
    all its images move the same share of the way to the same drawn style."""
    x = _images(12)
    styles = torch.cat([style_of(x[:1]), style_of(x[1:2])])
    runs = [restyle(x, styles, torch.Generator().manual_seed(s), p=0.5, groups=3) for s in range(8)]
    seen = set()
    for out in runs:
        moved = (out - x).abs().flatten(1).amax(dim=1) > 1e-6
        for run in moved.view(3, 4):
            assert run.all() or not run.any()
            seen.add(bool(run.any()))
        # the images of a moved run share one goal style: their own statistics agree after
        after = style_of(out).view(3, 4, 6)
        for r in range(3):
            if moved.view(3, 4)[r].all():
                spread = after[r, :, :3].std(dim=0)
                assert (spread < style_of(x).view(3, 4, 6)[r, :, :3].std(dim=0) + 1e-3).all()
    assert seen == {True, False}


def test_balanced_draws_every_source_equally() -> None:
    a, b = torch.zeros((2, 6)), torch.ones((7, 6))
    pool = balanced([a, b])
    assert len(pool) == 14 and int(pool[:, 0].sum()) == 7


def test_pool_of_unlabelled_labs_leaves_out_the_held_out_lab(shared_data: Path) -> None:
    styles, names = style_pool(shared_data, 32, 0.7, "white-point", "bccd", per_source=4)
    assert "txl-bccd" not in names and {"raabin", "draaslan"} <= set(names)
    assert all(s.shape == (4, 6) for s in styles)
    # labs differ in stain: Raabin's leukocyte crops are not coloured like draaslan's
    by_name = dict(zip(names, styles, strict=True))
    gap = (by_name["raabin"].mean(0) - by_name["draaslan"].mean(0)).abs().max()
    assert float(gap) > 0.005
    assert {s.name for s in STYLE_SOURCES} >= set(names)


@pytest.mark.parametrize("p", [0.5])
def test_training_with_styles_runs(p: float) -> None:
    from lisplugin.training.classifier import LeukocyteNet, train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    y = np.arange(16) % 8
    _model, history = train(
        LeukocyteNet(8), x, y, x[:4], y[:4], [0.5] * 3, [0.2] * 3, 1, batch_size=8,
        styles=style_of(torch.rand((3, 3, 8, 8))), style_p=p, log=lambda _: None,
    )  # fmt: skip
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
