"""Field quality control: sharp, well-exposed fields pass; blurred, dark, bright ones do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pytest_benchmark.fixture import BenchmarkFixture
from scipy import ndimage

from lisplugin.config import AnalysisSettings
from lisplugin.core.quality import (
    ASSUMED_SPACING_UM,
    assess,
    focus_measure,
    grey_levels,
    outside_view,
)
from lisplugin.core.types import Field
from lisplugin.synthetic import synthetic_field

SETTINGS = AnalysisSettings()


def blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    out = ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def scaled(image: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(np.rint(image * factor), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def smear() -> np.ndarray:
    return synthetic_field(3)[0]


@pytest.mark.parametrize("seed", range(4))
def test_synthetic_fields_pass(seed: int) -> None:
    quality = assess(Field(synthetic_field(seed)[0], "syn"), SETTINGS)
    assert quality.passed, quality.reasons
    assert quality.reasons == ()
    assert 0.6 < quality.exposure < 0.8
    assert quality.clipped_fraction == 0.0


def test_blur_fails_focus(smear: np.ndarray) -> None:
    sharp = assess(Field(smear, "s"), SETTINGS)
    soft = assess(Field(blurred(smear, 5), "s"), SETTINGS)
    assert soft.focus < SETTINGS.min_focus < sharp.focus
    assert soft.sharpness is not None and sharp.sharpness is not None
    assert soft.sharpness < SETTINGS.min_sharpness < sharp.sharpness
    assert not soft.passed
    assert any(r.startswith("out of focus") for r in soft.reasons)


def faded(image: np.ndarray, amount: float) -> np.ndarray:
    """A paler stain: every pixel moved ``amount`` of the way to white."""
    return np.clip(np.rint(image * (1 - amount) + 255 * amount), 0, 255).astype(np.uint8)


def test_a_dim_or_pale_sharp_field_is_in_focus(smear: np.ndarray) -> None:
    """A dim lamp or a pale stain lowers the Laplacian of a sharp field as much as blur does;
    its sharpness (a ratio of two variances of the same image) is unchanged, so it passes. The
    same field blurred fails however it is lit."""
    sharp = assess(Field(smear, "s"), SETTINGS)
    assert sharp.sharpness is not None
    for image in (scaled(smear, 0.45), faded(smear, 0.6)):
        quality = assess(Field(image, "s"), SETTINGS)
        assert quality.focus < SETTINGS.min_focus, "the Laplacian alone would call it blurred"
        assert quality.sharpness == pytest.approx(sharp.sharpness, rel=0.05)
        assert quality.passed, quality.reasons
    for image in (scaled(blurred(smear, 5), 0.45), faded(blurred(smear, 5), 0.6)):
        quality = assess(Field(image, "s"), SETTINGS)
        assert [r.split(" (")[0] for r in quality.reasons] == ["out of focus"]


def in_a_circular_stop(image: np.ndarray, radius: float = 0.45) -> np.ndarray:
    """The image as an eyepiece or camera adapter shows it: black outside a centred circle of
    ``radius`` times its long side."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    out = image.copy()
    out[np.hypot(yy - h / 2, xx - w / 2) > radius * max(h, w)] = 0
    return out


def test_a_field_in_a_circular_stop_is_judged_on_what_it_shows(smear: np.ndarray) -> None:
    """The black corners around a circular field stop are not clipping, under-exposure or
    detail: the field passes as the same field without them, and blurred it still fails."""
    plain = assess(Field(smear, "s"), SETTINGS)
    stopped = in_a_circular_stop(smear)
    outside = outside_view(stopped)
    assert outside is not None and 0.1 < outside.mean() < 0.4
    assert outside_view(smear) is None
    assert np.array_equal(outside_view(grey_levels(stopped)), outside)  # a grey image too
    quality = assess(Field(stopped, "s"), SETTINGS)
    assert quality.passed, quality.reasons
    assert quality.clipped_fraction == 0.0
    assert quality.exposure == pytest.approx(plain.exposure, abs=0.03)
    assert quality.sharpness == pytest.approx(plain.sharpness, rel=0.15)
    soft = assess(Field(in_a_circular_stop(blurred(smear, 5)), "s"), SETTINGS)
    assert [r.split(" (")[0] for r in soft.reasons] == ["out of focus"]
    small_dark_corner = smear.copy()
    small_dark_corner[:10, :10] = 0  # under OUTSIDE_FRACTION: clipping as before
    assert outside_view(small_dark_corner) is None
    assert outside_view(scaled(smear, 0.2)) is None  # all dark: under-exposed, not a stop


def test_dark_field_fails_exposure(smear: np.ndarray) -> None:
    quality = assess(Field(scaled(smear, 0.3), "s"), SETTINGS)
    assert not quality.passed
    assert quality.exposure < SETTINGS.exposure_range[0]
    assert any(r.startswith("under-exposed") for r in quality.reasons)


def test_bright_field_fails_exposure_and_clipping(smear: np.ndarray) -> None:
    quality = assess(Field(scaled(smear, 1.5), "s"), SETTINGS)
    assert quality.exposure > SETTINGS.exposure_range[1]
    assert quality.clipped_fraction > SETTINGS.max_clipped_fraction
    kinds = {r.split(" ")[0] for r in quality.reasons}
    assert kinds == {"over-exposed", "clipped"}


