"""c3.tl.fit_slide: spot-supervised fitting on one slide (pool, footprint sums, errors, persistence, CLI)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import c3diff as c3
from c3diff._validation import RasterGeometry
from c3diff.tl import _fit_slide
from c3diff.tl._fit_slide import footprint_sums, pool_spots, pooled_sdata, slide_spots, spot_windows

GENES = ["EPCAM", "PTPRC", "ACTA2", "KRT7", "CD3E", "LUM"]


@pytest.fixture(scope="module")
def section():
    return c3.datasets.simulate_section(width=960, height=960, seed=0, progress=False)


#: Tiles per step above the slide's tile count (at most 5 x 5 tiles of 64 px on this 96 px section), with every gene
#: per tile: each step sees one fixed batch - the whole slide - so `fit_history` is the full objective, step by step.
FIXED_BATCH = {"batch_size": 64, "genes_per_tile": len(GENES)}


@pytest.fixture(scope="module")
def fitted(section):
    return c3.tl.fit_slide(
        section,
        "hne",
        table_key="visium_table",
        genes=GENES,
        steps=3,
        learning_rate=1e-2,
        seed=0,
        progress=False,
        **FIXED_BATCH,
    )


def _read_at_spots(section, pseudo, model, method="c3diff"):
    """Super-resolve the pseudo-spots and read the layer back at the original Visium spots (counts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c3.tl.super_resolve(
            pseudo,
            "hne",
            table_key="table",
            genes=GENES,
            model=model,
            method=method,
            calibration="lr_pixel",
            progress=False,
            key_added="sr",
            overwrite=True,
        )
        section.images["sr"] = pseudo.images["sr"]
        try:
            read = c3.tl.sample_at_spots(section, "sr", table_key="visium_table", genes=GENES)
        finally:
            del section.images["sr"]
    return np.asarray(read.layers["counts"], dtype=np.float64)


def _within_block_r(truth, pred, block):
    ok = block >= 0
    rs = []
    for g in range(truth.shape[1]):
        t, p, b = truth[ok, g], pred[ok, g], block[ok]
        n = np.bincount(b)
        dt = t - (np.bincount(b, t) / np.maximum(n, 1))[b]
        dp = p - (np.bincount(b, p) / np.maximum(n, 1))[b]
        if dt.std() > 0 and dp.std() > 0:
            rs.append(np.corrcoef(dt, dp)[0, 1])
    return float(np.mean(rs))


def test_fit_places_counts_inside_pseudo_spots_by_the_hne(section, fitted):
    """From 2x2 pooled Visium spots, the fitted model tells the four member spots apart by the H&E; bicubic
    interpolation of the pseudo-spots cannot. The fit lowers the spot likelihood's loss at every step of its fixed
    batch (the whole slide)."""
    spots = slide_spots(section, "visium_table", GENES)
    pooled = pool_spots(spots, 2)
    pseudo = pooled_sdata(pooled, spots, GENES, pool=2)
    pseudo.images["hne"] = section.images["hne"]
    truth = spots.counts
    keep = c3.pp.spots_from_table(section, "visium_table", genes=GENES).library > 0
    bicubic = _within_block_r(truth, _read_at_spots(section, pseudo, None, "bicubic")[keep], pooled.block_of_spot)
    ours = _within_block_r(truth, _read_at_spots(section, pseudo, fitted)[keep], pooled.block_of_spot)
    # measured: 0.445 against 0.288 (bicubic gained from the footprint correction, which makes every pseudo-spot's
    # disc sum to its count; before it, bicubic scored about 0.07)
    assert ours > bicubic + 0.05, (ours, bicubic)
    history = np.asarray(fitted.fit_history)
    assert len(history) == 3 and np.all(np.diff(history) < 0), history  # measured: -1.4223, -1.4250, -1.4694
    assert history[-1] < history[0] - 0.02, history


@pytest.mark.parametrize(("diameter", "pitch"), [(55.0, 100.0), (100.0, 200.0)])
def test_footprint_sums_are_exact(diameter, pitch):
    """lambda_s = sum_p w_sp mu_p over a tile equals the disc integral: a constant map gives value x disc area, and
    any map gives what sum_over_spots gives on the whole grid (Visium and legacy-ST geometry)."""
    import torch

    grid = RasterGeometry(y0=-3.0, x0=7.0, sy=10.0, sx=10.0, height=110, width=110)
    yy, xx = np.meshgrid(np.arange(2, 5) * pitch * 0.93, np.arange(2, 5) * pitch * 0.87 + 13.0, indexing="ij")
    centres = np.stack([yy.ravel() + 1.7, xx.ravel()], axis=1)
    rows, cols, weights, area = spot_windows(grid, centres, diameter)
    np.testing.assert_allclose(weights.sum(axis=1), math.pi * (diameter / 2) ** 2 / 100.0, rtol=1e-9)
    np.testing.assert_allclose(area, math.pi * (diameter / 2) ** 2 / 100.0)
    rng = np.random.default_rng(0)
    full = rng.gamma(2.0, 1.0, size=(2, grid.height, grid.width))
    expected, covered = c3.metrics.sum_over_spots(full, grid, centres, diameter)
    assert np.all(covered == 1.0)
    row0, col0 = 5, 8  # a tile whose corner is grid pixel (5, 8), holding every spot
    tile = full[:, row0 : row0 + 100, col0 : col0 + 100]
    np.testing.assert_allclose(footprint_sums(tile, rows, cols, weights, row0, col0), expected.T, rtol=1e-9)
    lam = footprint_sums(
        torch.as_tensor(tile), torch.as_tensor(rows), torch.as_tensor(cols), torch.as_tensor(weights), row0, col0
    )
    np.testing.assert_allclose(lam.numpy(), expected.T, rtol=1e-9)
    constant = footprint_sums(np.full((1, 100, 100), 3.0), rows, cols, weights, row0, col0)
    np.testing.assert_allclose(constant, 3.0 * math.pi * (diameter / 2) ** 2 / 100.0, rtol=1e-9)


def test_pooling_follows_the_array_grid(section):
    spots = slide_spots(section, "visium_table", GENES)
    assert spots.hexagonal and spots.diameter == pytest.approx(55.0) and spots.pitch == pytest.approx(100.0)
    pooled = pool_spots(spots, 2)
    assert pooled.members.min() >= 2 and pooled.members.max() <= 4
    kept = pooled.block_of_spot >= 0
    np.testing.assert_allclose(pooled.counts.sum(axis=0), spots.counts[kept].sum(axis=0))
    # each pseudo-spot sits at its members' mean position
    for k in range(3):
        np.testing.assert_allclose(pooled.centres[k], spots.centres[pooled.block_of_spot == k].mean(axis=0))
    st = slide_spots(section, "st_table", GENES)
    assert not st.hexagonal and st.diameter == pytest.approx(100.0) and st.pitch == pytest.approx(200.0)
    assert pool_spots(st, 2).members.max() <= 4


def test_bad_inputs_fail_before_any_work(section, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("fit_slide started work on bad inputs")

    monkeypatch.setattr(_fit_slide, "_start_model", no_work)
    with pytest.raises(KeyError, match="NOPE"):
        c3.tl.fit_slide(section, "hne", table_key="visium_table", genes=["EPCAM", "NOPE"], progress=False)
    with pytest.raises(ValueError, match="Too few spots to pool"):
        c3.tl.fit_slide(section, "hne", table_key="st_table", genes=GENES, progress=False)
    with pytest.raises(ValueError, match="`pool` must be an integer >= 2"):
        c3.tl.fit_slide(section, "hne", table_key="visium_table", genes=GENES, pool=1, progress=False)
    with pytest.raises(KeyError, match="image_key='nope'"):
        c3.tl.fit_slide(section, "nope", table_key="visium_table", genes=GENES, progress=False)
    # a table without spot diameter: no uns entry and no circles
    xy = np.array([[100.0, 100.0], [300.0, 100.0], [100.0, 300.0], [300.0, 300.0]])
    sdata = c3.io.spots_from_arrays(
        np.ones((4, 2)),
        xy,
        genes=["A", "B"],
        spot_diameter=100.0,
        pitch=200.0,
        image=np.full((400, 400, 3), 200, dtype=np.uint8),
        pixel_size=1.0,
    )
    del sdata["table"].uns["c3diff"]["spots"]["diameter_um"]
    region = sdata["table"].uns["spatialdata_attrs"]["region"]
    region = region[0] if isinstance(region, list) else region
    del sdata.shapes[region]
    with pytest.raises(ValueError, match="spot diameter"):
        c3.tl.fit_slide(sdata, "hne", table_key="table", genes=["A"], progress=False)


def test_a_5x_model_is_refused_by_name(section):
    five = c3.models.build_model("tiny", genes=GENES, scale=5)
    with pytest.raises(ValueError, match="predicts 5x maps; fit_slide fits 10x models"):
        c3.tl.fit_slide(section, "hne", table_key="visium_table", model=five, genes=GENES, steps=1, progress=False)


def test_start_from_a_pretrained_model_copies_compatible_weights():
    import torch

    demo = c3.models.load_demo_model()  # paper formulation: its hint encoders, a fresh mean stage
    residual = c3.models.build_model("tiny", genes=["X", "Y"])
    for source in (demo, residual):
        model, _ = _fit_slide._start_model(source, GENES)
        assert model.genes == GENES and model.mean_net is not None and not model.is_fitted("mean")
        own, weights = model.state_dict(), source.state_dict()
        key = next(k for k in own if k.startswith("hint_encoders.") and k.endswith("weight"))
        assert torch.equal(own[key], weights[key])
        assert torch.count_nonzero(own["mean_net.gene_film.weight"]) == 0  # gene-specific: fresh
        assert source.genes != GENES  # the given model is left alone
    trunk = next(k for k in own if k.startswith("mean_net.trunk_unet.") and k.endswith("weight"))
    assert torch.equal(own[trunk], weights[trunk])


def test_fitted_model_round_trips_and_super_resolves(section, fitted, tmp_path):
    assert fitted.is_fitted("mean")
    assert "fit_slide" in fitted.config.training_data and "visium_table" in fitted.config.training_data
    fitted.save_pretrained(str(tmp_path / "model"), training_data=fitted.config.training_data)
    loaded = c3.models.from_pretrained(str(tmp_path / "model"))
    assert loaded.is_fitted("mean") and loaded.genes == GENES
    assert "visium_table" in (tmp_path / "model" / "README.md").read_text()
    layers = {}
    for name, model in (("fitted", fitted), ("loaded", loaded)):
        layers[name] = c3.tl.super_resolve(
            section, "hne", table_key="visium_table", model=model, inplace=False, progress=False
        )["mean"]
    np.testing.assert_allclose(
        np.asarray(layers["fitted"]["scale0"]["image"].data),
        np.asarray(layers["loaded"]["scale0"]["image"].data),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.slow
def test_cli_fit_writes_a_model_folder(section, tmp_path, capsys):
    from c3diff.cli import main

    assert main(["fit", str(tmp_path / "missing.zarr"), "--table-key", "t", "--out", str(tmp_path / "m")]) == 1
    assert "does not exist" in capsys.readouterr().err
    path = tmp_path / "section.zarr"
    section.write(path)
    assert main(["fit", str(path), "--table-key", "st_table", "--out", str(tmp_path / "m"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Too few spots to pool" in err and len(err.strip().splitlines()) == 1
    assert (
        main(
            [
                "fit",
                str(path),
                "--table-key",
                "visium_table",
                "--genes",
                "EPCAM",
                "PTPRC",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "m"),
                "--quiet",
            ]
        )
        == 0
    )
    assert "model in" in capsys.readouterr().out
    assert c3.models.from_pretrained(str(tmp_path / "m")).is_fitted("mean")


@pytest.mark.slow
def test_same_seed_same_fit(section):
    import torch

    a, b = (
        c3.tl.fit_slide(section, "hne", table_key="visium_table", genes=GENES[:2], steps=2, seed=3, progress=False)
        for _ in range(2)
    )
    assert a.fit_history == b.fit_history
    assert all(torch.equal(x, y) for x, y in zip(a.mean_net.parameters(), b.mean_net.parameters(), strict=True))
