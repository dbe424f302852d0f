"""Streaming the blended output to a zarr store: each chunk written once, after its last tile, and the same values
as blending in memory (bit for bit)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from toy_sections import make_toy_section
from zarr.storage import LocalStore

from c3diff._validation import scale0
from c3diff.tl import _super_resolve
from c3diff.tl._tiling import BlendAccumulator, blend_window, plan_tiles


@pytest.fixture
def chunk_writes(monkeypatch):
    """Counts of every key written to a local zarr store (``c/<gene>/<y>/<x>`` for chunks) while the test runs."""
    writes: Counter[str] = Counter()
    set_ = LocalStore.set

    async def counting_set(self, key, value, *args, **kwargs):
        writes[key] += 1
        return await set_(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", counting_set)
    return writes


def _chunks(writes: Counter[str]) -> Counter[str]:
    return Counter({k: n for k, n in writes.items() if k.startswith("c/")})


@pytest.mark.parametrize("order", ["planned", "shuffled"])
def test_store_writes_each_chunk_once_and_equals_memory(tmp_path, chunk_writes, order):
    rng = np.random.default_rng(0)
    height, width, size, chunk, n = 75, 97, 24, 16, 3
    keep = np.zeros((height, width), dtype=bool)
    keep[5:30, 10:90] = True  # tiles reach row 40: the chunk rows below are never touched
    plan = plan_tiles(height, width, size=size, stride=16, keep=keep)
    tiles = list(plan.tiles)
    if order == "shuffled":  # tasks finishing in any order (dask.distributed)
        tiles = [tiles[i] for i in rng.permutation(len(tiles))]
    values = {t.index: rng.gamma(2.0, 1.5, size=(n, size, size)).astype(np.float32) for t in tiles}
    weight = blend_window(size, 8)
    corners = [(t.row, t.col) for t in plan.tiles]
    memory = BlendAccumulator(n, height, width, chunk=chunk)
    stream = BlendAccumulator(n, height, width, chunk=chunk, store=tmp_path / "acc", tiles=corners, tile_size=size)
    blocks_touched = set()
    for t in tiles:
        memory.add(t.row, t.col, values[t.index], weight)
        stream.add(t.row, t.col, values[t.index], weight)
        blocks_touched.update(stream._blocks(t.row, t.col))
    assert not stream._open  # every block was written when its last tile came in
    expected = np.asarray(memory.result())
    streamed = np.asarray(stream.result())
    np.testing.assert_array_equal(streamed, expected)
    writes = _chunks(chunk_writes)
    assert set(writes.values()) == {1}  # each chunk once
    assert len(writes) == n * len(blocks_touched) == n * stream.chunk_writes
    n_blocks = -(-height // chunk) * -(-width // chunk)
    assert len(blocks_touched) < n_blocks  # untouched blocks are never written; they read as 0
    assert (expected[:, ~np.asarray(memory.weights > 0)] == 0).all()


def test_store_refuses_unplanned_tiles(tmp_path):
    with pytest.raises(ValueError, match="pass `tiles`"):
        BlendAccumulator(1, 40, 40, chunk=16, store=tmp_path / "a")
    acc = BlendAccumulator(1, 40, 40, chunk=16, store=tmp_path / "b", tiles=[(0, 0)], tile_size=16)
    tile, weight = np.ones((1, 16, 16), np.float32), np.ones((16, 16), np.float32)
    acc.add(0, 0, tile, weight)
    with pytest.raises(ValueError, match=r"a tile at \(0, 0\) was not planned"):
        acc.add(0, 0, tile, weight)
    with pytest.raises(ValueError, match=r"a tile at \(16, 0\) was not planned"):
        acc.add(16, 0, tile, weight)
    with pytest.raises(ValueError, match="tiles of 16 x 16 px were planned, got a tile of 8 x 8 px"):
        acc.add(0, 0, tile[:, :8, :8], weight[:8, :8])


def test_planned_tiles_never_added_are_written_by_result(tmp_path, chunk_writes):
    acc = BlendAccumulator(1, 40, 40, chunk=16, store=tmp_path / "a", tiles=[(0, 0), (8, 8)], tile_size=16)
    acc.add(0, 0, np.full((1, 16, 16), 2.0, np.float32), np.ones((16, 16), np.float32))
    assert acc.chunk_writes == 0  # block (0, 0) waits for the tile at (8, 8)
    out = np.asarray(acc.result())
    assert acc.chunk_writes == 1 and (out[0, :16, :16] == 2).all() and (out[0, 16:] == 0).all()
    assert set(_chunks(chunk_writes).values()) == {1}


def test_super_resolve_store_writes_each_chunk_once_and_equals_memory(tmp_path, chunk_writes, monkeypatch):
    """Through super_resolve (bicubic), with 32 px chunks so the toy layer spans several: while tiles are blended,
    each chunk is written once; the published layer equals the in-memory one bit for bit."""
    at_result: list[Counter[str]] = []

    class SmallChunks(BlendAccumulator):
        def __init__(self, *args, chunk, **kwargs):
            super().__init__(*args, chunk=32, **kwargs)

        def result(self):
            out = super().result()
            if self.store is not None:  # before the tissue mask and footprint passes
                at_result.append(_chunks(chunk_writes))
            return out

    monkeypatch.setattr(_super_resolve, "BlendAccumulator", SmallChunks)
    sdata = make_toy_section()
    kwargs = dict(table_key="table", method="bicubic", tile_size=32, inplace=False, progress=False)
    memory = _super_resolve.super_resolve(sdata, "hne", **kwargs)["mean"]
    disk = _super_resolve.super_resolve(sdata, "hne", store=tmp_path / "sr.zarr", **kwargs)["mean"]
    np.testing.assert_array_equal(scale0(disk).values, scale0(memory).values)
    (writes,) = at_result
    n_genes, height, width = scale0(disk).shape
    assert len(writes) > n_genes and set(writes.values()) == {1}  # several chunks per gene, each once
    assert len(writes) <= n_genes * -(-height // 32) * -(-width // 32)
