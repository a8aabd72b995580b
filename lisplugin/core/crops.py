"""Scale-normalised leukocyte crops: field pixels -> the PBC (CellaVision) scale.

The leukocyte classifier is trained on PBC crops: 160 x 160 px windows centred on one
leukocyte, where a red cell (about 7.5 um) is about 37 px across, i.e. about 0.2 um per pixel.
Fields from other microscopes have other magnifications (in BCCD a red cell is about 100 px
across), so a crop is taken from a window of ``160 / scale`` field pixels around the leukocyte
and resampled to 160 px, where ``scale`` (field px -> PBC px) comes from :func:`pbc_scale`.
Everything here is plain numpy so it runs the same in training, evaluation and the daemon.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image

from lisplugin.core.quality import outside_view

#: Side of a PBC crop in pixels: the window the classifier sees.
PBC_CROP_PX = 160
#: Diameter of a red cell in PBC pixels, measured as the daemon measures fields (the median
#: longer box side of the whole red cells the detector finds, ``median_rbc_diameter``): 37 px
#: in PBC crops (neutrophil, lymphocyte and eosinophil crops: 36.6, 38.6 and 36.9;
#: ``tests/test_classifier.py`` keeps it measured).
PBC_RBC_PX = 37.0
#: Typical diameter of a normal red cell in micrometres.
RBC_DIAMETER_UM = 7.5
#: Physical size of one PBC pixel.
PBC_UM_PER_PX = RBC_DIAMETER_UM / PBC_RBC_PX
#: Assumed leukocyte box width in PBC pixels when nothing else tells the scale.
PBC_WBC_BOX_PX = 60.0
#: Median detector box side of each class in PBC pixels (PBC val crops through the shipped
#: detector, scaled by their red cells; ``tests/test_classifier.py`` keeps it measured). Cells
#: keep their size across labs (Zheng et al.'s neutrophil/lymphocyte box ratio is 1.34, PBC's
#: 1.41), so a labelled training crop without red cells can be cut at its class's size.
CLASS_BOX_PX: dict[str, float] = {
    "neutrophil": 65.0,
    "lymphocyte": 46.3,
    "monocyte": 72.9,
    "eosinophil": 63.5,
    "basophil": 58.4,
    "ig": 64.7,
    "erythroblast": 44.9,
    "platelet": 28.8,
}


def usable_spacing(pixel_spacing_um: float | None) -> float | None:
    """The pixel spacing, unless it is missing or absurd for a blood smear (a red cell under 4
    or over 1000 pixels across): a wrong header must not blind the analysis."""
    if pixel_spacing_um is None or not 4 <= RBC_DIAMETER_UM / max(pixel_spacing_um, 1e-9) <= 1000:
        return None
    return float(pixel_spacing_um)


def pbc_scale(
    pixel_spacing_um: float | None,
    median_rbc_diameter_px: float | None,
    wbc_box: tuple[float, float, float, float],
    box_px: float = PBC_WBC_BOX_PX,
    shared: float | None = None,
) -> float:
    """Factor that maps field pixels to PBC pixels, from the best evidence available.

    The physical pixel spacing (DICOM Pixel Spacing) is exact when present; otherwise the
    median red-cell diameter in the field calibrates the magnification (red cells vary far less
    than leukocytes); otherwise ``shared``, the scale of the other images from the same
    microscope (:func:`shared_scale`); as a last resort the leukocyte box itself is assumed to
    be ``box_px`` PBC px wide (60 px; a labelled training crop may take its class's
    ``CLASS_BOX_PX``).
    """
    spacing = usable_spacing(pixel_spacing_um)
    if spacing is not None:
        return spacing / PBC_UM_PER_PX
    if median_rbc_diameter_px is not None and median_rbc_diameter_px > 0:
        return PBC_RBC_PX / float(median_rbc_diameter_px)
    if shared is not None and shared > 0:
        return float(shared)
    return box_px / box_side(wbc_box)


def box_side(box: tuple[float, float, float, float]) -> float:
    """Mean side of a box (at least 1 px): a leukocyte's size, as the scale rules read it."""
    x0, y0, x1, y1 = box
    return max((x1 - x0 + y1 - y0) / 2.0, 1.0)


