"""Noise-free expected transcript counts of a simulated section, on a gene-raster grid (a benchmark's noise ceiling)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from c3diff._constants import Key
from c3diff._geometry import grid_for, raster_geometry, scale0
from c3diff._validation import check_genes, get_element

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: Sigma (um) of the positional jitter that :func:`~c3diff.datasets._expression.place_transcripts` adds.
_DIFFUSION = 0.6
#: Quadrature points per um^2 of a cell's disc or nucleus (at least ``_MIN_POINTS`` per cell).
_POINT_DENSITY = 2.0
_MIN_POINTS = 48
_GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))
_CHUNK_POINTS = 400_000


def expected_counts(
    sdata: SpatialData,
    *,
    genes: Sequence[str] | None = None,
    pixel_size: float = 10.0,
    image_key: str | None = Key.HNE.value,
    origin: tuple[float, float] | None = None,
    labels_key: str = Key.CELL_LABELS.value,
    table_key: str = Key.CELL_TABLE.value,
) -> np.ndarray:
    """Expected transcript counts per gene and pixel of a simulated section: the map without counting noise.

    :func:`simulate_section` draws each cell's counts as gamma-Poisson around an expectation (library x type
    programme x spatial fields x clonal and cycling factors, stored in ``cell_table.layers["expected"]``), places the
    transcripts in the cell and adds uniform background transcripts. This function spreads each cell's expectation
    over the section the way the transcripts are placed and adds the background's expected density, so that the
    result is the mean of :func:`c3diff.pp.bin_transcripts` over repeated draws of the counts for the same cells. Scored
    against the observed counts (e.g. with :func:`c3diff.metrics.score_maps`), it gives the best score any prediction
    can expect: the benchmark's noise ceiling.

    What is modelled, as in the simulator: the nucleus share of each cell (a cell that is mostly nucleus keeps more of
    its transcripts there) spread uniformly over the nucleus ellipse; the rest spread uniformly over the part of the
    cell's disc (a rim for adipocytes) that the cell-label raster gives to the cell, the share that the simulator
    cannot place there after its four tries going to the nucleus; the 0.6 um positional jitter and the clipping of
    positions to the section; the background on tissue and (a tenth of it) on glass, split over genes by the
    simulated background profile. The areas are integrated with a fixed set of points per cell (about two per um^2),
    so a pixel's value is exact up to that quadrature. What is not modelled: nothing random is averaged beyond the
    counts and positions; the cells, their types, libraries, spatial fields, clones and cycling states are those of
    this section (the expectation is conditional on them).

    Parameters
    ----------
    sdata
        A section from :func:`simulate_section` (its cell table holds ``layers["expected"]``,
        ``obsm["cell_geometry"]``, ``var["background_share"]`` and ``uns["c3diff"]["simulation"]``).
    genes
        Genes (channels, in order); ``None``: every gene of the cell table.
    pixel_size
        Pixel size of the map in um; the same as ``bin_size`` of :func:`c3diff.pp.bin_transcripts`.
    image_key
        Anchor the grid at this image's top-left corner and cover it, as
        :func:`c3diff.pp.bin_transcripts` does with the same ``image_key``; ``None``: anchor at the cell-label raster
        (the section's ``(0, 0)``) and cover it.
    origin
        ``(y, x)`` of the grid's top-left corner, overriding the anchor (as in :func:`c3diff.pp.bin_transcripts`).
    labels_key, table_key
        The cell-label raster and the cell table of the section.

    Returns
    -------
    float32 array ``(n_genes, height, width)`` of expected counts per pixel, on the grid of
    ``c3diff.pp.bin_transcripts(sdata, bin_size=pixel_size, genes=genes, image_key=image_key, origin=origin)``.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=640, height=640, seed=0, progress=False)  # doctest: +SKIP
    >>> expected = c3.datasets.expected_counts(sdata, genes=["ERBB2", "CD3E"], pixel_size=10.0)  # doctest: +SKIP
    >>> observed = c3.pp.bin_transcripts(sdata, bin_size=10.0, genes=["ERBB2", "CD3E"], image_key="hne",
    ...                                  inplace=False)  # doctest: +SKIP
    >>> expected.shape == observed.shape  # doctest: +SKIP
    True
    >>> scores = c3.metrics.score_maps(expected, observed.values, genes=["ERBB2", "CD3E"])  # doctest: +SKIP
    """
    import pandas as pd
    from scipy import sparse

    from c3diff.datasets._celltypes import CELL_TYPES
    from c3diff.datasets._expression import CYTOPLASM_TRIES, NUCLEUS_FILL, VACUOLE_INNER, nucleus_share

    if (
        isinstance(pixel_size, bool)
        or not isinstance(pixel_size, int | float | np.number)
        or not math.isfinite(pixel_size)
        or pixel_size <= 0
    ):
        raise ValueError(f"`pixel_size` must be a positive number of micrometres, got {pixel_size!r}.")
    pixel_size = float(pixel_size)
    table = get_element(sdata, table_key, "tables", arg="table_key")
    sim = table.uns.get("c3diff", {}).get("simulation") if isinstance(table.uns.get("c3diff"), dict) else None
    missing = [
        what
        for what, ok in (
            ('layers["expected"]', "expected" in table.layers),
            ('obsm["cell_geometry"]', "cell_geometry" in table.obsm),
            ('var["background_share"]', "background_share" in table.var),
            ('uns["c3diff"]["simulation"]', isinstance(sim, dict) and "tissue_mask" in sim),
        )
        if not ok
    ]
    if missing:
        raise ValueError(
            f"`sdata.tables[{table_key!r}]` lacks {', '.join(missing)}: expected counts exist only for sections made "
            "by `c3diff.datasets.simulate_section` (of this c3diff version or later); simulate the section again."
        )
    genes = list(table.var_names) if genes is None else check_genes(genes, list(table.var_names))
    instance_key = table.uns.get("spatialdata_attrs", {}).get("instance_key")
    if instance_key is None or instance_key not in table.obs:
        raise ValueError(
            f"`sdata.tables[{table_key!r}]` has no instance key column linking its rows to the label "
            "values; parse it with `TableModel.parse(..., instance_key=...)`."
        )
    labels_el = get_element(sdata, labels_key, "labels", arg="labels_key")
    lgeom = raster_geometry(labels_el, arg="labels_key")
    if image_key is None:
        anchor = lgeom
    else:
        anchor = raster_geometry(get_element(sdata, image_key, "images", arg="image_key"), arg="image_key")
    grid = grid_for(bin_size=pixel_size, image_geometry=anchor, origin=origin, data_extent=None)

    # ------------------------------------------------------------------ cells
    gidx = table.var_names.get_indexer(genes)
    mu = np.asarray(table.layers["expected"][:, gidx], dtype=np.float64)
    if sparse.issparse(mu):  # pragma: no cover - the simulator writes a dense layer
        mu = mu.toarray()
    ids = np.asarray(table.obs[instance_key], dtype=np.int64)
    geo = table.obsm["cell_geometry"]
    geo = geo if isinstance(geo, pd.DataFrame) else pd.DataFrame(geo)
    cx, cy = (np.asarray(table.obsm["spatial"], dtype=np.float64)[:, k] for k in (0, 1))
    radius = geo["radius"].to_numpy(np.float64)
    na, nb = geo["nucleus_a"].to_numpy(np.float64), geo["nucleus_b"].to_numpy(np.float64)
    nx_, ny_, nth = (geo[c].to_numpy(np.float64) for c in ("nucleus_x", "nucleus_y", "nucleus_theta"))
    vacuole = {name: ct.vacuole for name, ct in CELL_TYPES.items()}
    inner = np.array([VACUOLE_INNER if vacuole.get(t, False) else 0.0 for t in table.obs["cell_type"].astype(str)])
    p_nuc = nucleus_share(radius, na, nb)
    width_um, height_um = float(sim["width"]), float(sim["height"])
    lab = np.asarray(scale0(labels_el).data)
    n_cells = ids.size

    rows_min, rows_max = _clip_range(grid.y0, pixel_size, height_um, grid.height)
    cols_min, cols_max = _clip_range(grid.x0, pixel_size, width_um, grid.width)
    reach = max(1, math.ceil(4.0 * _DIFFUSION / pixel_size))

    def spread(cell: np.ndarray, y: np.ndarray, x: np.ndarray, w: np.ndarray) -> sparse.csr_matrix:
        """Pixels x cells weights of point masses ``w`` at ``(y, x)``, jittered by the diffusion, then clipped."""
        ry, wy = _gauss_1d(y, grid.y0, pixel_size, reach)
        rx, wx = _gauss_1d(x, grid.x0, pixel_size, reach)
        ry, rx = np.clip(ry, rows_min, rows_max), np.clip(rx, cols_min, cols_max)
        k = ry.shape[1]
        pix = (ry[:, :, None] * grid.width + rx[:, None, :]).reshape(-1, k * k)
        ww = (wy[:, :, None] * wx[:, None, :]).reshape(-1, k * k) * w[:, None]
        inside = (
            (ry >= 0)[:, :, None]
            & (ry < grid.height)[:, :, None]
            & (rx >= 0)[:, None, :]
            & (rx < grid.width)[:, None, :]
        )
        inside = inside.reshape(-1, k * k)
        cc = np.broadcast_to(cell[:, None], pix.shape)
        return sparse.csr_matrix((ww[inside], (pix[inside], cc[inside])), shape=(grid.height * grid.width, n_cells))

    weights = sparse.csr_matrix((grid.height * grid.width, n_cells))
    n_cyt = np.maximum(np.ceil(_POINT_DENSITY * np.pi * radius**2 * (1 - inner**2)), _MIN_POINTS).astype(np.int64)
    n_nuc = np.maximum(np.ceil(_POINT_DENSITY * np.pi * na * nb * NUCLEUS_FILL**2), _MIN_POINTS).astype(np.int64)
    per_cell = n_cyt + n_nuc
    chunk = np.cumsum(per_cell) // _CHUNK_POINTS
    stops = np.concatenate([np.flatnonzero(np.diff(chunk)) + 1, [n_cells]]) if n_cells else np.array([], np.int64)
    start = 0
    for stop in stops:
        cells = np.arange(start, stop)
        # cytoplasm: a sunflower of points over the disc (or rim), kept where the label raster gives the cell
        cell, k, n = _points(cells, n_cyt)
        t = (k + 0.5) / n
        r = radius[cell] * np.sqrt(inner[cell] ** 2 + (1 - inner[cell] ** 2) * t)
        phi = k * _GOLDEN_ANGLE
        x, y = cx[cell] + r * np.cos(phi), cy[cell] + r * np.sin(phi)
        i = np.clip(np.floor((y - lgeom.y0) / lgeom.sy), 0, lgeom.height - 1).astype(np.int64)
        j = np.clip(np.floor((x - lgeom.x0) / lgeom.sx), 0, lgeom.width - 1).astype(np.int64)
        own = lab[i, j] == ids[cell]
        kept = np.bincount(cell - start, weights=own, minlength=cells.size)
        q = kept / n_cyt[cells]  # share of the disc that the raster gives the cell: one try's success rate
        placed = (1 - p_nuc[cells]) * (1 - (1 - q) ** CYTOPLASM_TRIES)
        w = (placed / np.maximum(kept, 1))[cell - start]
        weights = weights + spread(cell[own], y[own], x[own], w[own])
        # nucleus: its own share plus what the cytoplasm could not place
        cell, k, n = _points(cells, n_nuc)
        r = NUCLEUS_FILL * np.sqrt((k + 0.5) / n)
        phi = k * _GOLDEN_ANGLE
        u, v = na[cell] * r * np.cos(phi), nb[cell] * r * np.sin(phi)
        th = nth[cell]
        x = nx_[cell] + u * np.cos(th) - v * np.sin(th)
        y = ny_[cell] + u * np.sin(th) + v * np.cos(th)
        share = 1 - placed
        weights = weights + spread(cell, y, x, (share / n_nuc[cells])[cell - start])
        start = stop
    out = np.asarray((weights @ mu).T).reshape(len(genes), grid.height, grid.width)

    # ------------------------------------------------------------------ background
    tissue = np.asarray(sim["tissue_mask"], dtype=bool)
    spacing = float(sim["tissue_mask_spacing"])
    rate = np.where(tissue, float(sim["background_rate_tissue"]), float(sim["background_rate_glass"]))
    ay = _overlap(grid.y0, pixel_size, grid.height, spacing, tissue.shape[0], height_um)
    ax = _overlap(grid.x0, pixel_size, grid.width, spacing, tissue.shape[1], width_um)
    density = ay @ rate @ ax.T  # expected background transcripts per pixel, all genes
    share = table.var["background_share"].to_numpy(np.float64)[gidx]
    out += share[:, None, None] * density[None]
    return out.astype(np.float32)


def _points(cells: np.ndarray, n_points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell, index within the cell and number of points of every quadrature point of ``cells``."""
    n = n_points[cells]
    cell = np.repeat(cells, n)
    k = np.arange(cell.size) - np.repeat(np.cumsum(n) - n, n)
    return cell, k.astype(np.float64), n_points[cell].astype(np.float64)


