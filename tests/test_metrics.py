"""c3diff.metrics: map scores (docs/method.md, Metrics and protocols) and the spot-level external validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import structural_similarity

from c3diff._validation import RasterGeometry
from c3diff.metrics import aggregate_to_spots, lr_consistency, pcc, rmse, score_maps, ssim, summarize_scores


@pytest.fixture
def maps() -> np.ndarray:
    return np.random.default_rng(0).gamma(2.0, 3.0, size=(3, 4, 24, 24))


def _minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def test_perfect_prediction_scores_perfectly(maps):
    # min-max normalisation makes the scores blind to units: an affine copy is a perfect prediction
    pred = 2.5 * maps + 7.0
    np.testing.assert_allclose(rmse(pred, maps), 0.0, atol=1e-12)
    np.testing.assert_allclose(pcc(pred, maps), 1.0, atol=1e-12)
    np.testing.assert_allclose(ssim(pred, maps), 1.0, atol=1e-9)
    assert rmse(pred, maps).shape == (3, 4)


def test_anticorrelated_prediction_has_pcc_one(maps):
    np.testing.assert_allclose(pcc(-maps, maps), 1.0, atol=1e-12)
    # but it is far from the truth after normalisation
    assert (rmse(-maps, maps) > 0.3).all()


def test_rmse_is_range_normalised():
    rng = np.random.default_rng(1)
    truth = rng.random((16, 16)) * 40 + 10
    pred = truth + rng.normal(0, 3, truth.shape)
    raw = np.sqrt(np.mean((pred - truth) ** 2)) / (truth.max() - truth.min())
    assert rmse(pred, truth, normalize=False) == pytest.approx(raw, rel=1e-12)
    # the paper's default: both maps min-max normalised first, so the truth's range is 1
    expected = np.sqrt(np.mean((_minmax(pred) - _minmax(truth)) ** 2))
    assert rmse(pred, truth) == pytest.approx(expected, rel=1e-12)
    # scaling the truth's units does not change the normalised RMSE
    assert rmse(pred * 100, truth * 100, normalize=False) == pytest.approx(raw, rel=1e-12)


def test_vectorised_scores_match_per_map_scores(maps):
    pred = maps + np.random.default_rng(2).normal(0, 2, maps.shape)
    r, p, s = rmse(pred, maps), pcc(pred, maps), ssim(pred, maps)
    for i in range(3):
        for g in range(4):
            assert r[i, g] == pytest.approx(rmse(pred[i, g], maps[i, g]))
            assert p[i, g] == pytest.approx(abs(np.corrcoef(pred[i, g].ravel(), maps[i, g].ravel())[0, 1]))
            reference = structural_similarity(
                _minmax(pred[i, g]),
                _minmax(maps[i, g]),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
            )
            assert s[i, g] == pytest.approx(reference)


def test_constant_truth_is_skipped_and_counted(maps):
    truth = maps.copy()
    truth[0, 1] = 3.0
    truth[2, 3] = 0.0
    with pytest.warns(UserWarning, match=r"2 with a constant ground truth of 12 map"):
        values = pcc(maps, truth)
    assert np.isnan(values[0, 1]) and np.isnan(values[2, 3])
    assert np.isfinite(values).sum() == 10
    with pytest.warns(UserWarning, match="constant ground truth"):
        frame = score_maps(maps, truth, genes=list("ABCD"))
    assert (frame["status"] == "constant_truth").sum() == 2
    assert frame.loc[frame["status"] != "scored", ["rmse", "pcc", "ssim"]].isna().all().all()
    summary = summarize_scores(frame)
    assert summary.loc["all", "n_scored"] == 10 and summary.loc["all", "n_skipped"] == 2


def test_constant_prediction_scores_zero_pcc():
    truth = np.arange(64.0).reshape(8, 8)
    assert pcc(np.ones_like(truth), truth) == 0.0


def test_mask_restricts_scored_pixels():
    rng = np.random.default_rng(3)
    truth = rng.random((32, 32))
    pred = truth.copy()
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:28, 4:28] = True
    pred[~mask] = rng.random((~mask).sum()) * 100  # garbage outside the tissue
    assert pcc(pred, truth) < 0.9
    assert pcc(pred, truth, mask=mask) == pytest.approx(1.0)
    assert rmse(pred, truth, mask=mask) == pytest.approx(0.0, abs=1e-12)
    assert ssim(pred, truth, mask=mask) == pytest.approx(1.0)
    # non-finite pixels are never scored
    pred[0, 0] = np.nan
    assert rmse(pred, truth, mask=mask) == pytest.approx(0.0, abs=1e-12)


def test_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        rmse(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(TypeError, match="boolean"):
        pcc(np.zeros((4, 4)), np.zeros((4, 4)), mask=np.ones((4, 4)))
    with pytest.raises(ValueError, match="does not broadcast"):
        pcc(np.zeros((4, 4)), np.zeros((4, 4)), mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="`genes` names 2 genes"):
        score_maps(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)), genes=["A", "B"])


def test_ssim_needs_the_gaussian_window():
    truth = np.random.default_rng(4).random((8, 8))
    with pytest.warns(UserWarning, match="11 x 11"):
        assert np.isnan(ssim(truth, truth))


def test_score_maps_table_and_summary(maps):
    pred = maps + np.random.default_rng(5).normal(0, 1, maps.shape)
    frame = score_maps(pred, maps, genes=list("ABCD"))
    assert list(frame.columns) == ["item", "gene", "rmse", "pcc", "ssim", "n_pixels", "status"]
    assert len(frame) == 12 and (frame["n_pixels"] == 24 * 24).all()
    row = frame[(frame["item"] == 1) & (frame["gene"] == "C")].iloc[0]
    assert row["pcc"] == pytest.approx(pcc(pred[1, 2], maps[1, 2]))
    per_gene = summarize_scores(frame, by="gene")
    assert list(per_gene.index) == list("ABCD")
    assert per_gene.loc["B", "rmse"] == pytest.approx(rmse(pred[:, 1], maps[:, 1]).mean())
    overall = summarize_scores(frame)
    assert overall.loc["all", "pcc"] == pytest.approx(pcc(pred, maps).mean())
    # a single item (n_genes, h, w) and a per-item mask
    single = score_maps(pred[0], maps[0], genes=list("ABCD"))
    np.testing.assert_allclose(single["rmse"], frame["rmse"][:4])
    masked = score_maps(pred, maps, genes=list("ABCD"), mask=np.ones((3, 24, 24), bool))
    np.testing.assert_allclose(masked["ssim"], frame["ssim"])


def _spot_grid():
    """10 um pixels; Visium-like 55 um spots on a 100 um square pitch; centres as (y, x)."""
    grid = RasterGeometry(y0=-20.0, x0=30.0, sy=10.0, sx=10.0, height=50, width=60)
    xs, ys = np.meshgrid(np.arange(100.0, 600.0, 100.0), np.arange(50.0, 450.0, 100.0))
    centres = np.column_stack([ys.ravel(), xs.ravel()])
    return grid, centres


def test_aggregate_to_spots_averages_pixels_inside_each_disc():
    grid, centres = _spot_grid()
    cy, cx = grid.pixel_centres()
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    raster = np.stack([xx, yy])  # each pixel holds its own centre: the mean is the mean of the member centres
    agg = aggregate_to_spots(raster, grid, centres, 55.0)
    for (y, x), (mx, my) in zip(centres, agg, strict=True):
        inside = (xx - x) ** 2 + (yy - y) ** 2 <= 27.5**2
        assert inside.sum() > 20
        assert mx == pytest.approx(xx[inside].mean()) and my == pytest.approx(yy[inside].mean())
    # a spot smaller than a pixel takes the pixel under its centre; one off the raster is NaN
    tiny = aggregate_to_spots(raster, grid, np.array([[52.0, 101.0], [0.0, 5000.0]]), 2.0)
    assert tiny[0].tolist() == [105.0, 55.0]
    assert np.isnan(tiny[1]).all()


def test_lr_consistency_on_prediction_constant_within_spots():
    grid, centres = _spot_grid()
    rng = np.random.default_rng(6)
    values = rng.gamma(2.0, 2.0, size=(len(centres), 3))
    cy, cx = grid.pixel_centres()
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    pred = np.zeros((3, grid.height, grid.width))
    for (y, x), v in zip(centres, values, strict=True):
        pred[:, (xx - x) ** 2 + (yy - y) ** 2 <= 30**2] = v[:, None]
    counts = 40 * values + 3  # other units, same pattern
    frame = lr_consistency(pred, grid, centres, 55.0, counts, genes=["A", "B", "C"])
    assert list(frame.index) == ["A", "B", "C"]
    np.testing.assert_allclose(frame["pcc"], 1.0)
    np.testing.assert_allclose(frame["rmse"], 0.0, atol=1e-12)
    assert (frame["n_spots"] == len(centres)).all() and (frame["status"] == "scored").all()
    # anti-correlated counts: |PCC| stays 1, the RMSE does not
    frame = lr_consistency(pred, grid, centres, 55.0, -counts, genes=["A", "B", "C"])
    np.testing.assert_allclose(frame["pcc"], 1.0)
    assert (frame["rmse"] > 0.2).all()
    # a spot off the prediction is left out with a warning; a gene constant over the spots is skipped
    counts_off = np.vstack([counts, [[1.0, 1.0, 1.0]]])
    counts_off[:, 2] = 5.0
    with pytest.warns(UserWarning, match="1 of 21 spot"), pytest.warns(UserWarning, match="constant ground truth"):
        frame = lr_consistency(
            pred, grid, np.vstack([centres, [[9000.0, 9000.0]]]), 55.0, counts_off, genes=["A", "B", "C"]
        )
    assert frame.loc["A", "n_spots"] == 20
    assert frame.loc["C", "status"] == "constant_truth" and np.isnan(frame.loc["C", "pcc"])


def test_lr_consistency_errors():
    grid, centres = _spot_grid()
    with pytest.raises(ValueError, match="n_genes=2"):
        lr_consistency(np.zeros((3, 50, 60)), grid, centres, 55.0, np.zeros((20, 2)), genes=["A", "B"])
    with pytest.raises(ValueError, match="spot_counts"):
        lr_consistency(np.zeros((2, 50, 60)), grid, centres, 55.0, np.zeros((19, 2)), genes=["A", "B"])
    with pytest.raises(ValueError, match="spot_diameter_um"):
        aggregate_to_spots(np.zeros((1, 50, 60)), grid, centres, -1.0)
    with pytest.raises(ValueError, match="must have shape"):
        aggregate_to_spots(np.zeros((1, 5, 6)), grid, centres, 55.0)


def test_summarize_scores_validates_its_input():
    with pytest.raises(KeyError, match="status"):
        summarize_scores(pd.DataFrame({"rmse": [0.1]}))
    frame = score_maps(np.ones((1, 1, 12, 12)) * np.arange(12), np.ones((1, 1, 12, 12)) * np.arange(12), genes=["A"])
    with pytest.raises(KeyError, match="`by`"):
        summarize_scores(frame, by="tissue")


# --- c3diff.tl.evaluate -------------------------------------------------------------------------------------------


def _raster(values: np.ndarray, genes: list[str], pixel: float, origin: tuple[float, float] = (0.0, 0.0)):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    transform = Sequence([Scale([pixel, pixel], axes=("y", "x")), Translation(list(origin), axes=("y", "x"))])
    return Image2DModel.parse(
        np.asarray(values, dtype=np.float32),
        dims=("c", "y", "x"),
        c_coords=genes,
        transformations={"global": transform},
    )


GENES = ["A", "B", "C"]


@pytest.fixture
def truth_values() -> np.ndarray:
    return np.random.default_rng(7).poisson(3.0, size=(3, 50, 60)).astype(np.float32)


@pytest.fixture
def sdata(truth_values):
    from spatialdata import SpatialData

    return SpatialData(
        images={
            "pred": _raster(truth_values * 0.5 + 1, GENES, 10.0, (100.0, 200.0)),
            "truth": _raster(truth_values, GENES, 10.0, (100.0, 200.0)),
        }
    )


def test_evaluate_perfect_prediction_per_tile_and_gene(sdata):
    import c3diff as c3

    scores = c3.tl.evaluate(sdata, "pred", truth_key="truth", tile_size=32, key_added="eval")
    # 50 x 60 pixels in 32-pixel tiles: 2 x 2 tiles, 3 genes each
    assert len(scores) == 12 and scores["tile"].nunique() == 4
    assert (scores["protocol"] == "hr_truth").all() and (scores["status"] == "scored").all()
    np.testing.assert_allclose(scores["rmse"], 0.0, atol=1e-6)
    np.testing.assert_allclose(scores["pcc"], 1.0, atol=1e-6)
    np.testing.assert_allclose(scores["ssim"], 1.0, atol=1e-6)
    corner = scores[(scores["tile_row"] == 1) & (scores["tile_col"] == 1)]
    assert set(corner["y0_um"]) == {100.0 + 320.0} and set(corner["x0_um"]) == {200.0 + 320.0}
    assert set(corner["n_pixels"]) == {18 * 28}
    entry = sdata.attrs["c3diff"]["eval"]
    assert entry["tool"] == "evaluate" and entry["params"]["truth_key"] == "truth"
    assert entry["summary"]["hr_truth"]["pcc"] == pytest.approx(1.0)
    assert entry["per_gene"]["hr_truth"]["B"]["n_scored"] == 4
    assert entry["counts"]["hr_truth"] == {"n_tiles": 4, "n_tiles_empty": 0}


def test_evaluate_sum_pools_a_finer_nested_truth(truth_values):
    from spatialdata import SpatialData

    import c3diff as c3

    rng = np.random.default_rng(8)
    fine = rng.poisson(1.0, size=(3, 100, 120)).astype(np.float32)  # 5 um bins
    coarse = fine.reshape(3, 50, 2, 60, 2).sum(axis=(2, 4))
    sdata = SpatialData(
        images={"pred": _raster(coarse, GENES, 10.0, (0.0, 0.0)), "truth": _raster(fine, GENES, 5.0, (0.0, 0.0))}
    )
    scores = c3.tl.evaluate(sdata, "pred", truth_key="truth", tile_size=None)
    assert len(scores) == 3
    np.testing.assert_allclose(scores["pcc"], 1.0, atol=1e-6)
    assert "eval" not in sdata.attrs.get("c3diff", {})  # no key_added: nothing recorded


def test_evaluate_crops_to_the_overlap(truth_values):
    from spatialdata import SpatialData

    import c3diff as c3

    # the truth starts 10 pixels further right: only the overlapping prediction pixels are scored
    sdata = SpatialData(
        images={
            "pred": _raster(truth_values, GENES, 10.0),
            "truth": _raster(truth_values[:, :, 10:], GENES, 10.0, (0.0, 100.0)),
        }
    )
    with pytest.warns(UserWarning, match="500 of 3000 prediction pixels lie outside"):
        scores = c3.tl.evaluate(sdata, "pred", truth_key="truth", tile_size=None)
    assert set(scores["n_pixels"]) == {50 * 50}
    np.testing.assert_allclose(scores["pcc"], 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("pixel", "origin", "match"),
    [
        (20.0, (100.0, 200.0), "larger pixels"),
        (10.0, (105.0, 200.0), "do not match"),
        (3.0, (100.0, 200.0), "do not match"),
        (10.0, (9000.0, 200.0), "do not overlap"),
    ],
)
def test_evaluate_grid_mismatch_errors(sdata, truth_values, pixel, origin, match):
    import c3diff as c3

    sdata.images["other"] = _raster(truth_values, GENES, pixel, origin)
    with pytest.raises(ValueError, match=match):
        c3.tl.evaluate(sdata, "pred", truth_key="other")


def test_evaluate_mask_and_skipped_items(sdata, truth_values):
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    import c3diff as c3

    # a tissue mask at 2 um/px covering only the top-left tile (rows/cols 0..31 of the prediction)
    tissue = np.zeros((250, 300), dtype=np.uint8)
    tissue[: 32 * 5, : 32 * 5] = 1
    transform = Sequence([Scale([2.0, 2.0], axes=("y", "x")), Translation([100.0, 200.0], axes=("y", "x"))])
    sdata.labels["tissue"] = Labels2DModel.parse(tissue, dims=("y", "x"), transformations={"global": transform})
    sdata.images["pred"].data[:, 40:, :] = np.nan  # NaN outside tissue is simply not scored
    values = truth_values.copy()
    values[2, :32, :32] = 4.0  # gene C is constant on the tissue tile
    sdata.images["flat"] = _raster(values, GENES, 10.0, (100.0, 200.0))
    with pytest.warns(UserWarning, match="3 of 4 tile"), pytest.warns(UserWarning, match="1 hr_truth row"):
        scores = c3.tl.evaluate(sdata, "pred", truth_key="flat", tile_size=32, mask="tissue")
    assert len(scores) == 3 and set(scores["n_pixels"]) == {32 * 32}
    assert scores.set_index("gene").loc["C", "status"] == "constant_truth"
    summary = c3.metrics.summarize_scores(scores)
    assert summary.loc["hr_truth", "n_scored"] == 2 and summary.loc["hr_truth", "n_skipped"] == 1
    with pytest.raises(ValueError, match="boolean array of the prediction's shape"):
        c3.tl.evaluate(sdata, "pred", truth_key="truth", mask=np.ones((5, 5), bool))
    with pytest.raises(KeyError, match="not in `sdata.labels`"):
        c3.tl.evaluate(sdata, "pred", truth_key="truth", mask="nope")


def _spot_elements(centres_yx: np.ndarray, counts: np.ndarray, genes: list[str], diameter: float):
    """Circles + an annotating table as c3diff's readers write them (docs/conventions.md)."""
    import anndata as ad
    from scipy import sparse
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    n = len(centres_yx)
    xy = centres_yx[:, ::-1].astype(np.float64)
    shapes = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(n, diameter / 2),
        index=pd.Index(np.arange(n), name="spot_id"),
        transformations={"global": Identity()},
    )
    table = ad.AnnData(sparse.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=genes))
    table.obs["spot_id"] = np.arange(n)
    table.obs["region"] = pd.Categorical(["spots"] * n)
    table.obs["in_tissue"] = np.arange(n) != 0
    table.obsm["spatial"] = xy
    table.uns["c3diff"] = {"spots": {"layout": "visium", "diameter_um": diameter, "pitch_um": 100.0}}
    return shapes, TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")


