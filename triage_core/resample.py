"""Separable image resizing in numpy, with the very weights of ``torch.nn.functional.interpolate``.

The model input is made by one antialiased bilinear resize (``mode="bilinear", antialias=True,
align_corners=False``), the filter PyTorch took from Pillow: a triangle whose support widens by
the downscaling factor, normalised per output pixel. Training used torch for it; serving must not
need torch, and both must make the *same* input (one preprocessing path). So the weights are
computed here in float32, in the order ATen computes them
(``aten/src/ATen/native/cpu/UpSampleKernel.cpp``, ``_compute_indices_min_size_weights_aa``),
which gives identical weights (checked in ``tests/core/test_core_imaging.py`` against torch), and
are applied as two small matrix products; the result matches torch within float32 rounding of the
sums (~1e-7). Pillow's own ``Image.resize(BILINEAR)`` on a float image differs from torch by up to
2e-5 (double-precision weights), and OpenCV has no antialiased bilinear filter.

:func:`resize_bilinear` is the plain (not antialiased) bilinear resize of ``align_corners=False``
(``cv2.INTER_LINEAR``), used to bring maps back to the source image.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_F32 = np.float32


@lru_cache(maxsize=64)
def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float32 matrix of the antialiased bilinear filter (rows sum to 1)."""
    scale = _F32(n_in) / _F32(n_out)
    support = scale if scale >= 1.0 else _F32(1.0)
    invscale = _F32(1.0) / scale if scale >= 1.0 else _F32(1.0)
    centers = scale * (np.arange(n_out, dtype=_F32) + _F32(0.5))
    lows = np.maximum((centers - support + _F32(0.5)).astype(np.int64), 0)
    highs = np.minimum((centers + support + _F32(0.5)).astype(np.int64), n_in)
    width = int((highs - lows).max())
    taps = lows[:, None] + np.arange(width)[None, :]  # (n_out, width)
    inside = taps < highs[:, None]
    x = (taps.astype(_F32) - centers[:, None] + _F32(0.5)) * invscale
    weights = np.where(inside, np.maximum(_F32(0.0), _F32(1.0) - np.abs(x)), _F32(0.0))
    weights = weights.astype(_F32)
    totals = np.cumsum(weights, axis=1, dtype=_F32)[:, -1:]  # sequential float32 sum, as ATen
    weights = np.where(totals > 0, weights / np.where(totals > 0, totals, _F32(1.0)), weights)
    matrix = np.zeros((n_out, n_in), dtype=_F32)
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    matrix[rows[inside], taps[inside]] = weights[inside]
    matrix.setflags(write=False)
    return matrix


def resize_antialiased(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of a 2-D float image to ``height x width`` (float32).

    Equal, within float32 rounding, to ``F.interpolate(x, size=(height, width),
    mode="bilinear", antialias=True, align_corners=False)``.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"invalid output size {height}x{width}")
    out = np.ascontiguousarray(image, dtype=_F32)
    rows, cols = out.shape
    if cols != width:
        out = out @ _aa_weights(cols, width).T
    if rows != height:
        out = _aa_weights(rows, height) @ out
    return np.ascontiguousarray(out, dtype=_F32)


@lru_cache(maxsize=64)
def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of plain bilinear interpolation, half-pixel centres, edges
    clamped (``align_corners=False``, ``cv2.INTER_LINEAR``)."""
    scale = n_in / n_out
    src = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0.0, None)
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(matrix, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    out = matrix.astype(_F32)
    out.setflags(write=False)
    return out


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Plain bilinear resize of a 2-D float image to ``height x width`` (float32)."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    out = np.ascontiguousarray(image, dtype=_F32)
    rows, cols = out.shape
    if cols != width:
        out = out @ _linear_weights(cols, width).T
    if rows != height:
        out = _linear_weights(rows, height) @ out
    return np.ascontiguousarray(out, dtype=_F32)
