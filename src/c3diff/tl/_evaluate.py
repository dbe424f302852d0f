"""Score a super-resolved layer against a high-resolution truth (tile by tile) or against the measured spots."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from c3diff._constants import COORDINATE_SYSTEM
from c3diff._geometry import RasterGeometry, is_integer, level_geometries, raster_channels, raster_geometry, scale0
from c3diff._validation import check_genes, get_element

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: ``protocol`` values of :func:`evaluate`'s table.
HR_TRUTH, LR_SPOTS = "hr_truth", "lr_spots"
_COLUMNS = [
    "protocol",
    "tile",
    "tile_row",
    "tile_col",
    "y0_um",
    "x0_um",
    "gene",
    "rmse",
    "pcc",
    "ssim",
    "n_pixels",
    "status",
]
_TOL = 1e-6


@dataclass(frozen=True)
class _Alignment:
    """Where the prediction and the truth overlap: prediction pixels ``rows x cols`` and, for each prediction pixel,
    a ``fy x fx`` block of truth pixels starting at ``(truth_row0, truth_col0)``."""

    rows: tuple[int, int]
    cols: tuple[int, int]
    truth_row0: int
    truth_col0: int
    fy: int
    fx: int


def _align(pred: RasterGeometry, truth: RasterGeometry) -> _Alignment:
    """Match the truth's grid to the prediction's through their transforms (same grid, or a finer nested one)."""
    fy, fx = pred.sy / truth.sy, pred.sx / truth.sx
    if fy < 1 - _TOL or fx < 1 - _TOL:
        raise ValueError(
            f"`truth_key` has larger pixels ({truth.sy:g} x {truth.sx:g} um) than `pred_key` ({pred.sy:g} x "
            f"{pred.sx:g} um): the truth must be on the prediction's grid or a finer one that nests in it. "
            "Bin the ground truth at the prediction's pixel size (e.g. `c3.pp.bin_transcripts(..., bin_size=...)`)."
        )
    oy, ox = (pred.y0 - truth.y0) / truth.sy, (pred.x0 - truth.x0) / truth.sx
    if not all(is_integer(v) for v in (fy, fx, oy, ox)):
        raise ValueError(
            f"The grids of `pred_key` (pixel {pred.sy:g} x {pred.sx:g} um, origin y={pred.y0:g}, x={pred.x0:g}) and "
            f"`truth_key` (pixel {truth.sy:g} x {truth.sx:g} um, origin y={truth.y0:g}, x={truth.x0:g}) do not "
            "match: the prediction's pixel must be an integer number of truth pixels and its grid lines must fall on "
            "the truth's. Bin the truth on the prediction's grid (same origin; `c3.pp.bin_transcripts(..., "
            "origin=...)`)."
        )
    fy, fx = round(fy), round(fx)
    ty_end, tx_end = truth.y0 + truth.height * truth.sy, truth.x0 + truth.width * truth.sx
    # prediction pixels fully covered by the truth
    r0 = max(0, math.ceil((truth.y0 - pred.y0) / pred.sy - _TOL))
    r1 = min(pred.height, math.floor((ty_end - pred.y0) / pred.sy + _TOL))
    c0 = max(0, math.ceil((truth.x0 - pred.x0) / pred.sx - _TOL))
    c1 = min(pred.width, math.floor((tx_end - pred.x0) / pred.sx + _TOL))
    if r1 <= r0 or c1 <= c0:
        raise ValueError(
            f"`pred_key` (extent y {pred.extent[0]:g}..{pred.extent[2]:g}, x {pred.extent[1]:g}..{pred.extent[3]:g} "
            f"um) and `truth_key` (extent y {truth.extent[0]:g}..{truth.extent[2]:g}, x {truth.extent[1]:g}.."
            f"{truth.extent[3]:g} um) do not overlap."
        )
    return _Alignment(
        rows=(r0, r1),
        cols=(c0, c1),
        truth_row0=round((pred.y0 + r0 * pred.sy - truth.y0) / truth.sy),
        truth_col0=round((pred.x0 + c0 * pred.sx - truth.x0) / truth.sx),
        fy=fy,
        fx=fx,
    )


def mask_on_grid(sdata: SpatialData, mask: Any, grid: RasterGeometry, *, arg: str = "mask") -> np.ndarray:
    """A boolean ``(height, width)`` mask on ``grid`` from an array already on it, or from a labels element (any
    grid; read at the prediction's pixel centres, nonzero = inside)."""
    if isinstance(mask, str):
        element = get_element(sdata, mask, "labels", arg=arg)
        levels = level_geometries(element, coordinate_system=COORDINATE_SYSTEM, arg=arg)
        # the coarsest level still at least as fine as the grid keeps the lookup cheap on large tissue masks
        fine = [lg for lg in levels if lg[1].sy <= grid.sy * (1 + _TOL) and lg[1].sx <= grid.sx * (1 + _TOL)]
        level, geom = fine[-1] if fine else levels[0]
        cy, cx = grid.pixel_centres()
        rows = np.floor((cy - geom.y0) / geom.sy).astype(np.int64)
        cols = np.floor((cx - geom.x0) / geom.sx).astype(np.int64)
        ok_r = (rows >= 0) & (rows < geom.height)
        ok_c = (cols >= 0) & (cols < geom.width)
        out = np.zeros((grid.height, grid.width), dtype=bool)
        if ok_r.any() and ok_c.any():
            values = np.asarray(level.data[rows[ok_r]][:, cols[ok_c]])
            out[np.ix_(ok_r, ok_c)] = values > 0
        return out
    array = np.asarray(mask)
    if array.dtype != bool or array.shape != (grid.height, grid.width):
        raise ValueError(
            f"`{arg}` must be the key of a labels element (e.g. a tissue mask from `squidpy.experimental.im."
            f"detect_tissue`) or a boolean array of the prediction's shape {(grid.height, grid.width)}; got an array "
            f"of dtype {array.dtype} and shape {array.shape}."
        )
    return array


def _select_genes(
    requested: Sequence[str] | None, pred_genes: list[str], other_genes: list[str] | None, other_arg: str
) -> list[str]:
    if requested is not None:
        genes = check_genes(requested, pred_genes, arg="genes")
        if other_genes is not None:
            check_genes(genes, other_genes, arg=f"genes (in `{other_arg}`)")
        return genes
    if other_genes is None:
        return pred_genes
    known = set(other_genes)
    genes = [g for g in pred_genes if g in known]
    if not genes:
        raise ValueError(
            f"`pred_key` and `{other_arg}` share no gene (the prediction has {pred_genes[:5]}..., `{other_arg}` has "
            f"{other_genes[:5]}...)."
        )
    if len(genes) < len(pred_genes):
        warnings.warn(
            f"evaluate: {len(pred_genes) - len(genes)} of {len(pred_genes)} predicted gene(s) are not in "
            f"`{other_arg}` and are not scored.",
            UserWarning,
            stacklevel=3,
        )
    return genes


def _score_tiles(
    pred_data: Any,
    truth_data: Any,
    grid: RasterGeometry,
    align: _Alignment,
    genes: list[str],
    tissue: np.ndarray | None,
    tile_size: int | None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    from tqdm.auto import tqdm

    from c3diff.metrics import score_maps

    (r0, r1), (c0, c1) = align.rows, align.cols
    step_y = r1 - r0 if tile_size is None else tile_size
    step_x = c1 - c0 if tile_size is None else tile_size
    starts = [(r, c) for r in range(r0, r1, step_y) for c in range(c0, c1, step_x)]
    frames, n_empty = [], 0
    for tile, (r, c) in enumerate(tqdm(starts, desc="evaluate: tiles", disable=len(starts) < 4)):
        re, ce = min(r + step_y, r1), min(c + step_x, c1)
        mask = None if tissue is None else tissue[r:re, c:ce]
        if mask is not None and not mask.any():
            n_empty += 1
            continue
        pred = np.asarray(pred_data[:, r:re, c:ce], dtype=np.float64)
        tr = align.truth_row0 + (r - r0) * align.fy
        tc = align.truth_col0 + (c - c0) * align.fx
        truth = np.asarray(truth_data[:, tr : tr + (re - r) * align.fy, tc : tc + (ce - c) * align.fx], np.float64)
        if align.fy > 1 or align.fx > 1:  # counts of the finer bins add up to the prediction's bins
            truth = truth.reshape(len(genes), re - r, align.fy, ce - c, align.fx).sum(axis=(2, 4))
        frame = score_maps(pred, truth, genes=genes, mask=mask, warn=False)  # evaluate counts the skipped rows
        frame = frame.drop(columns="item")
        frame.insert(0, "tile", tile)
        frame.insert(1, "tile_row", (r - r0) // step_y)
        frame.insert(2, "tile_col", (c - c0) // step_x)
        frame.insert(3, "y0_um", grid.y0 + r * grid.sy)
        frame.insert(4, "x0_um", grid.x0 + c * grid.sx)
        if (frame["n_pixels"] == 0).all():
            n_empty += 1
            continue
        frames.append(frame)
    counts = {"n_tiles": len(starts), "n_tiles_empty": n_empty}
    if not frames:
        raise ValueError(
            f"evaluate: none of the {len(starts)} tile(s) holds a scored pixel (check `mask` and that the prediction "
            "is finite where the truth is)."
        )
    return pd.concat(frames, ignore_index=True), counts


def _score_spots(pred_data: Any, grid: RasterGeometry, spots: Any) -> pd.DataFrame:
    from tqdm.auto import tqdm

    from c3diff.metrics import aggregate_to_spots, compare_spots

    genes = spots.genes
    # genes in chunks of about 256 MiB of float64 pixels
    per_chunk = max(1, int(2**28 // (8 * grid.height * grid.width)))
    starts = range(0, len(genes), per_chunk)
    agg = []
    for start in tqdm(starts, desc="evaluate: spots", disable=len(starts) < 4):
        values = np.asarray(pred_data[start : start + per_chunk], dtype=np.float64)
        agg.append(aggregate_to_spots(values, grid, spots.centres, 2 * spots.radius))
    return compare_spots(np.concatenate(agg, axis=1), spots.counts, genes=genes).reset_index()


def _plain_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """A summary frame as nested plain dicts (``{protocol: {gene: {metric: value}}}``, NaN -> None) for
    ``sdata.attrs``, which is saved as JSON."""

    def plain(v: Any) -> Any:
        v = v.item() if hasattr(v, "item") else v
        return None if isinstance(v, float) and math.isnan(v) else v

    out: dict[str, Any] = {}
    for index, row in frame.iterrows():
        keys = [str(k) for k in (index if isinstance(index, tuple) else (index,))]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = {str(k): plain(v) for k, v in row.items()}
    return out


def evaluate(
    sdata: SpatialData,
    pred_key: str,
    *,
    truth_key: str | None = None,
    table_key: str | None = None,
    genes: Sequence[str] | None = None,
    tile_size: int | None = 256,
    mask: str | np.ndarray | None = None,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Score a super-resolved gene raster: against a high-resolution truth, and/or against the measured spots.

    With ``truth_key`` (:doc:`/method`, *Metrics and protocols*): the prediction and the truth are matched through their
    transforms and cut into ``tile_size`` x ``tile_size`` tiles (the paper's 256 x 256 patches); each (tile, gene) gets
    the range-normalised RMSE, ``|PCC|`` and Gaussian SSIM of :func:`c3diff.metrics.score_maps`, on maps min-max
    normalised per tile and gene. A truth on a finer grid that nests in the prediction's (e.g. 10 um bins for a
    20 um prediction) is sum-pooled onto it.

    With ``table_key`` (external validation, no high-resolution truth): the prediction is averaged inside each
    in-tissue spot and compared with the spot counts per gene across spots
    (:func:`c3diff.metrics.lr_consistency`).

    Parameters
    ----------
    sdata
        SpatialData holding the layers.
    pred_key
        Gene raster to score (e.g. ``"hne_c3diff_x10"`` written by :func:`c3diff.tl.super_resolve`); level 0 of a
        multiscale image is used.
    truth_key
        Ground-truth gene raster (e.g. transcripts binned by :func:`c3diff.pp.bin_transcripts`) on the prediction's
        grid or a finer nested one. Prediction pixels outside the truth are not scored.
    table_key
        Spot table annotating circles (docs/conventions.md), read with :func:`c3diff.pp.spots_from_table` (centres
        and diameter through the circles' transform); spots with ``obs["in_tissue"] == False`` are left out.
    genes
        Genes to score. Default: the prediction's genes that the truth/table also has (a warning gives the number
        left out).
    tile_size
        Tile edge in prediction pixels; ``None`` scores the whole overlap as one map. Edge tiles may be smaller.
        The paper's patch is 2.56 mm: 256 pixels at 10x (10 um), 128 at 5x (20 um).
    mask
        Pixels to score (``truth_key`` only): the key of a labels element (nonzero = tissue, e.g. from
        :func:`squidpy.experimental.im.detect_tissue`; read at the prediction's pixel centres through the
        transforms) or a boolean array of the prediction's shape. Tiles without a masked pixel are skipped and
        counted. Non-finite prediction pixels are never scored.
    key_added
        If given, store the parameters and the summaries (overall and per gene, per protocol) in
        ``sdata.attrs["c3diff"][key_added]``. Nothing else in ``sdata`` changes.

    Returns
    -------
    A tidy table, one row per scored item: ``protocol`` (``"hr_truth"`` for (tile, gene) rows, ``"lr_spots"`` for
    per-gene spot rows), ``tile``, ``tile_row``, ``tile_col``, ``y0_um``, ``x0_um`` (the tile's corner; missing for
    spot rows), ``gene``, ``rmse``, ``pcc``, ``ssim`` (missing for spot rows), ``n_pixels`` (pixels or spots
    compared) and ``status`` (``"scored"`` or why the row was skipped, e.g. ``"constant_truth"``; skipped rows hold
    NaN scores and are counted in a warning). Average it with :func:`c3diff.metrics.summarize_scores`
    (``by="gene"`` for the per-gene table).

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> c3.pp.bin_transcripts(sdata, bin_size=10, image_key="hne", key_added="truth")  # doctest: +SKIP
    >>> scores = c3.tl.evaluate(sdata, "hne_c3diff_x10", truth_key="truth", key_added="eval")  # doctest: +SKIP
    >>> c3.metrics.summarize_scores(scores)  # doctest: +SKIP
    >>> c3.metrics.summarize_scores(scores, by="gene").sort_values("pcc")  # doctest: +SKIP
    """
    if truth_key is None and table_key is None:
        raise ValueError("Pass `truth_key` (a high-resolution truth raster) and/or `table_key` (a spot table).")
    if tile_size is not None and (not isinstance(tile_size, int | np.integer) or tile_size < 2):
        raise ValueError(f"`tile_size` must be an integer >= 2 (prediction pixels) or None, got {tile_size!r}.")
    if mask is not None and truth_key is None:
        raise ValueError("`mask` restricts the pixels of the `truth_key` comparison; pass `truth_key` as well.")
    pred_el = get_element(sdata, pred_key, "images", arg="pred_key")
    grid = raster_geometry(pred_el, arg="pred_key")
    pred = scale0(pred_el)
    pred_genes = raster_channels(pred_el)

    frames, counts = [], {}
    truth_genes = table_genes = None
    if truth_key is not None:
        truth_el = get_element(sdata, truth_key, "images", arg="truth_key")
        truth_genes = raster_channels(truth_el)
        align = _align(grid, raster_geometry(truth_el, arg="truth_key"))
        uncovered = grid.height * grid.width - (align.rows[1] - align.rows[0]) * (align.cols[1] - align.cols[0])
        if uncovered:
            warnings.warn(
                f"evaluate: {uncovered} of {grid.height * grid.width} prediction pixels lie outside `truth_key` and "
                "are not scored.",
                UserWarning,
                stacklevel=2,
            )
    if table_key is not None:
        table_genes = [str(g) for g in get_element(sdata, table_key, "tables", arg="table_key").var_names]
    if truth_key is not None:
        hr_genes = _select_genes(genes, pred_genes, truth_genes, "truth_key")
        tissue = None if mask is None else mask_on_grid(sdata, mask, grid)
        pred_data = pred.sel(c=hr_genes).data
        truth_data = scale0(truth_el).sel(c=hr_genes).data
        frame, tile_counts = _score_tiles(pred_data, truth_data, grid, align, hr_genes, tissue, tile_size)
        frame.insert(0, "protocol", HR_TRUTH)
        frames.append(frame)
        counts[HR_TRUTH] = tile_counts
        if tile_counts["n_tiles_empty"]:
            warnings.warn(
                f"evaluate: {tile_counts['n_tiles_empty']} of {tile_counts['n_tiles']} tile(s) have no pixel to score "
                "(outside the mask or non-finite) and were skipped.",
                UserWarning,
                stacklevel=2,
            )
        n_small = int(((frame["status"] == "scored") & frame["ssim"].isna()).sum())
        if n_small:
            warnings.warn(
                f"evaluate: SSIM is undefined for {n_small} (tile, gene) map(s) of edge tiles smaller than the "
                "11-pixel Gaussian window; their RMSE and PCC are kept.",
                UserWarning,
                stacklevel=2,
            )
    if table_key is not None:
        from c3diff.pp import spots_from_table

        spot_genes = _select_genes(genes, pred_genes, table_genes, "table_key")
        spots = spots_from_table(sdata, table_key, genes=spot_genes, in_tissue_only=True)
        frame = _score_spots(pred.sel(c=spot_genes).data, grid, spots)
        frame.insert(0, "protocol", LR_SPOTS)
        frame = frame.rename(columns={"n_spots": "n_pixels"})
        frames.append(frame)
        counts[LR_SPOTS] = {"n_spots": len(spots.centres), "spot_diameter_um": 2 * spots.radius}

    scores = pd.concat(frames, ignore_index=True)
    genes_all = list(dict.fromkeys(scores["gene"].astype(str)))
    scores["gene"] = pd.Categorical(scores["gene"].astype(str), categories=genes_all)
    for column in ("tile", "tile_row", "tile_col"):
        scores[column] = (
            scores[column].astype("Int64") if column in scores else pd.array([pd.NA] * len(scores), dtype="Int64")
        )
    scores = scores.reindex(columns=_COLUMNS)
    scores["protocol"] = pd.Categorical(scores["protocol"], categories=[HR_TRUTH, LR_SPOTS])

    skipped = scores[scores["status"] != "scored"]
    if len(skipped):
        by_reason = skipped.groupby(["protocol", "status"], observed=True).size()
        warnings.warn(
            "evaluate: skipped (NaN) "
            + ", ".join(
                f"{n} {protocol} row(s) with {status.replace('_', ' ')}" for (protocol, status), n in by_reason.items()
            )
            + f" of {len(scores)}.",
            UserWarning,
            stacklevel=2,
        )

    if key_added is not None:
        from c3diff._provenance import record
        from c3diff.metrics import summarize_scores

        entry = record(
            sdata,
            key_added,
            "evaluate",
            pred_key=pred_key,
            truth_key=truth_key,
            table_key=table_key,
            genes=genes_all,
            tile_size=tile_size,
            mask=mask if mask is None or isinstance(mask, str) else "array",
        )
        entry["summary"] = _plain_summary(summarize_scores(scores))
        entry["per_gene"] = _plain_summary(summarize_scores(scores, by="gene"))
        entry["counts"] = counts
    return scores


def sample_at_spots(
    sdata: SpatialData,
    layer_key: str,
    *,
    table_key: str,
    genes: Sequence[str] | None = None,
    normalize: bool = False,
    library_key: str | None = None,
    target_sum: float = 1e4,
    in_tissue_only: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> Any:
    """Read a gene raster back at the spots of a table: each spot gets the layer summed over its disc footprint.

    Every pixel contributes its value times the fraction of its area inside the spot's disc (computed exactly; the
    radius is that of the circles the table annotates, through their transform). c3diff's rasters hold counts per
    pixel (:func:`c3diff.pp.spots_to_grid`, :func:`c3diff.pp.bin_transcripts`, :func:`super_resolve`), so the result
    is in counts per spot, comparable with the table's own counts at any pixel size (docs/usage.md, "What a pixel
    holds").

    Parameters
    ----------
    sdata
        SpatialData holding the layer, the table and the circles the table annotates.
    layer_key
        Gene raster in ``sdata.images`` (channels = genes), e.g. the output of :func:`super_resolve`; level 0 of a
        multiscale image is read.
    table_key
        Spot table whose spots to read at (its counts are only used as the library sizes of ``normalize``).
    genes
        Channels to read. Default: every channel of the layer (except ``library_key``).
    normalize
        Return ``log1p(counts / library * target_sum)``, scanpy's ``normalize_total`` + ``log1p``, instead of counts.
        The library of a spot is the layer's ``library_key`` channel read back the same way when given (a predicted
        total, e.g. a ``"total_counts"`` channel super-resolved with the genes), else the spot's measured total
        counts over all genes of ``table_key``.
    library_key
        Channel of the layer holding total counts per pixel, used as the library by ``normalize``.
    target_sum
        Counts each spot is scaled to before ``log1p``.
    in_tissue_only
        Leave out spots with ``obs["in_tissue"] == False``.
    coordinate_system
        Coordinate system (micrometres) in which the layer and the spots are matched.

    Returns
    -------
    AnnData, spots x genes: ``X`` the values (float32; counts, or normalised with ``normalize``), ``layers["counts"]``
    the counts, ``obs`` the table's ``obs`` of those spots plus ``footprint_on_layer`` (fraction of each disc on the
    layer's finite pixels; below 1 the sum misses part of the spot) and ``library`` (with ``normalize``),
    ``obsm["spatial"]`` the centres as ``(x, y)`` um, and the parameters in ``uns["c3diff"]["sample_at_spots"]``.
    Spots partly or wholly off the layer are kept and counted in a warning.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> c3.tl.super_resolve(sdata, "hne", table_key="visium_table", method="bicubic")  # doctest: +SKIP
    >>> spots = c3.tl.sample_at_spots(sdata, "hne_bicubic_x10", table_key="visium_table")  # doctest: +SKIP
    >>> spots.X[:3]  # counts per spot, the unit of sdata["visium_table"].X  # doctest: +SKIP
    """
    import anndata as ad
    from scipy import sparse

    from c3diff.metrics import sum_over_spots
    from c3diff.pp import spots_from_table

    element = get_element(sdata, layer_key, "images", arg="layer_key")
    channels = raster_channels(element)
    if library_key is not None and library_key not in channels:
        raise ValueError(
            f"`library_key={library_key!r}` is not a channel of `layer_key={layer_key!r}` (channels: "
            f"{channels[:8]}{'...' if len(channels) > 8 else ''}). Pass the channel that holds total counts per "
            "pixel, or leave `library_key=None` to use the table's measured totals."
        )
    if genes is None:
        genes = [c for c in channels if c != library_key]
    else:
        genes = check_genes(genes, channels, arg="genes")
    if not (isinstance(target_sum, int | float) and np.isfinite(target_sum) and target_sum > 0):
        raise ValueError(f"`target_sum` must be a positive number, got {target_sum!r}.")
    table = get_element(sdata, table_key, "tables", arg="table_key")
    if table.n_vars == 0:
        raise ValueError(f"`table_key={table_key!r}` has no gene; it must be a spot table (spots x genes counts).")
    spots = spots_from_table(
        sdata,
        table_key,
        genes=[str(table.var_names[0])],
        in_tissue_only=in_tissue_only,
        coordinate_system=coordinate_system,
    )
    grid = raster_geometry(element, coordinate_system=coordinate_system, arg="layer_key")
    data = scale0(element)
    read = genes + ([library_key] if library_key is not None else [])
    # channels in chunks of about 256 MiB of float64 pixels (a whole-slide layer need not fit in memory)
    per_chunk = max(1, int(2**28 // (8 * grid.height * grid.width)))
    parts = [
        sum_over_spots(
            np.asarray(data.sel(c=read[start : start + per_chunk]).data, dtype=np.float64),
            grid,
            spots.centres,
            2 * spots.radius,
        )
        for start in range(0, len(read), per_chunk)
    ]
    sums = np.concatenate([part[0] for part in parts], axis=1)
    covered = np.min([part[1] for part in parts], axis=0)
    n_off, n_partial = int((covered <= 0).sum()), int(((covered > 0) & (covered < 1 - 1e-6)).sum())
    if n_off or n_partial:
        warnings.warn(
            f"sample_at_spots: of {len(covered)} spot(s), {n_off} lie off `layer_key={layer_key!r}` (value 0) and "
            f"{n_partial} lie partly off it (their sums miss the part off the layer; see obs['footprint_on_layer']).",
            UserWarning,
            stacklevel=2,
        )
    counts = sums[:, : len(genes)]
    rows = table.obs_names.get_indexer(spots.spot_ids)
    obs = table.obs.iloc[rows].copy()
    obs["footprint_on_layer"] = covered
    values = counts
    if normalize:
        if library_key is not None:
            library = sums[:, -1]
        else:
            x = table.X[rows]
            library = np.asarray(x.sum(axis=1) if sparse.issparse(x) else np.sum(x, axis=1), dtype=np.float64).ravel()
        obs["library"] = library
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.log1p(np.where(library[:, None] > 0, counts / library[:, None] * target_sum, 0.0))
    out = ad.AnnData(
        X=values.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, name="gene")),
        layers={"counts": counts.astype(np.float32)},
    )
    out.obsm["spatial"] = spots.centres[:, ::-1].copy()
    out.uns["c3diff"] = {
        "sample_at_spots": {
            "layer_key": layer_key,
            "table_key": table_key,
            "normalize": bool(normalize),
            "library_key": library_key,
            "target_sum": float(target_sum),
            "spot_diameter_um": 2 * spots.radius,
            "units": (f"log1p(counts / library * {target_sum:g})" if normalize else "counts per spot"),
        }
    }
    return out
