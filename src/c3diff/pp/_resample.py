"""Resampling a raster element (e.g. the H&E) onto an axis-aligned grid given in micrometres."""

from __future__ import annotations

from typing import Any

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM
from c3diff._geometry import RasterGeometry, is_integer, level_geometries

#: Source values (channels x rows x columns) converted to float32 at a time when averaging blocks exactly.
STRIP_ELEMENTS = 2**22


def _choose_level(levels: list[tuple[Any, RasterGeometry]], grid: RasterGeometry) -> tuple[Any, RasterGeometry, bool]:
    """The coarsest level not coarser than the grid; prefer one the grid tiles exactly (integer factor, aligned)."""
    fine_enough = [(lv, g) for lv, g in levels if g.sy <= grid.sy * (1 + 1e-6) and g.sx <= grid.sx * (1 + 1e-6)]
    if not fine_enough:  # the image is coarser than the grid: upsample from its finest level
        lv, g = levels[0]
        return lv, g, False
    for lv, g in reversed(fine_enough):
        fy, fx = grid.sy / g.sy, grid.sx / g.sx
        oy, ox = (grid.y0 - g.y0) / g.sy, (grid.x0 - g.x0) / g.sx
        if all(is_integer(v) for v in (fy, fx, oy, ox)):
            return lv, g, True
    lv, g = fine_enough[-1]
    return lv, g, False


def resample_raster(
    element: Any,
    grid: RasterGeometry,
    *,
    fill: float = 0.0,
    coordinate_system: str = COORDINATE_SYSTEM,
    arg: str = "element",
) -> tuple[np.ndarray, np.ndarray]:
    """Area-average a raster element onto ``grid``.

    Parameters
    ----------
    element
        An image or labels element (single- or multiscale) with a transformation to ``coordinate_system``.
    grid
        Target grid in ``coordinate_system`` units.
    fill
        Value of grid pixels that fall outside the element.
    coordinate_system
        Coordinate system shared by ``element`` and ``grid``.
    arg
        Name of the argument that ``element`` came from, for error messages.

    Returns
    -------
    ``(values, inside)``: float32 ``(c, height, width)`` and a boolean ``(height, width)`` mask of pixels whose centre
    lies inside the element.

    Notes
    -----
    The finest pyramid level that is still not coarser than the grid is read, and only the window under the grid.
    When the grid pixel is an integer multiple of that level's pixel and the grids are aligned, each output pixel is
    the exact mean of the source pixels it covers; otherwise a Gaussian anti-aliasing filter (sigma = (factor - 1) / 2
    source pixels) is followed by bilinear interpolation at the grid's pixel centres.
    """
    from scipy import ndimage

    level, src, exact = _choose_level(level_geometries(element, coordinate_system=coordinate_system, arg=arg), grid)
    data = level.transpose("c", "y", "x").data if "c" in level.dims else level.data[None]
    n_channels = data.shape[0]
    out = np.full((n_channels, grid.height, grid.width), fill, dtype=np.float32)

    cy, cx = grid.pixel_centres()
    rows_in = (cy >= src.y0) & (cy < src.y0 + src.height * src.sy)
    cols_in = (cx >= src.x0) & (cx < src.x0 + src.width * src.sx)
    inside = rows_in[:, None] & cols_in[None, :]
    if not inside.any():
        return out, inside

    if exact:
        fy, fx = round(grid.sy / src.sy), round(grid.sx / src.sx)
        oy, ox = round((grid.y0 - src.y0) / src.sy), round((grid.x0 - src.x0) / src.sx)
        r_idx, c_idx = np.flatnonzero(rows_in), np.flatnonzero(cols_in)
        r0, r1, c0, c1 = r_idx[0], r_idx[-1] + 1, c_idx[0], c_idx[-1] + 1
        sy0, sx0 = oy + r0 * fy, ox + c0 * fx
        window = np.asarray(data[:, max(sy0, 0) : oy + r1 * fy, max(sx0, 0) : ox + c1 * fx])  # its own dtype
        # pad partial blocks at the image border with edge values so that border pixels average real data only
        want_h, want_w = (r1 - r0) * fy, (c1 - c0) * fx
        pad_top, pad_left = max(-sy0, 0), max(-sx0, 0)
        window = np.pad(
            window,
            (
                (0, 0),
                (pad_top, max(want_h - window.shape[1] - pad_top, 0)),
                (pad_left, max(want_w - window.shape[2] - pad_left, 0)),
            ),
            mode="edge",
        )[:, :want_h, :want_w]
        # means in float32 over strips of output rows: a whole-slide H&E is never held as float32 at once
        strip = max(1, STRIP_ELEMENTS // max(n_channels * fy * want_w, 1))
        for a in range(0, r1 - r0, strip):
            b = min(a + strip, r1 - r0)
            part = window[:, a * fy : b * fy].astype(np.float32)
            out[:, r0 + a : r0 + b, c0:c1] = part.reshape(n_channels, b - a, fy, c1 - c0, fx).mean(axis=(2, 4))
        out[:, ~inside] = fill
        return out, inside

    # general case: continuous source coordinates of the grid's pixel centres
    py = (cy - src.y0) / src.sy - 0.5
    px = (cx - src.x0) / src.sx - 0.5
    factor_y, factor_x = grid.sy / src.sy, grid.sx / src.sx
    margin = int(np.ceil(2 * max(factor_y, factor_x))) + 2
    r0 = int(np.clip(np.floor(py.min()) - margin, 0, src.height))
    r1 = int(np.clip(np.ceil(py.max()) + margin + 1, 0, src.height))
    c0 = int(np.clip(np.floor(px.min()) - margin, 0, src.width))
    c1 = int(np.clip(np.ceil(px.max()) + margin + 1, 0, src.width))
    window = np.asarray(data[:, r0:r1, c0:c1], dtype=np.float32)
    sigma = (max((factor_y - 1) / 2, 0.0), max((factor_x - 1) / 2, 0.0))
    yy, xx = np.meshgrid(py - r0, px - c0, indexing="ij")
    for c in range(n_channels):
        smoothed = ndimage.gaussian_filter(window[c], sigma=sigma, mode="nearest") if any(sigma) else window[c]
        out[c] = ndimage.map_coordinates(smoothed, [yy, xx], order=1, mode="nearest")
    out[:, ~inside] = fill
    return out, inside
