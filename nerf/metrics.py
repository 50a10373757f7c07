"""Image metrics as the NeRF paper's authors computed them: the 8-bit convention, PSNR and tf-style SSIM.

The convention (bmild/nerf issue 66): the rendered test images and the ground
truth (Blender: alpha-matted onto white) are both taken as the saved 8-bit
PNGs divided by 255, then scored with

- PSNR with max value 1 (``tf.image.psnr(..., max_val=1.)``),
- SSIM as ``tf.image.ssim(..., max_val=1.)`` computes it: an 11x11 Gaussian
  window with sigma 1.5, K1 = 0.01, K2 = 0.03, filtered over the 'valid'
  region only (no padding), averaged over pixels, per channel, then over
  channels.

LPIPS, the third metric, is :mod:`nerf.lpips_vgg`; scoring a test set and its
``metrics.json`` is :mod:`nerf.scoring`.

PSNR is *not* capped: a render identical to its ground truth (MSE 0) scores
``math.inf`` here, as ``tf.image.psnr`` and ``mse2psnr`` give.

Shapes: an image is ``(H, W, C)`` (or ``(H, W)``), floats in [0, 1] or uint8.
"""
from __future__ import annotations

import math

import numpy as np


# --------------------------------------------------------------------------
# 8-bit convention


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``to8b``: ``(255 * clip(x, 0, 1)).astype(uint8)``, same shape.

    Truncates, as the original's ``to8b`` does, so that scoring an in-memory
    render gives exactly what scoring its saved PNG gives. uint8 input is
    returned unchanged.
    """
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr
    return (255 * np.clip(arr, 0, 1)).astype(np.uint8)


def quantize_8bit(img: np.ndarray) -> np.ndarray:
    """An image as its 8-bit PNG would hold it, divided by 255.

    ``(H, W, C)`` (any shape) in, float64 of the same shape out, every value
    a multiple of 1/255. Images that came from 8-bit files (``imread / 255``)
    come back unchanged.
    """
    return to_uint8(img).astype(np.float64) / 255.0


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``(..., 4)`` RGBA in [0, 1] to ``(..., 3)`` RGB: ``rgb * a + (1 - a)``."""
    arr = np.asarray(rgba, dtype=np.float64)
    if arr.shape[-1] != 4:
        raise ValueError(f"expected RGBA (..., 4), got shape {arr.shape}")
    alpha = arr[..., 3:4]
    return arr[..., :3] * alpha + (1.0 - alpha)


def check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: render {a.shape} vs ground truth {b.shape}")


def as_float(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return arr.astype(np.float64)


# --------------------------------------------------------------------------
# PSNR


def mse(img: np.ndarray, ref: np.ndarray) -> float:
    """Mean squared error over all elements of two same-shape images."""
    a, b = as_float(img), as_float(ref)
    check_same_shape(a, b)
    return float(np.mean((a - b) ** 2))


def psnr(img: np.ndarray, ref: np.ndarray, max_val: float = 1.0) -> float:
    """PSNR in dB, ``10 log10(max_val^2 / MSE)``, of two same-shape images.

    Not capped: identical images give ``math.inf`` (as ``tf.image.psnr``).
    Does not quantize; :func:`score_view` does that first.
    """
    err = mse(img, ref)
    if err == 0.0:
        return math.inf
    return float(10.0 * np.log10(max_val**2 / err))


# --------------------------------------------------------------------------
# SSIM (tf.image.ssim)


def gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """``(size,)`` normalised Gaussian taps centred on the middle tap.

    TensorFlow builds its 2-D window as a softmax over ``-(x^2 + y^2) / (2
    sigma^2)``, which is exactly the outer product of this 1-D kernel with
    itself, so filtering rows then columns with it is the same window.
    """
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-0.5 * coords**2 / sigma**2)
    return taps / taps.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of ``(H, W, C)``: ``(H-k+1, W-k+1, C)``."""
    k = taps.shape[0]
    h, w = x.shape[0] - k + 1, x.shape[1] - k + 1
    rows = sum(taps[i] * x[i:i + h] for i in range(k))
    return sum(taps[j] * rows[:, j:j + w] for j in range(k))


def ssim_map(
    img: np.ndarray,
    ref: np.ndarray,
    max_val: float = 1.0,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """Per-pixel SSIM over the valid region, ``(H-10, W-10, C)`` for 11 taps.

    The luminance term ``(2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)`` times the
    contrast-structure term ``(2 s_xy + C2) / (s_x^2 + s_y^2 + C2)``, with the
    local (co)variances the Gaussian-weighted population ones, exactly as
    TensorFlow's ``_ssim_helper`` computes them.
    """
    a, b = as_float(img), as_float(ref)
    check_same_shape(a, b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {a.shape}")
    if a.shape[0] < filter_size or a.shape[1] < filter_size:
        raise ValueError(
            f"image {a.shape[0]}x{a.shape[1]} is smaller than the "
            f"{filter_size}x{filter_size} SSIM window"
        )
    taps = gaussian_kernel_1d(filter_size, filter_sigma)
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    mean_a = _filter_valid(a, taps)
    mean_b = _filter_valid(b, taps)
    num0 = 2.0 * mean_a * mean_b
    den0 = mean_a**2 + mean_b**2
    luminance = (num0 + c1) / (den0 + c1)
    num1 = 2.0 * _filter_valid(a * b, taps)
    den1 = _filter_valid(a * a + b * b, taps)
    contrast_structure = (num1 - num0 + c2) / (den1 - den0 + c2)
    return luminance * contrast_structure


def ssim(
    img: np.ndarray,
    ref: np.ndarray,
    max_val: float = 1.0,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """SSIM of two ``(H, W, C)`` (or ``(H, W)``) images as ``tf.image.ssim``.

    Mean of :func:`ssim_map` over the valid region of each channel, then the
    mean over channels. Identical images give 1. Does not quantize.
    """
    smap = ssim_map(img, ref, max_val, filter_size, filter_sigma, k1, k2)
    return float(np.mean(smap.mean(axis=(0, 1))))
