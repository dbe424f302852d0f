"""What a pixel of a super-resolved layer holds, checked: summed over each spot's footprint (a Visium disc, a legacy-ST
disc with gaps between spots, a 100 um transcript bin) the layer gives that spot's count, for every method; and the
layer holds counts on tissue only, with one tissue mask for every method."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from toy_sections import make_toy_section

import c3diff as c3
from c3diff._validation import raster_geometry, scale0
from c3diff.tl._footprints import Footprints, match_footprints
from c3diff.tl._tissue import layer_tissue_mask

GENES = ["EPCAM", "PTPRC", "ACTA2", "CD68"]
#: Calibration tolerance of a footprint sum: 3 % of the count (one count below one count), or - the correction's
#: noise rule - two Poisson standard deviations of the sum (a count is one noisy draw of the expected map).
TOLERANCE = 0.03


def _met(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Whether each footprint sum is within the tolerance or two Poisson standard deviations of its count."""
    gap = np.abs(predicted - measured)
    return (gap <= TOLERANCE * np.maximum(measured, 1.0)) | (gap <= 2.0 * np.sqrt(np.maximum(predicted, 1.0)) + 1e-6)


@pytest.fixture(scope="module")
def section():
    return c3.datasets.simulate_section(width=960, height=960, pixel_size=4.0, genes=GENES, seed=0, progress=False)


