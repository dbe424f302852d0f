"""Shared drawing helpers: pick a pyramid level, crop a raster to an extent in um, place it with its transform."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from c3diff._geometry import RasterGeometry, level_geometries

#: ``(ymin, xmin, ymax, xmax)`` in micrometres.
Extent = tuple[float, float, float, float]


def pick_level(element: Any, extent: Extent, *, max_pixels: int, arg: str) -> tuple[Any, RasterGeometry]:
    """The coarsest pyramid level that still shows ``extent`` with at least ``max_pixels`` along its longer side
    (level 0 when none does), so a large H&E is drawn from a small level."""
    levels = level_geometries(element, arg=arg)
    ymin, xmin, ymax, xmax = extent
    for level, geom in reversed(levels):
        if max((ymax - ymin) / geom.sy, (xmax - xmin) / geom.sx) >= max_pixels:
            return level, geom
    return levels[0]


def _block_mean(x: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN (NaN where a block has no finite value), without warnings; float32."""
    if np.issubdtype(x.dtype, np.integer):  # no NaN: one pass (an H&E)
        return np.mean(x, axis=axis, dtype=np.float32)
    finite = np.isfinite(x)
    total = np.where(finite, x, 0).sum(axis=axis, dtype=np.float64)
    count = finite.sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def downsample(window: Any, factor: int) -> np.ndarray:
    """A raster window (``DataArray``, numpy or dask backed) reduced ``factor`` times along y and x, lazily (dask,
    chunk by chunk) before it becomes numpy: block means for images (NaN-aware; integer images keep their type),
    every ``factor``-th pixel for labels (no ``c`` axis), whose values must not be averaged. Rows and columns past
    the last whole block are dropped."""
    import dask.array as da

    data = window.data
    if factor <= 1:
        return np.asarray(data)
    if "c" not in window.dims:
        return np.asarray(data[..., ::factor, ::factor])
    height, width = (data.shape[-2] // factor) * factor, (data.shape[-1] // factor) * factor
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=(1, *(max(factor, (2048 // factor) * factor),) * 2))
    data = data[..., :height, :width]
    axes = {data.ndim - 2: factor, data.ndim - 1: factor}
    if not np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32)
    means = da.coarsen(_block_mean, data, axes, trim_excess=True)
    out = np.asarray(means.compute())
    if np.issubdtype(window.dtype, np.integer):
        info = np.iinfo(window.dtype)
        out = np.clip(np.rint(np.nan_to_num(out)), info.min, info.max).astype(window.dtype)
    return out


def crop(
    element: Any, extent: Extent, *, max_pixels: int = 1024, arg: str, channels: list[str] | None = None
) -> tuple[np.ndarray, Extent] | None:
    """The part of a raster that covers ``extent``: an array (``(c, h, w)`` for images, ``(h, w)`` for labels) and
    its own extent in um; ``None`` if the raster does not reach into ``extent``.

    It is read from the coarsest pyramid level that still has ``max_pixels`` across ``extent``; when even that level
    has more than twice as many (a single-scale image), it is reduced lazily (:func:`downsample`) so that only about
    ``max_pixels`` across ever reach numpy and matplotlib (a 9.9k x 9.3k single-scale H&E draws in well under 1 GB).
    """
    level, geom = pick_level(element, extent, max_pixels=max_pixels, arg=arg)
    ymin, xmin, ymax, xmax = extent
    r0 = max(0, math.floor((ymin - geom.y0) / geom.sy))
    r1 = min(geom.height, math.ceil((ymax - geom.y0) / geom.sy))
    c0 = max(0, math.floor((xmin - geom.x0) / geom.sx))
    c1 = min(geom.width, math.ceil((xmax - geom.x0) / geom.sx))
    if r1 <= r0 or c1 <= c0:
        return None
    across = max((ymax - ymin) / geom.sy, (xmax - xmin) / geom.sx)
    factor = max(1, min(int(across // max(max_pixels, 1)), r1 - r0, c1 - c0))
    data = level.sel(c=channels) if channels is not None else level
    values = downsample(data.isel(y=slice(r0, r1), x=slice(c0, c1)), factor)
    r1, c1 = r0 + values.shape[-2] * factor, c0 + values.shape[-1] * factor
    return values, (geom.y0 + r0 * geom.sy, geom.x0 + c0 * geom.sx, geom.y0 + r1 * geom.sy, geom.x0 + c1 * geom.sx)


def imshow_extent(extent: Extent) -> tuple[float, float, float, float]:
    """``imshow(extent=...)`` for ``origin="upper"``: y runs down, as in the rasters."""
    ymin, xmin, ymax, xmax = extent
    return xmin, xmax, ymax, ymin


def set_view(ax: Any, extent: Extent) -> None:
    """Show exactly ``extent`` (um) with y running down and square pixels."""
    ymin, xmin, ymax, xmax = extent
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymax, ymin)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def rgb(image: np.ndarray) -> np.ndarray:
    """``(c, h, w)`` H&E as an ``(h, w, 3)`` array imshow understands (uint8 as is, floats scaled to [0, 1])."""
    image = np.moveaxis(image[:3], 0, -1)
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32)
    top = np.nanmax(image) if image.size else 1.0
    return np.clip(image / (top if top > 1 else 1.0), 0, 1)


def colour_limits(values: np.ndarray, robust: bool) -> tuple[float, float]:
    """Colour range of a map: the 1st-99th percentiles with ``robust``, else min-max (finite values only)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99]) if robust else (finite.min(), finite.max())
    if hi <= lo:
        hi = lo + 1e-6
    return float(lo), float(hi)
