"""Transcripts -> gene raster (counts per square bin)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM
from c3diff._geometry import (
    grid_for,
    points_feature_key,
    points_genes,
    raster_geometry,
    transform_matrix,
)
from c3diff._provenance import record
from c3diff._validation import check_genes, get_element

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from spatialdata import SpatialData


def _gene_codes(column, gene_index: dict[str, int]) -> np.ndarray:
    """Index of each transcript's gene in ``gene_index`` (-1 for other genes), without per-row strings when the
    column is categorical (millions of transcripts per partition)."""
    import pandas as pd

    if isinstance(column.dtype, pd.CategoricalDtype):
        lut = np.array([gene_index.get(str(c), -1) for c in column.cat.categories] + [-1], dtype=np.int64)
        return lut[column.cat.codes.to_numpy()]  # code -1 (missing) picks the trailing -1
    return column.astype(str).map(gene_index).fillna(-1).to_numpy(dtype=np.int64)


def bin_transcripts(
    sdata: SpatialData,
    *,
    points_key: str = "transcripts",
    bin_size: float = 10.0,
    genes: list[str] | None = None,
    image_key: str | None = None,
    origin: tuple[float, float] | None = None,
    key_added: str | None = None,
    inplace: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> xr.DataArray | None:
    """Count transcripts per gene in square bins: a gene raster (one channel per gene).

    Parameters
    ----------
    sdata
        SpatialData with a points element of transcripts.
    points_key
        Key of the transcripts in ``sdata.points`` (a PointsModel with a feature key naming the gene).
    bin_size
        Bin edge length in micrometres (units of ``coordinate_system``), e.g. 10 for 10x ground truth, 100 for LR.
    genes
        Genes to count, in channel order. Default: every gene of the points element.
    image_key
        Align the grid with this image (usually the H&E): the grid starts at the image's top-left corner and covers
        the image; transcripts outside the image are left out, with a warning giving their number.
    origin
        ``(y, x)`` of the grid's top-left corner, overriding the default (the image's corner; without an image,
        ``(0, 0)`` or the transcripts' minimum snapped down to a multiple of ``bin_size``). Rasters made with the same
        origin nest exactly: bins of 10 um pooled 10 x 10 equal bins of 100 um.
    key_added
        Key of the new image. Default ``f"{points_key}_bin{bin_size:g}um"``.
    inplace
        Write the raster into ``sdata.images`` (and return ``None``); otherwise return it.
    coordinate_system
        Coordinate system (in micrometres) of the grid.

    Returns
    -------
    ``None``, or with ``inplace=False`` the raster: an Image2DModel DataArray ``(c, y, x)`` of float32 counts with
    ``c`` = genes and a transformation (``Scale(bin_size)`` then ``Translation(origin)``) to ``coordinate_system``.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=640, height=640, seed=0)  # doctest: +SKIP
    >>> c3.pp.bin_transcripts(sdata, bin_size=10, image_key="hne")  # doctest: +SKIP
    >>> sdata["transcripts_bin10um"].sizes  # doctest: +SKIP
    """
    from spatialdata.models import Image2DModel

    if not (isinstance(bin_size, int | float) and bin_size > 0 and math.isfinite(bin_size)):
        raise ValueError(f"`bin_size` must be a positive number of micrometres, got {bin_size!r}.")
    bin_size = float(bin_size)
    points = get_element(sdata, points_key, "points", arg="points_key")
    feature_key = points_feature_key(points)
    all_genes = points_genes(points, feature_key)
    genes = all_genes if genes is None else check_genes(genes, all_genes)
    gene_index = {g: i for i, g in enumerate(genes)}
    matrix = transform_matrix(points, coordinate_system=coordinate_system, arg="points_key")

    image_geometry = None
    if image_key is not None:
        image = get_element(sdata, image_key, "images", arg="image_key")
        image_geometry = raster_geometry(image, coordinate_system=coordinate_system, arg="image_key")

    def to_cs(frame) -> tuple[np.ndarray, np.ndarray]:
        x = frame["x"].to_numpy(dtype=float)
        y = frame["y"].to_numpy(dtype=float)
        return matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2], matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]

    partitions = points[["x", "y", feature_key]].to_delayed()
    data_extent = None
    if image_geometry is None:
        lo = points[["x", "y"]].min().compute()
        hi = points[["x", "y"]].max().compute()
        corners_x = np.array([lo["x"], hi["x"], lo["x"], hi["x"]], dtype=float)
        corners_y = np.array([lo["y"], lo["y"], hi["y"], hi["y"]], dtype=float)
        cy = matrix[1, 0] * corners_x + matrix[1, 1] * corners_y + matrix[1, 2]
        cx = matrix[0, 0] * corners_x + matrix[0, 1] * corners_y + matrix[0, 2]
        # the far edge is inclusive: nudge it so a transcript exactly on it still gets a bin
        data_extent = (cy.min(), cx.min(), np.nextafter(cy.max(), np.inf), np.nextafter(cx.max(), np.inf))
    grid = grid_for(bin_size=bin_size, image_geometry=image_geometry, origin=origin, data_extent=data_extent)

    n_pixels = grid.height * grid.width
    counts = np.zeros(len(genes) * n_pixels, dtype=np.float32)
    n_outside = 0
    for part in partitions:
        frame = part.compute()
        if len(frame) == 0:
            continue
        codes = _gene_codes(frame[feature_key], gene_index)
        keep = codes >= 0
        y, x = to_cs(frame)
        unplaced = ~(np.isfinite(y) & np.isfinite(x))
        if unplaced.any():
            raise ValueError(
                f"`points_key={points_key!r}`: {int(unplaced.sum())} transcript(s) of this partition have no finite "
                f"x/y position (index {frame.index[unplaced][:5].tolist()}); a transcript without a position cannot "
                "be binned. Drop them and parse the points again, e.g. "
                "`PointsModel.parse(frame.dropna(subset=['x', 'y']), feature_key=...)`."
            )
        row = np.floor((y - grid.y0) / bin_size)
        col = np.floor((x - grid.x0) / bin_size)
        inside = (row >= 0) & (row < grid.height) & (col >= 0) & (col < grid.width)
        n_outside += int((keep & ~inside).sum())
        keep &= inside
        flat = (
            codes[keep].astype(np.int64) * n_pixels
            + row[keep].astype(np.int64) * grid.width
            + col[keep].astype(np.int64)
        )
        values, n = np.unique(flat, return_counts=True)
        counts[values] += n
    if n_outside:
        warnings.warn(
            f"bin_transcripts: {n_outside} transcript(s) of the selected genes lie outside the grid "
            f"(the extent of `image_key={image_key!r}`) and were not counted.",
            UserWarning,
            stacklevel=2,
        )
    if counts.sum() == 0:
        raise ValueError(
            f"No transcripts of the selected genes fall on the grid of `points_key={points_key!r}`; check `genes` and "
            f"that the points and `image_key` share the coordinate system {coordinate_system!r}."
        )

    raster = Image2DModel.parse(
        counts.reshape(len(genes), grid.height, grid.width),
        dims=("c", "y", "x"),
        c_coords=genes,
        transformations={coordinate_system: grid.transformation()},
        chunks={"c": 1, "y": min(grid.height, 1024), "x": min(grid.width, 1024)},
    )
    if not inplace:
        return raster
    key = key_added or f"{points_key}_bin{bin_size:g}um"
    sdata.images[key] = raster
    record(
        sdata,
        key,
        "bin_transcripts",
        points_key=points_key,
        bin_size=bin_size,
        image_key=image_key,
        origin=(grid.y0, grid.x0),
        n_genes=len(genes),
        n_outside=n_outside,
    )
    return None


__all__ = ["bin_transcripts"]