#: Fewer leukocytes than this give no shared scale: their median says little of the mix.
MIN_WBC_FOR_SHARED_SCALE = 5


def shared_scale(leukocyte_sides: Sequence[float], box_px: float = PBC_WBC_BOX_PX) -> float | None:
    """One field -> PBC factor for images of one microscope that have no scale of their own.

    Crops of single leukocytes show no red cells and often carry no Pixel Spacing. Taking each
    leukocyte's box as 60 PBC px makes a small lymphocyte as large as a monocyte; taking the
    *median* leukocyte of the images (a specimen's fields, a lab's class folders) as 60 px keeps
    the size differences the classifier learnt. None with fewer than
    ``MIN_WBC_FOR_SHARED_SCALE`` leukocytes.
    """
    if len(leukocyte_sides) < MIN_WBC_FOR_SHARED_SCALE:
        return None
    return box_px / max(float(np.median(np.asarray(leukocyte_sides, dtype=float))), 1.0)


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an H x W x C uint8 image to size x size with antialiased linear filtering.

    Pillow's bilinear filter: a triangle widened by the shrink factor, so shrinking averages
    all covered pixels instead of aliasing, computed in C on the 8-bit image in one call (three
    times faster than on float planes, which it matches to within 1 grey level).
    """
    if image.shape[0] == size and image.shape[1] == size:
        return image
    rgb = Image.fromarray(np.ascontiguousarray(image[..., :3], dtype=np.uint8), "RGB")
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))


def centre_window(image: np.ndarray, fraction: float) -> np.ndarray:
    """The central square covering ``fraction`` of the shorter side (a view, not a copy).

    The classifier may look only at the middle of the PBC window, where the leukocyte is, to
    spend its input pixels on nuclear and granule detail rather than on background.
    """
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    h, w = image.shape[:2]
    side = max(round(fraction * min(h, w)), 1)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the image border: the slide background used to pad crops at edges."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0).reshape(
        -1, image.shape[2]
    )
    return np.median(border, axis=0).astype(image.dtype)


def leukocyte_crop(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    scale: float,
    out_size: int = PBC_CROP_PX,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Cut the PBC-scale window around a leukocyte and resample it to ``out_size`` pixels.

    ``box`` is (x0, y0, x1, y1) in field pixels, ``scale`` the field -> PBC factor from
    :func:`pbc_scale`. The window is ``160 / scale`` field pixels wide, centred on the box;
    parts outside the field are filled with the background colour so the cell stays centred
    (``background``: the field's :func:`background_colour`, when the caller has it already).
    """
    if scale <= 0:
        raise ValueError("scale must be positive")
    h, w = image.shape[:2]
    window = max(round(PBC_CROP_PX / scale), 1)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    left, top = round(cx - window / 2.0), round(cy - window / 2.0)
    canvas = np.empty((window, window, image.shape[2]), dtype=image.dtype)
    canvas[:] = background_colour(image) if background is None else background
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + window, w), min(top + window, h)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
    return resize_rgb(canvas, out_size)


#: Colour the glass of every crop is mapped to by :func:`white_balanced` (a neutral light grey
#: that leaves head-room above it, so that the paler parts of cells are not clipped).
REFERENCE_WHITE = 235.0
#: Share of the brightest pixels taken as the glass (the background between cells).
WHITE_QUANTILE = 0.9


