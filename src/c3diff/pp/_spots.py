"""Spot tables (Visium, legacy ST) -> low-resolution gene raster with a coverage mask."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from c3diff._constants import (
    ATTRS_KEY,
    COORDINATE_SYSTEM,
    LR_PIXEL_SIZE,
    MASK_FILLED,
    MASK_MEASURED,
    MASK_OUTSIDE,
)
from c3diff._geometry import grid_for, raster_geometry, transform_matrix
from c3diff._provenance import record
from c3diff._validation import check_genes, check_table_counts, get_element

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData


@dataclass(frozen=True)
class Spots:
    """Measured spots in micrometres: centres ``(n, 2)`` as (y, x), one radius, counts ``(n, genes)``, and each
    spot's library size ``(n,)`` (``obs["total_counts"]`` when the table has it, else its counts over all genes)."""

    centres: np.ndarray
    radius: float
    counts: np.ndarray
    genes: list[str]
    spot_ids: np.ndarray
    pitch: float
    library: np.ndarray | None = None

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
        library=_library(table, rows),
    )


def _library(table: AnnData, rows: np.ndarray) -> np.ndarray:
    """Library size of the selected spots: ``obs["total_counts"]`` if present, else the counts over all genes."""
    from scipy import sparse

    if "total_counts" in table.obs:
        return table.obs["total_counts"].to_numpy(dtype=np.float64)[rows]
    x = table.X[rows]
    return np.asarray(x.sum(axis=1) if sparse.issparse(x) else np.sum(x, axis=1), dtype=np.float64).ravel()


#: Spots above which the thin-plate RBF of :func:`spots_to_grid` is local (each point uses its nearest spots).
RBF_GLOBAL_MAX = 2000
#: Nearest spots used per point by the local thin-plate RBF.
RBF_NEIGHBOURS = 64
#: Points per pixel edge at which the RBF surface is averaged into a pixel.
RBF_SUBSAMPLES = 3
#: Counts per spot that a gene's share of the library is scaled to before ``log1p`` (scanpy's CP10k).
NORMALIZE_TARGET_SUM = 1e4


