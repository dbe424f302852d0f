"""Histology texture: what the H&E shows inside each 10 um pixel, which a 10 um RGB average cannot.

The model's histology input is the H&E averaged to 10 um pixels, where a nucleus is smaller than a pixel: nuclear
size, chromatin and the haematoxylin/eosin balance - what tells cell types apart - average away. These features are
computed from the H&E at about 1 um/px and summarised per 10 um pixel, so the conditional mean can place each LR
count by them: on held-out simulated tissue they place counts inside each 100 um pixel far better than the 10 um
colour or the squared darkness do (the method page; numbers on the benchmarks pages).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM
from c3diff._geometry import RasterGeometry, level_geometries, raster_geometry

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: The texture features, in channel order (each the mean over a model pixel of a ~1 um/px map, standardised per slide).
TEXTURE_FEATURES = (
    "red",
    "green",
    "blue",
    "haematoxylin",
    "haematoxylin_sd",
    "eosin",
    "eosin_sd",
    "grey_sd",
    "dark_fraction",
    "bright_fraction",
    "gradient",
    "laplacian",
    "nucleus_size",
)
#: Pixel size (um) the features are computed at; the H&E must have a level at most :data:`TEXTURE_MAX_PIXEL_SIZE`.
TEXTURE_PIXEL_SIZE = 1.0
#: Coarsest H&E pixel (um) that still resolves nuclei.
TEXTURE_MAX_PIXEL_SIZE = 2.5
#: Grey levels (RGB mean in [0, 1]) below which a pixel is nuclear, above which it is glass or fat.
_DARK, _BRIGHT = 0.45, 0.85
#: Floor of a feature's spread when standardising: a feature (nearly) constant over the slide, e.g. on a flat-coloured
#: image, stays (nearly) 0 rather than its rounding noise being blown up to unit spread.
_MIN_SPREAD = 1e-3
#: Output rows whose features are computed at once (bounds the float maps on whole slides).
_BAND_ROWS = 32
#: Texture pixels of the H&E read at once (resampled as float32: 192 MiB); larger slides are read in bands of rows.
_READ_PIXELS = 2**24


def _cell_features(rgb: np.ndarray, factor: int, pixel_size: float) -> np.ndarray:
    """The raw features ``(K, h, w)`` of an RGB band ``(3, h * factor, w * factor)`` uint8 at ``pixel_size`` um/px,
    one value per ``factor x factor`` cell."""
    from scipy import ndimage
    from skimage.color import rgb2hed

    x = rgb.transpose(1, 2, 0).astype(np.float32) / 255.0
    grey = x.mean(axis=2)
    hed = rgb2hed(x)
    dark = grey < _DARK
    h, w = grey.shape[0] // factor, grey.shape[1] // factor

    def cells(a: np.ndarray) -> np.ndarray:
        return a[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3), dtype=np.float64)

    def cell_sd(a: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(cells(a * a) - cells(a) ** 2, 0.0))

    labels, n = ndimage.label(dark)
    blob_area = ndimage.sum_labels(np.ones_like(grey), labels, index=np.arange(1, n + 1)) * pixel_size**2
    nucleus = np.zeros_like(grey)
    nucleus[dark] = np.log1p(blob_area[labels[dark] - 1])
    gradient = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1)) / pixel_size
    laplacian = np.abs(ndimage.laplace(grey)) / pixel_size**2
    return np.stack(
        [
            cells(x[..., 0]),
            cells(x[..., 1]),
            cells(x[..., 2]),
            cells(hed[..., 0]),
            cell_sd(hed[..., 0]),
            cells(hed[..., 1]),
            cell_sd(hed[..., 1]),
            cell_sd(grey),
            cells(dark.astype(np.float32)),
            cells((grey > _BRIGHT).astype(np.float32)),
            cells(gradient),
            cells(laplacian),
            cells(nucleus),
        ]
    ).astype(np.float32)


def histology_texture(
    sdata: SpatialData,
    image_key: str,
    *,
    grid: RasterGeometry,
    tissue: np.ndarray | None = None,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> np.ndarray:
    """Texture features of the H&E on ``grid`` (the model's 10 um grid): ``(K, height, width)`` float32.

    Each channel (:data:`TEXTURE_FEATURES`) is the mean over a grid pixel of a map computed at about
    :data:`TEXTURE_PIXEL_SIZE` um/px: mean red, green and blue; haematoxylin and eosin (colour deconvolution) and
    their spread; the spread of grey; the fraction of dark (nuclear) and of bright (glass, fat) pixels; the gradient
    magnitude and absolute Laplacian of grey (per um); and the log area of the dark blob (nucleus) each dark pixel
    belongs to. Channels are standardised per slide (zero mean and unit spread over ``tissue``, clipped to +-5), so
    stain differences between slides shift no feature; pixels outside the image are 0.

    Parameters
    ----------
    sdata
        The section.
    image_key
        The H&E (RGB) in ``sdata.images``; it needs a level at most :data:`TEXTURE_MAX_PIXEL_SIZE` um/px.
    grid
        The target grid (e.g. from :func:`c3diff.pp.histology_raster`); its pixel must be a whole number of
        texture pixels (10 um: 10).
    tissue
        Boolean ``(height, width)`` mask the statistics are taken over (default: every pixel inside the image).
    coordinate_system
        The micrometre coordinate system of the image and the grid.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=400, height=400, spot_layouts=(), seed=0, progress=False)
    >>> rgb, grid = c3.pp.histology_raster(sdata, "hne")
    >>> c3.pp.histology_texture(sdata, "hne", grid=grid).shape
    (13, 40, 40)
    """
    from c3diff._validation import get_element
    from c3diff.pp._histology import histology_raster

    image = get_element(sdata, image_key, "images", arg="image_key")
    finest = min(g.sy for _, g in level_geometries(image, coordinate_system=coordinate_system, arg="image_key"))
    if finest > TEXTURE_MAX_PIXEL_SIZE:
        raise ValueError(
            f"`image_key={image_key!r}` is {finest:g} um/px at its finest; texture features need nuclei resolved, "
            f"at most {TEXTURE_MAX_PIXEL_SIZE:g} um/px. Use the full-resolution H&E (or a model without texture)."
        )
    factor = max(1, round(grid.sy / max(TEXTURE_PIXEL_SIZE, finest)))
    if abs(grid.sy - grid.sx) > 1e-9 * grid.sy:
        raise ValueError(f"`grid` must have square pixels, got {grid.sy:g} x {grid.sx:g} um.")
    out = np.zeros((len(TEXTURE_FEATURES), grid.height, grid.width), dtype=np.float32)
    fine = RasterGeometry(
        y0=grid.y0, x0=grid.x0, sy=grid.sy / factor, sx=grid.sx / factor, height=0, width=grid.width * factor
    )
    # the H&E in as few reads as memory allows (a lazy pyramid level is computed again for every read)
    band_rows = max(_BAND_ROWS, _READ_PIXELS // max(grid.width * factor**2, 1))
    for r0 in range(0, grid.height, band_rows):
        rows = min(band_rows, grid.height - r0)
        band = replace(fine, y0=grid.y0 + r0 * grid.sy, height=rows * factor)
        rgb, _ = histology_raster(sdata, image_key, grid=band, coordinate_system=coordinate_system)
        for b0 in range(0, rows, _BAND_ROWS):  # features of a few rows at a time: float maps of the band's size
            b1 = min(b0 + _BAND_ROWS, rows)
            out[:, r0 + b0 : r0 + b1] = _cell_features(rgb[:, b0 * factor : b1 * factor], factor, band.sy)
    ymin, xmin, ymax, xmax = raster_geometry(image, coordinate_system=coordinate_system, arg="image_key").extent
    cy, cx = grid.pixel_centres()
    inside = ((cy >= ymin) & (cy < ymax))[:, None] & ((cx >= xmin) & (cx < xmax))[None, :]
    where = inside if tissue is None else np.asarray(tissue, dtype=bool) & inside
    if not where.any():
        where = inside if inside.any() else np.ones_like(inside)
    mean = out[:, where].mean(axis=1)
    sd = np.maximum(out[:, where].std(axis=1), _MIN_SPREAD)
    out = np.clip((out - mean[:, None, None]) / sd[:, None, None], -5.0, 5.0)
    out[:, ~inside] = 0.0
    return out.astype(np.float32)
