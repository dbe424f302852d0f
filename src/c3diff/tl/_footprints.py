"""Spot consistency of a super-resolved layer: the map summed over each measurement's footprint gives its count.

A pixel of a super-resolved layer holds the expected count of its square as if all tissue had been measured
(:data:`c3diff.tl.UNITS`). Its footprint sum - the layer summed over a spot's disc, each pixel weighted by the
fraction of its area inside (:func:`c3diff.metrics.spot_footprint`), or over a 100 um transcript bin - should then
give the spot's (or bin's) measured count. Tiles are calibrated on the 100 um LR grid, which meets spots only
approximately (Visium discs straddle LR pixels; legacy ST leaves gaps between spots), so :func:`match_footprints`
finishes the layer with a smooth multiplicative correction that brings every footprint sum to its count, up to
the count's own Poisson noise (a count is one draw of the expected map; matching it exactly would fit the noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from c3diff._geometry import RasterGeometry

#: Largest relative footprint error (``|sum - count| / max(count, 1)``) at which a measurement counts as met.
FOOTPRINT_TOLERANCE = 5e-3

#: A measurement also counts as met when its footprint sum lies within this many Poisson standard deviations
#: (``sqrt(sum)``) of its count: a count is one noisy draw of the expected map, so pulling the map onto it exactly
#: fits the noise: a zero count of a sparse gene would drive the map around its disc to zero (measured on real
#: pseudo-spots on the benchmarks page, ``real_pool_recover``).
FOOTPRINT_NOISE_SD = 2.0

#: Correction rounds at most (each a sparse product per gene batch); the error falls geometrically.
FOOTPRINT_MAX_ROUNDS = 1000

#: A measurement is matched when (up to rounding) its whole footprint lies on the layer's tissue pixels. A spot or
#: bin at the tissue's edge also counted what lies off the mask (glass, or tissue beyond the counts' reach); matching
#: it would pile that onto its tissue pixels, so it keeps its calibrated prediction.
MIN_FOOTPRINT_ON_TISSUE = 0.999

#: Width of the correction's smoothing kernel (Gaussian sigma) as a fraction of the measurement pitch: the
#: correction varies smoothly between neighbouring spots and across the gaps of legacy ST.
KERNEL_SIGMA_PER_PITCH = 0.3

#: Over-relaxation of each round (the ratios are raised to this power): the smoothing kernel mixes neighbouring
#: ratios, which slows the plain update (power 1) for spots whose neighbours need the opposite change.
RELAXATION = 1.3


@dataclass(frozen=True)
class Footprints:
    """Measurements and where they were made on an output grid.

    ``weights`` is a sparse ``(n, height * width)`` matrix of the fraction of each pixel inside each footprint,
    ``centres`` ``(n, 2)`` the footprints' centres (y, x) in um, ``counts`` ``(n, genes)`` the measured counts,
    ``pitch`` the distance between neighbouring measurements in um and ``kind`` ``"spots"`` or ``"bins"``.
    """

    weights: Any
    centres: np.ndarray
    counts: np.ndarray
    pitch: float
    kind: str


def spot_footprints(
    sdata: Any, table_key: str, genes: list[str], grid: RasterGeometry, *, coordinate_system: str
) -> Footprints:
    """The spot discs of ``table_key`` (spots under tissue) on ``grid`` (:func:`c3diff.metrics.spot_footprint`)."""
    from c3diff.metrics import spot_footprint
    from c3diff.pp import spots_from_table

    spots = spots_from_table(sdata, table_key, genes=genes, coordinate_system=coordinate_system)
    weights = spot_footprint(grid, spots.centres, spots.radius)
    return Footprints(
        weights=weights,
        centres=np.asarray(spots.centres, dtype=np.float64),
        counts=np.asarray(spots.counts, dtype=np.float64),
        pitch=float(spots.pitch),
        kind="spots",
    )


def bin_footprints(lr_counts: np.ndarray, bin_size: float, grid: RasterGeometry) -> Footprints:
    """The square bins of an LR raster ``(genes, ny, nx)`` that shares ``grid``'s corner, ``bin_size`` um each.

    Only bins whose whole square lies on ``grid`` are kept (a bin cut by the slide's edge counts transcripts the
    grid does not cover).
    """
    from scipy import sparse

    per = int(round(bin_size / grid.sy))
    if per < 1 or abs(per * grid.sy - bin_size) > 1e-6 * bin_size:
        raise ValueError(f"Bins of {bin_size:g} um are not whole pixels of {grid.sy:g} um.")
    ny, nx = min(lr_counts.shape[-2], grid.height // per), min(lr_counts.shape[-1], grid.width // per)
    rows, cols = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    bins = (rows * nx + cols).ravel()
    dy, dx = np.meshgrid(np.arange(per), np.arange(per), indexing="ij")
    pixel_rows = rows.ravel()[:, None] * per + dy.ravel()[None]
    pixel_cols = cols.ravel()[:, None] * per + dx.ravel()[None]
    flat = (pixel_rows * grid.width + pixel_cols).ravel()
    weights = sparse.csr_matrix(
        (np.ones(flat.size), (np.repeat(bins, per * per), flat)), shape=(ny * nx, grid.height * grid.width)
    )
    centres = np.column_stack([grid.y0 + (rows.ravel() + 0.5) * bin_size, grid.x0 + (cols.ravel() + 0.5) * bin_size])
    counts = np.asarray(lr_counts[:, :ny, :nx], dtype=np.float64).reshape(lr_counts.shape[0], -1).T
    return Footprints(weights=weights, centres=centres, counts=counts, pitch=float(bin_size), kind="bins")


def _smoothing_kernel(pixels_yx: np.ndarray, centres: np.ndarray, sigma: float) -> Any:
    """Sparse ``(pixels, measurements)`` Gaussian weights within 3 sigma, rows summing to 1 (0 rows: no neighbour)."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    distances = cKDTree(pixels_yx).sparse_distance_matrix(cKDTree(centres), 3.0 * sigma, output_type="coo_matrix")
    values = np.exp(-0.5 * (distances.data / sigma) ** 2)
    kernel = sparse.csr_matrix((values, (distances.row, distances.col)), shape=(len(pixels_yx), len(centres)))
    totals = np.asarray(kernel.sum(axis=1)).ravel()
    return sparse.diags(np.where(totals > 0, 1.0 / np.where(totals > 0, totals, 1.0), 0.0)) @ kernel