def white_point(image: np.ndarray) -> np.ndarray:
    """Colour of the glass: the median colour of the brightest 10 % of the pixels (RGB float).

    Labs differ most in lamp colour, white balance and exposure; all of them show up in the
    colour of the empty glass, which is the brightest part of a smear (or, in a dense area, the
    pale centres of red cells, which are near-white too). Clipped pixels are left out while
    enough others remain.
    """
    rgb = image[..., :3].reshape(-1, 3)
    # Channel planes, not reductions over the last axis of three (several times slower).
    levels = rgb if rgb.dtype == np.uint8 else rgb.astype(np.uint16)
    r, g, b = levels[:, 0], levels[:, 1], levels[:, 2]
    # Brightness as the integer sum of the channels (three times the grey level): its quantile
    # comes from a 766-bin histogram, exactly as np.quantile's linear rule would give it.
    total = r.astype(np.uint16) + g + b
    # Saturated glass has lost the lamp's colour; the brightest pixels that are not clipped
    # (the glass's edges, the red cells' pale centres) still carry it.
    kept = (r < 254) & (g < 254) & (b < 254)
    count = int(np.count_nonzero(kept))
    if count < 0.05 * len(rgb):
        kept, count = np.ones(len(rgb), dtype=bool), len(rgb)
    cumulative = np.cumsum(np.bincount(total[kept], minlength=766))
    position = WHITE_QUANTILE * (count - 1)
    below = int(position)
    low = int(np.searchsorted(cumulative, below, side="right"))
    high = int(np.searchsorted(cumulative, min(below + 1, count - 1), side="right"))
    threshold = low + (position - below) * (high - low)
    bright = rgb[kept & (total >= threshold)]
    return np.maximum(np.median(bright, axis=0).astype(np.float32), 1.0)


def in_view(image: np.ndarray) -> np.ndarray:
    """The image with the dark outside of the microscope's field of view (the corners around
    an eyepiece's or camera adapter's circular stop, ``quality.outside_view``) painted in the
    glass's colour; the image itself when it shows none.

    A crop near the stop would otherwise take black for chromatin: the stain reference of the
    specimen, the crop's white point and the red cells' density would all be measured on it.
    """
    outside = outside_view(image) if image.ndim == 3 else None
    if outside is None:
        return image
    filled = image.copy()
    filled[outside] = np.rint(white_point(image[~outside])).astype(image.dtype)
    return filled


def white_balanced(image: np.ndarray, white: np.ndarray | None = None) -> np.ndarray:
    """The image with per-channel gains that map its glass to :data:`REFERENCE_WHITE`.

    A von Kries correction: it removes the lamp colour, white balance and exposure of the
    capture, leaving the stain's own colours for the classifier (and for the stain augmentation
    in training) to deal with. Used by the classifier adapter when its card asks for it, and by
    training on the same crops, so both see the same colours.
    """
    white = white_point(image) if white is None else np.asarray(white, dtype=np.float32)
    gain = REFERENCE_WHITE / white
    if image.dtype != np.uint8:
        return np.clip(np.rint(image[..., :3].astype(np.float32) * gain), 0, 255).astype(np.uint8)
    # Every 8-bit level of each channel mapped once: a lookup per pixel, not float arithmetic.
    table = np.clip(np.rint(_LEVELS[:, None] * gain), 0, 255).astype(np.uint8)  # 256 x 3
    out = np.empty((*image.shape[:2], 3), dtype=np.uint8)
    for channel in range(3):
        np.take(table[:, channel], image[..., channel], out=out[..., channel])
    return out


_LEVELS = np.arange(256, dtype=np.float32)


#: Optical density (per channel, natural log, glass = 0) of the red cells around PBC's
#: leukocytes after white balancing: the median over PBC crops (``rbc_density``), kept
#: measured by ``tests/test_classifier.py``.
REFERENCE_RBC_DENSITY = (0.201, 0.293, 0.186)
#: Where a crop's red cells are looked for: outside this fraction of the crop's side around its
#: centre (the leukocyte), stained but neither glass nor nucleus (total density in range).
RBC_RING = 0.3
RBC_DENSITY_RANGE = (0.25, 1.5)
#: Fewer red-cell pixels than this (a tight crop, a thick area): no correction.
MIN_RBC_PIXELS = 300
#: A channel's density is scaled by at most this factor either way.
MAX_DENSITY_GAIN = 2.5


def optical_density(image: np.ndarray) -> np.ndarray:
    """Per-channel optical density of a white-balanced image (glass at 0, float32)."""
    return -np.log((image[..., :3].astype(np.float32) + 1.0) / (REFERENCE_WHITE + 1.0))


def _channel_sum(od: np.ndarray) -> np.ndarray:
    """Sum over the last axis of three, plane by plane (a reduction over it is slower)."""
    return od[..., 0] + od[..., 1] + od[..., 2]