def test_limits_come_from_settings(smear: np.ndarray) -> None:
    strict = AnalysisSettings(
        min_focus=1e6, min_sharpness=1e6, exposure_range=(0.9, 1.0), max_clipped_fraction=0.0
    )
    quality = assess(Field(smear, "s"), strict)
    assert not quality.passed
    assert len(quality.reasons) == 2  # focus and under-exposure; nothing is clipped


def test_focus_is_measured_at_one_physical_scale(smear: np.ndarray) -> None:
    """The same smear at a 4x coarser pixel spacing scores the same focus."""
    grey = grey_levels(smear)
    coarse = grey.reshape(120, 4, 160, 4).mean(axis=(1, 3))
    at_bccd_scale = focus_measure(grey, ASSUMED_SPACING_UM)
    assert focus_measure(coarse, 4 * ASSUMED_SPACING_UM) == pytest.approx(at_bccd_scale)
    assert focus_measure(grey, None) == pytest.approx(at_bccd_scale)
    # a field coarser than the reference scale is measured as it is
    assert focus_measure(coarse, 1.0) == pytest.approx(at_bccd_scale)


def test_grey_accepts_grey_images() -> None:
    grey = np.full((8, 8), 100, dtype=np.uint8)
    assert grey_levels(grey).mean() == 100.0
    rgb = np.stack([grey] * 3, axis=-1)
    assert grey_levels(rgb).mean() == pytest.approx(100.0)


@pytest.mark.data
def test_calibration_on_real_fields(shared_data: Path) -> None:
    """Defaults pass real BCCD fields and fail the same fields degraded (module notes)."""
    files = sorted((shared_data / "bccd" / "JPEGImages").glob("*.jpg"))[::30]
    assert len(files) >= 10
    for path in files:
        image = np.asarray(Image.open(path).convert("RGB"))
        assert assess(Field(image, path.name), SETTINGS).passed, path.name
        assert not assess(Field(blurred(image, 5), path.name), SETTINGS).passed
        assert not assess(Field(scaled(blurred(image, 5), 0.6), path.name), SETTINGS).passed
        assert assess(Field(scaled(image, 0.6), path.name), SETTINGS).passed, path.name
        assert assess(Field(faded(image, 0.5), path.name), SETTINGS).passed, path.name
        assert not assess(Field(scaled(image, 0.3), path.name), SETTINGS).passed
        assert not assess(Field(scaled(image, 1.5), path.name), SETTINGS).passed


def test_assess_speed(benchmark: BenchmarkFixture, smear: np.ndarray) -> None:
    """QC must stay a small part of a field's time budget (run with --benchmark-enable)."""
    quality = benchmark(assess, Field(smear, "s"), SETTINGS)
    assert quality.passed


def test_a_cell_on_a_white_background_is_not_over_exposed(smear: np.ndarray) -> None:
    """A single cell on saturated white (a lab's crops) has a mean grey above the range and
    every detail: it passes. Washed out as well, it fails."""
    white = np.full_like(smear, 255)
    h, w = smear.shape[:2]
    part = (slice(h // 3, h // 3 + 80), slice(w // 3, w // 3 + 80))
    white[part] = smear[part]
    quality = assess(Field(white, "s"), SETTINGS)
    assert quality.exposure > SETTINGS.exposure_range[1]
    assert quality.passed, quality.reasons
    washed = white.copy()
    washed[part] = np.maximum(washed[part], 200)
    reasons = assess(Field(washed, "s"), SETTINGS).reasons
    assert any(r.startswith("over-exposed") for r in reasons), reasons


def test_white_background_alone_is_not_clipping(smear: np.ndarray) -> None:
    """A lab that exposes so that the glass saturates loses nothing: the cells keep their dark
    detail. Half the field at 255 with the cells untouched passes; the whole field brightened
    until the cells wash out still fails."""
    grey = grey_levels(smear)
    glass = grey > np.percentile(grey, 50)
    saturated = smear.copy()
    saturated[glass] = 255
    quality = assess(Field(saturated, "s"), SETTINGS)
    assert float(np.mean(np.rint(grey_levels(saturated)) >= 255)) > 0.4
    assert quality.clipped_fraction == 0.0
    assert not any(r.startswith("clipped") for r in quality.reasons)
    washed = assess(Field(scaled(saturated, 1.6), "s"), SETTINGS)
    assert washed.clipped_fraction > SETTINGS.max_clipped_fraction


def test_tenth_percentile_check_agrees_with_numpy() -> None:
    """The washed-out check counts instead of sorting; it must decide as np.percentile does."""
    from lisplugin.core.quality import _tenth_percentile_above

    rng = np.random.default_rng(3)
    for n in (1, 2, 9, 10, 11, 1000, 4097):
        values = np.round(rng.uniform(0, 255, n), 1).astype(np.float32)
        p10 = float(np.percentile(values, 10))
        for limit in (0.0, 100.0, 165.75, 254.9, p10 - 0.01, p10 + 0.01, *values[:5].tolist()):
            if limit == p10:
                continue  # the boundary itself is a matter of float rounding
            assert _tenth_percentile_above(values, limit) == (p10 > limit), (n, limit)