#: A footprint predicted to hold less than this fraction of its count is treated as empty (its count is first spread
#: evenly over it), so that no round multiplies by more than about its inverse.
_EMPTY_SHARE = 1e-3
#: Largest factor (and smallest, its inverse) one round applies to a footprint's ratio: a measurement the model
#: missed by orders of magnitude is met over several rounds, not by one jump that its neighbours' pixels share.
_MAX_STEP = 10.0


def _settled(sums: np.ndarray, counts: np.ndarray, tolerance: float) -> np.ndarray:
    """Footprints (x genes) whose sum is within the relative ``tolerance`` or :data:`FOOTPRINT_NOISE_SD` Poisson
    standard deviations of the count."""
    gap = np.abs(sums - counts)
    return (gap <= tolerance * np.maximum(counts, 1.0)) | (gap <= FOOTPRINT_NOISE_SD * np.sqrt(np.maximum(sums, 1.0)))


def _total_factor(sums: np.ndarray, counts: np.ndarray, tolerance: float) -> np.ndarray:
    """One factor per gene that brings the footprints' total sum to their total count, 1 where it is already within
    the noise: the total has little noise, so a bias every footprint shares (each within its own noise) is removed."""
    total, measured = sums.sum(axis=0), counts.sum(axis=0)
    return np.where((total > 0) & ~_settled(total, measured, tolerance), measured / np.where(total > 0, total, 1), 1.0)


