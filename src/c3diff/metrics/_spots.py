"""External validation (:doc:`/method`, *Metrics and protocols*): compare a prediction with the measured spots at the
spots only."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from c3diff._geometry import RasterGeometry
from c3diff.metrics._maps import SCORED, _as_maps, _pcc, _rmse, _status, _warn_skipped


def _disc_windows(
    geometry: RasterGeometry, spot_centres_um: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Candidate pixels of each spot: a window around its centre pixel wide enough to hold the whole disc. Returns
    the centres ``(n, 2)`` as (y, x), the windows' ``rows`` and ``cols`` ``(n, k)`` (possibly off the raster) and
    the slot of the spot's centre pixel in a window."""
    centres = np.asarray(spot_centres_um, dtype=float)
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise ValueError(f"`spot_centres_um` must be an (n_spots, 2) array of (y, x) in um, got shape {centres.shape}.")
    ky, kx = math.ceil(radius / geometry.sy) + 1, math.ceil(radius / geometry.sx) + 1
    row0 = np.floor((centres[:, 0] - geometry.y0) / geometry.sy).astype(np.int64)
    col0 = np.floor((centres[:, 1] - geometry.x0) / geometry.sx).astype(np.int64)
    dr, dc = np.meshgrid(np.arange(-ky, ky + 1), np.arange(-kx, kx + 1), indexing="ij")
    rows = row0[:, None] + dr.ravel()[None]
    cols = col0[:, None] + dc.ravel()[None]
    return centres, rows, cols, dr.size // 2  # (dr, dc) == (0, 0)


def _as_raster(raster: np.ndarray, geometry: RasterGeometry) -> np.ndarray:
    """``raster`` as float64 ``(n_genes, height, width)`` matching ``geometry``, else a ValueError."""
    raster = np.asarray(raster, dtype=np.float64)
    if raster.ndim != 3 or raster.shape[1:] != (geometry.height, geometry.width):
        raise ValueError(
            f"`raster` must have shape (n_genes, {geometry.height}, {geometry.width}) to match its geometry, "
            f"got {raster.shape}."
        )
    return raster


def _spot_membership(
    geometry: RasterGeometry, spot_centres_um: np.ndarray, spot_diameter_um: float
) -> tuple[object, np.ndarray]:
    """Sparse 0/1 ``(n_spots, height * width)`` matrix: row ``i`` marks the pixels of ``geometry`` whose centres lie
    inside spot ``i`` (a closed disc); a spot that covers no pixel centre but whose own centre lies on the raster
    gets the pixel under its centre. Also returns the number of pixels per spot (0 = spot off the raster)."""
    from scipy import sparse

    if not (np.isfinite(spot_diameter_um) and spot_diameter_um > 0):
        raise ValueError(f"`spot_diameter_um` must be a positive number of um, got {spot_diameter_um!r}.")
    radius = spot_diameter_um / 2
    centres, rows, cols, centre_slot = _disc_windows(geometry, spot_centres_um, radius)
    row0, col0 = rows[:, centre_slot], cols[:, centre_slot]
    cy, cx = centres[:, 0], centres[:, 1]
    py = geometry.y0 + (rows + 0.5) * geometry.sy
    px = geometry.x0 + (cols + 0.5) * geometry.sx
    inside = ((py - cy[:, None]) ** 2 + (px - cx[:, None]) ** 2 <= radius**2) & (
        (rows >= 0) & (rows < geometry.height) & (cols >= 0) & (cols < geometry.width)
    )
    # spots smaller than a pixel may hold no pixel centre: use the pixel under the spot's centre instead
    centre_on = (row0 >= 0) & (row0 < geometry.height) & (col0 >= 0) & (col0 < geometry.width)
    fallback = ~inside.any(axis=1) & centre_on
    inside[fallback, centre_slot] = True
    spot_idx, slot = np.nonzero(inside)
    flat = rows[spot_idx, slot] * geometry.width + cols[spot_idx, slot]
    matrix = sparse.csr_matrix(
        (np.ones(flat.size), (spot_idx, flat)), shape=(centres.shape[0], geometry.height * geometry.width)
    )
    return matrix, inside.sum(axis=1)