def _rbf_pixel_means(
    centres: np.ndarray, density: np.ndarray, library: np.ndarray, pixel_centres: np.ndarray, pixel_size: float
) -> np.ndarray:
    """Densities ``(n_spots, genes)`` at ``centres`` interpolated by thin-plate RBF and averaged over each pixel
    square (centres ``(n_pixels, 2)``): ``(n_pixels, genes)``.

    A density is interpolated as library x composition: the library density (``library`` scaled like ``density``)
    as ``log1p`` (it stays positive between dense and sparse spots), and each gene's share of the library as
    ``log1p(share * 1e4)``, the scale on which expression is compared (scanpy's ``normalize_total`` + ``log1p``), so
    that values normalised by the library read back as the RBF of the spots' normalised values. Fewer than 3 spots,
    or spots on one line, fall back to the nearest spot."""
    from scipy.interpolate import RBFInterpolator
    from scipy.spatial import cKDTree

    offsets = (np.arange(RBF_SUBSAMPLES) + 0.5) / RBF_SUBSAMPLES - 0.5
    dy, dx = np.meshgrid(offsets * pixel_size, offsets * pixel_size, indexing="ij")
    points = (pixel_centres[:, None, :] + np.stack([dy.ravel(), dx.ravel()], axis=1)[None]).reshape(-1, 2)
    library = np.maximum(np.asarray(library, dtype=np.float64), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(library[:, None] > 0, density / library[:, None], 0.0)
    known = np.column_stack([np.log1p(library), np.log1p(share * NORMALIZE_TARGET_SUM)])
    # centred and scaled coordinates keep the thin-plate system well conditioned on slides in micrometres
    shift, scale = centres.mean(axis=0), max(float(centres.std()), 1.0)
    try:
        if len(centres) < 3:
            raise np.linalg.LinAlgError("fewer than 3 spots")
        neighbours = None if len(centres) <= RBF_GLOBAL_MAX else RBF_NEIGHBOURS
        surface = RBFInterpolator((centres - shift) / scale, known, kernel="thin_plate_spline", neighbors=neighbours)(
            (points - shift) / scale
        )
    except (np.linalg.LinAlgError, ValueError):  # degenerate layouts (spots on one line): nearest spot
        surface = known[cKDTree(centres).query(points)[1]]
    values = np.expm1(np.maximum(surface, 0.0))
    values = values[:, :1] * values[:, 1:] / NORMALIZE_TARGET_SUM
    return values.reshape(len(pixel_centres), RBF_SUBSAMPLES**2, -1).mean(axis=1)


def spots_to_grid(
    sdata: SpatialData,
    *,
    table_key: str,
    pixel_size: float = LR_PIXEL_SIZE,
    genes: list[str] | None = None,
    image_key: str | None = None,
    origin: tuple[float, float] | None = None,
    fill: Literal["rbf", "linear", "nearest", "none"] = "rbf",
    key_added: str | None = None,
    inplace: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> tuple[xr.DataArray, xr.DataArray] | None:
    """Turn a spot table into a low-resolution gene raster (default 100 um/px) with a coverage mask.

    Each spot's counts are converted to a density, the expected count in one ``pixel_size`` square
    (``counts * pixel_size**2 / spot_area``), so that rasters from Visium (55 um spots), legacy ST (100 um spots) and
    binned transcripts share one unit: counts per pixel.

    Coverage mask, the same for every ``fill``:

    - *measured* (mask 1): the pixel contains one or more spot centres;
    - *filled* (mask 2): a gap pixel that comes within one spot pitch of a spot centre (under tissue): its centre
      lies within one pitch plus half the pixel's diagonal;
    - *outside* (mask 0): farther than that from every spot; value 0.

    How measured and filled pixels get values (``fill``):

    - ``"rbf"`` (default): the spot densities are interpolated by a thin-plate radial basis function
      (:class:`scipy.interpolate.RBFInterpolator`; with more than :data:`RBF_GLOBAL_MAX` spots, each point uses its
      :data:`RBF_NEIGHBOURS` nearest spots) and each pixel holds the mean of that surface over its square
      (:data:`RBF_SUBSAMPLES` x :data:`RBF_SUBSAMPLES` points). A density is interpolated as the spot's library
      size (``obs["total_counts"]`` if the table has it, else its counts over all genes; on a ``log1p`` scale) times
      the gene's share of it (on scanpy's ``log1p(share * 1e4)`` scale), so values stay non-negative and values
      normalised by the library interpolate as the spots' normalised values do. The raster therefore follows the
      spots' geometry: summed over a spot's disc (:func:`c3diff.tl.sample_at_spots`) it gives back about that
      spot's counts, and read back at other spots it scores as thin-plate RBF of the spots does
      (``docs/benchmarks/real_pool_recover.md``);
    - ``"linear"``: measured pixels hold the mean density of the spots whose centres they contain; gap pixels get
      the linear (Delaunay) interpolation of the spot densities at their centre, or the nearest spot's density
      outside the spots' convex hull (the default before thin-plate RBF);
    - ``"nearest"``: as ``"linear"``, but gap pixels take the nearest spot's density;
    - ``"none"``: as ``"linear"``, but gap pixels stay 0.

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
        How measured and gap pixels get values (above).
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
    if fill not in ("rbf", "linear", "nearest", "none"):
        raise ValueError(f"`fill` must be 'rbf', 'linear', 'nearest' or 'none', got {fill!r}.")
    pixel_size = float(pixel_size)
    spots = spots_from_table(sdata, table_key, genes=genes, coordinate_system=coordinate_system)
    image_geometry = None
    if image_key is not None:
        image_geometry = raster_geometry(
            get_element(sdata, image_key, "images", arg="image_key"),
            coordinate_system=coordinate_system,
            arg="image_key",
        )
        ymin, xmin, ymax, xmax = image_geometry.extent
        outside = (
            (spots.centres[:, 0] < ymin)
            | (spots.centres[:, 0] >= ymax)
            | (spots.centres[:, 1] < xmin)
            | (spots.centres[:, 1] >= xmax)
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
        spots.centres[:, 0].min() - r,
        spots.centres[:, 1].min() - r,
        spots.centres[:, 0].max() + r,
        spots.centres[:, 1].max() + r,
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
    # a gap pixel is filled when some point of it lies within one pitch of a spot centre
    gaps = (~measured) & (distance - pixel_size / math.sqrt(2) <= spots.pitch)
    mask[gaps] = MASK_FILLED
    if fill == "rbf":
        inside = measured | gaps
        library = spots.library * (pixel_size**2 / spots.area)
        values[:, inside] = _rbf_pixel_means(spots.centres, density, library, centres_grid[inside], pixel_size).T
    elif fill != "none" and gaps.any():
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
        sdata,
        key,
        "spots_to_grid",
        table_key=table_key,
        pixel_size=pixel_size,
        fill=fill,
        image_key=image_key,
        origin=(grid.y0, grid.x0),
        n_spots=len(spots.centres),
        spot_radius_um=spots.radius,
        pitch_um=spots.pitch,
        n_measured=int(measured.sum()),
        n_filled=int(gaps.sum()),
        units="counts per pixel",
    )
    return None
