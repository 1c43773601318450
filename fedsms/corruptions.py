"""Image corruptions in the manner of CIFAR-10-C, computed on the fly on whole batches.

Hendrycks & Dietterich (2019), "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", publish CIFAR-10-C as fixed files made with numpy / PIL /
OpenCV one image at a time. Here the same corruptions are torch ops on a whole batch
(N, C, H, W) of float images in [0, 1], so any data set (8x8 digits, 32x32 CIFAR, any C)
can be evaluated under shift without files. Random draws come only from the caller's
``torch.Generator`` (drawn on that generator's device, then moved to the images' device),
so the same generator state gives the same corrupted batch on CPU and GPU alike.

Parameters per severity 1..5 are CIFAR-10-C's (``make_cifar_c.py``), in pixel units:

==============  ==========================================  ===============================
name            severity 1 .. 5                             operation
==============  ==========================================  ===============================
gaussian_noise  sigma .04 .06 .08 .09 .10                   x + N(0, sigma^2)
shot_noise      photons 500 250 100 75 50                   Poisson(x * photons) / photons
impulse_noise   amount .01 .02 .03 .05 .07                  each value set to 0 or 1 (half
                                                            each) with probability amount
speckle_noise   sigma .06 .10 .12 .16 .20                   x + x * N(0, sigma^2)
gaussian_blur   sigma .4 .6 .7 .8 1.0                       separable Gaussian, radius
                                                            round(4 sigma), reflect padding
defocus_blur    (radius, alias) (.3,.4) (.4,.5) (.5,.6)     disk of ``radius`` smoothed by a
                (1,.2) (1.5,.1)                             3x3 Gaussian(alias), reflect pad
contrast        factor .75 .5 .4 .3 .15                     (x - m) * factor + m, m the
                                                            per-image, per-channel mean
brightness      delta .05 .1 .15 .2 .3                      HSV value V -> min(V + delta, 1)
==============  ==========================================  ===============================

Differences from the published files, all deliberate:

- No 8-bit rounding between steps and no JPEG/PNG round trip: outputs stay float32.
- gaussian_blur pads by reflection (skimage's ``gaussian`` default is 'nearest'); filter
  radii are cut to ``size - 1`` so that 8x8 images (or smaller) work, and the truncated
  kernel is renormalised. defocus_blur's reflect padding is OpenCV's default, as in the
  original. Blur sigmas stay in pixels for every image size.
- brightness is exact, not approximated: with hue and saturation fixed, HSV->RGB is linear
  in V, so raising V scales every channel by V'/V (a black pixel, which has S = 0,
  becomes grey V'); for one channel this is simply ``min(x + delta, 1)``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from fedsms import FedSMSError

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
}

CORRUPTIONS: tuple[str, ...] = tuple(_PARAMS)


class CorruptionError(FedSMSError, ValueError):
    """Unknown corruption name or severity (a ``ValueError`` and a ``FedSMSError``)."""


def check_corruption(name: str, severity: int) -> None:
    """Raise ``CorruptionError`` naming the valid choices if ``name``/``severity`` is bad.

    Parameters
    ----------
    name : str
        A corruption name, one of ``CORRUPTIONS``.
    severity : int
        An integer from 1 to 5 (bools are refused).

    Raises
    ------
    CorruptionError
        If the name is unknown or the severity is not an integer in [1, 5].
    """
    if name not in _PARAMS:
        raise CorruptionError(f"unknown corruption {name!r}; use one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or not 1 <= severity <= 5:
        raise CorruptionError(f"corruption severity must be one of 1, 2, 3, 4, 5, got {severity!r}")


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` (N, C, H, W) float in [0, 1] under corruption ``name`` at ``severity`` (1..5).

    Returns a new tensor of the same shape, dtype and device, clipped to [0, 1]; the input
    is not modified. Deterministic given the generator's state (which it advances).

    Parameters
    ----------
    x : torch.Tensor
        A batch of float images (N, C, H, W), values in [0, 1], on any device.
    name : str
        The corruption, one of ``CORRUPTIONS`` (see the table above).
    severity : int
        1 (mildest) to 5.
    generator : torch.Generator
        The only source of random draws, on any device.

    Returns
    -------
    torch.Tensor
        The corrupted batch.

    Raises
    ------
    CorruptionError
        If the name or severity is bad.
    ValueError
        If ``x`` is not a 4-D floating tensor.
    """
    check_corruption(name, severity)
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"corrupt expects a float tensor (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    out = _FUNCTIONS[name](work, _PARAMS[name][severity - 1], generator)
    return out.clamp_(0.0, 1.0).to(x.dtype)


