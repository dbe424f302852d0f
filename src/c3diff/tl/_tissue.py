"""The tissue mask of a super-resolved layer: outputs hold counts on tissue only, the same mask for every method."""

from __future__ import annotations

from typing import Any

import numpy as np


def layer_tissue_mask(tissue: np.ndarray, out_factor: int, shape: tuple[int, int]) -> np.ndarray:
    """The tissue mask of a histology-grid raster pooled to the output grid.

    Parameters
    ----------
    tissue
        ``(h, w)`` bool on the histology grid (10 um): tissue detected in the H&E
        (:func:`c3diff.pp.detect_tissue`) where the LR counts have data (measured or gap-filled pixels of the
        coverage mask), the mask that also chooses the tiles.
    out_factor
        Histology pixels per output pixel (1 at ``scale=10``, 2 at ``scale=5``).
    shape
        ``(height, width)`` of the output grid (``ceil`` of the histology grid over ``out_factor``).

    Returns
    -------
    ``shape`` bool: an output pixel is tissue when any of its histology pixels is.
    """
    height, width = shape
    padded = np.zeros((height * out_factor, width * out_factor), dtype=bool)
    h, w = min(tissue.shape[0], padded.shape[0]), min(tissue.shape[1], padded.shape[1])
    padded[:h, :w] = tissue[:h, :w]
    return padded.reshape(height, out_factor, width, out_factor).any(axis=(1, 3))


def zero_off_tissue(arrays: tuple[Any, ...], mask: np.ndarray, *, max_elements: int = 2**22) -> None:
    """Set every pixel off ``mask`` to 0 in each ``(genes, height, width)`` array (numpy or zarr), in place.

    Gene batches of at most ``max_elements`` values are read and written at a time.
    """
    off = ~np.asarray(mask, dtype=bool)
    if not off.any():
        return
    for array in arrays:
        batch = max(1, int(max_elements // max(off.size, 1)))
        for start in range(0, array.shape[0], batch):
            genes = slice(start, min(start + batch, array.shape[0]))
            part = np.asarray(array[genes])
            part[:, off] = 0.0
            array[genes] = part