def aggregate_to_spots(
    raster: np.ndarray,
    geometry: RasterGeometry,
    spot_centres_um: np.ndarray,
    spot_diameter_um: float,
) -> np.ndarray:
    """Mean of the raster's pixels inside each spot: a prediction brought onto the measured spots.

    Parameters
    ----------
    raster
        ``(n_genes, height, width)`` values, e.g. a super-resolved prediction.
    geometry
        Placement of ``raster`` in micrometres (:func:`c3diff._validation.raster_geometry`).
    spot_centres_um
        ``(n_spots, 2)`` spot centres as ``(y, x)`` in the raster's micrometre coordinate system, as in
        :attr:`c3diff.pp.Spots.centres` (note: ``obsm["spatial"]`` holds ``(x, y)``; reverse its columns).
    spot_diameter_um
        Spot diameter in micrometres.

    Returns
    -------
    ``(n_spots, n_genes)`` means over the pixels whose centres fall inside each spot's disc (a spot holding no pixel
    centre takes the pixel under its own centre). Non-finite pixels are left out of the mean; spots off the raster,
    or with no finite pixel, are NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff._geometry import RasterGeometry
    >>> from c3diff.metrics import aggregate_to_spots
    >>> grid = RasterGeometry(y0=0, x0=0, sy=10, sx=10, height=10, width=10)
    >>> aggregate_to_spots(np.ones((1, 10, 10)), grid, np.array([[50.0, 50.0]]), 55.0).tolist()
    [[1.0]]
    """
    raster = _as_raster(raster, geometry)
    members, _ = _spot_membership(geometry, spot_centres_um, spot_diameter_um)
    flat = raster.reshape(raster.shape[0], -1).T
    finite = np.isfinite(flat)
    sums = members @ np.where(finite, flat, 0.0)
    counts = members @ finite.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def lr_consistency(
    pred_raster: np.ndarray,
    pred_geometry: RasterGeometry,
    spot_centres_um: np.ndarray,
    spot_diameter_um: float,
    spot_counts: np.ndarray,
    *,
    genes: Sequence[str],
) -> pd.DataFrame:
    """Agreement of a prediction with measured spots, per gene: the external-validation protocol.

    The prediction is brought onto the spots with :func:`aggregate_to_spots` (mean of the prediction's pixels
    whose centres fall inside each spot's disc; the mean, not the sum, so that spots cut by the raster's edge stay
    comparable). Then, per gene and across spots, both vectors are min-max normalised to [0, 1] and compared:
    ``pcc`` is ``|Pearson r|`` and ``rmse`` the RMSE divided by the spots' range (1 after normalising), exactly as
    :func:`rmse`/:func:`pcc` score maps. Units therefore do not matter (counts per spot vs expression per pixel).

    Parameters
    ----------
    pred_raster
        ``(n_genes, height, width)`` prediction.
    pred_geometry
        Its placement in micrometres (:func:`c3diff._validation.raster_geometry`).
    spot_centres_um
        ``(n_spots, 2)`` spot centres ``(y, x)`` in micrometres, as in :attr:`c3diff.pp.Spots.centres` (which
        :func:`c3diff.pp.spots_from_table` reads through the spots' transform); ``obsm["spatial"]`` holds ``(x, y)``.
    spot_diameter_um
        Spot diameter in micrometres (``2 * Spots.radius``).
    spot_counts
        ``(n_spots, n_genes)`` measured counts (dense or scipy sparse), genes in the order of ``pred_raster``.
    genes
        Names of the ``n_genes`` genes.

    Returns
    -------
    One row per gene (index ``gene``) with ``rmse``, ``pcc``, ``n_spots`` (spots compared) and ``status``
    (``"scored"``, ``"constant_truth"`` when the spots do not vary, ``"no_pixels"``). Spots that lie off the
    prediction are left out with a warning giving their number.

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff._geometry import RasterGeometry
    >>> from c3diff.metrics import lr_consistency
    >>> grid = RasterGeometry(y0=0, x0=0, sy=10, sx=10, height=20, width=20)
    >>> pred = np.zeros((1, 20, 20)); pred[0, :, 10:] = 5.0
    >>> centres = np.array([[50.0, 50.0], [50.0, 150.0], [150.0, 50.0], [150.0, 150.0]])
    >>> lr_consistency(pred, grid, centres, 55.0, np.array([[1.0], [9.0], [1.0], [9.0]]), genes=["A"])["pcc"].item()
    1.0
    """
    from scipy import sparse

    genes = [str(g) for g in genes]
    pred_raster = np.asarray(pred_raster)
    if pred_raster.ndim != 3 or pred_raster.shape[0] != len(genes):
        raise ValueError(
            f"`pred_raster` must have shape (n_genes={len(genes)}, height, width), got {pred_raster.shape}."
        )
    counts = spot_counts.toarray() if sparse.issparse(spot_counts) else np.asarray(spot_counts)
    centres = np.asarray(spot_centres_um, dtype=float)
    if counts.shape != (centres.shape[0], len(genes)):
        raise ValueError(
            f"`spot_counts` must have shape (n_spots={centres.shape[0]}, n_genes={len(genes)}), got {counts.shape}."
        )
    agg = aggregate_to_spots(pred_raster, pred_geometry, centres, spot_diameter_um)
    return _compare_spots(agg, counts, genes, stacklevel=3)


