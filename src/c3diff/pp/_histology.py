"""Histology at the model's resolution: the H&E resampled onto a micrometre grid, and where the tissue is."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM, HISTOLOGY_PIXEL_SIZE
from c3diff._geometry import RasterGeometry, grid_for, raster_geometry, scale0
from c3diff._validation import get_element, hne_to_uint8
from c3diff.pp._resample import resample_raster

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: Mean optical density (-log10 transmission, averaged over RGB) above which a pixel counts as stained tissue.
TISSUE_OD_THRESHOLD = 0.06


def histology_raster(
    sdata: SpatialData,
    image_key: str,
    *,
    pixel_size: float = HISTOLOGY_PIXEL_SIZE,
    grid: RasterGeometry | None = None,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> tuple[np.ndarray, RasterGeometry]:
    """The RGB H&E averaged onto a ``pixel_size`` grid anchored at the image's corner (or onto ``grid``).

    The image may be single-scale or multiscale (the coarsest pyramid level still as fine as ``pixel_size`` is
    read). Its pixel type decides how values become uint8: uint8 as is; uint16 divided by 257 (the full 16-bit range;
    8-bit values stored as uint16, all at most 255, as they are); floats in [0, 1] times 255 and floats in [0, 255]
    as they are (a float image whose maximum is at most 1 is read as [0, 1]); other integer types only when every
    value lies in 0..255. Other types (bool masks, int32 counts) are refused with a ``TypeError`` naming the type,
    floats outside [0, 255] or with NaN with a ``ValueError`` (see ``docs/reliability.md``).

    Returns ``(rgb, grid)``: uint8 ``(3, height, width)`` (white outside the image) and the grid's geometry.
    """
    image = get_element(sdata, image_key, "images", arg="image_key")
    data = scale0(image)
    if "c" not in data.dims or data.sizes["c"] not in (3, 4):
        raise ValueError(
            f"`image_key={image_key!r}` must be an RGB(A) H&E image with 3 channels, found dims {dict(data.sizes)}."
        )
    hne_to_uint8(np.zeros(1, dtype=data.dtype), arg=f"image_key={image_key!r}")  # refuse unknown types up front
    geometry = raster_geometry(image, coordinate_system=coordinate_system, arg="image_key")
    if grid is None:
        grid = grid_for(bin_size=float(pixel_size), image_geometry=geometry, origin=None, data_extent=None)
    values, inside = resample_raster(image, grid, fill=0.0, coordinate_system=coordinate_system, arg="image_key")
    rgb = np.full((3, grid.height, grid.width), 255, dtype=np.uint8)
    if inside.any():
        rgb[:, inside] = hne_to_uint8(values[:3][:, inside], dtype=data.dtype, arg=f"image_key={image_key!r}")
    return rgb, grid


def detect_tissue(rgb: np.ndarray, *, pixel_size: float, threshold: float = TISSUE_OD_THRESHOLD) -> np.ndarray:
    """Boolean tissue mask of an RGB H&E raster ``(3, h, w)``: stained pixels, closed and with holes filled.

    A pixel is stained when its mean optical density exceeds ``threshold``; the mask is then closed over ~30 um
    and holes smaller than 0.25 mm^2 (fat lobules, vessel lumens) are filled, and specks under 0.01 mm^2 removed,
    so that tissue interiors count as tissue.
    """
    from scipy import ndimage
    from skimage import morphology

    od = -np.log10((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=0)
    stained = od > threshold
    radius = max(1, int(round(30.0 / pixel_size)))
    closed = ndimage.binary_closing(stained, structure=morphology.disk(radius), border_value=0)
    closed |= stained
    filled = morphology.remove_small_holes(closed, max_size=int(250_000 / pixel_size**2))
    return morphology.remove_small_objects(filled, max_size=int(10_000 / pixel_size**2))
