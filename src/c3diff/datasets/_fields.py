"""Smooth random fields and exact grid-to-grid resampling used by the simulator.

Every raster here lives on a grid with origin ``(0, 0)`` and square pixels of ``spacing`` um: pixel ``(i, j)`` covers
``[i*s, (i+1)*s) x [j*s, (j+1)*s)``, its centre is at ``((i + 0.5) s, (j + 0.5) s)`` (the spatialdata convention).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def gaussian_field(rng: np.random.Generator, shape: tuple[int, int], spacing: float, corr: float) -> np.ndarray:
    """Standardised Gaussian random field with a Gaussian covariance of length ``corr`` um (float32).

    White noise is smoothed in Fourier space on a padded grid, so opposite edges of the result are independent.
    """
    sigma = max(corr / spacing, 0.5)
    pad = int(min(3 * sigma, 2 * max(shape))) + 1
    ph, pw = shape[0] + pad, shape[1] + pad
    noise = rng.standard_normal((ph, pw), dtype=np.float32)
    ky = np.fft.fftfreq(ph)[:, None]
    kx = np.fft.rfftfreq(pw)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (ky**2 + kx**2)).astype(np.float32)
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(ph, pw))[: shape[0], : shape[1]]
    field = field - field.mean()
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def _interp_matrix(n_out: int, out_spacing: float, n_in: int, in_spacing: float) -> sparse.csr_matrix:
    """Sparse ``(n_out, n_in)`` linear-interpolation matrix between pixel centres (edges clamped)."""
    pos = (np.arange(n_out) + 0.5) * out_spacing / in_spacing - 0.5
    pos = np.clip(pos, 0.0, n_in - 1.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (pos - i0).astype(np.float32)
    rows = np.repeat(np.arange(n_out), 2)
    cols = np.stack([i0, i1], axis=1).ravel()
    vals = np.stack([1.0 - w1, w1], axis=1).ravel()
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in), dtype=np.float32)


def upsample(field: np.ndarray, in_spacing: float, out_shape: tuple[int, int], out_spacing: float) -> np.ndarray:
    """Bilinear resampling of ``field`` (pixel size ``in_spacing``) onto a grid of ``out_shape`` x ``out_spacing``.

    Separable, as two sparse matrix products, so a 5000 x 5000 output costs a fraction of a second.
    """
    ry = _interp_matrix(out_shape[0], out_spacing, field.shape[0], in_spacing)
    rx = _interp_matrix(out_shape[1], out_spacing, field.shape[1], in_spacing)
    tmp = np.asarray(rx @ np.ascontiguousarray(field.T, dtype=np.float32))  # (W_out, h_in)
    return np.ascontiguousarray(np.asarray(ry @ np.ascontiguousarray(tmp.T)), dtype=np.float32)


def grid_index(n_out: int, out_spacing: float, n_in: int, in_spacing: float) -> np.ndarray:
    """For each output pixel, the input pixel containing its centre (nearest-neighbour resampling)."""
    idx = np.floor((np.arange(n_out) + 0.5) * out_spacing / in_spacing).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def nearest_resample(array: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``array[rows][:, cols]`` with a fast path for integer up-sampling factors."""
    h, w = array.shape
    fy, fx = len(rows) // h, len(cols) // w
    if (
        fy >= 1
        and fx >= 1
        and len(rows) == fy * h
        and len(cols) == fx * w
        and np.array_equal(rows, np.repeat(np.arange(h), fy))
        and np.array_equal(cols, np.repeat(np.arange(w), fx))
    ):
        wide = np.repeat(array, fx, axis=1) if fx > 1 else array
        if fy == 1:
            return wide if fx > 1 else wide.copy()
        out = np.empty((h, fy, w * fx), dtype=array.dtype)
        for k in range(fy):
            out[:, k] = wide
        return out.reshape(h * fy, w * fx)
    return np.take(np.take(array, rows, axis=0), cols, axis=1)


def sample(field: np.ndarray, spacing: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear sample of a grid ``field`` at points ``(y, x)`` in um."""
    from scipy.ndimage import map_coordinates

    coords = np.stack([np.asarray(y) / spacing - 0.5, np.asarray(x) / spacing - 0.5])
    return map_coordinates(field, coords, order=1, mode="nearest").astype(np.float32)


def lookup(grid: np.ndarray, spacing: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Nearest (containing-pixel) lookup of a grid at points ``(y, x)`` in um."""
    i = np.clip((np.asarray(y) / spacing).astype(np.int64), 0, grid.shape[0] - 1)
    j = np.clip((np.asarray(x) / spacing).astype(np.int64), 0, grid.shape[1] - 1)
    return grid[i, j]
