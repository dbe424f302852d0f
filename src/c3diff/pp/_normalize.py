"""Per-map min-max normalisation (:doc:`/method`, *Normalisation and units*) and its inverse."""

from __future__ import annotations

import numpy as np


def minmax_normalize(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale each map (the last two axes) to [0, 1]; constant maps become 0.

    Returns ``(normalised, low, high)`` with ``low``/``high`` of shape ``maps.shape[:-2]`` so that
    :func:`minmax_denormalize` maps values back to the input units.
    """
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(-2, -1))
    high = maps.max(axis=(-2, -1))
    span = high - low
    safe = np.where(span > 0, span, 1.0)
    normalised = (maps - low[..., None, None]) / safe[..., None, None]
    normalised[span <= 0] = 0.0
    return normalised.astype(np.float32), low.astype(np.float32), high.astype(np.float32)


def minmax_denormalize(normalised: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Inverse of :func:`minmax_normalize`: ``low + normalised * (high - low)`` per map."""
    low = np.asarray(low, dtype=np.float32)[..., None, None]
    high = np.asarray(high, dtype=np.float32)[..., None, None]
    return (low + np.asarray(normalised, dtype=np.float32) * (high - low)).astype(np.float32)