@pytest.fixture(scope="module")
def fitted(section):
    """A tiny model trained on the slide (a few fit_slide steps: the H&E decides where counts go inside a spot)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return c3.tl.fit_slide(section, "hne", table_key="visium_table", genes=GENES, steps=3, seed=0, progress=False)


def _layer(sdata, key) -> np.ndarray:
    return np.asarray(scale0(sdata.images[key]).values, dtype=np.float64)


def _run(sdata, method, model, **source):
    key = f"sr_{method}_{'_'.join(map(str, source.values()))}"
    c3.tl.super_resolve(
        sdata,
        "hne",
        genes=GENES,
        method=method,
        model=model if method == "c3diff" else None,
        key_added=key,
        progress=False,
        **source,
    )
    return key


@pytest.mark.parametrize("method", ["bicubic", "c3diff"])
@pytest.mark.parametrize("table_key", ["visium_table", "st_table"])
def test_spot_footprint_sums_equal_the_spot_counts(section, fitted, method, table_key):
    key = _run(section, method, fitted, table_key=table_key)
    read = c3.tl.sample_at_spots(section, key, table_key=table_key, genes=GENES)
    predicted = np.asarray(read.layers["counts"], dtype=np.float64)
    measured = section.tables[table_key][read.obs_names, GENES].X
    measured = np.asarray(measured.todense() if hasattr(measured, "todense") else measured, dtype=np.float64)
    # spots whose whole disc lies on the layer's tissue (a spot at the tissue's edge has part of its disc off it)
    layer = _layer(section, key)
    on_tissue = (layer.sum(axis=0) > 0).astype(np.float64)[None]
    centres = read.obsm["spatial"][:, ::-1]
    diameter = section.tables[table_key].uns["c3diff"]["spots"]["diameter_um"]
    fraction = c3.metrics.sum_over_spots(on_tissue, raster_geometry(section.images[key]), centres, diameter)[0]
    disc = fraction[:, 0] / (np.pi * (diameter / 2) ** 2 / 10.0**2)
    inner = disc > 0.999
    assert inner.mean() > 0.7, inner.mean()
    met = _met(predicted[inner], measured[inner])
    assert met.all(), np.argwhere(~met)[:5]
    # the inner spots' totals agree (one factor per gene removes a bias every spot shares within its noise) ...
    assert _met(predicted[inner].sum(axis=0), measured[inner].sum(axis=0)).all()
    # ... and over all in-tissue spots (edge spots, not corrected, included) within two Poisson SDs of the total
    total = measured.sum(axis=0)
    assert np.all(np.abs(predicted.sum(axis=0) - total) <= 2 * np.sqrt(total) + 0.05 * total)
    params = section.attrs["c3diff"][key]["params"]
    assert params["footprints"]["kind"] == "spots" and params["footprints"]["noise_sd"] == 2.0


@pytest.mark.parametrize("method", ["bicubic", "c3diff"])
def test_bin_footprint_sums_equal_the_binned_transcripts(section, fitted, method):
    key = _run(section, method, fitted, points_key="transcripts")
    grid = c3.pp.bin_transcripts(section, bin_size=100.0, genes=GENES, image_key="hne", inplace=False)
    bins = np.asarray(scale0(grid).values, dtype=np.float64)
    layer = _layer(section, key)
    ny, nx = layer.shape[1] // 10, layer.shape[2] // 10
    sums = layer[:, : ny * 10, : nx * 10].reshape(len(GENES), ny, 10, nx, 10).sum(axis=(2, 4))
    bins = bins[:, :ny, :nx]
    inner = (layer.sum(axis=0) > 0)[: ny * 10, : nx * 10].reshape(ny, 10, nx, 10).all(axis=(1, 3))
    assert inner.sum() > 20
    assert _met(sums[:, inner], bins[:, inner]).all()


def test_footprint_sums_hold_at_5x(section):
    key = "sr_bicubic_x5"
    c3.tl.super_resolve(
        section, "hne", table_key="visium_table", genes=GENES, method="bicubic", scale=5, key_added=key, progress=False
    )
    assert raster_geometry(section.images[key]).sy == 20.0
    read = c3.tl.sample_at_spots(section, key, table_key="visium_table", genes=GENES)
    measured = np.asarray(section.tables["visium_table"][read.obs_names, GENES].X.todense(), dtype=np.float64)
    predicted = np.asarray(read.layers["counts"], dtype=np.float64)
    assert _met(predicted, measured).all(axis=1).mean() > 0.7  # every spot whose disc is on tissue


def test_match_footprints_keeps_the_pattern_and_the_zeros():
    from c3diff._geometry import RasterGeometry
    from c3diff.metrics import spot_footprint

    rng = np.random.default_rng(0)
    grid = RasterGeometry(y0=0.0, x0=0.0, sy=10.0, sx=10.0, height=60, width=60)
    centres = np.array([[y, x] for y in range(100, 600, 100) for x in range(100, 600, 100)], dtype=float)
    counts = rng.poisson(30, (len(centres), 2)).astype(float)
    counts[3] = 0.0
    values = rng.uniform(0.5, 1.5, (2, 60, 60)).astype(np.float32)
    values[1, 20:32, 20:32] = 0.0  # the model put nothing where spot (300, 300) counted something
    tissue = np.ones((60, 60), dtype=bool)
    tissue[:, 55:] = False
    values[:, ~tissue] = 0.0
    before = values.copy()
    std = np.ones_like(values)
    weights = spot_footprint(grid, centres, 50.0)
    summary = match_footprints(
        values, grid, Footprints(weights, centres, counts, 100.0, "spots"), tissue, others=(std,)
    )
    sums = np.asarray(weights @ values.reshape(2, -1).T.astype(np.float64))
    gap = np.abs(sums - counts)
    assert np.all((gap <= 0.005 * np.maximum(counts, 1.0) + 1e-9) | (gap <= 2 * np.sqrt(np.maximum(sums, 1.0)) + 1e-9))
    assert summary["matched"] == len(centres) and summary["max_noise_sd"] <= 2.0 + 1e-9
    # the spot the model left empty got its count (30 +- noise), not 0
    assert sums[12, 1] > 15
    assert values.min() >= 0 and (values[:, ~tissue] == 0).all()
    # a smooth correction: inside one disc the model's pattern is kept up to a slowly varying factor
    ratio = values[0, 28:33, 28:33] / before[0, 28:33, 28:33]
    assert ratio.std() / ratio.mean() < 0.1
    # the standard deviation follows the mean's factors
    kept = before[0] > 0
    np.testing.assert_allclose(std[0][kept], values[0][kept] / before[0][kept], rtol=1e-5)


# --- tissue only ---------------------------------------------------------------------------------------------------
def _residual_model():
    import torch

    torch.manual_seed(0)
    return c3.models.build_model("tiny", genes=["GENE_A", "GENE_B", "GENE_C"]).eval()


def test_layers_are_zero_off_tissue_with_one_mask_for_every_method():
    sdata = make_toy_section()
    model = _residual_model()
    # the toy tissue is an ellipse: centre (500, 600) um, radii 400 and 480 um
    yy, xx = np.meshgrid((np.arange(100) + 0.5) * 10, (np.arange(120) + 0.5) * 10, indexing="ij")
    distance_out = (np.sqrt(((yy - 500) / 400) ** 2 + ((xx - 600) / 480) ** 2) - 1) * 400  # um, a lower bound
    supports = {}
    for source in ({"table_key": "table"}, {"points_key": "transcripts"}):
        for method in ("bicubic", "c3diff"):
            out = c3.tl.super_resolve(
                sdata,
                "hne",
                method=method,
                model=model if method == "c3diff" else None,
                inplace=False,
                progress=False,
                **source,
            )["mean"]
            layer = np.asarray(scale0(out).values)
            support = layer.sum(axis=0) > 0
            assert (distance_out[support] <= 27.5).all(), distance_out[support].max()  # one Visium spot radius
            supports[(next(iter(source.values())), method)] = support
    for name in ("table", "transcripts"):
        bicubic, c3diff = supports[(name, "bicubic")], supports[(name, "c3diff")]
        assert (bicubic == c3diff).all()  # the same mask whatever the method
        inside = distance_out < -60  # well inside the tissue and the spots' reach
        assert bicubic[inside].mean() > 0.99


def test_layer_tissue_mask_pools_any_tissue_pixel():
    tissue = np.zeros((5, 7), dtype=bool)
    tissue[0, 0] = tissue[4, 6] = True
    mask = layer_tissue_mask(tissue, 2, (3, 4))
    assert mask.shape == (3, 4) and mask[0, 0] and mask[2, 3] and mask.sum() == 2
    np.testing.assert_array_equal(layer_tissue_mask(tissue, 1, (5, 7)), tissue)


def test_match_footprints_leaves_counts_within_their_noise_alone():
    """A sparse gene: the map expects 0.5 counts per disc and the spots counted Poisson draws of it (mostly 0 or 1).
    Pulling the map onto each draw would empty the discs that counted 0 and their surroundings; within the noise
    the map stays as it was."""
    from c3diff._geometry import RasterGeometry
    from c3diff.metrics import spot_footprint

    rng = np.random.default_rng(1)
    grid = RasterGeometry(y0=0.0, x0=0.0, sy=10.0, sx=10.0, height=80, width=80)
    centres = np.array([[y, x] for y in range(100, 800, 100) for x in range(100, 800, 100)], dtype=float)
    weights = spot_footprint(grid, centres, 50.0)
    values = np.full((1, 80, 80), 1.0, dtype=np.float32)
    values *= 0.5 / float((weights @ values.reshape(1, -1).T)[0, 0])  # 0.5 expected counts per disc
    before = values.copy()
    counts = rng.poisson(0.5, (len(centres), 1)).clip(max=2).astype(float)  # each within 2 SD of 0.5
    assert (counts == 0).sum() > 10 and (counts == 2).any()
    match_footprints(values, grid, Footprints(weights, centres, counts, 100.0, "spots"), np.ones((80, 80), bool))
    np.testing.assert_allclose(values, before, rtol=1e-6)
    # a count far outside the noise is still met: 40 where 0.5 were expected
    counts[24] = 40.0
    match_footprints(values, grid, Footprints(weights, centres, counts, 100.0, "spots"), np.ones((80, 80), bool))
    sums = np.asarray(weights @ values.reshape(1, -1).T.astype(np.float64))
    assert abs(sums[24, 0] - 40.0) <= 2 * np.sqrt(sums[24, 0]) + 1e-6