@functools.lru_cache(maxsize=8)
def _outside_middle(h: int, w: int) -> np.ndarray:
    """Pixels farther than ``RBC_RING`` of the side from the crop's centre (read-only)."""
    yy, xx = np.ogrid[0:h, 0:w]
    ring = np.hypot(yy - h / 2, xx - w / 2) > RBC_RING * min(h, w)
    ring.flags.writeable = False
    return ring


def rbc_density(balanced: np.ndarray) -> np.ndarray | None:
    """Median optical density of the red cells around the crop's leukocyte (None: too few)."""
    return _rbc_density(optical_density(balanced))


def _rbc_density(od: np.ndarray) -> np.ndarray | None:
    h, w = od.shape[:2]
    ring = _outside_middle(h, w)
    total = _channel_sum(od)
    keep = ring & (total > RBC_DENSITY_RANGE[0]) & (total < RBC_DENSITY_RANGE[1])
    if int(keep.sum()) < MIN_RBC_PIXELS:
        return None
    return np.median(od[keep], axis=0)


def rbc_referenced(balanced: np.ndarray, window: float = 1.0) -> np.ndarray:
    """The crop with each channel's optical density scaled so that its red cells take the
    density of PBC's: the red cells are the one stained object every field shows, so their
    colour measures a lab's stain and camera (unchanged when too few red cells are seen)."""
    whole = optical_density(balanced)
    return _rbc_scaled(balanced, _rbc_density(whole), window, whole)


def _rbc_scaled(
    balanced: np.ndarray, found: np.ndarray | None, window: float, whole: np.ndarray
) -> np.ndarray:
    """``balanced`` (its optical density ``whole``) with per-channel gains that give its red
    cells (``found``) PBC's density, in its central ``window``."""
    if found is None:
        return centre_window(balanced, window)
    gain = np.clip(np.asarray(REFERENCE_RBC_DENSITY, np.float32) / np.maximum(found, 1e-3),
                   1 / MAX_DENSITY_GAIN, MAX_DENSITY_GAIN)  # fmt: skip
    od = centre_window(whole, window)  # measured on the whole crop, applied where seen
    out = (REFERENCE_WHITE + 1.0) * np.exp(-od * gain) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


#: Optical density of the darkest part of PBC's leukocytes (the 15 % densest pixels of the
#: crop's middle: nuclear chromatin), median over PBC crops.
REFERENCE_NUCLEUS_DENSITY = (1.12, 1.80, 0.44)
NUCLEUS_QUANTILE = 0.85
#: Two stain directions closer than this (cosine) cannot be told apart.
MAX_STAIN_COSINE = 0.995