# ---- the corruptions (work on float32/64, may return values outside [0, 1]) ----------------


def _randn(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)


def _rand(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)


def _gaussian_noise(x, sigma, generator):
    return x + sigma * _randn(x, generator)


def _shot_noise(x, photons, generator):
    rate = (x.clamp(0.0, 1.0) * photons).to(generator.device, torch.float32)
    return torch.poisson(rate, generator=generator).to(x.device, x.dtype) / photons


def _impulse_noise(x, amount, generator):
    flipped = _rand(x, generator) <= amount
    salted = _rand(x, generator) <= 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


def _speckle_noise(x, sigma, generator):
    return x + x * sigma * _randn(x, generator)


def _gaussian_kernel(sigma: float, radius: int, dtype, device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of ``x`` with the odd-sized 2-D ``kernel``, reflect padding."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(y, kernel.view(1, 1, kh, kw)).view(n, c, h, w)


def _reflect_filter_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) matrix M with ``M @ v`` = ``v`` correlated with the odd-sized 1-D ``kernel``
    under reflect padding (radius must be < n). A matmul is much faster on CPU than a
    depthwise conv with a thin kernel."""
    radius = kernel.numel() // 2
    out = torch.arange(n).view(-1, 1)
    src = out + torch.arange(-radius, radius + 1).view(1, -1)
    src = torch.where(src < 0, -src, src)
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    matrix = torch.zeros(n, n, dtype=kernel.dtype)
    matrix.index_put_((out.expand_as(src), src), kernel.expand_as(src), accumulate=True)
    return matrix


def _gaussian_blur(x, sigma, generator):
    h, w = x.shape[-2:]
    radius = int(4.0 * sigma + 0.5)  # scipy / skimage: truncate = 4 standard deviations
    rh, rw = min(radius, h - 1), min(radius, w - 1)  # reflect padding needs pad < size
    rows = _reflect_filter_matrix(_gaussian_kernel(sigma, rh, torch.float64, "cpu"), h).to(x.device, x.dtype)
    cols = _reflect_filter_matrix(_gaussian_kernel(sigma, rw, torch.float64, "cpu"), w).to(x.device, x.dtype)
    return rows @ x @ cols.T


def _defocus_blur(x, params, generator):
    radius, alias_blur = params
    r = math.floor(radius) + 1  # extent of the disk after the 3x3 alias blur
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = ((t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) <= radius**2).to(torch.float64)
    disk /= disk.sum()
    g = _gaussian_kernel(alias_blur, 1, torch.float64, "cpu")
    kernel = F.conv2d(disk.view(1, 1, *disk.shape), (g.view(-1, 1) * g.view(1, -1)).view(1, 1, 3, 3), padding=1)[0, 0]
    h, w = x.shape[-2:]
    rh, rw = min(r, h - 1), min(r, w - 1)
    kernel = kernel[r - rh : r + rh + 1, r - rw : r + rw + 1]
    return _depthwise(x, (kernel / kernel.sum()).to(dtype=x.dtype, device=x.device))


def _contrast(x, factor, generator):
    means = x.mean(dim=(-2, -1), keepdim=True)
    return (x - means) * factor + means


def _brightness(x, delta, generator):
    value = x.amax(dim=1, keepdim=True)  # HSV value
    new_value = (value + delta).clamp(max=1.0)
    scaled = x * (new_value / value.clamp(min=torch.finfo(x.dtype).tiny))
    return torch.where(value > 0, scaled, new_value.expand_as(x))


_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "brightness": _brightness,
}
assert tuple(_FUNCTIONS) == CORRUPTIONS