def compare_spots(spot_values: np.ndarray, spot_counts: np.ndarray, *, genes: Sequence[str]) -> pd.DataFrame:
    """Per-gene agreement of values brought onto spots with the spots' measured counts: the second half of
    :func:`lr_consistency`, for predictions already aggregated (e.g. with :func:`aggregate_to_spots`, gene chunk by
    gene chunk on a large slide).

    Parameters
    ----------
    spot_values
        ``(n_spots, n_genes)`` prediction per spot; spots that are NaN for every gene (off the prediction) are left
        out, with a warning that counts them.
    spot_counts
        ``(n_spots, n_genes)`` measured counts (numpy or scipy sparse).
    genes
        Names of the ``n_genes`` columns.

    Returns
    -------
    One row per gene (index ``gene``) with ``rmse``, ``pcc``, ``n_spots`` and ``status``, scored as in
    :func:`lr_consistency`.

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff.metrics import compare_spots
    >>> values = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 0.5]])
    >>> compare_spots(values, 10 * values, genes=["A", "B"])["pcc"].round(6).tolist()
    [1.0, 1.0]
    """
    from scipy import sparse

    genes = [str(g) for g in genes]
    values = np.asarray(spot_values, dtype=np.float64)
    counts = spot_counts.toarray() if sparse.issparse(spot_counts) else np.asarray(spot_counts)
    if values.ndim != 2 or values.shape[1] != len(genes) or counts.shape != values.shape:
        raise ValueError(
            f"`spot_values` and `spot_counts` must both have shape (n_spots, n_genes={len(genes)}), got "
            f"{values.shape} and {counts.shape}."
        )
    return _compare_spots(values, counts, genes, stacklevel=3)


def _compare_spots(agg: np.ndarray, counts: np.ndarray, genes: list[str], *, stacklevel: int = 2) -> pd.DataFrame:
    """Per-gene |PCC| and range-normalised RMSE between ``(n_spots, n_genes)`` aggregated predictions and counts."""
    off = np.isnan(agg).all(axis=1)
    if off.any():
        warnings.warn(
            f"lr_consistency: {int(off.sum())} of {len(off)} spot(s) cover no (finite) pixel of the prediction and "
            "were left out.",
            UserWarning,
            stacklevel=stacklevel,
        )
    # genes as maps of shape (1, n_spots): the map scores apply unchanged across spots
    p, t, valid = _as_maps(agg.T[:, None, :], counts.T[:, None, :].astype(np.float64), None)
    status = _status(t, valid)
    frame = pd.DataFrame(
        {
            "rmse": np.where(status == SCORED, _rmse(p, t, valid, True), np.nan),
            "pcc": np.where(status == SCORED, _pcc(p, t, valid), np.nan),
            "n_spots": valid.sum(axis=(-2, -1)),
            "status": status.astype(str),
        },
        index=pd.Index(genes, name="gene"),
    )
    _warn_skipped(status, "lr_consistency", stacklevel=stacklevel + 1)
    return frame


