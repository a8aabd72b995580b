"""Field quality control: is a field sharp and well exposed enough for its cells to count?

A blurred or badly exposed field gives unreliable leukocyte classes, so such a field is
measured, reported with its reasons and left out of the differential.

Focus is the variance of the 3x3 Laplacian of the grey image (0..255) measured at a common
physical scale: the field is first block-averaged to about :data:`FOCUS_SPACING_UM` per pixel
(the PBC scale the classifier works at). Measured at the native pixel grid instead, the
Laplacian of an oversampled field sees mostly sensor and JPEG noise (a real BCCD field scores
about 8 there, the same field slightly blurred under 1), and its value would change with the
magnification. A field without a pixel spacing is taken to be at the BCCD-like magnification
the project is built around (a red cell about 100 px across, :data:`ASSUMED_SPACING_UM`).

Calibration of the defaults in ``AnalysisSettings`` (``min_focus`` 20, ``exposure_range``
0.25..0.92, ``max_clipped_fraction`` 0.2), measured on the 364 BCCD fields (640 x 480 JPEG):

* sharp fields: focus 24.2 min, 28.4 1st percentile, 72.8 median, 144 max; exposure
  0.647..0.762; clipped fraction 0 (grey 0 or 255) - all pass;
* the same fields blurred (Gaussian, sigma in field pixels): sigma 3 focus median 18.2,
  max 28.2 (239 of 364 fail); sigma 4 max 15.9 (all fail); sigma 4 plus noise (sd 3) max 21.0
  (361 fail); sigma 6 plus noise max 11.3 (all fail);
* darkened x0.3: exposure max 0.226 (all fail); x0.35: exposure median 0.249, and the lower
  contrast brings focus under 20 too (all fail);
* brightened x1.4: exposure min 0.899, clipped fraction 0.12..0.73 (363 of 364 fail);
* other sources at the assumed scale (TXL-PBC train, 1,008 fields of four microscopes): 1 field
  under 20 (17.0, visibly blurred); the lower exposure bound leaves room for Raabin-WBC fields
  (mean grey down to 0.39) and the upper one for CellaVision fields (up to 0.87).

Clipping is counted on the grey image, not per channel: CellaVision fields have the red channel
saturated on up to a third of the background while nothing is lost in grey.

A white (saturated) background alone loses nothing: many labs expose so that the glass clips.
Bright clipping therefore fails a field only when the unclipped rest has lost its dark detail
too (the 10th percentile of its grey above :data:`WASHED_OUT_P10`), as in an over-exposed
field. Measured: the 300 Zheng et al. crops (another lab, 0-77 % of pixels at 255) keep that
percentile at 0.08-0.62; BCCD fields brightened x1.4 have it at 0.71-0.87 (all still fail),
unchanged BCCD fields 0.56-0.68 with nothing clipped. Dark clipping (grey 0) always counts.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lisplugin.config import AnalysisSettings
from lisplugin.core.types import Field, FieldQuality

#: Physical pixel size the focus is measured at (0.3 um: coarse enough to average sensor noise,
#: fine enough for cell edges); the focus limit in the settings is calibrated at this size.
FOCUS_SPACING_UM = 0.3
#: Pixel size assumed for a field that does not state one: a red cell ~100 px across (BCCD).
ASSUMED_SPACING_UM = 0.075
#: ITU-R BT.601 luma weights, as in PIL's "L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Bright clipping fails a field when the 10th percentile of its unclipped grey exceeds this.
WASHED_OUT_P10 = 0.65
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)


def grey_levels(image: np.ndarray) -> np.ndarray:
    """Grey image (float32, 0..255) of an RGB (or already grey) uint8 image."""
    if image.ndim == 2:
        return image.astype(np.float32)
    return image[..., :3].astype(np.float32) @ _LUMA


def _box_resample(grey: np.ndarray, factor: float) -> np.ndarray:
    """Shrink by ``factor`` (>= 1) averaging the pixels each output pixel covers (a box filter):
    an integer factor is an exact block mean, and any other factor is handled the same way, so
    the focus measure changes smoothly with the measured scale."""
    if factor <= 1.0:
        return grey
    k = round(factor)
    if abs(factor - k) < 1e-6:
        h, w = (grey.shape[0] // k) * k, (grey.shape[1] // k) * k
        return grey[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))
    from PIL import Image

    size = (max(round(grey.shape[1] / factor), 1), max(round(grey.shape[0] / factor), 1))
    return np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.BOX))


def focus_measure(grey: np.ndarray, pixel_spacing_um: float | None = None) -> float:
    """Variance of the Laplacian at :data:`FOCUS_SPACING_UM` per pixel (see module notes)."""
    spacing = pixel_spacing_um if pixel_spacing_um and pixel_spacing_um > 0 else None
    # A field coarser than the reference cannot be refined: it is measured as it is.
    small = _box_resample(grey, FOCUS_SPACING_UM / (spacing or ASSUMED_SPACING_UM))
    return float(ndimage.convolve(small, _LAPLACIAN, mode="reflect").var())


def assess(
    field: Field, settings: AnalysisSettings, spacing_um: float | None = None
) -> FieldQuality:
    """Measure a field and check it against the limits in ``settings``.

    ``spacing_um`` is the field's pixel size as measured from its cells (see
    ``analysis.measured_spacing_um``); without it, the Pixel Spacing or the assumed BCCD scale.
    """
    grey = grey_levels(field.image)
    focus = focus_measure(grey, spacing_um or field.pixel_spacing_um)
    exposure = float(grey.mean() / 255.0)
    rounded = np.rint(grey)
    bright = rounded >= 255
    dark = float(np.mean(rounded <= 0))
    rest = grey[~bright]
    washed_out = rest.size == 0 or float(np.percentile(rest, 10)) > WASHED_OUT_P10 * 255
    clipped = dark + (float(np.mean(bright)) if washed_out else 0.0)
    low, high = settings.exposure_range
    reasons: list[str] = []
    if focus < settings.min_focus:
        reasons.append(f"out of focus ({focus:.1f} < {settings.min_focus:g})")
    if exposure < low:
        reasons.append(f"under-exposed (mean grey {exposure:.2f} < {low:g})")
    if exposure > high:
        reasons.append(f"over-exposed (mean grey {exposure:.2f} > {high:g})")
    if clipped > settings.max_clipped_fraction:
        reasons.append(
            f"clipped ({clipped:.0%} of pixels at 0 or 255 > {settings.max_clipped_fraction:.0%})"
        )
    return FieldQuality(
        focus=focus,
        exposure=exposure,
        clipped_fraction=clipped,
        passed=not reasons,
        reasons=tuple(reasons),
    )