def _gauss_1d(pos: np.ndarray, start: float, size: float, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins ``row - reach .. row + reach`` around each position and the share of a Gaussian of sigma ``_DIFFUSION``
    falling in each (the tails beyond go to the outermost bins)."""
    from scipy.special import ndtr

    row = np.floor((pos - start) / size).astype(np.int64)
    offsets = np.arange(-reach, reach + 1)
    rows = row[:, None] + offsets[None, :]
    edges = start + (rows[:, :, None] + np.array([0, 1])[None, None, :]) * size
    cdf = ndtr((edges - pos[:, None, None]) / _DIFFUSION)
    cdf[:, 0, 0], cdf[:, -1, 1] = 0.0, 1.0
    return rows, cdf[:, :, 1] - cdf[:, :, 0]


def _clip_range(start: float, size: float, extent: float, n: int) -> tuple[int, int]:
    """Grid bins holding the section's first and last positions (the simulator clips positions into the section)."""
    lo = math.floor((0.0 - start) / size)
    hi = math.floor((extent * (1 - 1e-7) - start) / size)
    return max(lo, -1), min(hi, n)


def _overlap(start: float, size: float, n: int, spacing: float, m: int, extent: float) -> np.ndarray:
    """``(n, m)`` lengths shared by grid bins ``[start + i size, ...)`` and field cells ``[j spacing, ...)`` cut to
    ``[0, extent)``."""
    a0 = start + np.arange(n)[:, None] * size
    b0 = np.arange(m)[None, :] * spacing
    lo = np.maximum(np.maximum(a0, b0), 0.0)
    hi = np.minimum(np.minimum(a0 + size, b0 + spacing), extent)
    return np.clip(hi - lo, 0.0, None)
