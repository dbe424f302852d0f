"""Whole-slide tiling: where tiles go, how overlapping tiles are blended, and where the blended result accumulates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Tile:
    """A tile of the output grid: its index in the plan and its top-left corner in output pixels."""

    index: int
    row: int
    col: int


@dataclass(frozen=True)
class TilePlan:
    """Tiles of ``size`` output pixels laid every ``stride`` pixels over an output grid of ``height x width``.

    Tiles may run past the grid's bottom/right edge (their outside part is padded on input and dropped on output);
    the last row/column of tiles is placed so that the grid is fully covered.
    """

    height: int
    width: int
    size: int
    stride: int
    tiles: tuple[Tile, ...]

    @property
    def overlap(self) -> int:
        return self.size - self.stride

    def __len__(self) -> int:
        return len(self.tiles)


def plan_tiles(
    height: int,
    width: int,
    *,
    size: int,
    stride: int,
    keep: np.ndarray | None = None,
) -> TilePlan:
    """Lay tiles over a grid; with ``keep`` (a boolean ``(height, width)`` mask, e.g. tissue) only tiles touching it.

    Every pixel of ``keep`` is covered by at least one tile.
    """
    if size <= 0 or stride <= 0 or stride > size:
        raise ValueError(f"Tiles need 0 < stride <= size, got size={size}, stride={stride}.")
    rows = list(range(0, max(height - size, 0) + 1, stride))
    cols = list(range(0, max(width - size, 0) + 1, stride))
    if rows[-1] + size < height:
        rows.append(rows[-1] + stride)
    if cols[-1] + size < width:
        cols.append(cols[-1] + stride)
    tiles = []
    for r in rows:
        for c in cols:
            if keep is not None and not keep[r : r + size, c : c + size].any():
                continue
            tiles.append(Tile(index=len(tiles), row=r, col=c))
    return TilePlan(height=height, width=width, size=size, stride=stride, tiles=tuple(tiles))


def blend_window(size: int, overlap: int) -> np.ndarray:
    """Separable ``(size, size)`` weights: 1 in the core, a raised-cosine ramp over ``overlap`` pixels at each edge.

    Where two tiles overlap, their ramps cross-fade, so a constant input stays constant (no seams). The ramp never
    reaches 0, so pixels covered by a single tile (the slide's border) keep that tile's value after normalisation.
    """
    ramp = np.ones(size, dtype=np.float64)
    if overlap > 0:
        t = (np.arange(overlap) + 0.5) / overlap
        rise = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap] = np.minimum(ramp[:overlap], rise)
        ramp[size - overlap :] = np.minimum(ramp[size - overlap :], rise[::-1])
    return np.outer(ramp, ramp).astype(np.float32)


class BlendAccumulator:
    """Weighted sums of overlapping tiles, in memory (numpy) or streamed to a zarr store on disk.

    With a store, only the tile being added is in memory, so memory stays flat whatever the slide size.
    """

    def __init__(self, n_channels: int, height: int, width: int, *, chunk: int, store: str | Path | None = None):
        self.shape = (n_channels, height, width)
        self.weights = np.zeros((height, width), dtype=np.float32)
        self.store = store
        if store is None:
            self.values = np.zeros(self.shape, dtype=np.float32)
        else:
            import zarr

            self.values = zarr.open_array(
                str(store),
                mode="w",
                shape=self.shape,
                chunks=(1, min(chunk, height), min(chunk, width)),
                dtype="float32",
                fill_value=0.0,
            )

    def add(self, row: int, col: int, values: np.ndarray, weight: np.ndarray) -> None:
        """Add ``values * weight`` for a tile whose corner is ``(row, col)``; parts past the grid are dropped."""
        _, height, width = self.shape
        h = min(values.shape[-2], height - row)
        w = min(values.shape[-1], width - col)
        if h <= 0 or w <= 0:
            return
        weight = weight[:h, :w]
        region = (slice(None), slice(row, row + h), slice(col, col + w))
        self.values[region] = self.values[region] + values[:, :h, :w] * weight
        self.weights[row : row + h, col : col + w] += weight

    def result(self):
        """The blended raster ``(c, h, w)`` (0 where no tile): a numpy array, or a dask array reading the store.

        With a store, the weighted sums are normalised in place, one chunk at a time.
        """
        safe = np.where(self.weights > 0, self.weights, 1.0).astype(np.float32)
        if self.store is None:
            return self.values / safe
        import dask.array as da

        _, height, width = self.shape
        step_y, step_x = self.values.chunks[1], self.values.chunks[2]
        for r in range(0, height, step_y):
            for c in range(0, width, step_x):
                window = (slice(None), slice(r, r + step_y), slice(c, c + step_x))
                self.values[window] = self.values[window] / safe[r : r + step_y, c : c + step_x]
        return da.from_zarr(str(self.store))