def stain_densities(balanced: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The red cells' and the nucleus's median optical density (None: either not seen)."""
    rbc, nucleus = _stain_densities(optical_density(balanced))
    return None if rbc is None or nucleus is None else (rbc, nucleus)


def _stain_densities(od: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Red cells' and nucleus's densities of a crop's optical density (each None: not seen;
    the nucleus is not looked for without red cells)."""
    rbc = _rbc_density(od)
    if rbc is None:
        return None, None
    middle = od[~_outside_middle(*od.shape[:2])]
    total = _channel_sum(middle)
    selected = total >= np.quantile(total, NUCLEUS_QUANTILE)
    dense = middle[selected]
    if len(dense) < 50 or float(total[selected].mean()) < RBC_DENSITY_RANGE[0]:
        return rbc, None
    return rbc, np.median(dense, axis=0)


def stain_normalised(
    balanced: np.ndarray, window: float = 1.0, nucleus: np.ndarray | None = None
) -> np.ndarray:
    """The crop re-expressed in PBC's two stains (object-guided Macenko): each pixel's density
    split along the red cells' and the nucleus's stain directions of this crop, each stain's
    amount scaled so that the red cells and the chromatin take PBC's density, and put back
    along PBC's directions; what the two stains do not explain is kept as it is.

    ``nucleus``: the chromatin density of the crop's specimen (:func:`shared_nucleus`), used
    in place of the crop's own where the crop shows red cells. A lymphocyte's chromatin is
    denser than a monocyte's: one reference per specimen keeps that difference, one per crop
    erased it.
    """
    # The crop's density is measured once; without a nucleus, or with two stains that cannot
    # be told apart, the red cells alone set the gains (``rbc_referenced``).
    whole = optical_density(balanced)
    rbc, own = _stain_densities(whole)
    nucleus = own if rbc is None or nucleus is None else np.asarray(nucleus, np.float32)
    if rbc is None or nucleus is None:
        return _rbc_scaled(balanced, rbc, window, whole)
    here = np.stack([rbc, nucleus], axis=1)  # 3 x 2: red-cell stain, nuclear stain
    ref = np.stack([np.asarray(REFERENCE_RBC_DENSITY), np.asarray(REFERENCE_NUCLEUS_DENSITY)], 1)
    units = here / np.linalg.norm(here, axis=0)
    if float(units[:, 0] @ units[:, 1]) > MAX_STAIN_COSINE:
        return _rbc_scaled(balanced, rbc, window, whole)
    unmix = np.linalg.pinv(units)  # 2 x 3
    ref_units = ref / np.linalg.norm(ref, axis=0)
    gain = np.clip(np.linalg.norm(ref, axis=0) / np.maximum(np.diag(unmix @ here), 1e-3),
                   1 / MAX_DENSITY_GAIN, MAX_DENSITY_GAIN)  # fmt: skip
    # Per pixel: amounts = od @ unmix.T, rest = od - amounts @ units.T, and the result
    # (amounts * gain) @ ref_units.T + rest; all linear in od, so one 3 x 3 matrix does it.
    mapping = np.eye(3) + unmix.T @ (gain[:, None] * ref_units.T - units.T)
    od = centre_window(whole, window)  # measured on the whole crop, applied where seen
    out_od = (
        od[..., 0:1] * mapping[0].astype(np.float32)
        + od[..., 1:2] * mapping[1].astype(np.float32)
        + od[..., 2:3] * mapping[2].astype(np.float32)
    )
    out = (REFERENCE_WHITE + 1.0) * np.exp(-out_od) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


#: Colour normalisations a classifier card may name (``colour_normalisation``).
COLOUR_NORMALISATIONS = (None, "white-point", "white-point+rbc", "white-point+stains")


def colour_normalised(
    crop: np.ndarray, colour: str | None, window: float = 1.0, nucleus: np.ndarray | None = None
) -> np.ndarray:
    """The central ``window`` of a crop in the colours the classifier sees (its card's
    ``colour_normalisation``); the statistics are always measured on the whole crop
    (``nucleus``: the specimen's chromatin density, for ``white-point+stains``)."""
    if colour not in COLOUR_NORMALISATIONS:
        raise ValueError(f"unknown colour normalisation {colour!r}")
    if colour is None:
        return centre_window(crop[..., :3], window)
    balanced = white_balanced(crop)
    if colour == "white-point+rbc":
        return rbc_referenced(balanced, window)
    if colour == "white-point+stains":
        return stain_normalised(balanced, window, nucleus)
    return centre_window(balanced, window)


def classifier_input(
    crop: np.ndarray,
    size: int,
    centre: float,
    colour: str | None,
    nucleus: np.ndarray | None = None,
) -> np.ndarray:
    """A PBC-scale crop as the classifier sees it: colour-normalised as its card says, the
    central ``centre`` window, resized to ``size``. The adapter and training both call this."""
    return resize_rgb(colour_normalised(crop, colour, centre, nucleus), size)


def crop_nucleus(crop: np.ndarray) -> np.ndarray | None:
    """A crop's chromatin density as :func:`stain_normalised` measures it (white-balanced);
    None where it shows no red cells or no nucleus."""
    return _stain_densities(optical_density(white_balanced(crop)))[1]


#: Fewer leukocytes than this give no shared chromatin reference: each crop keeps its own.
MIN_WBC_FOR_SHARED_NUCLEUS = 5


def shared_nucleus(densities: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The median chromatin density of a specimen's (or a lab folder's) leukocytes, the stain
    reference of all its crops; None with fewer than ``MIN_WBC_FOR_SHARED_NUCLEUS``."""
    seen = [d for d in densities if d is not None]
    if len(seen) < MIN_WBC_FOR_SHARED_NUCLEUS:
        return None
    return np.median(np.stack(seen), axis=0).astype(np.float32)
