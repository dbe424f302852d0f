"""Map-to-map scores (:doc:`/method`, *Metrics and protocols*): range-normalised RMSE, |PCC| and Gaussian SSIM per
(item, gene)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

#: Values of the ``status`` column of :func:`score_maps`.
SCORED, CONSTANT_TRUTH, NO_PIXELS = "scored", "constant_truth", "no_pixels"
#: Gaussian SSIM settings of the paper (Wang et al. 2004): an 11-tap filter with sigma 1.5 on [0, 1] maps.
SSIM_SIGMA = 1.5
METRICS = ("rmse", "pcc", "ssim")


def _as_maps(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes; return float64 ``pred``, ``truth`` and the boolean ``valid`` pixels, all of the same shape."""
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape:
        raise ValueError(f"`pred` and `truth` must have the same shape, got {pred.shape} and {truth.shape}.")
    if pred.ndim < 2:
        raise ValueError(f"`pred` and `truth` must be maps of shape (..., height, width), got shape {pred.shape}.")
    valid = np.isfinite(pred) & np.isfinite(truth)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(f"`mask` must be a boolean array (True = pixel scored), got dtype {mask.dtype}.")
        try:
            valid &= np.broadcast_to(mask, pred.shape)
        except ValueError:
            raise ValueError(
                f"`mask` of shape {mask.shape} does not broadcast to the maps' shape {pred.shape}; pass a "
                "(height, width) mask or one per item."
            ) from None
    return pred, truth, valid


