"""Batch-wise photometric augmentations for the interference factors labs meet.

Microscopes at different sites differ in stain, lamp, focus, camera noise and compression, and
slides carry debris. Training with these variations makes the models robust to them. All
functions work on float images in [0, 1] shaped (B, 3, H, W), draw their randomness from an
optional ``torch.Generator`` (reproducible runs) and return a new tensor of the same shape.
``strength`` scales every effect (0 = identity, 1 = the default ranges).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rand(n: int, generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand((n, *shape), generator=generator)


def _chosen(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of the images that get an augmentation applied with probability ``p``."""
    return torch.nonzero(_rand(n, generator) < p).flatten()


def colour_cast(
    images: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0
) -> torch.Tensor:
    """Stain and white-balance differences: per-channel gain and offset, mild channel mixing."""
    b = images.shape[0]
    gain = 1.0 + strength * 0.15 * (2 * _rand(b, generator, 3) - 1)
    offset = strength * 0.05 * (2 * _rand(b, generator, 3) - 1)
    mix = torch.eye(3) + strength * 0.06 * (2 * _rand(b, generator, 3, 3) - 1)
    mix = mix / mix.sum(dim=2, keepdim=True)  # keep grey levels roughly grey
    mixed = torch.einsum("bij,bjhw->bihw", mix.to(images), images)
    return mixed * gain.to(images)[:, :, None, None] + offset.to(images)[:, :, None, None]


def illumination(
    images: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0
) -> torch.Tensor:
    """Low or uneven lamp light: global brightness, a linear gradient and a vignette."""
    b, _, h, w = images.shape
    brightness = 1.0 + strength * (0.55 * _rand(b, generator) - 0.35)  # 0.65 .. 1.2
    angle = 2 * math.pi * _rand(b, generator)
    slope = strength * 0.3 * _rand(b, generator)
    vignette = strength * 0.35 * _rand(b, generator)
    ys = torch.linspace(-1, 1, h)[:, None]
    xs = torch.linspace(-1, 1, w)[None, :]
    ramp = torch.cos(angle)[:, None, None] * xs + torch.sin(angle)[:, None, None] * ys
    radius2 = (xs**2 + ys**2) / 2
    field = brightness[:, None, None] * (1 + slope[:, None, None] * ramp / 2)
    field = field * (1 - vignette[:, None, None] * radius2)
    return images * field[:, None].to(images)


def defocus(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
    p: float = 0.35,
) -> torch.Tensor:
    """Out-of-focus capture: separable Gaussian blur with a random sigma per chosen image."""
    idx = _chosen(images.shape[0], p, generator)
    if idx.numel() == 0 or strength <= 0:
        return images
    sigma = 0.3 + strength * 1.5 * _rand(idx.numel(), generator)
    radius = math.ceil(3 * float(sigma.max()))
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None].to(images) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)
    n, c, h, w = idx.numel(), images.shape[1], images.shape[2], images.shape[3]
    x = images[idx].reshape(1, n * c, h, w)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)
    x = F.conv2d(x, kernel[:, None, None, :], groups=n * c)
    out = images.clone()
    out[idx] = x.reshape(n, c, h, w)
    return out


def sensor_noise(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
    p: float = 0.35,
) -> torch.Tensor:
    """Camera noise: additive Gaussian noise with a random level per chosen image."""
    idx = _chosen(images.shape[0], p, generator)
    if idx.numel() == 0:
        return images
    level = strength * 0.04 * _rand(idx.numel(), generator)[:, None, None, None]
    noise = torch.randn(images[idx].shape, generator=generator) * level
    out = images.clone()
    out[idx] = images[idx] + noise.to(images)
    return out


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.float()


def jpeg_artefacts(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
    p: float = 0.25,
) -> torch.Tensor:
    """Lossy compression: quantise 8x8 block DCT coefficients, coarser at high frequencies."""
    idx = _chosen(images.shape[0], p, generator)
    if idx.numel() == 0 or strength <= 0:
        return images
    x = images[idx]
    n, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    hb, wb = x.shape[2] // 8, x.shape[3] // 8
    blocks = x.reshape(n, c, hb, 8, wb, 8).permute(0, 1, 2, 4, 3, 5)
    d = _dct_matrix().to(x)
    coef = d @ blocks @ d.T
    freq = torch.arange(8, dtype=x.dtype)
    base = strength * (0.01 + 0.05 * _rand(n, generator)).to(x)
    step = base[:, None, None, None, None, None] * (1 + freq[:, None] + freq[None, :])
    coef = torch.round(coef / step) * step
    blocks = d.T @ coef @ d
    x = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hb * 8, wb * 8)[:, :, :h, :w]
    out = images.clone()
    out[idx] = x
    return out


