"""A tile's [0, 1] prediction -> expected counts per output pixel, calibrated to the LR counts it was predicted from
(see :data:`c3diff.tl.UNITS` and ``calibration`` in :func:`c3diff.tl.super_resolve`)."""

from __future__ import annotations

import numpy as np

from c3diff._constants import MASK_MEASURED, MASK_OUTSIDE

#: Calibrations of a [0, 1] prediction to counts (see :func:`c3diff.tl.super_resolve`).
CALIBRATIONS = ("lr_pixel", "tile")


def to_counts(
    pred: np.ndarray,
    std: np.ndarray | None,
    lr_counts: np.ndarray,
    lr_mask: np.ndarray,
    per_lr: int,
    calibration: str = "lr_pixel",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Map a [0, 1] tile prediction ``(G, h, w)`` to counts per output pixel (see :data:`c3diff.tl.UNITS`).

    ``"tile"``: each gene is scaled so that the prediction summed over the tile's measured LR pixels equals their LR
    counts; a gene predicted flat zero where the LR has counts (e.g. a constant LR map, which min-max maps to 0) gets
    the LR density spread evenly instead.

    ``"lr_pixel"``: the prediction keeps its pattern inside each LR pixel but is scaled so that its sum over the LR
    pixel equals the LR count (for an LR pixel cut by the tile's edge, the count times the fraction inside): the
    output honours every measurement at the resolution it was made, as a data-consistency projection. LR pixels
    where the prediction is zero but the count is not get the count spread evenly; LR pixels outside the measured
    area (no spot coverage) keep the tile calibration.

    Parameters
    ----------
    pred
        The tile's prediction ``(G, h, w)`` in [0, 1], on the output grid.
    std
        Its standard deviation over samples (same shape), or ``None``; scaled by the same factors.
    lr_counts
        The LR counts under the tile ``(G, L, L)``, counts per LR pixel.
    lr_mask
        The LR coverage ``(L, L)``: outside / measured / filled (:data:`c3diff._constants.MASK_OUTSIDE`, ...).
    per_lr
        Output pixels per LR pixel along one axis.
    calibration
        ``"lr_pixel"`` or ``"tile"`` (:data:`CALIBRATIONS`).

    Returns
    -------
    ``(counts, std)``: float32 ``(G, h, w)`` expected counts per output pixel, and the scaled ``std`` (or ``None``).

    Examples
    --------
    >>> pred = np.full((1, 4, 4), 0.5, dtype=np.float32)
    >>> lr, mask = np.array([[[8.0, 4.0], [0.0, 2.0]]]), np.ones((2, 2), dtype=np.uint8)
    >>> counts, _ = to_counts(pred, None, lr, mask, 2)
    >>> counts[0].tolist()
    [[2.0, 2.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]]
    """
    counts, factors = _tile_calibration(pred, lr_counts, lr_mask, per_lr)
    if calibration == "lr_pixel":
        counts, factors = _lr_pixel_calibration(pred, counts, factors, lr_counts, lr_mask, per_lr)
    if std is None:
        return counts, None
    return counts, std * factors


def _tile_calibration(
    pred: np.ndarray, lr_counts: np.ndarray, lr_mask: np.ndarray, per_lr: int
) -> tuple[np.ndarray, np.ndarray]:
    n = pred.shape[-1] // per_lr
    pooled = pred[:, : n * per_lr, : n * per_lr].reshape(pred.shape[0], n, per_lr, n, per_lr).sum(axis=(2, 4))
    measured = lr_mask[:n, :n] == MASK_MEASURED
    if not measured.any():
        measured = lr_mask[:n, :n] != MASK_OUTSIDE
    numerator = lr_counts[:, :n, :n][:, measured].sum(axis=1)
    denominator = pooled[:, measured].sum(axis=1)
    factors = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)
    factors = np.broadcast_to(factors[:, None, None], pred.shape).astype(np.float32)
    counts = pred * factors
    flat = (denominator <= 0) & (numerator > 0)
    if flat.any():
        counts[flat] = (numerator[flat] / (max(int(measured.sum()), 1) * per_lr**2))[:, None, None]
    return counts, factors


def _lr_pixel_calibration(
    pred: np.ndarray,
    counts: np.ndarray,
    factors: np.ndarray,
    lr_counts: np.ndarray,
    lr_mask: np.ndarray,
    per_lr: int,
) -> tuple[np.ndarray, np.ndarray]:
    n_genes, height, width = pred.shape
    ny, nx = -(-height // per_lr), -(-width // per_lr)  # LR pixels touched by the tile, the last ones maybe cut
    ny, nx = min(ny, lr_counts.shape[-2]), min(nx, lr_counts.shape[-1])
    h, w = min(height, ny * per_lr), min(width, nx * per_lr)
    padded = np.zeros((n_genes, ny * per_lr, nx * per_lr), dtype=np.float64)
    padded[:, :h, :w] = pred[:, :h, :w]
    pooled = padded.reshape(n_genes, ny, per_lr, nx, per_lr).sum(axis=(2, 4))
    inside = np.zeros((ny * per_lr, nx * per_lr))
    inside[:h, :w] = 1.0
    n_inside = inside.reshape(ny, per_lr, nx, per_lr).sum(axis=(1, 3))  # output pixels of each LR pixel in the tile
    expected = lr_counts[:, :ny, :nx].astype(np.float64) * (n_inside / per_lr**2)
    covered = (lr_mask[:ny, :nx] != MASK_OUTSIDE) & (n_inside > 0)
    block = np.where(pooled > 0, expected / np.where(pooled > 0, pooled, 1.0), 0.0)
    even = np.where((pooled <= 0) & (expected > 0), expected / np.maximum(n_inside, 1), 0.0)

    def up(a: np.ndarray) -> np.ndarray:  # LR grid -> output pixels of the tile
        return np.repeat(np.repeat(a, per_lr, axis=-2), per_lr, axis=-1)[..., :h, :w]

    use = up(np.broadcast_to(covered, block.shape))
    counts, factors = counts.copy(), factors.copy()
    counts[:, :h, :w] = np.where(use, pred[:, :h, :w] * up(block) + up(even), counts[:, :h, :w])
    factors[:, :h, :w] = np.where(use, up(block), factors[:, :h, :w])
    return counts.astype(np.float32), factors.astype(np.float32)
