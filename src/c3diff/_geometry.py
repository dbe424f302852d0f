"""Where rasters lie and what elements hold: the geometry every subpackage shares.

Raster placement (:class:`RasterGeometry`, from an element's transform), pyramid levels and channel names (on
spatialdata's own :func:`spatialdata.get_pyramid_levels` and :func:`spatialdata.models.get_channel_names`), square
grids over an image or a set of points, and the gene names of a points element. Subpackages import these from here,
never from each other's private modules (``CONTRIBUTING.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr


def raster_levels(element: Any) -> list[xr.DataArray]:
    """All resolution levels of a raster element, finest first (a single-scale image gives one level).

    Parameters
    ----------
    element
        An image or labels element: an xarray ``DataArray`` or a multiscale ``DataTree``.

    Returns
    -------
    The ``DataArray`` of each level (``scale0`` first).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> [level.shape for level in raster_levels(xr.DataArray(np.zeros((3, 4, 5)), dims=("c", "y", "x")))]
    [(3, 4, 5)]
    """
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return [element]
    if isinstance(element, xr.DataTree):
        from spatialdata import get_pyramid_levels

        return get_pyramid_levels(element)
    raise TypeError(f"Expected a raster element (xarray DataArray or DataTree), got {type(element).__name__}.")


def scale0(element: Any) -> xr.DataArray:
    """The full-resolution ``DataArray`` of a raster element (level 0 of a multiscale ``DataTree``)."""
    return raster_levels(element)[0]


def raster_channels(element: Any) -> list[str]:
    """Channel names of an image element (for c3diff's gene rasters, the genes), as strings.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> raster_channels(xr.DataArray(np.zeros((2, 4, 4)), dims=("c", "y", "x"), coords={"c": ["EPCAM", "PTPRC"]}))
    ['EPCAM', 'PTPRC']
    """
    from spatialdata.models import get_channel_names

    data = scale0(element)
    if "c" not in data.dims:
        raise ValueError(f"Expected an image with a channel dimension 'c', got dims {data.dims}.")
    return [str(c) for c in get_channel_names(element)]


@dataclass(frozen=True)
class RasterGeometry:
    """Axis-aligned placement of a raster in a coordinate system: pixel ``(i, j)`` covers
    ``[y0 + i*sy, y0 + (i+1)*sy) x [x0 + j*sx, x0 + (j+1)*sx)``.

    Examples
    --------
    >>> grid = RasterGeometry(y0=0.0, x0=50.0, sy=10.0, sx=10.0, height=3, width=4)
    >>> grid.extent
    (0.0, 50.0, 30.0, 90.0)
    >>> grid.crop(1, 2, 2, 2).extent
    (10.0, 70.0, 30.0, 90.0)
    """

    y0: float
    x0: float
    sy: float
    sx: float
    height: int
    width: int

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``(ymin, xmin, ymax, xmax)`` in the coordinate system."""
        return self.y0, self.x0, self.y0 + self.height * self.sy, self.x0 + self.width * self.sx

    def pixel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Centre coordinates of rows (y) and columns (x)."""
        return (
            self.y0 + (np.arange(self.height) + 0.5) * self.sy,
            self.x0 + (np.arange(self.width) + 0.5) * self.sx,
        )

    def to_pixel(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuous pixel coordinates (row, col) of points given in the coordinate system."""
        return (np.asarray(y) - self.y0) / self.sy, (np.asarray(x) - self.x0) / self.sx

    def transformation(self):
        """The spatialdata transformation placing this grid in its coordinate system."""
        from spatialdata.transformations import Identity, Scale, Sequence, Translation

        steps = []
        if (self.sy, self.sx) != (1.0, 1.0):
            steps.append(Scale([self.sy, self.sx], axes=("y", "x")))
        if (self.y0, self.x0) != (0.0, 0.0):
            steps.append(Translation([self.y0, self.x0], axes=("y", "x")))
        if not steps:
            return Identity()
        return steps[0] if len(steps) == 1 else Sequence(steps)

    def crop(self, row: int, col: int, height: int, width: int) -> RasterGeometry:
        """The geometry of the window ``[row:row+height, col:col+width]`` of this grid (may extend past it)."""
        return RasterGeometry(
            y0=self.y0 + row * self.sy, x0=self.x0 + col * self.sx, sy=self.sy, sx=self.sx, height=height, width=width
        )


def transform_matrix(element: Any, *, coordinate_system: str = COORDINATE_SYSTEM, arg: str = "element") -> np.ndarray:
    """3x3 affine matrix mapping ``(x, y, 1)`` of the element to ``coordinate_system``."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if coordinate_system not in transforms:
        raise ValueError(
            f"`{arg}` has no transformation to the coordinate system {coordinate_system!r} "
            f"(it has: {sorted(transforms)}). Register it with "
            f"`spatialdata.transformations.set_transformation(element, transform, {coordinate_system!r})`, "
            "with the transform in micrometres."
        )
    return np.asarray(
        transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float
    )


def raster_geometry(
    element: Any, *, coordinate_system: str = COORDINATE_SYSTEM, arg: str = "element"
) -> RasterGeometry:
    """Pixel size and origin of a raster element in ``coordinate_system`` (must be axis-aligned, no flip)."""
    data = scale0(element)
    m = transform_matrix(element, coordinate_system=coordinate_system, arg=arg)
    if abs(m[0, 1]) > 1e-9 or abs(m[1, 0]) > 1e-9:
        raise ValueError(
            f"`{arg}` is rotated or sheared in {coordinate_system!r} (affine {m[:2].tolist()}); c3diff needs an "
            "axis-aligned raster. Resample it onto an axis-aligned grid first (e.g. `spatialdata.transform`)."
        )
    sx, sy = m[0, 0], m[1, 1]
    if sx <= 0 or sy <= 0:
        raise ValueError(f"`{arg}` has a non-positive pixel size ({sy}, {sx}) in {coordinate_system!r} (flipped axes).")
    return RasterGeometry(
        y0=float(m[1, 2]),
        x0=float(m[0, 2]),
        sy=float(sy),
        sx=float(sx),
        height=int(data.sizes["y"]),
        width=int(data.sizes["x"]),
    )


def level_geometries(
    element: Any, *, coordinate_system: str = COORDINATE_SYSTEM, arg: str = "element"
) -> list[tuple[xr.DataArray, RasterGeometry]]:
    """Each pyramid level of a raster with its own geometry, finest first (levels share the level-0 transform)."""
    base = raster_geometry(element, coordinate_system=coordinate_system, arg=arg)
    out = []
    for level in raster_levels(element):
        h, w = int(level.sizes["y"]), int(level.sizes["x"])
        out.append((level, RasterGeometry(base.y0, base.x0, base.sy * base.height / h, base.sx * base.width / w, h, w)))
    return out


def is_integer(value: float, tol: float = 1e-6) -> bool:
    """Whether ``value`` is a whole number up to a relative tolerance (grid ratios and offsets)."""
    return abs(value - round(value)) < tol * max(1.0, abs(value))


def grid_for(
    *,
    bin_size: float,
    image_geometry: RasterGeometry | None,
    origin: tuple[float, float] | None,
    data_extent: tuple[float, float, float, float] | None,
) -> RasterGeometry:
    """A grid of ``bin_size`` squares: anchored at ``origin`` (or the image's corner, else the coordinate origin or
    the data's minimum snapped to the bin size) and covering the image (or else the data).

    Examples
    --------
    >>> image = RasterGeometry(y0=0.0, x0=0.0, sy=0.5, sx=0.5, height=250, width=410)
    >>> grid_for(bin_size=100.0, image_geometry=image, origin=None, data_extent=None)
    RasterGeometry(y0=0.0, x0=0.0, sy=100.0, sx=100.0, height=2, width=3)
    """
    if image_geometry is not None:
        ymin, xmin, ymax, xmax = image_geometry.extent
        y0, x0 = origin if origin is not None else (ymin, xmin)
    else:
        if data_extent is None:
            raise ValueError("A grid needs an image or data to cover.")
        ymin, xmin, ymax, xmax = data_extent
        if origin is not None:
            y0, x0 = origin
        else:
            y0 = 0.0 if ymin >= 0 else math.floor(ymin / bin_size) * bin_size
            x0 = 0.0 if xmin >= 0 else math.floor(xmin / bin_size) * bin_size
    height = max(1, math.ceil((ymax - y0) / bin_size - 1e-9))
    width = max(1, math.ceil((xmax - x0) / bin_size - 1e-9))
    return RasterGeometry(y0=float(y0), x0=float(x0), sy=bin_size, sx=bin_size, height=height, width=width)


def points_feature_key(points: Any, *, arg: str = "points_key") -> str:
    """The column of a PointsModel element that names each point's gene."""
    key = points.attrs.get("spatialdata_attrs", {}).get("feature_key")
    if key is None:
        if "gene" in points.columns:
            return "gene"
        raise ValueError(
            f"`{arg}` has no feature key: parse the points with `PointsModel.parse(..., feature_key='gene')` so "
            "c3diff knows which column holds the gene names."
        )
    return key


def points_genes(points: Any, feature_key: str) -> list[str]:
    """Gene names of a points element, in category order when the column is categorical."""
    column = points[feature_key]
    if hasattr(column, "cat") and column.cat.known:
        return [str(g) for g in column.cat.categories]
    return sorted(str(g) for g in column.unique().compute())