def _minmax(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-map (last two axes) min-max to [0, 1] over ``valid`` pixels; constant maps become 0.

    Returns the normalised maps (invalid pixels set to 0) and the per-map range before normalising."""
    lo = np.where(valid, values, np.inf).min(axis=(-2, -1), keepdims=True)
    hi = np.where(valid, values, -np.inf).max(axis=(-2, -1), keepdims=True)
    span = hi - lo
    ok = np.isfinite(span) & (span > 0)
    scaled = np.where(valid & ok, (values - np.where(ok, lo, 0.0)) / np.where(ok, span, 1.0), 0.0)
    return scaled, np.where(np.isfinite(span), span, 0.0)[..., 0, 0]


def _status(truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per map: ``scored``, ``no_pixels`` (fewer than 2 valid pixels) or ``constant_truth``."""
    n = valid.sum(axis=(-2, -1))
    _, span = _minmax(truth, valid)
    status = np.full(n.shape, SCORED, dtype=object)
    status[span <= 0] = CONSTANT_TRUTH
    status[n < 2] = NO_PIXELS
    return status


def _rmse(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray, normalize: bool) -> np.ndarray:
    if normalize:
        pred, _ = _minmax(pred, valid)
        truth, _ = _minmax(truth, valid)
    _, span = _minmax(truth, valid)  # 1 after normalising (0 for a constant truth, skipped by the caller)
    n = valid.sum(axis=(-2, -1))
    sq = np.where(valid, (pred - truth) ** 2, 0.0).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(sq / n) / span


def _pcc(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    n = valid.sum(axis=(-2, -1), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        dp = np.where(valid, pred - np.where(valid, pred, 0.0).sum(axis=(-2, -1), keepdims=True) / n, 0.0)
        dt = np.where(valid, truth - np.where(valid, truth, 0.0).sum(axis=(-2, -1), keepdims=True) / n, 0.0)
        cov = (dp * dt).sum(axis=(-2, -1))
        vp = (dp * dp).sum(axis=(-2, -1))
        vt = (dt * dt).sum(axis=(-2, -1))
        r = np.abs(cov) / np.sqrt(vp * vt)
    # a flat prediction explains none of the truth's variation: score it 0 rather than skipping it
    return np.where(vp > 0, np.clip(r, 0.0, 1.0), 0.0)


def _ssim(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    p, _ = _minmax(pred, valid)
    t, _ = _minmax(truth, valid)
    lead = p.shape[:-2]
    p = p.reshape(-1, *p.shape[-2:])
    t = t.reshape(-1, *t.shape[-2:])
    v = valid.reshape(-1, *valid.shape[-2:])
    out = np.full(p.shape[0], np.nan)
    radius = int(3.5 * SSIM_SIGMA + 0.5)  # skimage's window: truncate 3.5 -> 11 taps
    if min(p.shape[-2:]) < 2 * radius + 1:
        return out.reshape(lead)  # too small for the Gaussian window; reported by the caller
    everywhere = bool(v.all())
    for i in range(p.shape[0]):
        kwargs = dict(gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False, data_range=1.0)
        if everywhere:
            out[i] = structural_similarity(p[i], t[i], **kwargs)
            continue
        # with a mask: average skimage's local SSIM map over the scored pixels, leaving out the same border strip
        _, local = structural_similarity(p[i], t[i], full=True, **kwargs)
        inner = v[i, radius:-radius, radius:-radius]
        if inner.any():
            out[i] = local[radius:-radius, radius:-radius][inner].mean()
    return out.reshape(lead)


def _warn_skipped(status: np.ndarray, name: str, stacklevel: int = 3) -> None:
    status = np.asarray(status)
    n_const = int((status == CONSTANT_TRUTH).sum())
    n_empty = int((status == NO_PIXELS).sum())
    if n_const or n_empty:
        parts = []
        if n_const:
            parts.append(f"{n_const} with a constant ground truth")
        if n_empty:
            parts.append(f"{n_empty} with fewer than 2 scored pixels")
        warnings.warn(
            f"{name}: skipped {' and '.join(parts)} of {status.size} map(s); their scores are NaN.",
            UserWarning,
            stacklevel=stacklevel,
        )


def _finish(values: np.ndarray, status: np.ndarray, name: str) -> np.ndarray | float:
    values = np.where(status == SCORED, values, np.nan)
    _warn_skipped(status, name, stacklevel=4)
    return float(values) if values.ndim == 0 else values


def rmse(
    pred: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None, normalize: bool = True
) -> np.ndarray | float:
    """Root-mean-square error divided by the ground-truth range, per map.

    Parameters
    ----------
    pred, truth
        Maps of the same shape ``(..., height, width)``; every leading index is one item (e.g. one patch-gene).
    mask
        Boolean pixels to score (e.g. tissue), broadcastable to the maps. Non-finite pixels are never scored.
    normalize
        Min-max each map (prediction and truth separately, over the scored pixels) to [0, 1] first, as in the paper
        (:doc:`/method`, *Metrics and protocols*). The truth's range is then 1. With ``False`` the RMSE is in the maps'
        units, divided by the truth's range (a normalised RMSE).

    Returns
    -------
    One value per item (a ``float`` for a single map). Maps whose ground truth is constant, or that have fewer than
    two scored pixels, are skipped: NaN, with a warning giving their number.

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff.metrics import rmse
    >>> truth = np.arange(16.0).reshape(4, 4)
    >>> rmse(truth * 3 + 1, truth)
    0.0
    """
    pred, truth, valid = _as_maps(pred, truth, mask)
    return _finish(_rmse(pred, truth, valid, normalize), _status(truth, valid), "rmse")


def pcc(pred: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray | float:
    """Absolute Pearson correlation between prediction and truth pixels, per map.

    Parameters
    ----------
    pred, truth
        Maps of the same shape ``(..., height, width)``.
    mask
        Boolean pixels to score, broadcastable to the maps. Non-finite pixels are never scored.

    Returns
    -------
    ``|r|`` per item in [0, 1] (the paper's protocol: anti-correlation counts as correlation). A constant
    prediction of a non-constant truth scores 0; constant truths are skipped (NaN, counted in a warning).

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff.metrics import pcc
    >>> truth = np.arange(16.0).reshape(4, 4)
    >>> pcc(-truth, truth)
    1.0
    """
    pred, truth, valid = _as_maps(pred, truth, mask)
    return _finish(_pcc(pred, truth, valid), _status(truth, valid), "pcc")


def ssim(pred: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray | float:
    """Gaussian structural similarity (sigma 1.5) of the [0, 1]-normalised maps, per map.

    Uses :func:`skimage.metrics.structural_similarity` with ``gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1`` on maps min-max normalised over their scored pixels.

    Parameters
    ----------
    pred, truth
        Maps of the same shape ``(..., height, width)``; each map must be at least 11 x 11 pixels (the Gaussian
        window), smaller maps give NaN with a warning.
    mask
        Boolean pixels to score. SSIM is local, so the whole map is filtered and the local SSIM map is averaged over
        the scored pixels (outside skimage's 5-pixel border strip, as without a mask).

    Returns
    -------
    Mean SSIM per item; constant truths are skipped (NaN, counted in a warning).

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff.metrics import ssim
    >>> truth = np.random.default_rng(0).random((32, 32))
    >>> round(ssim(truth, truth), 6)
    1.0
    """
    pred, truth, valid = _as_maps(pred, truth, mask)
    status = _status(truth, valid)
    values = _ssim(pred, truth, valid)
    small = (status == SCORED) & np.isnan(values)
    if small.any():
        warnings.warn(
            f"ssim: {int(small.sum())} map(s) have no pixel inside the Gaussian window's border "
            f"(maps of shape {pred.shape[-2:]} need at least 11 x 11 pixels): NaN.",
            UserWarning,
            stacklevel=2,
        )
    return _finish(values, status, "ssim")


def score_maps(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    genes: Sequence[str],
    mask: np.ndarray | None = None,
    normalize: bool = True,
    warn: bool = True,
) -> pd.DataFrame:
    """RMSE, PCC and SSIM for every (item, gene): the paper's per patch-gene scores.

    Parameters
    ----------
    pred, truth
        Arrays of shape ``(n_items, n_genes, height, width)`` (e.g. patches) or ``(n_genes, height, width)``
        (a single item).
    genes
        Names of the ``n_genes`` channels.
    mask
        Boolean pixels to score: ``(height, width)`` for all items, or ``(n_items, height, width)``.
    normalize
        Min-max each map to [0, 1] before the RMSE (see :func:`rmse`).
    warn
        Warn about skipped maps (their count). Pass ``False`` when scoring many pieces of one map and counting the
        ``status`` column afterwards, as :func:`c3diff.tl.evaluate` does per tile.

    Returns
    -------
    One row per (item, gene) with columns ``item``, ``gene``, ``rmse``, ``pcc``, ``ssim``, ``n_pixels`` and
    ``status`` (``"scored"``, ``"constant_truth"`` or ``"no_pixels"``; skipped rows hold NaN scores, and a warning
    gives their number). Average with :func:`summarize_scores`.

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff.metrics import score_maps, summarize_scores
    >>> truth = np.random.default_rng(0).random((4, 2, 32, 32))
    >>> scores = score_maps(truth, truth, genes=["A", "B"])
    >>> summarize_scores(scores)[["rmse", "pcc", "ssim"]].round(6).values.tolist()
    [[0.0, 1.0, 1.0]]
    """
    frame, status = _score_frame(pred, truth, genes=genes, mask=mask, normalize=normalize)
    if warn:
        _warn_skipped(status, "score_maps")
    return frame


def _score_frame(
    pred: np.ndarray, truth: np.ndarray, *, genes: Sequence[str], mask: np.ndarray | None, normalize: bool = True
) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`score_maps` without the warning; also returns the ``(n_items, n_genes)`` status array."""
    pred_a, truth_a = np.asarray(pred), np.asarray(truth)
    if pred_a.ndim == 3:
        pred_a, truth_a = pred_a[None], truth_a[None]
    if pred_a.ndim != 4:
        raise ValueError(
            f"`pred` must have shape (n_items, n_genes, height, width) or (n_genes, height, width), got {pred_a.shape}."
        )
    genes = [str(g) for g in genes]
    if len(genes) != pred_a.shape[1]:
        raise ValueError(f"`genes` names {len(genes)} genes but the maps have {pred_a.shape[1]} channels.")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 3:  # one mask per item, shared by its genes
            mask = mask[:, None]
    p, t, valid = _as_maps(pred_a, truth_a, mask)
    status = _status(t, valid)
    frame = pd.DataFrame(
        {
            "item": np.repeat(np.arange(p.shape[0]), p.shape[1]),
            "gene": pd.Categorical(np.tile(genes, p.shape[0]), categories=genes),
            "rmse": np.where(status == SCORED, _rmse(p, t, valid, normalize), np.nan).ravel(),
            "pcc": np.where(status == SCORED, _pcc(p, t, valid), np.nan).ravel(),
            "ssim": np.where(status == SCORED, _ssim(p, t, valid), np.nan).ravel(),
            "n_pixels": valid.sum(axis=(-2, -1)).ravel(),
            "status": status.ravel().astype(str),
        }
    )
    return frame, status


def summarize_scores(scores: pd.DataFrame, *, by: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Average per-item scores: the paper's protocol (score each patch-gene, then average).

    Parameters
    ----------
    scores
        Output of :func:`score_maps`, :func:`~c3diff.tl.evaluate` or :func:`lr_consistency` (any frame with
        ``rmse``/``pcc`` (and optionally ``ssim``) columns and a ``status`` column).
    by
        Column(s) to group by, e.g. ``"gene"`` for one row per gene. A ``protocol`` column, when present, is always
        a grouping key so that scores of different protocols are never averaged together.

    Returns
    -------
    Mean of each metric over the scored rows, with ``n_scored`` and ``n_skipped`` counts. Without ``by``
    (and no ``protocol`` column) a single row indexed ``"all"``.

    Examples
    --------
    >>> import numpy as np
    >>> from c3diff.metrics import score_maps, summarize_scores
    >>> truth = np.random.default_rng(0).random((3, 2, 16, 16))
    >>> summarize_scores(score_maps(truth, truth, genes=["A", "B"]), by="gene")["n_scored"].tolist()
    [3, 3]
    """
    if "status" not in scores.columns:
        raise KeyError("`scores` has no 'status' column; pass the output of `score_maps` or `c3.tl.evaluate`.")
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    if "protocol" in scores.columns and "protocol" not in keys:
        keys = ["protocol", *keys]
    missing = [k for k in keys if k not in scores.columns]
    if missing:
        raise KeyError(f"`by`: column(s) {missing} not in `scores` (columns: {list(scores.columns)}).")
    metrics = [m for m in METRICS if m in scores.columns]
    work = scores.assign(_scored=scores["status"] == SCORED)
    masked = work[metrics].where(np.broadcast_to(work["_scored"].to_numpy()[:, None], (len(work), len(metrics))))
    work = pd.concat([masked, work[keys], work["_scored"]], axis=1)
    if not keys:
        row = {m: work[m].mean() for m in metrics}
        row["n_scored"] = int(work["_scored"].sum())
        row["n_skipped"] = int((~work["_scored"]).sum())
        return pd.DataFrame([row], index=pd.Index(["all"]))
    grouped = work.groupby(keys, observed=True, sort=False)
    out = grouped[metrics].mean()
    out["n_scored"] = grouped["_scored"].sum().astype(int)
    out["n_skipped"] = grouped["_scored"].size().astype(int) - out["n_scored"]
    return out
