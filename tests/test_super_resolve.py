"""c3.tl.super_resolve: tiling, blending, geometry, units, dask execution and errors (bicubic and tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from toy_sections import make_toy_section

import c3diff as c3
from c3diff._validation import raster_geometry, scale0
from c3diff.tl._super_resolve import super_resolve
from c3diff.tl._tiling import BlendAccumulator, blend_window, plan_tiles


# ------------------------------------------------------------------------------------------------------- tiling
def test_plan_covers_grid_and_skips_empty_tiles():
    keep = np.zeros((100, 130), dtype=bool)
    keep[10:20, 100:130] = True
    plan = plan_tiles(100, 130, size=32, stride=24)
    covered = np.zeros((100, 130), dtype=int)
    for t in plan.tiles:
        covered[t.row : t.row + 32, t.col : t.col + 32] += 1
    assert covered.min() >= 1
    sparse = plan_tiles(100, 130, size=32, stride=24, keep=keep)
    assert 0 < len(sparse) < len(plan)
    covered = np.zeros((100, 130), dtype=bool)
    for t in sparse.tiles:
        covered[t.row : t.row + 32, t.col : t.col + 32] = True
    assert covered[keep].all()
    assert [t.index for t in sparse.tiles] == list(range(len(sparse)))
    with pytest.raises(ValueError, match="stride"):
        plan_tiles(10, 10, size=8, stride=9)


@pytest.mark.parametrize("store", [False, True])
def test_blending_constant_tiles_is_seamless(tmp_path, store):
    plan = plan_tiles(70, 90, size=32, stride=20)
    corners = [(t.row, t.col) for t in plan.tiles]
    acc = BlendAccumulator(2, 70, 90, chunk=16, store=tmp_path / "acc" if store else None, tiles=corners, tile_size=32)
    weight = blend_window(32, 12)
    assert weight.min() > 0 and weight.max() == 1
    for t in plan.tiles:
        acc.add(t.row, t.col, np.full((2, 32, 32), 3.0, dtype=np.float32), weight)
    np.testing.assert_allclose(np.asarray(acc.result()), 3.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------------- bicubic path
def test_bicubic_layer_geometry_channels_and_provenance():
    sdata = make_toy_section(origin=(20.0, 40.0))
    from spatialdata.transformations import Identity, set_transformation

    set_transformation(sdata.images["hne"], Identity(), "pixels")  # a second coordinate system to carry over
    super_resolve(sdata, "hne", table_key="table", method="bicubic", tile_size=32, progress=False)
    layer = sdata.images["hne_bicubic_x10"]
    data = scale0(layer)
    assert list(data.coords["c"].values) == ["GENE_A", "GENE_B", "GENE_C"]
    geom = raster_geometry(layer)
    assert (geom.sy, geom.sx, geom.y0, geom.x0) == (10.0, 10.0, 20.0, 40.0)
    assert (geom.height, geom.width) == (100, 120)
    # pixel (i, j)'s centre in the H&E's own pixel system: Identity "pixels" = H&E pixels of 2 um
    from c3diff._validation import transform_matrix

    m = transform_matrix(layer, coordinate_system="pixels")
    np.testing.assert_allclose(m[:2, :2], np.diag([5.0, 5.0]))  # one 10 um pixel = 5 H&E pixels
    np.testing.assert_allclose(m[:2, 2], [0.0, 0.0], atol=1e-9)
    assert len(layer.children) >= 2  # multiscale
    assert data.chunks[0][0] == 1  # one gene per chunk
    entry = sdata.attrs["c3diff"]["hne_bicubic_x10"]
    assert entry["tool"] == "super_resolve" and entry["params"]["method"] == "bicubic"
    assert "counts per output pixel" in entry["params"]["units"]


def test_bicubic_output_aggregated_on_spots_tracks_counts(toy_section):
    sdata = toy_section
    super_resolve(sdata, "hne", table_key="table", method="bicubic", tile_size=32, scale=5, progress=False)
    layer = scale0(sdata.images["hne_bicubic_x5"])
    assert raster_geometry(sdata.images["hne_bicubic_x5"]).sy == 20.0
    spots = c3.pp.spots_from_table(sdata, "table")
    values = np.asarray(layer.sel(c="GENE_B").values)
    rows, cols = (spots.centres // 20).astype(int).T
    predicted = values[rows, cols]
    r = np.corrcoef(predicted, spots.counts[:, 1])[0, 1]
    assert r > 0.5
    # units: counts per 20 um pixel, so 25 pixels of a 100 um square hold about a 100 um pixel's counts
    grid = c3.pp.spots_to_grid(sdata, table_key="table", image_key="hne", inplace=False)[0]
    lr = np.asarray(grid.sel(c="GENE_B").values)
    pooled = values[:50, :60].reshape(10, 5, 12, 5).sum(axis=(1, 3))
    inner = lr[3:7, 3:9]
    assert np.median(pooled[3:7, 3:9] / inner) == pytest.approx(1.0, rel=0.2)


def test_bicubic_reproduces_a_smooth_field(toy_section):
    """Transcripts drawn from a smooth intensity: the 10x bicubic output follows the 10 um truth closely."""
    from spatialdata.models import PointsModel

    sdata = toy_section
    rng = np.random.default_rng(1)
    n = 400_000
    y, x = rng.uniform(0, 1000, n), rng.uniform(0, 1200, n)
    intensity = 1.0 + 0.8 * np.sin(2 * np.pi * x / 1200) * np.cos(2 * np.pi * y / 1000)
    keep = rng.uniform(0, 1.8, n) < intensity
    frame = pd.DataFrame({"x": x[keep], "y": y[keep], "gene": pd.Categorical(["SMOOTH"] * int(keep.sum()))})
    sdata.points["smooth"] = PointsModel.parse(frame, coordinates={"x": "x", "y": "y"}, feature_key="gene")
    super_resolve(sdata, "hne", points_key="smooth", method="bicubic", tile_size=32, progress=False)
    pred = np.asarray(scale0(sdata.images["hne_bicubic_x10"]).values[0])
    truth = intensity_grid = (
        1.0
        + 0.8
        * np.sin(2 * np.pi * (np.arange(120) + 0.5) * 10 / 1200)[None, :]
        * np.cos(2 * np.pi * (np.arange(100) + 0.5) * 10 / 1000)[:, None]
    )
    inside = pred > 0
    assert inside.mean() > 0.3
    assert np.corrcoef(pred[inside], truth[inside])[0, 1] > 0.9  # LR Poisson noise (~7% per 100 um pixel) limits it
    del intensity_grid


def test_constant_input_has_no_seams(toy_section):
    from spatialdata.models import PointsModel

    sdata = toy_section
    yy, xx = np.meshgrid(np.arange(5, 1000, 10.0), np.arange(5, 1200, 10.0), indexing="ij")
    frame = pd.DataFrame(
        {"x": np.repeat(xx.ravel(), 3), "y": np.repeat(yy.ravel(), 3), "gene": pd.Categorical(["FLAT"] * (3 * xx.size))}
    )
    sdata.points["flat"] = PointsModel.parse(frame, coordinates={"x": "x", "y": "y"}, feature_key="gene")
    super_resolve(sdata, "hne", points_key="flat", method="bicubic", tile_size=32, progress=False)
    pred = np.asarray(scale0(sdata.images["hne_bicubic_x10"]).values[0])
    tissue = pred > 0
    # 3 transcripts per 10 um pixel everywhere: the blended output is 3 wherever tiles ran, with no jumps
    np.testing.assert_allclose(pred[tissue], 3.0, rtol=1e-4)
    assert np.abs(np.diff(pred, axis=1))[tissue[:, 1:] & tissue[:, :-1]].max() < 1e-3


def test_store_streams_to_zarr_and_matches_memory(tmp_path, toy_section):
    sdata = toy_section
    mem = super_resolve(sdata, "hne", table_key="table", method="bicubic", tile_size=32, inplace=False, progress=False)[
        "mean"
    ]
    disk = super_resolve(
        sdata,
        "hne",
        table_key="table",
        method="bicubic",
        tile_size=32,
        inplace=False,
        progress=False,
        store=tmp_path / "sr.zarr",
    )["mean"]
    assert (tmp_path / "sr.zarr" / "mean").exists()
    np.testing.assert_allclose(scale0(disk).values, scale0(mem).values, rtol=1e-6)


@pytest.mark.slow
def test_distributed_client_gives_the_same_result(toy_section):
    distributed = pytest.importorskip("distributed")
    sdata = toy_section
    local = super_resolve(
        sdata, "hne", table_key="table", method="bicubic", tile_size=32, inplace=False, progress=False
    )["mean"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            remote = super_resolve(
                sdata, "hne", table_key="table", method="bicubic", tile_size=32, inplace=False, progress=False
            )["mean"]
    # atol: subnormal floats (~1e-40 counts) may round differently in the worker processes
    np.testing.assert_allclose(scale0(remote).values, scale0(local).values, rtol=1e-6, atol=1e-30)


# --------------------------------------------------------------------------------------------------------- errors
def test_super_resolve_errors_leave_sdata_untouched(toy_section):
    sdata = toy_section
    before = set(sdata.images)
    with pytest.raises(KeyError, match="image_key='nope'"):
        super_resolve(sdata, "nope", method="bicubic")
    with pytest.raises(ValueError, match="method"):
        super_resolve(sdata, "hne", method="nearest")
    with pytest.raises(ValueError, match="scale"):
        super_resolve(sdata, "hne", method="bicubic", scale=4)
    with pytest.raises(ValueError, match="one LR source"):
        super_resolve(sdata, "hne", method="bicubic", table_key="table", points_key="transcripts")
    with pytest.raises(KeyError, match="NOTAGENE"):
        super_resolve(sdata, "hne", method="bicubic", genes=["NOTAGENE"], table_key="table")
    with pytest.raises(ValueError, match="`model` is required"):
        super_resolve(sdata, "hne", table_key="table")
    with pytest.raises(ValueError, match="n_samples"):
        super_resolve(sdata, "hne", table_key="table", method="bicubic", n_samples=0)
    assert set(sdata.images) == before and "hne_bicubic_x10" not in sdata.attrs.get("c3diff", {})


def _blocks(a: np.ndarray, k: int) -> np.ndarray:
    g, h, w = a.shape
    return a[:, : h // k * k, : w // k * k].reshape(g, h // k, k, w // k, k).sum(axis=(2, 4))


def test_lr_pixel_calibration_honours_every_lr_pixel():
    from c3diff._constants import MASK_FILLED, MASK_MEASURED, MASK_OUTSIDE
    from c3diff.tl._calibration import to_counts

    rng = np.random.default_rng(0)
    pred = rng.uniform(0, 1, (2, 64, 64)).astype(np.float32)
    pred[1, 10:20, 20:30] = 0.0  # a zero prediction under a non-zero count: spread evenly
    std = np.full_like(pred, 0.1)
    lr = rng.uniform(5, 50, (2, 7, 7)).astype(np.float32)
    mask = np.full((7, 7), MASK_MEASURED, dtype=np.uint8)
    mask[3, 3] = MASK_FILLED
    mask[0, 6] = MASK_OUTSIDE
    counts, spread = to_counts(pred, std, lr, mask, 10, "lr_pixel")
    sums = _blocks(counts, 10)  # the 6 x 6 whole LR pixels inside the 64 px tile
    covered = mask[:6, :6] != MASK_OUTSIDE
    np.testing.assert_allclose(sums[:, covered], lr[:, :6, :6][:, covered], rtol=1e-4)
    # the LR pixels cut by the tile's edge (4 of 10 columns inside) get 40% of their count
    assert np.isfinite(counts[:, :10, 60:]).all()  # LR pixel (0, 6) is outside: tile calibration there
    np.testing.assert_allclose(counts[:, 10:20, 60:].sum(axis=(1, 2)), 0.4 * lr[:, 1, 6], rtol=1e-4)
    # inside an LR pixel the model's pattern is kept: one factor per LR pixel
    ratio = counts[0, 20:30, 20:30] / pred[0, 20:30, 20:30]
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-4)
    np.testing.assert_allclose(spread[0, 20:30, 20:30], 0.1 * ratio, rtol=1e-4)
    # a zero prediction with a count: the count spread evenly
    np.testing.assert_allclose(counts[1, 10:20, 20:30], lr[1, 1, 2] / 100, rtol=1e-4)
    # tile calibration keeps one factor for the whole tile and gene
    tile_counts, _ = to_counts(pred, None, lr, mask, 10, "tile")
    tile_ratio = tile_counts[0] / pred[0]
    np.testing.assert_allclose(tile_ratio, tile_ratio[0, 0], rtol=1e-4)


def test_lr_pixel_calibration_through_super_resolve_matches_lr_counts(toy_section):
    sdata = toy_section
    c3.pp.bin_transcripts(sdata, bin_size=100, image_key="hne", key_added="lr")
    lr = np.asarray(scale0(sdata.images["lr"]).values, dtype=np.float64)
    out = {}
    for calibration in ("lr_pixel", "tile"):
        key = f"bicubic_{calibration}"
        super_resolve(
            sdata,
            "hne",
            points_key="transcripts",
            method="bicubic",
            tile_size=32,
            progress=False,
            calibration=calibration,
            key_added=key,
        )
        assert sdata.attrs["c3diff"][key]["params"]["calibration"] == calibration
        out[calibration] = _blocks(np.asarray(scale0(sdata.images[key]).values, dtype=np.float64), 10)
    n_y, n_x = out["lr_pixel"].shape[-2:]
    lr = lr[:, :n_y, :n_x]
    error = {k: np.abs(v - lr).sum() / lr.sum() for k, v in out.items()}
    # cross-faded tiles each honour the LR pixels (blending within cut LR pixels), and the footprint correction
    # leaves each bin within its Poisson noise: a few % in all
    assert error["lr_pixel"] < 0.08
    within = np.abs(out["lr_pixel"] - lr) <= 2 * np.sqrt(np.maximum(out["lr_pixel"], 1.0)) + 0.005 * lr + 1e-6
    assert within.mean() > 0.9  # the rest: bins at the tissue edge, partly masked and not corrected
    # the tile calibration alone misses the bins by more; the layer's footprint correction (test_footprint.py) then
    # brings every bin wholly on tissue within its noise, so only bins at the tissue's edge (partly masked) differ more
    assert error["tile"] < 0.1
    with pytest.raises(ValueError, match="calibration"):
        super_resolve(sdata, "hne", points_key="transcripts", method="bicubic", calibration="spot", progress=False)


# ------------------------------------------------------------------------------------------------ c3diff models
def _residual_model():
    import torch

    torch.manual_seed(0)
    return c3.models.build_model("tiny", genes=["GENE_A", "GENE_B", "GENE_C"]).eval()


def test_c3diff_mean_honours_every_lr_pixel_and_needs_no_sampling(toy_section):
    sdata = toy_section
    c3.pp.bin_transcripts(sdata, bin_size=100, image_key="hne", key_added="lr")
    lr = np.asarray(scale0(sdata.images["lr"]).values, dtype=np.float64)
    model = _residual_model()
    super_resolve(sdata, "hne", points_key="transcripts", model=model, progress=False)
    layer = np.asarray(scale0(sdata.images["hne_c3diff_x10"]).values, dtype=np.float64)
    params = sdata.attrs["c3diff"]["hne_c3diff_x10"]["params"]
    assert params["mode"] == "mean" and "hne_c3diff_x10_std" not in sdata.images
    assert np.isfinite(layer).all() and layer.min() >= 0
    sums = _blocks(layer, 10)
    n_y, n_x = sums.shape[-2:]
    error = np.abs(sums - lr[:, :n_y, :n_x]).sum() / lr[:, :n_y, :n_x].sum()
    assert error < 0.05
    # the same map whatever the tile batch (the mean is deterministic)
    again = super_resolve(
        sdata, "hne", points_key="transcripts", model=model, batch_size=1, inplace=False, progress=False
    )["mean"]
    np.testing.assert_allclose(scale0(again).values, layer, rtol=1e-5, atol=1e-6)
    # 5x from the 10x model: 2 x 2 sums of counts keep the LR totals too
    super_resolve(sdata, "hne", points_key="transcripts", model=model, scale=5, progress=False)
    five = np.asarray(scale0(sdata.images["hne_c3diff_x5"]).values, dtype=np.float64)
    assert five.shape[-1] * 2 >= layer.shape[-1] - 1
    np.testing.assert_allclose(five.sum(), layer.sum(), rtol=0.02)


def test_c3diff_samples_write_an_uncertainty_layer_beside_the_exact_mean(toy_section):
    sdata = toy_section
    model = _residual_model()
    super_resolve(sdata, "hne", table_key="table", model=model, progress=False, key_added="mean_only")
    super_resolve(
        sdata,
        "hne",
        table_key="table",
        model=model,
        mode="sample",
        n_samples=3,
        steps=2,
        progress=False,
        key_added="sampled",
    )
    np.testing.assert_allclose(
        scale0(sdata.images["sampled"]).values, scale0(sdata.images["mean_only"]).values, rtol=1e-5, atol=1e-7
    )
    std = np.asarray(scale0(sdata.images["sampled_std"]).values)
    assert std.shape == scale0(sdata.images["sampled"]).shape and std.max() > 0 and std.min() >= 0
    assert sdata.attrs["c3diff"]["sampled"]["params"]["std_key"] == "sampled_std"
    paper = c3.models.build_model("tiny-paper", genes=["GENE_A", "GENE_B", "GENE_C"])
    before = set(sdata.images)
    with pytest.raises(ValueError, match="conditional-mean stage"):
        super_resolve(sdata, "hne", table_key="table", model=paper, mode="mean", progress=False)
    with pytest.raises(ValueError, match="mode"):
        super_resolve(sdata, "hne", table_key="table", model=model, mode="median", progress=False)
    assert set(sdata.images) == before


@pytest.mark.slow
def test_distributed_client_with_a_model_object(toy_section):
    import pickle

    distributed = pytest.importorskip("distributed")
    sdata = toy_section
    model = _residual_model()
    clone = pickle.loads(pickle.dumps(model))  # what a worker process receives
    assert clone.config.image_size == 64 and type(clone.noise_scheduler) is type(model.noise_scheduler)
    local = super_resolve(sdata, "hne", table_key="table", model=model, inplace=False, progress=False)["mean"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            remote = super_resolve(sdata, "hne", table_key="table", model=model, inplace=False, progress=False)["mean"]
    np.testing.assert_allclose(scale0(remote).values, scale0(local).values, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ geometry of the model
def test_the_models_stored_geometry_is_used(toy_section):
    """A model whose config says 20 um histology and 200 um LR maps gets exactly those inputs and writes a 20 um
    layer honouring the 200 um LR counts; a stored geometry that cannot be used is refused, naming it."""
    import torch

    sdata = toy_section
    torch.manual_seed(0)
    genes = ["GENE_A", "GENE_B", "GENE_C"]
    coarse = c3.models.build_model(
        "tiny", genes=genes, histology_pixel_size=20.0, hr_pixel_size=20.0, lr_pixel_size=200.0
    ).eval()
    seen = []
    original = c3.pp.ModelInputs.lr_window

    def spy(self, row, col, size):
        seen.append(self.geometry)
        return original(self, row, col, size)

    c3.pp.bin_transcripts(sdata, bin_size=200, image_key="hne", key_added="lr200")
    lr = np.asarray(scale0(sdata.images["lr200"]).values, dtype=np.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c3.pp.ModelInputs, "lr_window", spy)
        super_resolve(sdata, "hne", points_key="transcripts", model=coarse, progress=False)
    assert {(g.histology_pixel_size, g.lr_pixel_size, g.hr_pixel_size) for g in seen} == {(20.0, 200.0, 20.0)}
    layer = sdata.images["hne_c3diff_x10"]
    assert raster_geometry(layer).sy == 20.0
    assert sdata.attrs["c3diff"]["hne_c3diff_x10"]["params"]["pixel_size_um"] == 20.0
    values = np.asarray(scale0(layer).values, dtype=np.float64)
    assert values.shape[-2:] == (50, 60)  # 1000 x 1200 um at 20 um
    sums = _blocks(values, 10)  # 200 um LR pixels
    n_y, n_x = sums.shape[-2:]
    assert np.abs(sums - lr[:, :n_y, :n_x]).sum() / lr[:, :n_y, :n_x].sum() < 0.05

    odd = _residual_model()
    odd.register_to_config(hr_pixel_size=20.0)  # maps on another grid than the histology: not supported
    before = set(sdata.images)
    with pytest.raises(ValueError, match=r"stored geometry \(histology_pixel_size=10, hr_pixel_size=20.*config.json"):
        super_resolve(sdata, "hne", points_key="transcripts", model=odd, key_added="odd", progress=False)
    assert set(sdata.images) == before


# -------------------------------------------------------------------------------------- all layers or none of them
def _fail_on_record(monkeypatch):
    def record(*args, **kwargs):
        raise RuntimeError("injected failure while recording the provenance")

    monkeypatch.setattr("c3diff.tl._super_resolve.record", record)


@pytest.mark.parametrize("store", [False, True])
def test_a_failed_overwrite_keeps_the_old_layers(toy_section, tmp_path, monkeypatch, store):
    """``overwrite=True`` replaces the layer, its ``_std`` layer, its provenance and its store together: a failure
    after the new layers were computed (here: recording the provenance) leaves all of the old ones as they were."""
    sdata = toy_section
    model = _residual_model()
    where = {"store": tmp_path / "sr.zarr"} if store else {}
    sample = dict(table_key="table", model=model, mode="sample", n_samples=2, steps=1, progress=False, key_added="sr")
    super_resolve(sdata, "hne", **sample, **where)
    old = {k: np.asarray(scale0(sdata.images[k]).values).copy() for k in ("sr", "sr_std")}
    attrs = json.dumps(sdata.attrs["c3diff"]["sr"], default=str)
    files = _files(tmp_path)
    _fail_on_record(monkeypatch)
    for mode in ("mean", "sample"):  # a mean replaces the layer and removes its _std; a sample rewrites both
        with pytest.raises(RuntimeError, match="injected failure"):
            super_resolve(sdata, "hne", **{**sample, "mode": mode, "genes": ["GENE_B"]}, overwrite=True, **where)
        assert set(sdata.images) >= {"sr", "sr_std"}
        for k, values in old.items():
            np.testing.assert_array_equal(np.asarray(scale0(sdata.images[k]).values), values)
        assert json.dumps(sdata.attrs["c3diff"]["sr"], default=str) == attrs
        assert _files(tmp_path) == files  # the store as it was, nothing left beside it
    monkeypatch.undo()
    super_resolve(sdata, "hne", **{**sample, "mode": "mean", "genes": ["GENE_B"]}, overwrite=True, **where)
    assert list(scale0(sdata.images["sr"]).coords["c"].values) == ["GENE_B"] and "sr_std" not in sdata.images


def _files(folder):
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
