"""super_resolve estimates its memory before allocating and refuses more genes than fit, saying how many fit.

The available memory is faked (``c3diff.tl._memory.available_memory``): nothing large is ever allocated."""

from __future__ import annotations

import re

import numpy as np
import pytest
from toy_sections import make_toy_section

import c3diff as c3
from c3diff.tl import _memory


@pytest.fixture
def per_gene(monkeypatch):
    """The per-gene estimate of a bicubic run on the toy section (recorded from a run with plenty of memory)."""
    seen = []
    original = _memory.bytes_per_gene

    def spy(**kwargs):
        seen.append(original(**kwargs))
        return seen[-1]

    monkeypatch.setattr("c3diff.tl._super_resolve.bytes_per_gene", spy)
    sdata = make_toy_section()
    c3.tl.super_resolve(sdata, "hne", table_key="table", method="bicubic", tile_size=32, progress=False)
    layer = c3._validation.scale0(sdata.images["hne_bicubic_x10"])
    # the estimate covers at least the output (weighted sums and the blended result) of one gene
    assert seen[0] >= 2 * 4 * layer.shape[1] * layer.shape[2]
    return seen[0]


def test_too_many_genes_are_refused_before_any_work_saying_how_many_fit(per_gene, monkeypatch):
    sdata = make_toy_section()
    before = set(sdata.images)
    monkeypatch.setattr(_memory, "available_memory", lambda: int(2.5 * per_gene / _memory.MEMORY_SHARE))
    called = []
    monkeypatch.setattr("c3diff.pp._model_inputs.spots_to_grid", lambda *a, **k: called.append(1))
    with pytest.raises(MemoryError) as error:
        c3.tl.super_resolve(sdata, "hne", table_key="table", method="bicubic", tile_size=32, progress=False)
    message = str(error.value)
    assert re.search(r"`genes` has 3 genes.*at most 2 genes fit", message), message
    assert "GiB" in message
    streamed = int(re.search(r"store=.*then at most (\d+) genes fit", message).group(1))
    assert streamed == 3  # without the output in memory all three genes would fit
    assert called == [] and set(sdata.images) == before  # refused before the LR rasters were made
    monkeypatch.undo()
    monkeypatch.setattr(_memory, "available_memory", lambda: int(2.5 * per_gene / _memory.MEMORY_SHARE))
    c3.tl.super_resolve(
        sdata, "hne", table_key="table", method="bicubic", tile_size=32, genes=["GENE_A", "GENE_B"], progress=False
    )  # two genes fit
    assert c3._validation.scale0(sdata.images["hne_bicubic_x10"]).shape[0] == 2


def test_streaming_to_a_store_needs_less_and_unknown_memory_is_not_guarded(per_gene, monkeypatch, tmp_path):
    streamed = _memory.bytes_per_gene(
        out_shape=(100, 120), lr_shape=(10, 12), n_tiles=20, lr_tile=4, out_tile=32, n_layers=1, streamed=True
    )
    in_memory = _memory.bytes_per_gene(
        out_shape=(100, 120), lr_shape=(10, 12), n_tiles=20, lr_tile=4, out_tile=32, n_layers=1, streamed=False
    )
    assert in_memory - streamed == 4 * 2 * 100 * 120
    monkeypatch.setattr(_memory, "available_memory", lambda: 1)
    with pytest.raises(MemoryError, match="at most 0 genes fit") as error:
        _memory.check_memory(3, 1000, streamed=True, streamed_per_gene=10)
    assert "store=" not in str(error.value)  # already streamed: not suggested again
    monkeypatch.setattr(_memory, "available_memory", lambda: 10_000)
    with pytest.raises(MemoryError) as error:
        _memory.check_memory(30, 1000, streamed_per_gene=500)  # streaming would fit 16, not 30: still refused
    assert "at most 8 genes fit" in str(error.value) and "then at most 16 genes fit" in str(error.value)
    with pytest.raises(MemoryError) as error:
        _memory.check_memory(30, 1000, streamed_per_gene=950)  # streaming fits no more genes: not suggested
    assert "store=" not in str(error.value)
    monkeypatch.setattr(_memory, "available_memory", lambda: None)
    _memory.check_memory(10**9, 10**9)  # nothing known: no guard


def test_all_genes_of_a_whole_transcriptome_slide_are_refused(monkeypatch):
    """The issue's case: 15,289 genes on a 9.9k x 9.3k px H&E at ~1 um/px asked numpy for ~25 GiB and died."""
    per_gene = _memory.bytes_per_gene(
        out_shape=(990, 930), lr_shape=(99, 93), n_tiles=30, lr_tile=26, out_tile=256, n_layers=1, streamed=False
    )
    monkeypatch.setattr(_memory, "available_memory", lambda: 16 * 2**30)
    with pytest.raises(MemoryError) as error:
        _memory.check_memory(15_289, per_gene)
    fit = int(re.search(r"at most (\d+) genes fit", str(error.value)).group(1))
    assert 0 < fit < 15_289 and fit * per_gene <= 0.8 * 16 * 2**30 < (fit + 1) * per_gene
    assert np.isclose(
        15_289 * per_gene / 2**30, float(re.search(r"need ([\d.]+) GiB", str(error.value)).group(1)), atol=0.05
    )
