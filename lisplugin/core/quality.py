"""Field quality control: is a field sharp and well exposed enough for its cells to count?

A blurred or badly exposed field gives unreliable leukocyte classes, so such a field is
measured, reported with its reasons and left out of the differential.

Focus is the variance of the 3x3 Laplacian of the grey image (0..255) measured at a common
physical scale: the field is first box-filtered down to :data:`FOCUS_SPACING_UM` per pixel
(the PBC scale the classifier works at). Measured at the native pixel grid instead, the
Laplacian of an oversampled field sees mostly sensor and JPEG noise (a real BCCD field scores
about 8 there, the same field slightly blurred under 1), and its value would change with the
magnification. The scale is the field's Pixel Spacing, else what its own red cells (or
leukocytes) measure (``analysis.measured_spacing_um``: the analysis detects before it checks),
else the BCCD-like magnification the project was built around (:data:`ASSUMED_SPACING_UM`).
Before the scale was measured, a BCCD field resampled to x2 failed focus 58 times in 59.

Calibration of the defaults in ``AnalysisSettings`` (``min_focus`` 20, ``exposure_range``
0.25..0.92, ``max_clipped_fraction`` 0.2), measured at the measured scale on the 364 BCCD fields
(640 x 480 JPEG), blur sigma in field pixels (0.085 um each):

* sharp fields: focus 26.7 min, 33.3 1st percentile, 81.5 median, 161 max - all pass;
  exposure 0.647..0.762; clipped fraction 0;
* blurred: sigma 3 median 24.1, max 45.1 (a visible softening; about a third fail); sigma 4
  median 14.7, max 27.5 (most fail); sigma 4 plus noise (sd 3) max 29.4; sigma 6 plus noise
  max 16.2 (all fail);
* darkened x0.3: exposure max 0.226 (all fail); x0.35: exposure median 0.249 (all fail);
* brightened x1.4: exposure min 0.899, clipped and washed out (363 of 364 fail);
* other sources: TXL-PBC train (1,008 fields of four microscopes) focus 26.7 min, 38.7 1st
  percentile; draaslan (100 fields of another lab) 69.3 min; the lower exposure bound leaves
  room for Raabin-WBC fields (mean grey down to 0.39) and the upper one for CellaVision fields
  (up to 0.87).

The variance of the Laplacian grows with the square of the contrast, so on its own it calls a
sharp field under a paler stain, a dimmer lamp or a flatter camera curve blurred: BCCD test
fields darkened x0.6 failed focus in 14 of 59 (``evaluate cells`` scored 0.763 instead of 0.983),
faded half-way to white in 37 % (60 fields). A field below ``min_focus`` therefore still passes
when its **sharpness** reaches ``min_sharpness`` (0.3): the Laplacian's variance over that of
the fine detail (the image less its Gaussian blur at :data:`DETAIL_SIGMA_PX`), a ratio of two
variances of the same image that gain, offset and stain density leave unchanged. Measured on
the daemon's path (measured scale), share of fields failing focus, Laplacian alone -> both
limits: BCCD (60 fields) sharp 0 -> 0, x0.6 0.18 -> 0, faded 0.37 -> 0, blur sigma 3 0.25 ->
0.13, sigma 4 0.87 -> 0.82; TXL-PBC (100) sharp 0 -> 0, faded 0.16 -> 0, sigma 4 0.32 -> 0.32;
draaslan (50) faded 0.02 -> 0, sigma 4 0.72 -> 0.72; Zheng et al. (60 crops) faded 0.08 -> 0.08,
sigma 4 0.97 -> 0.97. Sharpness alone was not enough: some sharp TXL-PBC fields (3 %) and Zheng
et al. crops (10 %), soft at 0.3 um in the lab's own optics but of high contrast, score under
0.3; sharp BCCD fields score 0.46-1.58, blurred at sigma 3 0.20-0.45, at sigma 4 0.15-0.28.

An eyepiece or a camera adapter often shows a circular field stop: black corners that would
count as clipped (every such BCCD field failed) and whose edge would count as detail. Dark
regions touching the image's edge that cover 2-70 % of it (:func:`outside_view`) are taken
for the outside of the view: exposure, clipping, focus and sharpness are measured inside it.

A mean grey level above the range fails a field only when it is washed out as well (below): a
lab's single-cell images on a saturated white background have a mean near white and every
detail intact. Zheng et al.'s test crops brightened by a gamma of 0.5 (mean grey 0.92-0.93,
glass at 255, nuclei still dark) failed 3 of 60 on the mean alone, none now. Glass just under
saturation (250) around a single cell still counts as washed out.

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
#: Scale (pixels at :data:`FOCUS_SPACING_UM`, so 1.2 um) below which image content counts as
#: fine detail for the sharpness: a cell's edges and chromatin, not its size or the lamp.
DETAIL_SIGMA_PX = 4.0
#: Grey level below which a region touching the image's edge may be outside the field of view.
OUTSIDE_GREY = 25.0
#: Such regions are the outside of the field of view when they cover this share of the image.
OUTSIDE_FRACTION = (0.02, 0.7)
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
    from PIL import Image

    image = Image.fromarray(grey.astype(np.float32), mode="F")
    k = round(factor)
    if abs(factor - k) < 1e-6:
        h, w = (grey.shape[0] // k) * k, (grey.shape[1] // k) * k
        # Pillow's block mean (seven times a numpy mean over two strided axes)
        return np.asarray(image.crop((0, 0, w, h)).reduce(k))
    size = (max(round(grey.shape[1] / factor), 1), max(round(grey.shape[0] / factor), 1))
    return np.asarray(image.resize(size, Image.BOX))


def _at_focus_scale(grey: np.ndarray, pixel_spacing_um: float | None) -> np.ndarray:
    spacing = pixel_spacing_um if pixel_spacing_um and pixel_spacing_um > 0 else None
    # A field coarser than the reference cannot be refined: it is measured as it is.
    return _box_resample(grey, FOCUS_SPACING_UM / (spacing or ASSUMED_SPACING_UM))


def focus_measure(grey: np.ndarray, pixel_spacing_um: float | None = None) -> float:
    """Variance of the Laplacian at :data:`FOCUS_SPACING_UM` per pixel (see module notes)."""
    return focus_measures(grey, pixel_spacing_um)[0]


def outside_view(image: np.ndarray) -> np.ndarray | None:
    """The part of an RGB image outside the microscope's field of view, if it shows one: the
    dark (grey < :data:`OUTSIDE_GREY`) regions that touch the image's edge, when they cover
    :data:`OUTSIDE_FRACTION` of it (the black corners around the circular field stop of an
    eyepiece or camera-adapter capture: 41 % of a 4:3 frame with the circle inscribed, 56 % of a
    16:9 one; more is an under-exposed field, not a stop). None when there are none; a look at
    the four edges decides that for most fields."""
    edges = (image[:1], image[-1:], image[:, :1], image[:, -1:])  # RGB or grey, kept 2-D
    if min(float(grey_levels(e).min()) for e in edges) >= OUTSIDE_GREY:
        return None
    labels, _ = ndimage.label(grey_levels(image) < OUTSIDE_GREY)
    touching = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, touching[touching > 0])
    low, high = OUTSIDE_FRACTION
    return outside if low <= outside.mean() <= high else None


def focus_measures(
    grey: np.ndarray, pixel_spacing_um: float | None = None, outside: np.ndarray | None = None
) -> tuple[float, float]:
    """The focus (variance of the Laplacian) and the sharpness (that variance over the
    variance of the fine detail, :data:`DETAIL_SIGMA_PX`), both at :data:`FOCUS_SPACING_UM`.

    The focus scales with the square of the contrast, so a sharp field under a pale stain or a
    dim lamp scores as a blurred one; the sharpness is a ratio of two variances of the same
    image and does not change with gain, offset or stain density (module notes). ``outside``
    (``outside_view``): measured inside the field of view only, the dark outside filled with
    the glass's grey so that the field stop's edge is not taken for detail.
    """
    inside: np.ndarray | None = None
    if outside is not None:
        grey = grey.astype(np.float32, copy=True)
        grey[outside] = np.percentile(grey[~outside], 90)
        covered = _at_focus_scale(outside.astype(np.float32), pixel_spacing_um) > 0
        inside = ~ndimage.binary_dilation(covered, iterations=2)
        if not inside.any():
            return 0.0, 0.0
    small = _at_focus_scale(grey, pixel_spacing_um)
    laplacian = ndimage.convolve(small, _LAPLACIAN, mode="reflect")
    fine = small - ndimage.gaussian_filter(small, DETAIL_SIGMA_PX)
    if inside is not None:
        laplacian, fine = laplacian[inside], fine[inside]
    focus, detail = float(laplacian.var()), float(fine.var())
    return focus, focus / detail if detail > 1e-6 else 0.0


def _tenth_percentile_above(values: np.ndarray, limit: float) -> bool:
    """``np.percentile(values, 10) > limit`` (linear rule) from a count, without sorting: the
    percentile lies between the sorted values at ``floor(0.1 (n - 1))`` and the next."""
    n = values.size
    position = 0.1 * (n - 1)
    index = int(position)
    at_most = values <= limit
    count = int(np.count_nonzero(at_most))
    if count <= index:  # the value at ``index`` is already above the limit
        return True
    if count > index + 1 or count == n:  # the value after it is not above it either
        return False
    lower, upper = float(values[at_most].max()), float(values[~at_most].min())
    return lower + (position - index) * (upper - lower) > limit


def assess(
    field: Field, settings: AnalysisSettings, spacing_um: float | None = None
) -> FieldQuality:
    """Measure a field and check it against the limits in ``settings``.

    ``spacing_um`` is the field's pixel size as measured from its cells (see
    ``analysis.measured_spacing_um``); without it, the Pixel Spacing or the assumed BCCD scale.
    """
    grey = grey_levels(field.image)
    outside = outside_view(field.image)
    focus, sharpness = focus_measures(grey, spacing_um or field.pixel_spacing_um, outside)
    if outside is not None:  # exposure and clipping of what the microscope shows
        grey = grey[~outside]
    exposure = float(grey.mean() / 255.0)
    rounded = np.rint(grey)
    bright = rounded >= 255
    dark = float(np.mean(rounded <= 0))
    rest = grey[~bright]
    washed_out = rest.size == 0 or _tenth_percentile_above(rest, WASHED_OUT_P10 * 255)
    clipped = dark + (float(np.mean(bright)) if washed_out else 0.0)
    low, high = settings.exposure_range
    reasons: list[str] = []
    if focus < settings.min_focus and sharpness < settings.min_sharpness:
        reasons.append(
            f"out of focus ({focus:.1f} < {settings.min_focus:g}, "
            f"sharpness {sharpness:.2f} < {settings.min_sharpness:g})"
        )
    if exposure < low:
        reasons.append(f"under-exposed (mean grey {exposure:.2f} < {low:g})")
    if exposure > high and washed_out:  # a cell on a saturated white background keeps detail
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
        sharpness=sharpness,
    )
