"""The protocol of benchmarks/real_pool_recover.py (pooling, scores, method registry) on a small synthetic array."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_pool_recover.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_pool_recover", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_pool_recover"] = module
    spec.loader.exec_module(module)
    return module


def _array(n: int = 8, pitch: float = 200.0):
    """An ``n x n`` legacy-ST array (plus one lone spot in a block of its own) with smooth expression."""
    import anndata as ad
    import pandas as pd

    x, y = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    x, y = np.append(x.ravel(), n), np.append(y.ravel(), 0)  # (n, 0): alone in its block, next to the array
    xy = np.column_stack([x, y]) * pitch + 300.0
    gradient = 1 + x / n
    counts = np.column_stack([100 * gradient, 100 * (3 - gradient), 50 + 20 * np.sin(y), 500 + 0 * x]).round()
    obs = pd.DataFrame({"array_x": x, "array_y": y}, index=[f"{a}x{b}" for a, b in zip(x, y, strict=True)])
    adata = ad.AnnData(counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=["A", "B", "C", "D"]))
    adata.obsm["spatial"] = xy
    return adata, xy, counts.sum(axis=1)


def test_pooling_sums_members_and_drops_lone_blocks(bench):
    adata, xy, library = _array()
    pseudo, block_id, in_kept = bench.pool(adata, xy, library, ["A", "B", "C"], 2, pitch=200.0, diameter=100.0)
    assert len(pseudo.centres) == 16 and (pseudo.members == 4).all()
    assert not in_kept[-1] and in_kept[:-1].all()  # the lone spot's block is dropped, the spot still scored
    first = block_id == block_id[0]
    np.testing.assert_allclose(pseudo.counts[0], adata[first, ["A", "B", "C"]].X.sum(axis=0))
    np.testing.assert_allclose(pseudo.centres[0], xy[first].mean(axis=0))
    np.testing.assert_allclose(pseudo.values, np.log1p(pseudo.counts / pseudo.library[:, None] * 1e4))


def test_scores_perfect_and_flat_within_blocks(bench):
    adata, xy, library = _array()
    truth = np.log1p(adata[:, ["A", "B", "C"]].X / library[:, None] * 1e4)
    pseudo, block_id, in_kept = bench.pool(adata, xy, library, ["A", "B", "C"], 2, pitch=200.0, diameter=100.0)
    assert bench.score(truth, truth, block_id, in_kept) == pytest.approx((1.0, 1.0))
    targets = bench.Targets(centres=xy, diameter=100.0)
    nearest = bench.METHODS["nearest"](pseudo, None, targets)
    pearson, within = bench.score(truth, nearest, block_id, in_kept)
    assert within == 0.0 and 0.5 < pearson < 1.0


def test_every_method_of_the_registry_predicts_every_spot(bench):
    adata, xy, library = _array()
    genes = ["A", "B", "C"]
    truth = np.log1p(adata[:, genes].X / library[:, None] * 1e4)
    pseudo, block_id, in_kept = bench.pool(adata, xy, library, genes, 2, pitch=200.0, diameter=100.0)
    rng = np.random.default_rng(0)
    hne = bench.Histology(rgb=rng.integers(120, 230, (1150, 1950, 3), dtype=np.uint8), pixel_size=2.0)
    targets = bench.Targets(centres=xy, diameter=100.0)
    scores = {}
    for name in ("nearest", "cubic", "rbf", "he_ridge", "c3diff_bicubic"):
        pred = bench.METHODS[name](pseudo, hne, targets)
        assert pred.shape == truth.shape and np.isfinite(pred).all(), name
        scores[name] = bench.score(truth, pred, block_id, in_kept)
    # a smooth field: c3diff's bicubic path recovers the original spots as well as thin-plate RBF does
    assert scores["c3diff_bicubic"][0] >= scores["rbf"][0] - 0.02 and scores["c3diff_bicubic"][0] > 0.9