def test_evaluate_against_spots(sdata, truth_values):
    import c3diff as c3

    grid = c3.tl._evaluate.raster_geometry(sdata.images["pred"])
    xs, ys = np.meshgrid(np.arange(250.0, 800.0, 100.0), np.arange(150.0, 600.0, 100.0))
    centres = np.column_stack([ys.ravel(), xs.ravel()])
    means = c3.metrics.aggregate_to_spots(np.asarray(sdata.images["pred"].data), grid, centres, 55.0)
    counts = np.column_stack([means * 30, np.ones(len(means))])
    sdata.shapes["spots"], sdata.tables["spots_table"] = _spot_elements(centres, counts, [*GENES, "D"], 55.0)
    scores = c3.tl.evaluate(sdata, "pred", truth_key="truth", table_key="spots_table", tile_size=32, key_added="ev")
    spots = scores[scores["protocol"] == "lr_spots"]
    assert list(spots["gene"]) == GENES and spots["tile"].isna().all() and spots["ssim"].isna().all()
    assert (spots["n_pixels"] == len(centres) - 1).all()  # the first spot is not under tissue
    np.testing.assert_allclose(spots["pcc"], 1.0, atol=1e-6)
    np.testing.assert_allclose(spots["rmse"], 0.0, atol=1e-6)
    entry = sdata.attrs["c3diff"]["ev"]
    assert set(entry["summary"]) == {"hr_truth", "lr_spots"} and entry["summary"]["lr_spots"]["ssim"] is None
    assert entry["counts"]["lr_spots"] == {"n_spots": len(centres) - 1, "spot_diameter_um": 55.0}
    with pytest.raises(KeyError, match="gene\\(s\\) not found"):
        c3.tl.evaluate(sdata, "pred", table_key="spots_table", genes=["A", "ZZZ"])
    # shuffled spot counts no longer agree
    sdata.shapes["spots2"], sdata.tables["shuffled"] = _spot_elements(
        centres, np.random.default_rng(0).permutation(counts), [*GENES, "D"], 55.0
    )
    sdata.tables["shuffled"].obs["region"] = pd.Categorical(["spots2"] * len(centres))
    sdata.tables["shuffled"].uns["spatialdata_attrs"]["region"] = "spots2"
    shuffled = c3.tl.evaluate(sdata, "pred", table_key="shuffled", genes=GENES)
    assert (shuffled["pcc"] < 0.8).all()


def test_evaluate_argument_errors(sdata):
    import c3diff as c3

    with pytest.raises(ValueError, match="truth_key.*table_key"):
        c3.tl.evaluate(sdata, "pred")
    with pytest.raises(KeyError, match="`pred_key='nope'`"):
        c3.tl.evaluate(sdata, "nope", truth_key="truth")
    with pytest.raises(ValueError, match="tile_size"):
        c3.tl.evaluate(sdata, "pred", truth_key="truth", tile_size=0)
    with pytest.raises(KeyError, match="gene"):
        c3.tl.evaluate(sdata, "pred", truth_key="truth", genes=["A", "Q"])
