"""Shared drawing helpers: pick a pyramid level, crop a raster to an extent in um, place it with its transform."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from c3diff._validation import RasterGeometry, level_geometries

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


def crop(element: Any, extent: Extent, *, max_pixels: int = 1024, arg: str, channels: list[str] | None = None
         ) -> tuple[np.ndarray, Extent] | None:
    """The part of a raster that covers ``extent``: an array (``(c, h, w)`` for images, ``(h, w)`` for labels) and
    its own extent in um; ``None`` if the raster does not reach into ``extent``."""
    level, geom = pick_level(element, extent, max_pixels=max_pixels, arg=arg)
    ymin, xmin, ymax, xmax = extent
    r0 = max(0, math.floor((ymin - geom.y0) / geom.sy))
    r1 = min(geom.height, math.ceil((ymax - geom.y0) / geom.sy))
    c0 = max(0, math.floor((xmin - geom.x0) / geom.sx))
    c1 = min(geom.width, math.ceil((xmax - geom.x0) / geom.sx))
    if r1 <= r0 or c1 <= c0:
        return None
    data = level.sel(c=channels) if channels is not None else level
    data = np.asarray(data.isel(y=slice(r0, r1), x=slice(c0, c1)).data)
    return data, (geom.y0 + r0 * geom.sy, geom.x0 + c0 * geom.sx, geom.y0 + r1 * geom.sy, geom.x0 + c1 * geom.sx)


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