def match_footprints(
    values: Any,
    grid: RasterGeometry,
    footprints: Footprints,
    tissue: np.ndarray,
    *,
    others: tuple[Any, ...] = (),
    tolerance: float = FOOTPRINT_TOLERANCE,
    max_rounds: int = FOOTPRINT_MAX_ROUNDS,
    max_elements: int = 2**22,
) -> dict[str, Any]:
    """Scale a layer ``(genes, height, width)`` in place so that each footprint sum equals its measured count.

    The correction is multiplicative and smooth: each round, every measurement's ratio of count to footprint sum is
    spread over the pixels around it with a Gaussian kernel (sigma :data:`KERNEL_SIGMA_PER_PITCH` times the pitch,
    weights normalised per pixel) and the layer multiplied by it (after one factor per gene that makes the
    footprints' total sum equal their total count), until every footprint sum is within
    :data:`FOOTPRINT_NOISE_SD` Poisson standard deviations (``sqrt`` of the sum) or ``tolerance`` (relative, or
    absolute below one count) of its count; a footprint already that close is left as it is (its ratio is taken as
    one), so that the map follows the counts' signal and not their sampling noise. The pattern inside each
    footprint is the model's; values stay non-negative; pixels off ``tissue`` are not touched (they are 0 in a
    masked layer). A footprint whose prediction sums to less than a thousandth of its count (and is not within the
    noise) first gets the count spread evenly over its tissue pixels, and no round moves a ratio by more than ten
    times. Measurements with less than
    :data:`MIN_FOOTPRINT_ON_TISSUE` of their footprint on tissue are left out.

    Parameters
    ----------
    values
        ``(genes, height, width)`` counts per pixel, a numpy or zarr array, changed in place (gene batches of at
        most ``max_elements`` tissue pixels x genes are read and written at a time).
    grid
        Placement of ``values`` in um.
    footprints
        The measurements (:func:`spot_footprints`, :func:`bin_footprints`); ``counts`` columns follow ``values``'
        genes.
    tissue
        ``(height, width)`` bool: the pixels that may hold counts.
    others
        Arrays shaped like ``values`` scaled by the same factors (e.g. a standard-deviation layer).
    tolerance, max_rounds
        Stopping rule.
    max_elements
        Memory bound of a gene batch (pixels on tissue x genes).

    Returns
    -------
    A summary: measurements matched and left out, rounds taken (largest over gene batches), the largest
    remaining relative error and the largest remaining error in Poisson standard deviations (``max_noise_sd``).
    """
    from scipy import sparse

    n_genes = values.shape[0]
    tissue_flat = np.asarray(tissue, dtype=bool).ravel()
    on_tissue = np.flatnonzero(tissue_flat)
    weights = sparse.csr_matrix(footprints.weights)[:, on_tissue]
    full_area = np.asarray(footprints.weights.sum(axis=1)).ravel()
    tissue_area = np.asarray(weights.sum(axis=1)).ravel()
    used = (full_area > 0) & (tissue_area >= MIN_FOOTPRINT_ON_TISSUE * np.where(full_area > 0, full_area, 1.0))
    summary = {
        "kind": footprints.kind,
        "matched": int(used.sum()),
        "left_out": int((~used).sum()),
        "rounds": 0,
        "max_relative_error": 0.0,
        "max_noise_sd": 0.0,
        "tolerance": tolerance,
        "noise_sd": FOOTPRINT_NOISE_SD,
    }
    if not used.any() or on_tissue.size == 0:
        return summary
    weights = weights[np.flatnonzero(used)]
    counts = footprints.counts[used]
    rows, cols = np.divmod(on_tissue, grid.width)
    pixels_yx = np.column_stack([grid.y0 + (rows + 0.5) * grid.sy, grid.x0 + (cols + 0.5) * grid.sx])
    kernel = _smoothing_kernel(pixels_yx, footprints.centres[used], KERNEL_SIGMA_PER_PITCH * footprints.pitch)
    unreached = np.asarray(kernel.sum(axis=1)).ravel() == 0  # pixels beyond 3 sigma of every measurement: kept
    support = (weights > 0).astype(np.float64)
    support_area = np.asarray(weights.sum(axis=1)).ravel()

    batch = max(1, int(max_elements // max(on_tissue.size, 1)))
    for start in range(0, n_genes, batch):
        genes = slice(start, min(start + batch, n_genes))
        block = np.asarray(values[genes], dtype=np.float64).reshape(genes.stop - genes.start, -1)
        m = block[:, on_tissue].T  # (pixels, genes)
        original = m.copy()
        y = counts[:, genes]
        s = weights @ m
        # a ratio to a near-zero sum would blow up the multiplicative rounds
        empty = (s < _EMPTY_SHARE * y) & (y > 0) & ~_settled(s, y, tolerance)
        if empty.any():
            m += support.T @ np.where(empty, y / support_area[:, None], 0.0)
        # genes still off are iterated in a compact array of their own; the converged ones are written back
        active, work, target, rounds, error, noise_error = np.arange(m.shape[1]), m.copy(), y, 0, 0.0, 0.0
        while active.size:
            s = weights @ work
            # one factor per gene for the total (the local pulls below leave it where it was); it scales s exactly
            total = _total_factor(s, target, tolerance)
            work *= total
            s *= total
            settled = _settled(s, target, tolerance)
            done = settled.all(axis=0) if rounds < max_rounds else np.ones(active.size, dtype=bool)
            if done.any():
                gap = np.abs(s[:, done] - target[:, done])
                error = max(error, float((gap / np.maximum(target[:, done], 1.0)).max()))
                noise_error = max(noise_error, float((gap / np.sqrt(np.maximum(s[:, done], 1.0))).max()))
                m[:, active[done]] = work[:, done]
                active, work, target, s = active[~done], work[:, ~done], target[:, ~done], s[:, ~done]
                settled = settled[:, ~done]
                if not active.size:
                    break
            rounds += 1
            ratio = np.where(s > 0, target / np.where(s > 0, s, 1.0), 1.0).clip(1 / _MAX_STEP, _MAX_STEP)
            ratio[settled] = 1.0  # within the noise (or the tolerance): no pull
            factor = np.exp(kernel @ (RELAXATION * np.log(ratio)))  # geometric: a 10x and a 0.1x cancel
            factor[unreached] = 1.0
            work *= factor
        summary["rounds"] = max(summary["rounds"], rounds)
        summary["max_relative_error"] = max(summary["max_relative_error"], error)
        summary["max_noise_sd"] = max(summary["max_noise_sd"], noise_error)
        for array in (values, *others):
            part = block if array is values else np.asarray(array[genes], dtype=np.float64).reshape(block.shape)
            if array is values:
                part[:, on_tissue] = m.T
            else:
                scale = np.where(original > 0, m / np.where(original > 0, original, 1.0), 1.0)
                part[:, on_tissue] = part[:, on_tissue] * scale.T
            array[genes] = part.reshape((-1, *values.shape[1:])).astype(np.float32)
    return summary