def _quadrant_area(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Signed area of the disc of ``radius`` at the origin inside ``[0, x] x [0, y]`` (odd in ``x`` and in ``y``)."""
    sign = np.sign(x) * np.sign(y)
    x, y = np.minimum(np.abs(x), radius), np.minimum(np.abs(y), radius)
    r2 = radius**2

    def antiderivative(t: np.ndarray) -> np.ndarray:  # integral of sqrt(r^2 - s^2) ds from 0 to t
        return 0.5 * (t * np.sqrt(np.maximum(r2 - t**2, 0.0)) + r2 * np.arcsin(np.clip(t / radius, -1.0, 1.0)))

    t_star = np.sqrt(np.maximum(r2 - y**2, 0.0))  # where the circle crosses height y
    corner_inside = x**2 + y**2 <= r2
    area = np.where(corner_inside, x * y, y * t_star + antiderivative(x) - antiderivative(t_star))
    return sign * area


def spot_footprint(geometry: RasterGeometry, spot_centres_um: np.ndarray, spot_radius_um: float) -> object:
    """Sparse ``(n_spots, height * width)`` matrix: the fraction of each pixel's area that lies inside each spot's
    disc (exact, from the disc's area integral; pixels outside the raster are absent).

    Multiplying it with a raster of amounts per pixel, flattened to ``(height * width, n_genes)``, gives the amounts
    of each spot (:func:`sum_over_spots`).

    Parameters
    ----------
    geometry
        Placement of the raster in micrometres.
    spot_centres_um
        ``(n_spots, 2)`` spot centres ``(y, x)`` in micrometres, as :attr:`c3diff.pp.Spots.centres`.
    spot_radius_um
        Spot radius in micrometres.

    Returns
    -------
    A ``scipy.sparse.csr_matrix`` of shape ``(n_spots, height * width)`` with values in (0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff._geometry import RasterGeometry
    >>> from c3diff.metrics import spot_footprint
    >>> grid = RasterGeometry(y0=0, x0=0, sy=10, sx=10, height=20, width=20)
    >>> round(float(spot_footprint(grid, np.array([[100.0, 100.0]]), 50.0).sum()), 4)  # pi * 50**2 / 10**2
    78.5398
    """
    from scipy import sparse

    if not (np.isfinite(spot_radius_um) and spot_radius_um > 0):
        raise ValueError(f"The spot radius must be a positive number of um, got {spot_radius_um!r}.")
    radius = float(spot_radius_um)
    centres, rows, cols, _ = _disc_windows(geometry, spot_centres_um, radius)
    cy, cx = centres[:, 0], centres[:, 1]
    top = geometry.y0 + rows * geometry.sy - cy[:, None]
    left = geometry.x0 + cols * geometry.sx - cx[:, None]
    bottom, right = top + geometry.sy, left + geometry.sx
    area = (
        _quadrant_area(right, bottom, radius)
        - _quadrant_area(left, bottom, radius)
        - _quadrant_area(right, top, radius)
        + _quadrant_area(left, top, radius)
    )
    fraction = np.clip(area / (geometry.sy * geometry.sx), 0.0, 1.0)
    keep = (fraction > 0) & (rows >= 0) & (rows < geometry.height) & (cols >= 0) & (cols < geometry.width)
    spot_idx, slot = np.nonzero(keep)
    flat = rows[spot_idx, slot] * geometry.width + cols[spot_idx, slot]
    return sparse.csr_matrix(
        (fraction[spot_idx, slot], (spot_idx, flat)), shape=(centres.shape[0], geometry.height * geometry.width)
    )


def sum_over_spots(
    raster: np.ndarray,
    geometry: RasterGeometry,
    spot_centres_um: np.ndarray,
    spot_diameter_um: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A raster of amounts per pixel (e.g. counts per pixel) summed over each spot's disc footprint.

    Each pixel contributes its value times the fraction of its area inside the disc (computed exactly), so a raster
    of counts per pixel gives the expected counts of each spot, whatever the pixel size.

    Parameters
    ----------
    raster
        ``(n_genes, height, width)`` values per pixel.
    geometry
        Placement of ``raster`` in micrometres (:func:`c3diff._validation.raster_geometry`).
    spot_centres_um
        ``(n_spots, 2)`` spot centres ``(y, x)`` in micrometres, as :attr:`c3diff.pp.Spots.centres`.
    spot_diameter_um
        Spot diameter in micrometres.

    Returns
    -------
    ``(n_spots, n_genes)`` sums (non-finite pixels count as 0) and ``(n_spots,)`` the fraction of each disc that lies
    on the raster's finite pixels (1 for a spot fully on the raster; 0 for a spot off it).

    Examples
    --------
    >>> import numpy as np
    >>> import c3diff as c3
    >>> grid = c3._geometry.RasterGeometry(y0=0, x0=0, sy=10, sx=10, height=20, width=20)
    >>> sums, covered = c3.metrics.sum_over_spots(np.ones((1, 20, 20)), grid, np.array([[100.0, 100.0]]), 100.0)
    >>> round(float(sums[0, 0]), 4), float(covered[0])  # pi * 50**2 / 10**2
    (78.5398, 1.0)
    """
    raster = _as_raster(raster, geometry)
    if not (np.isfinite(spot_diameter_um) and spot_diameter_um > 0):
        raise ValueError(f"`spot_diameter_um` must be a positive number of um, got {spot_diameter_um!r}.")
    weights = spot_footprint(geometry, spot_centres_um, spot_diameter_um / 2)
    flat = raster.reshape(raster.shape[0], -1).T
    finite = np.isfinite(flat).all(axis=1)
    sums = np.asarray(weights @ np.where(finite[:, None], flat, 0.0))
    disc_pixels = math.pi * (spot_diameter_um / 2) ** 2 / (geometry.sy * geometry.sx)
    covered = np.asarray(weights @ finite.astype(np.float64)).ravel() / disc_pixels
    covered = np.where(np.abs(covered - 1.0) < 1e-9, 1.0, covered)  # rounding of the exact areas
    return sums, np.clip(covered, 0.0, 1.0)
