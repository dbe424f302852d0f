"""c3diff.pp: rasters from transcripts and spots, resampling, patches, dataset, splits, gene selection."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from toy_sections import make_toy_section

import c3diff as c3
from c3diff._validation import RasterGeometry, raster_geometry


def _points(sdata):
    return sdata.points["transcripts"].compute()


# ---------------------------------------------------------------------------------------------- bin_transcripts
def test_bin_transcripts_conserves_counts_and_places_points(toy_section):
    sdata = toy_section
    c3.pp.bin_transcripts(sdata, bin_size=10.0)
    raster = sdata.images["transcripts_bin10um"]
    frame = _points(sdata)
    assert list(raster.coords["c"].values) == ["GENE_A", "GENE_B", "GENE_C"]
    assert float(raster.sum()) == len(frame)
    geom = raster_geometry(raster)
    assert (geom.sy, geom.sx, geom.y0, geom.x0) == (10.0, 10.0, 0.0, 0.0)
    # every gene's total equals its transcripts; a single transcript's bin holds it
    for g in ["GENE_A", "GENE_B", "GENE_C"]:
        assert float(raster.sel(c=g).sum()) == int((frame["gene"] == g).sum())
    row = frame.iloc[123]
    i, j = int(row["y"] // 10), int(row["x"] // 10)
    assert float(raster.sel(c=row["gene"]).values[i, j]) >= 1
    assert sdata.attrs["c3diff"]["transcripts_bin10um"]["tool"] == "bin_transcripts"


def test_bin_transcripts_pooled_10um_equals_100um(toy_section):
    sdata = toy_section
    fine = c3.pp.bin_transcripts(sdata, bin_size=10.0, image_key="hne", inplace=False)
    coarse = c3.pp.bin_transcripts(sdata, bin_size=100.0, image_key="hne", inplace=False)
    f = np.asarray(fine.data)
    g, h, w = f.shape
    hc, wc = coarse.shape[1:]
    padded = np.zeros((g, hc * 10, wc * 10), dtype=np.float32)
    padded[:, :h, :w] = f
    pooled = padded.reshape(g, hc, 10, wc, 10).sum(axis=(2, 4))
    np.testing.assert_array_equal(pooled, np.asarray(coarse.data))


def test_bin_transcripts_with_image_aligns_to_image_and_warns_outside():
    sdata = make_toy_section(origin=(30.0, 50.0))
    raster = c3.pp.bin_transcripts(sdata, bin_size=20.0, image_key="hne", inplace=False)
    geom = raster_geometry(raster)
    assert (geom.y0, geom.x0) == (30.0, 50.0)
    assert (geom.height, geom.width) == (50, 60)
    # a transcript outside the H&E is left out with a warning that says how many
    import pandas as pd
    from spatialdata.models import PointsModel

    frame = _points(sdata)[["x", "y", "gene"]]
    extra = pd.DataFrame(
        {
            "x": [5000.0, 5001.0],
            "y": [10.0, 10.0],
            "gene": pd.Categorical(["GENE_A", "GENE_A"], categories=frame["gene"].cat.categories),
        }
    )
    sdata.points["transcripts"] = PointsModel.parse(
        pd.concat([frame, extra], ignore_index=True), coordinates={"x": "x", "y": "y"}, feature_key="gene"
    )
    with pytest.warns(UserWarning, match="2 transcript"):
        raster = c3.pp.bin_transcripts(sdata, bin_size=20.0, image_key="hne", inplace=False)
    assert float(raster.sum()) == len(frame)


def test_bin_transcripts_errors(toy_section):
    with pytest.raises(KeyError, match="points_key='nope'"):
        c3.pp.bin_transcripts(toy_section, points_key="nope")
    with pytest.raises(KeyError, match="not found: NOTAGENE"):
        c3.pp.bin_transcripts(toy_section, genes=["GENE_A", "NOTAGENE"])
    with pytest.raises(ValueError, match="bin_size"):
        c3.pp.bin_transcripts(toy_section, bin_size=0)
    with pytest.raises(KeyError, match="image_key='hne_missing'"):
        c3.pp.bin_transcripts(toy_section, image_key="hne_missing")


# ------------------------------------------------------------------------------------------------ spots_to_grid
def test_spots_to_grid_density_and_mask(toy_section):
    sdata = toy_section
    c3.pp.spots_to_grid(sdata, table_key="table", image_key="hne", fill="linear")
    raster, mask = sdata.images["table_grid"], sdata.labels["table_grid_mask"]
    geom = raster_geometry(raster)
    assert (geom.sy, geom.y0, geom.x0, geom.height, geom.width) == (100.0, 0.0, 0.0, 10, 12)
    values, mask = np.asarray(raster.data), np.asarray(mask.data)
    assert set(np.unique(mask)) <= {0, 1, 2} and (mask == 1).any() and (mask == 2).any()
    # a measured pixel holding exactly one spot centre carries that spot's counts scaled to the pixel area
    spots = c3.pp.spots_from_table(sdata, "table")
    rows, cols = (spots.centres // 100).astype(int).T
    flat = rows * geom.width + cols
    unique, n_hits = np.unique(flat, return_counts=True)
    single = unique[n_hits == 1][0]
    k = int(np.flatnonzero(flat == single)[0])
    expected = spots.counts[k] * 100.0**2 / (np.pi * 27.5**2)
    np.testing.assert_allclose(values[:, single // geom.width, single % geom.width], expected, rtol=1e-5)
    # filled pixels lie between measured values (linear interpolation is a convex combination)
    b = list(raster.coords["c"].values).index("GENE_B")
    filled = values[b][mask == 2]
    measured = values[b][mask == 1]
    assert filled.min() >= measured.min() - 1e-4 and filled.max() <= measured.max() + 1e-4
    assert np.all(values[:, mask == 0] == 0)


def test_spots_to_grid_fill_none_and_errors(toy_section):
    raster, mask = c3.pp.spots_to_grid(toy_section, table_key="table", fill="none", inplace=False)
    assert np.all(np.asarray(raster.data)[:, np.asarray(mask.data) == 2] == 0)
    with pytest.raises(ValueError, match="fill"):
        c3.pp.spots_to_grid(toy_section, table_key="table", fill="cubic")
    with pytest.raises(KeyError, match="table_key='nope'"):
        c3.pp.spots_to_grid(toy_section, table_key="nope")
    toy_section.tables["table"].obs["in_tissue"] = False
    with pytest.raises(ValueError, match="no spot under tissue"):
        c3.pp.spots_to_grid(toy_section, table_key="table")


def test_spots_outside_image_error():
    from spatialdata.transformations import Translation, set_transformation

    sdata = make_toy_section()
    set_transformation(sdata.shapes["spots"], Translation([50_000.0, 0.0], axes=("y", "x")), "global")
    with pytest.raises(ValueError, match="not registered to the same coordinate system"):
        c3.pp.spots_to_grid(sdata, table_key="table", image_key="hne")


def test_image_without_transform_to_coordinate_system(toy_section):
    from spatialdata.transformations import Identity, remove_transformation, set_transformation

    set_transformation(toy_section.images["hne"], Identity(), "pixels")
    remove_transformation(toy_section.images["hne"], "global")
    with pytest.raises(ValueError, match="no transformation to the coordinate system 'global'"):
        c3.pp.bin_transcripts(toy_section, image_key="hne")


# ----------------------------------------------------------------------------------------------------- resampling
def test_resample_exact_block_mean_and_general_path_agree():
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    from c3diff.pp._resample import resample_raster

    yy, xx = np.meshgrid(np.arange(200), np.arange(300), indexing="ij")
    data = np.stack([yy, xx, yy + xx]).astype(np.float32)
    image = Image2DModel.parse(
        data, dims=("c", "y", "x"), transformations={"global": Scale([0.5, 0.5], axes=("y", "x"))}
    )
    grid = RasterGeometry(y0=0.0, x0=0.0, sy=10.0, sx=10.0, height=10, width=15)
    exact, inside = resample_raster(image, grid)
    assert inside.all()
    # block of 20x20 source pixels: mean row index = 20 i + 9.5
    np.testing.assert_allclose(exact[0, :, 0], 20 * np.arange(10) + 9.5)
    np.testing.assert_allclose(exact[1, 0, :], 20 * np.arange(15) + 9.5)
    shifted = RasterGeometry(y0=0.25, x0=0.25, sy=10.0, sx=10.0, height=9, width=14)  # not aligned: general path
    general, _ = resample_raster(image, shifted)
    # interior pixels (the Gaussian anti-aliasing sees the image border at the first one)
    np.testing.assert_allclose(general[0, 1:-1, 0], 20 * np.arange(1, 8) + 10.0, atol=0.05)
    outside = RasterGeometry(y0=-50.0, x0=0.0, sy=10.0, sx=10.0, height=10, width=2)
    values, inside = resample_raster(image, outside, fill=-1.0)
    assert (~inside[:5]).all() and inside[5:].all() and np.all(values[:, :5] == -1.0)


def test_histology_raster_uses_pyramid_and_detects_tissue(toy_section):
    rgb, grid = c3.pp.histology_raster(toy_section, "hne", pixel_size=10.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 100, 120)
    assert (grid.sy, grid.height, grid.width) == (10.0, 100, 120)
    tissue = c3.pp.detect_tissue(rgb, pixel_size=10.0)
    # the tissue ellipse covers pi * 0.4 * 0.4 of the section
    assert tissue.mean() == pytest.approx(np.pi * 0.16, abs=0.02)
    assert tissue[50, 60] and not tissue[2, 2]


# -------------------------------------------------------------------------------------------------------- patches
@pytest.mark.parametrize("scale", [10, 5])
def test_make_patches_shapes_and_round_trip(toy_section, scale):
    patches = c3.pp.make_patches(
        toy_section, genes=["GENE_B", "GENE_A"], points_key="transcripts", scale=scale, patch_size=32, min_tissue=0.6
    )
    n = len(patches)
    assert n > 0 and patches.genes == ["GENE_B", "GENE_A"]
    hr_size = 32 if scale == 10 else 16
    assert patches.histology.shape == (n, 3, 32, 32) and patches.histology.dtype == np.uint8
    assert patches.lr.shape == (n, 2, 4, 4)  # ceil(32 * 10 / 100)
    assert patches.hr.shape == (n, 2, hr_size, hr_size)
    assert patches.params["hr_pixel_size"] == (10.0 if scale == 10 else 20.0)
    assert patches.hr.min() >= 0 and patches.hr.max() <= 1 and patches.lr.max() <= 1
    # patch corners on the LR grid (multiples of 100 um from the image corner), stride 30 px = 300 um
    assert np.all(patches.origins % 100 == 0)
    # normalisation round trip: HR back in counts equals the binned transcripts under the patch
    hr_px = patches.params["hr_pixel_size"]
    binned = c3.pp.bin_transcripts(
        toy_section, bin_size=hr_px, genes=["GENE_B", "GENE_A"], image_key="hne", inplace=False
    )
    y0, x0 = (patches.origins[0] / hr_px).astype(int)
    expected = np.asarray(binned.data)[:, y0 : y0 + hr_size, x0 : x0 + hr_size]
    np.testing.assert_allclose(patches.hr_counts(0), expected, atol=1e-4)
    # Xenium-like LR = HR transcripts in 100 um bins: pooling the HR truth gives the LR inside the patch
    pool = 10 if scale == 10 else 5
    lr = patches.lr_counts(0)[:, :3, :3]
    pooled = expected[:, : 3 * pool, : 3 * pool].reshape(2, 3, pool, 3, pool).sum(axis=(2, 4))
    np.testing.assert_allclose(lr, pooled, atol=1e-3)


def test_make_patches_from_spots_keeps_mask(toy_section):
    patches = c3.pp.make_patches(toy_section, genes=["GENE_B"], table_key="table", patch_size=32, min_tissue=0.9)
    assert patches.hr is None
    assert set(np.unique(patches.lr_mask)) <= {0, 1, 2} and (patches.lr_mask == 1).any()
    assert patches.params["sources"]["table_key"] == "table"
    assert patches.sample_id[0] == "toy0"


def test_make_patches_tissue_filter_and_errors(toy_section):
    loose = c3.pp.make_patches(toy_section, genes=["GENE_B"], points_key="transcripts", patch_size=32, min_tissue=0.0)
    strict = c3.pp.make_patches(toy_section, genes=["GENE_B"], points_key="transcripts", patch_size=32, min_tissue=1.0)
    assert len(loose) > len(strict) > 0
    assert strict.tissue.all()
    with pytest.raises(KeyError, match="NOTAGENE"):
        c3.pp.make_patches(toy_section, genes=["NOTAGENE"], points_key="transcripts", patch_size=32)
    with pytest.raises(ValueError, match="scale"):
        c3.pp.make_patches(toy_section, genes=["GENE_B"], points_key="transcripts", scale=4)
    with pytest.raises(ValueError, match="No LR source"):
        c3.pp.make_patches(toy_section, genes=["GENE_B"], patch_size=32)
    with pytest.raises(ValueError, match="smaller than one patch"):
        c3.pp.make_patches(toy_section, genes=["GENE_B"], points_key="transcripts", patch_size=256)
    with pytest.raises(ValueError, match="stride"):
        c3.pp.make_patches(toy_section, genes=["GENE_B"], points_key="transcripts", patch_size=32, stride=15)


def test_make_patches_misaligned_lr_raster(toy_section):
    raster = c3.pp.bin_transcripts(toy_section, bin_size=100.0, origin=(0.0, 35.0), inplace=False)
    toy_section.images["lr_shifted"] = raster
    with pytest.raises(ValueError, match="not aligned"):
        c3.pp.make_patches(toy_section, genes=["GENE_B"], lr_key="lr_shifted", patch_size=32)


def test_make_patches_blank_image_is_empty_tissue(toy_section):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    blank = np.full((3, 100, 100), 250, dtype=np.uint8)
    toy_section.images["blank"] = Image2DModel.parse(
        blank, dims=("c", "y", "x"), transformations={"global": Scale([10.0, 10.0], axes=("y", "x"))}
    )
    with pytest.raises(ValueError, match="No tissue found"):
        c3.pp.make_patches(toy_section, image_key="blank", genes=["GENE_B"], points_key="transcripts", patch_size=32)


def test_patchset_subset_concat_save_load(toy_section, tmp_path):
    a = c3.pp.make_patches(
        toy_section, genes=["GENE_A", "GENE_B"], points_key="transcripts", patch_size=32, sample_id="s1"
    )
    b = c3.pp.make_patches(
        make_toy_section(seed=1), genes=["GENE_A", "GENE_B"], points_key="transcripts", patch_size=32, sample_id="s2"
    )
    both = c3.pp.PatchSet.concat([a, b])
    assert len(both) == len(a) + len(b) and both.samples == ["s1", "s2"]
    assert len(both.subset(samples=["s2"])) == len(b)
    path = tmp_path / "patches.npz"
    both.save(path)
    loaded = c3.pp.PatchSet.load(path)
    np.testing.assert_array_equal(loaded.hr, both.hr)
    np.testing.assert_array_equal(loaded.sample_id, both.sample_id)
    assert loaded.genes == both.genes and loaded.params["scale"] == 10
    with pytest.raises(ValueError, match="different genes"):
        c3.pp.PatchSet.concat(
            [a, c3.pp.make_patches(toy_section, genes=["GENE_B"], points_key="transcripts", patch_size=32)]
        )
    with pytest.raises(KeyError, match="unknown sample"):
        both.subset(samples=["s3"])


# -------------------------------------------------------------------------------------------------------- dataset
def test_patch_dataset_items_and_missing_lr(toy_section):
    import torch

    patches = c3.pp.make_patches(
        toy_section, genes=["GENE_A", "GENE_B", "GENE_C"], points_key="transcripts", patch_size=32, min_tissue=0.0
    )
    ds = patches.dataset(genes=["GENE_B", "GENE_A"])
    assert len(ds) == len(patches) * 2
    item = ds[1]
    assert item["histology"].shape == (3, 32, 32) and item["histology"].dtype == torch.float32
    assert 0 <= float(item["histology"].min()) and float(item["histology"].max()) <= 1
    assert item["lr"].shape == (1, 4, 4) and item["hr"].shape == (1, 32, 32)
    assert -1 <= float(item["hr"].min()) and float(item["hr"].max()) <= 1
    assert int(item["gene_index"]) == 1  # GENE_A is the dataset's second gene
    np.testing.assert_allclose(item["lr"][0].numpy(), patches.lr[0, 0])  # GENE_A is the patches' first channel

    skipping = patches.dataset(skip_constant=True)
    assert len(skipping) < len(patches) * 3  # GENE_C is absent from most patches

    missing = patches.dataset(lr_missing_fraction=0.5, seed=3)
    flags = [bool(missing[i]["lr_missing"]) for i in range(len(missing))]
    assert 0 < sum(flags) < len(flags)
    assert flags == [bool(missing[i]["lr_missing"]) for i in range(len(missing))]  # deterministic
    k = flags.index(True)
    assert float(missing[k]["lr"].abs().sum()) == 0.0
    missing.set_epoch(1)
    assert flags != [bool(missing[i]["lr_missing"]) for i in range(len(missing))]
    with pytest.raises(ValueError, match="lr_missing_fraction"):
        patches.dataset(lr_missing_fraction=2.0)


# --------------------------------------------------------------------------------------------------------- splits
def test_split_samples_has_no_leakage():
    ids = [f"p{i}" for i in range(10) for _ in range(3)]
    splits = c3.pp.split_samples(ids, val_fraction=0.2, test_fraction=0.3, seed=1)
    sets = [set(v) for v in splits.values()]
    assert sum(len(s) for s in sets) == 10
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert (len(splits["val"]), len(splits["test"])) == (2, 3)
    assert splits == c3.pp.split_samples(ids, val_fraction=0.2, test_fraction=0.3, seed=1)
    with pytest.raises(ValueError, match="never by patch"):
        c3.pp.split_samples(["only", "two"], val_fraction=0.5, test_fraction=0.5)


# -------------------------------------------------------------------------------------------------- select_genes
def test_select_genes_hvg_with_forced_markers():
    import anndata as ad

    rng = np.random.default_rng(0)
    n_cells, n_genes = 500, 120
    means = np.exp(rng.uniform(-1, 2.5, n_genes))
    counts = rng.poisson(means, size=(n_cells, n_genes)).astype(np.float32)  # Poisson: no extra variance
    # genes 0-4: gamma-Poisson with a strong overdispersion at ordinary means
    counts[:, :5] = rng.poisson(rng.gamma(0.3, means[:5] / 0.3, size=(n_cells, 5)))
    adata = ad.AnnData(counts)
    adata.var_names = [f"G{i}" for i in range(n_genes)]
    genes = c3.pp.select_genes(adata, n_top_genes=6, include=["G99"])
    assert len(genes) == 6 and "G99" in genes
    assert set(genes) - {"G99"} == {f"G{i}" for i in range(5)}
    assert genes[-1] == "G99"  # a forced gene keeps its own (low) HVG rank
    assert adata.var["c3diff_selected"].sum() == 6
    assert adata.uns["c3diff"]["select_genes"]["genes"] == genes
    with pytest.raises(KeyError, match="NOPE"):
        c3.pp.select_genes(adata, n_top_genes=5, include=["NOPE"])
    with pytest.raises(ValueError, match="n_top_genes"):
        c3.pp.select_genes(adata, n_top_genes=121)


def test_select_genes_on_spatialdata_requires_table_key(toy_section):
    from spatialdata.models import TableModel

    toy_section.tables["other"] = TableModel.parse(toy_section.tables["table"].copy())
    with pytest.raises(ValueError, match="table_key"):
        c3.pp.select_genes(toy_section, n_top_genes=2)
    with pytest.warns(UserWarning, match="seurat_v3"):
        assert len(c3.pp.select_genes(toy_section, table_key="table", n_top_genes=2, inplace=False)) == 2


def test_select_genes_keeps_torchs_thread_count(toy_section):
    """scanpy's numba kernels share torch's OpenMP runtime and left it at every core (a later training run in the same
    process then summed in another order than a resumed one: tests/test_fault_injection.py after this module)."""
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for flavor in ("seurat", "seurat_v3"):  # (seurat_v3 falls back to seurat on the toy's few genes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c3.pp.select_genes(toy_section, table_key="table", n_top_genes=2, flavor=flavor, inplace=False)
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_make_patches_at_a_models_geometry_and_the_shared_padding(toy_section):
    """Patches at a model's own pixel sizes (20 um histology, 200 um LR): their HR truth pooled over each LR pixel
    is that LR pixel's count; windows past the data follow :data:`c3diff.pp._model_inputs.PADDING` (white glass,
    maps repeating their edge, LR mask "outside"), for training as for super_resolve."""
    from c3diff._constants import MASK_OUTSIDE

    geometry = c3.pp.ModelGeometry(histology_pixel_size=20.0, lr_pixel_size=200.0)
    patches = c3.pp.make_patches(
        toy_section,
        genes=["GENE_A", "GENE_B"],
        points_key="transcripts",
        patch_size=32,
        min_tissue=0.3,
        geometry=geometry,
    )
    params = patches.params
    assert (params["histology_pixel_size"], params["lr_pixel_size"], params["hr_pixel_size"]) == (20.0, 200.0, 20.0)
    assert patches.histology.shape[-1] == 32 and patches.lr.shape[-1] == 4 and patches.hr.shape[-1] == 32
    hr, lr = patches.hr_counts(), patches.lr_counts()
    pooled = hr[:, :, :30, :30].reshape(len(patches), 2, 3, 10, 3, 10).sum(axis=(3, 5))  # whole LR pixels
    np.testing.assert_allclose(pooled, lr[:, :, :3, :3], rtol=1e-5, atol=1e-4)

    inputs = c3.pp.model_inputs(toy_section, image_key="hne", genes=["GENE_B"], table_key="table", geometry=geometry)
    h, w = inputs.histology.shape[-2:]
    corner = ((h - 20) // 10 * 10, (w - 20) // 10 * 10)  # on an LR corner, running past the data's bottom-right
    histology = inputs.histology_window(*corner, 30)
    counts, mask = inputs.lr_window(*corner, 30)
    assert (histology[:, h - corner[0] :, :] == 255).all() and (histology[:, :, w - corner[1] :] == 255).all()
    n_y, n_x = inputs.lr.shape[-2] - corner[0] // 10, inputs.lr.shape[-1] - corner[1] // 10
    assert (mask[n_y:, :] == MASK_OUTSIDE).all() and (mask[:, n_x:] == MASK_OUTSIDE).all()
    np.testing.assert_array_equal(counts[:, n_y:, :n_x], np.repeat(counts[:, n_y - 1 : n_y, :n_x], 3 - n_y, axis=1))
