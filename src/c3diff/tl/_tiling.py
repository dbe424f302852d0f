"""Whole-slide tiling: where tiles go, how overlapping tiles are blended, and where the blended result accumulates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
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

    With a store, the sums are held per block of the store's chunk grid (``chunk x chunk`` pixels, every channel)
    only while a tile that touches the block is still to come; when the block's last tile is added, the block is
    normalised and written, so each zarr chunk is written once. ``tiles`` (the corners of every tile that will be
    added, in output pixels, and ``tile_size``) say which tiles touch which block. Added in the planned, row-major
    order (:func:`plan_tiles`), about one row of blocks is in memory at a time (the whole slide's width, ``chunk``
    pixels high); added out of order (tasks finishing in any order), blocks stay open until their last tile is in.
    """

    def __init__(
        self,
        n_channels: int,
        height: int,
        width: int,
        *,
        chunk: int,
        store: str | Path | None = None,
        tiles: Sequence[tuple[int, int]] | None = None,
        tile_size: int | None = None,
    ):
        self.shape = (n_channels, height, width)
        self.weights = np.zeros((height, width), dtype=np.float32)
        self.store = store
        if store is None:
            self.values = np.zeros(self.shape, dtype=np.float32)
            return
        if tiles is None or tile_size is None:
            raise ValueError(
                "BlendAccumulator: with a `store`, pass `tiles` (the (row, col) corner of every tile to come) and "
                "`tile_size`, so that each chunk is written once, after its last tile."
            )
        import zarr

        self.block = (min(chunk, height), min(chunk, width))
        self.tile_size = int(tile_size)
        self.values = zarr.open_array(
            str(store),
            mode="w",
            shape=self.shape,
            chunks=(1, *self.block),
            dtype="float32",
            fill_value=0.0,
        )
        self._expected = Counter((int(r), int(c)) for r, c in tiles)
        self._pending = Counter()  # tiles still to come per block
        for (r, c), n in self._expected.items():
            for block in self._blocks(r, c):
                self._pending[block] += n
        self._open: dict[tuple[int, int], np.ndarray] = {}  # weighted sums of the blocks being filled
        self.chunk_writes = 0  # blocks written (each is one chunk per channel)

    def _clip(self, row: int, col: int, shape: tuple[int, int]) -> tuple[int, int]:
        _, height, width = self.shape
        return min(shape[0], height - row), min(shape[1], width - col)

    def _blocks(self, row: int, col: int) -> list[tuple[int, int]]:
        """The blocks of the chunk grid that a tile at ``(row, col)`` covers (inside the grid)."""
        h, w = self._clip(row, col, (self.tile_size, self.tile_size))
        if h <= 0 or w <= 0 or row < 0 or col < 0:
            return []
        by, bx = self.block
        return [
            (i, j) for i in range(row // by, (row + h - 1) // by + 1) for j in range(col // bx, (col + w - 1) // bx + 1)
        ]

    def _bounds(self, block: tuple[int, int]) -> tuple[slice, slice]:
        _, height, width = self.shape
        by, bx = self.block
        return slice(block[0] * by, min((block[0] + 1) * by, height)), slice(
            block[1] * bx, min((block[1] + 1) * bx, width)
        )

    def add(self, row: int, col: int, values: np.ndarray, weight: np.ndarray) -> None:
        """Add ``values * weight`` for a tile whose corner is ``(row, col)``; parts past the grid are dropped.

        With a store, ``(row, col)`` must be one of ``tiles`` not yet added; blocks whose last tile this was are
        written.
        """
        h, w = self._clip(row, col, values.shape[-2:])
        if self.store is not None:
            key = (int(row), int(col))
            if values.shape[-2:] != (self.tile_size, self.tile_size):
                raise ValueError(
                    f"BlendAccumulator: tiles of {self.tile_size} x {self.tile_size} px were planned, got a tile of "
                    f"{values.shape[-2]} x {values.shape[-1]} px at {key}."
                )
            if self._expected[key] <= 0:
                raise ValueError(
                    f"BlendAccumulator: a tile at {key} was not planned (or was added more often than planned); the "
                    "chunks it touches may already be written. Pass every tile's corner in `tiles`."
                )
            self._expected[key] -= 1
        if h <= 0 or w <= 0:
            return
        weight = weight[:h, :w]
        self.weights[row : row + h, col : col + w] += weight
        if self.store is None:
            region = (slice(None), slice(row, row + h), slice(col, col + w))
            self.values[region] = self.values[region] + values[:, :h, :w] * weight
            return
        for block in self._blocks(row, col):
            ys, xs = self._bounds(block)
            y0, y1 = max(ys.start, row), min(ys.stop, row + h)
            x0, x1 = max(xs.start, col), min(xs.stop, col + w)
            sums = self._open.get(block)
            if sums is None:
                sums = self._open[block] = np.zeros((self.shape[0], ys.stop - ys.start, xs.stop - xs.start), np.float32)
            part = (slice(None), slice(y0 - ys.start, y1 - ys.start), slice(x0 - xs.start, x1 - xs.start))
            sums[part] = (
                sums[part]
                + values[:, y0 - row : y1 - row, x0 - col : x1 - col] * weight[y0 - row : y1 - row, x0 - col : x1 - col]
            )
            self._pending[block] -= 1
            if self._pending[block] == 0:
                self._write(block)

    def _write(self, block: tuple[int, int]) -> None:
        """Normalise a block's sums by the blending weights and write it (one chunk per channel)."""
        sums = self._open.pop(block)
        ys, xs = self._bounds(block)
        weights = self.weights[ys, xs]
        self.values[:, ys, xs] = sums / np.where(weights > 0, weights, 1.0).astype(np.float32)
        self.chunk_writes += 1

    def result(self):
        """The blended raster ``(c, h, w)`` (0 where no tile): a numpy array, or a dask array reading the store.

        With a store, blocks still open (tiles that were planned but never added) are written now; blocks no tile
        touched are never written and read as 0 (the store's fill value).
        """
        if self.store is None:
            safe = np.where(self.weights > 0, self.weights, 1.0).astype(np.float32)
            return self.values / safe
        import dask.array as da

        for block in sorted(self._open):
            self._write(block)
        return da.from_zarr(str(self.store))