def debris(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
    p: float = 0.3,
    max_blobs: int = 3,
) -> torch.Tensor:
    """Impurities on the slide: a few small dark soft-edged blobs on chosen images."""
    idx = _chosen(images.shape[0], p, generator)
    if idx.numel() == 0 or strength <= 0:
        return images
    _, _, h, w = images.shape
    n = idx.numel()
    ys = torch.arange(h, dtype=images.dtype)[:, None]
    xs = torch.arange(w, dtype=images.dtype)[None, :]
    shade = torch.ones(n, h, w, dtype=images.dtype)
    present = _rand(n, generator, max_blobs) < torch.linspace(1.0, 0.3, max_blobs)
    cy = _rand(n, generator, max_blobs) * h
    cx = _rand(n, generator, max_blobs) * w
    radius = (0.01 + 0.03 * _rand(n, generator, max_blobs)) * min(h, w) + 0.5
    depth = strength * (0.3 + 0.5 * _rand(n, generator, max_blobs))
    for k in range(max_blobs):
        d2 = (ys[None] - cy[:, k, None, None]) ** 2 + (xs[None] - cx[:, k, None, None]) ** 2
        blob = torch.exp(-d2 / (2 * radius[:, k, None, None] ** 2))
        weight = (depth[:, k] * present[:, k])[:, None, None].to(images.dtype)
        shade = shade * (1 - weight * blob)
    out = images.clone()
    out[idx] = images[idx] * shade[:, None]
    return out


#: Ruifrok & Johnston's optical densities of haematoxylin, eosin and DAB (rows, RGB).
_HED_FROM_RGB = torch.linalg.inv(
    torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
)
_RGB_FROM_HED = torch.linalg.inv(_HED_FROM_RGB)


def stain_jitter(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
    sigma: tuple[float, float, float] = (0.15, 0.35, 0.1),
    bias: tuple[float, float, float] = (0.05, 0.12, 0.03),
) -> torch.Tensor:
    """Another lab's stain: scale and shift each stain's optical density (Tellez et al. 2018).

    The image is split into stain concentrations by colour deconvolution (the Romanowsky dyes
    of a blood smear separate into a basic, nuclear and an acidic, cytoplasmic component much
    like haematoxylin and eosin), each concentration is scaled by ``1 +- sigma`` and shifted by
    ``+- bias``, and the image is recomposed. Unlike a colour cast this changes how much each
    dye took, independently, as staining time and pH do between labs. The acidic (eosin-like)
    dye varies most: at another lab's pH a neutrophil's cytoplasm takes it up and turns pink,
    and a model that has not seen that calls it an eosinophil (measured on Zheng et al.'s crops).
    """
    b = images.shape[0]
    od = -torch.log(images.clamp(1.0 / 255.0, 1.0))
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB.to(images))
    alpha = 1.0 + strength * torch.tensor(sigma) * (2 * _rand(b, generator, 3) - 1)
    beta = strength * torch.tensor(bias) * (2 * _rand(b, generator, 3) - 1)
    hed = hed * alpha.to(images)[:, :, None, None] + beta.to(images)[:, :, None, None] * (
        hed > 0.02
    )  # shift only stained pixels, so the glass stays clear
    od = torch.einsum("bdhw,dc->bchw", hed, _RGB_FROM_HED.to(images))
    return torch.exp(-od.clamp(min=0.0))


def hue_saturation(
    images: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0
) -> torch.Tensor:
    """Dye batches and cameras differ in hue and saturation: rotate hue about the grey axis by
    up to +-12 degrees and scale saturation by 0.6..1.4, grey levels kept."""
    b = images.shape[0]
    angle = strength * math.radians(12.0) * (2 * _rand(b, generator) - 1)
    sat = 1.0 + strength * 0.4 * (2 * _rand(b, generator) - 1)
    grey = images.mean(dim=1, keepdim=True)
    chroma = images - grey
    k = torch.full((3,), 1.0 / math.sqrt(3.0))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rodrigues' rotation about the grey axis (1, 1, 1) / sqrt(3).
    kx = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    eye = torch.eye(3)
    rot = (
        cos[:, None, None] * eye
        + sin[:, None, None] * kx
        + (1 - cos)[:, None, None] * torch.outer(k, k)
    )
    rotated = torch.einsum("bij,bjhw->bihw", rot.to(images), chroma)
    return grey + rotated * sat.to(images)[:, None, None, None]


def gamma(
    images: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0
) -> torch.Tensor:
    """Camera tone curves: a random gamma of 0.7..1.4."""
    b = images.shape[0]
    g = torch.exp(strength * math.log(1.4) * (2 * _rand(b, generator) - 1))
    return images.clamp(min=0.0) ** g.to(images)[:, None, None, None]


def photometric(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
    stain: float = 0.0,
) -> torch.Tensor:
    """Apply all photometric augmentations in a realistic order and clip to [0, 1].

    ``stain`` (0 = off) adds the lab-to-lab stain, hue, saturation and tone-curve variation of
    :func:`stain_jitter`, :func:`hue_saturation` and :func:`gamma` at that strength.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
    x = images
    if stain > 0:
        x = stain_jitter(x, generator, stain)
        x = hue_saturation(x.clamp(0, 1), generator, stain)
        x = gamma(x.clamp(0, 1), generator, stain)
    x = colour_cast(x, generator, strength)
    x = illumination(x, generator, strength)
    x = debris(x, generator, strength)
    x = defocus(x, generator, strength)
    x = sensor_noise(x, generator, strength)
    x = jpeg_artefacts(x.clamp(0, 1), generator, strength)
    return x.clamp(0, 1)
