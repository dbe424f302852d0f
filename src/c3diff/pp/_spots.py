"""Spot tables (Visium, legacy ST) -> low-resolution gene raster with a coverage mask."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from c3diff._constants import ATTRS_KEY, COORDINATE_SYSTEM, LR_PIXEL_SIZE
from c3diff._provenance import record
from c3diff._validation import check_genes, get_element, raster_geometry, transform_matrix
from c3diff._validation import check_table_counts
from c3diff.pp._binning import grid_for

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

#: Values of the coverage mask written next to an LR grid.
MASK_OUTSIDE, MASK_MEASURED, MASK_FILLED = 0, 1, 2


@dataclass(frozen=True)
class Spots:
    """Measured spots in micrometres: centres ``(n, 2)`` as (y, x), one radius, counts ``(n, genes)``."""

    centres: np.ndarray
    radius: float
    counts: np.ndarray
    genes: list[str]
    spot_ids: np.ndarray
    pitch: float

    @property
    def area(self) -> float:
        return math.pi * self.radius**2


def _counts_matrix(adata: AnnData, genes: list[str]) -> np.ndarray:
    from scipy import sparse

    x = adata[:, genes].X
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    return x.astype(np.float32)


def spots_from_table(
    sdata: SpatialData,
    table_key: str,
    *,
    genes: list[str] | None = None,
    in_tissue_only: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> Spots:
    """Centres, radius and counts of the spots a table annotates, in ``coordinate_system`` micrometres."""
    table = get_element(sdata, table_key, "tables", arg="table_key")
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    region = region[0] if isinstance(region, list) and len(region) == 1 else region
    if not isinstance(region, str) or region not in sdata.shapes:
        raise ValueError(
            f"`table_key={table_key!r}` must annotate one circles element of `sdata.shapes` (its region is "
            f"{region!r}; shapes: {sorted(sdata.shapes)}). Parse it with `TableModel.parse(adata, region=..., "
            "region_key=..., instance_key=...)`."
        )
    shapes = sdata.shapes[region]
    if "radius" not in shapes.columns:
        raise ValueError(f"The shapes {region!r} annotated by `table_key={table_key!r}` are not circles (no radius).")
    genes = list(map(str, table.var_names)) if genes is None else check_genes(genes, list(map(str, table.var_names)))

    instance_key = attrs.get("instance_key")
    obs = table.obs
    rows = np.ones(table.n_obs, dtype=bool)
    if in_tissue_only and "in_tissue" in obs:
        rows &= obs["in_tissue"].to_numpy(dtype=bool)
    if instance_key is not None and instance_key in obs:
        ids = obs[instance_key].to_numpy()
        found = np.isin(ids, shapes.index.to_numpy())
        if not found.all():
            raise ValueError(
                f"{int((~found).sum())} spot(s) of `table_key={table_key!r}` have no circle in shapes {region!r} "
                f"(instance key {instance_key!r}), e.g. {ids[~found][:3].tolist()}."
            )
        geometry = shapes.loc[ids[rows]]
    else:
        if len(shapes) != table.n_obs:
            raise ValueError(f"`table_key={table_key!r}` has no instance key and a different length than {region!r}.")
        geometry = shapes[rows]
    if rows.sum() == 0:
        raise ValueError(f"`table_key={table_key!r}` has no spot under tissue (obs['in_tissue'] is all False).")

    m = transform_matrix(shapes, coordinate_system=coordinate_system, arg=f"shapes {region!r}")
    x, y = geometry.geometry.x.to_numpy(), geometry.geometry.y.to_numpy()
    centres = np.stack([m[1, 0] * x + m[1, 1] * y + m[1, 2], m[0, 0] * x + m[0, 1] * y + m[0, 2]], axis=1)
    linear_scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))
    radius = float(np.median(geometry["radius"].to_numpy()) * linear_scale)

    layout = table.uns.get(ATTRS_KEY, {}).get("spots", {})
    pitch = layout.get("pitch_um")
    if pitch is None:
        from scipy.spatial import cKDTree

        if len(centres) < 2:
            raise ValueError(f"`table_key={table_key!r}`: need at least two spots to infer their pitch.")
        pitch = float(np.median(cKDTree(centres).query(centres, k=2)[0][:, 1]))
    return Spots(
        centres=centres,
        radius=radius,
        counts=_counts_matrix(table[rows], genes),
        genes=genes,
        spot_ids=obs.index.to_numpy()[rows],
        pitch=float(pitch),
    )


def spots_to_grid(
    sdata: SpatialData,
    *,
    table_key: str,
    pixel_size: float = LR_PIXEL_SIZE,
    genes: list[str] | None = None,
    image_key: str | None = None,
    origin: tuple[float, float] | None = None,
    fill: Literal["linear", "nearest", "none"] = "linear",
    key_added: str | None = None,
    inplace: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> tuple[xr.DataArray, xr.DataArray] | None:
    """Turn a spot table into a low-resolution gene raster (default 100 um/px) with a coverage mask.

    Each spot's counts are converted to a density, the expected count in one ``pixel_size`` square
    (``counts * pixel_size**2 / spot_area``), so that rasters from Visium (55 um spots), legacy ST (100 um spots) and
    binned transcripts share one unit: counts per pixel.

    How pixels get values:

    - *measured* (mask 1): the pixel contains one or more spot centres; its value is their mean density;
    - *filled* (mask 2): a gap pixel whose centre lies within one spot pitch of a spot centre (under tissue); with
      ``fill="linear"`` it gets the linear (Delaunay) interpolation of the spot densities at its centre, or the
      nearest spot's density outside the spots' convex hull; ``fill="nearest"`` always uses the nearest spot;
      ``fill="none"`` leaves it 0;
    - *outside* (mask 0): farther than one pitch from every spot; value 0.

    Parameters
    ----------
    sdata
        SpatialData holding the table and the circles it annotates.
    table_key
        Key of the spot table in ``sdata.tables`` (raw counts; ``obs["in_tissue"]`` honoured when present).
    pixel_size
        Edge of a grid pixel in micrometres (the paper's LR maps: 100).
    genes
        Genes, in channel order. Default: all genes of the table.
    image_key
        Align the grid with this image (the grid starts at its top-left corner and covers it).
    origin
        ``(y, x)`` of the grid's corner, overriding the default (the image's corner, else ``(0, 0)`` or the spots'
        minimum snapped to ``pixel_size``).
    fill
        How gap pixels are filled (above).
    key_added
        Key of the new image; the mask is written as the labels ``f"{key_added}_mask"``.
        Default ``f"{table_key}_grid"``.
    inplace
        Write both elements (and return ``None``); otherwise return ``(raster, mask)``.
    coordinate_system
        Coordinate system (in micrometres) of the grid.

    Returns
    -------
    ``None``, or with ``inplace=False`` the raster (Image2DModel, ``c`` = genes, float32 counts per pixel) and the
    mask (Labels2DModel, uint8 values 0/1/2 as above).

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> c3.pp.spots_to_grid(sdata, table_key="visium_table", image_key="hne")  # doctest: +SKIP
    >>> sdata["visium_table_grid"], sdata["visium_table_grid_mask"]  # doctest: +SKIP
    """
    check_table_counts(sdata, table_key, genes=genes)
    from scipy.interpolate import LinearNDInterpolator
    from scipy.spatial import cKDTree
    from spatialdata.models import Image2DModel, Labels2DModel

    if not (isinstance(pixel_size, int | float) and pixel_size > 0):
        raise ValueError(f"`pixel_size` must be a positive number of micrometres, got {pixel_size!r}.")
    if fill not in ("linear", "nearest", "none"):
        raise ValueError(f"`fill` must be 'linear', 'nearest' or 'none', got {fill!r}.")
    pixel_size = float(pixel_size)
    spots = spots_from_table(sdata, table_key, genes=genes, coordinate_system=coordinate_system)
    image_geometry = None
    if image_key is not None:
        image_geometry = raster_geometry(
            get_element(sdata, image_key, "images", arg="image_key"), coordinate_system=coordinate_system,
            arg="image_key",
        )
        ymin, xmin, ymax, xmax = image_geometry.extent
        outside = (
            (spots.centres[:, 0] < ymin) | (spots.centres[:, 0] >= ymax)
            | (spots.centres[:, 1] < xmin) | (spots.centres[:, 1] >= xmax)
        )
        if outside.all():
            raise ValueError(
                f"No spot of `table_key={table_key!r}` lies on `image_key={image_key!r}` (image extent y {ymin:.0f}.."
                f"{ymax:.0f}, x {xmin:.0f}..{xmax:.0f} um); the two are not registered to the same coordinate system."
            )
        if outside.any():
            warnings.warn(
                f"spots_to_grid: {int(outside.sum())} spot(s) lie outside `image_key={image_key!r}` and are left out.",
                UserWarning,
                stacklevel=2,
            )
    r = spots.radius
    extent = (
        spots.centres[:, 0].min() - r, spots.centres[:, 1].min() - r,
        spots.centres[:, 0].max() + r, spots.centres[:, 1].max() + r,
    )
    grid = grid_for(bin_size=pixel_size, image_geometry=image_geometry, origin=origin, data_extent=extent)

    density = spots.counts * (pixel_size**2 / spots.area)
    n_genes = len(spots.genes)
    values = np.zeros((n_genes, grid.height * grid.width), dtype=np.float64)
    hits = np.zeros(grid.height * grid.width, dtype=np.int64)
    row = np.floor((spots.centres[:, 0] - grid.y0) / pixel_size).astype(np.int64)
    col = np.floor((spots.centres[:, 1] - grid.x0) / pixel_size).astype(np.int64)
    on_grid = (row >= 0) & (row < grid.height) & (col >= 0) & (col < grid.width)
    flat = row[on_grid] * grid.width + col[on_grid]
    np.add.at(hits, flat, 1)
    for g in range(n_genes):
        np.add.at(values[g], flat, density[on_grid, g])
    measured = hits > 0
    values[:, measured] /= hits[measured]
    mask = np.where(measured, MASK_MEASURED, MASK_OUTSIDE).astype(np.uint8)

    cy, cx = grid.pixel_centres()
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    centres_grid = np.stack([yy.ravel(), xx.ravel()], axis=1)
    tree = cKDTree(spots.centres)
    distance, nearest = tree.query(centres_grid)
    gaps = (~measured) & (distance <= spots.pitch)
    mask[gaps] = MASK_FILLED
    if fill != "none" and gaps.any():
        nearest_values = density[nearest[gaps]].T
        if fill == "linear" and len(spots.centres) >= 3:
            try:
                interpolated = LinearNDInterpolator(spots.centres, density)(centres_grid[gaps]).T
            except Exception:  # degenerate layouts (all spots on a line): fall back to nearest
                interpolated = np.full_like(nearest_values, np.nan)
            values[:, gaps] = np.where(np.isnan(interpolated), nearest_values, interpolated)
        else:
            values[:, gaps] = nearest_values

    transformation = grid.transformation()
    raster = Image2DModel.parse(
        values.reshape(n_genes, grid.height, grid.width).astype(np.float32),
        dims=("c", "y", "x"),
        c_coords=spots.genes,
        transformations={coordinate_system: transformation},
        chunks={"c": 1, "y": min(grid.height, 1024), "x": min(grid.width, 1024)},
    )
    mask_element = Labels2DModel.parse(
        mask.reshape(grid.height, grid.width), dims=("y", "x"), transformations={coordinate_system: transformation}
    )
    if not inplace:
        return raster, mask_element
    key = key_added or f"{table_key}_grid"
    sdata.images[key] = raster
    sdata.labels[f"{key}_mask"] = mask_element
    record(
        sdata, key, "spots_to_grid", table_key=table_key, pixel_size=pixel_size, fill=fill, image_key=image_key,
        origin=(grid.y0, grid.x0), n_spots=len(spots.centres), spot_radius_um=spots.radius, pitch_um=spots.pitch,
        n_measured=int(measured.sum()), n_filled=int(gaps.sum()), units="counts per pixel",
    )
    return None
