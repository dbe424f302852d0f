"""Checks made at the boundary of every public function, with messages that say how to fix the input."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from spatialdata import SpatialData

_KINDS = ("images", "labels", "points", "shapes", "tables")


def get_element(sdata: SpatialData, key: str, kind: str, *, arg: str) -> Any:
    """Return ``sdata.<kind>[key]`` or raise a ``KeyError`` naming the argument and the keys that exist."""
    if kind not in _KINDS:
        raise ValueError(f"Unknown element kind {kind!r}; expected one of {_KINDS}.")
    if not isinstance(key, str):
        raise TypeError(f"`{arg}` must be a string naming an element of `sdata.{kind}`, got {type(key).__name__}.")
    elements = getattr(sdata, kind)
    if key not in elements:
        available = sorted(elements.keys())
        elsewhere = [k for k in _KINDS if k != kind and key in getattr(sdata, k)]
        hint = f" {key!r} is in `sdata.{elsewhere[0]}`, not `sdata.{kind}`." if elsewhere else ""
        raise KeyError(f"`{arg}={key!r}` is not in `sdata.{kind}` (available: {available}).{hint}")
    return elements[key]


def scale0(element: Any) -> xr.DataArray:
    """The full-resolution ``DataArray`` of a raster element (level 0 of a multiscale ``DataTree``)."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return element
    if isinstance(element, xr.DataTree):
        node = element["scale0"]
        return next(iter(node.ds.data_vars.values()))
    raise TypeError(f"Expected a raster element (xarray DataArray or DataTree), got {type(element).__name__}.")


def raster_levels(element: Any) -> list[xr.DataArray]:
    """All resolution levels of a raster element, finest first (a single-scale image gives one level)."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return [element]
    levels = []
    for name in sorted(element.children, key=lambda n: int(n.removeprefix("scale"))):
        levels.append(next(iter(element[name].ds.data_vars.values())))
    return levels


@dataclass(frozen=True)
class RasterGeometry:
    """Axis-aligned placement of a raster in a coordinate system: pixel ``(i, j)`` covers
    ``[y0 + i*sy, y0 + (i+1)*sy) x [x0 + j*sx, x0 + (j+1)*sx)``."""

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


def raster_geometry(element: Any, *, coordinate_system: str = COORDINATE_SYSTEM, arg: str = "element") -> RasterGeometry:
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
        y0=float(m[1, 2]), x0=float(m[0, 2]), sy=float(sy), sx=float(sx),
        height=int(data.sizes["y"]), width=int(data.sizes["x"]),
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


def check_genes(requested: Iterable[str], available: Sequence[str], *, arg: str = "genes") -> list[str]:
    """Return ``requested`` as a list, raising a ``KeyError`` that lists the unknown genes."""
    requested = [requested] if isinstance(requested, str) else list(requested)
    if len(requested) == 0:
        raise ValueError(f"`{arg}` is empty; pass at least one gene name.")
    known = set(available)
    missing = [g for g in requested if g not in known]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise KeyError(f"`{arg}`: {len(missing)} gene(s) not found: {shown}. Available genes include "
                       f"{list(available)[:8]}.")
    duplicated = sorted({g for g in requested if requested.count(g) > 1})
    if duplicated:
        raise ValueError(f"`{arg}` lists genes more than once: {duplicated}.")
    return requested
