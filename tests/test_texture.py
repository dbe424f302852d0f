"""Histology texture: features that tell apart what a 10 um RGB average cannot, and mean networks that read them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import c3diff
from c3diff.pp import TEXTURE_FEATURES, histology_texture


def _section(rgb: np.ndarray, pixel_size: float):
    """A SpatialData holding only an H&E ``(3, h, w)`` uint8 at ``pixel_size`` um/px."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    image = Image2DModel.parse(
        rgb, dims=("c", "y", "x"), transformations={"global": Scale([pixel_size, pixel_size], axes=("y", "x"))}
    )
    return sd.SpatialData(images={"hne": image})


def _dots_and_grey(seed: int = 0) -> np.ndarray:
    """400 x 200 um at 1 um/px: the left half has dark 4 um nuclei on pink, the right half a flat colour with the
    same mean, so that the two halves look identical at 10 um."""
    rng = np.random.default_rng(seed)
    left = np.empty((3, 200, 200), dtype=np.float64)
    left[:] = np.array([230.0, 190.0, 210.0])[:, None, None]
    yy, xx = np.mgrid[:200, :200]
    for cy, cx in rng.uniform(4, 196, size=(250, 2)):
        left[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= 4] = np.array([70.0, 40.0, 110.0])[:, None]
    right = np.broadcast_to(left.mean(axis=(1, 2))[:, None, None], left.shape)
    return np.concatenate([left, right], axis=2).round().astype(np.uint8)


def test_texture_separates_what_the_10um_average_cannot():
    sdata = _section(_dots_and_grey(), 1.0)
    rgb, grid = c3diff.pp.histology_raster(sdata, "hne")
    texture = histology_texture(sdata, "hne", grid=grid)
    assert texture.shape == (len(TEXTURE_FEATURES), 20, 40) and texture.dtype == np.float32
    # at 10 um the halves differ by a few grey levels at most; their texture differs by whole standard deviations
    assert np.abs(rgb[:, :, :20].mean(axis=(1, 2)) - rgb[:, :, 20:].mean(axis=(1, 2))).max() < 3
    for name, gap in (
        ("dark_fraction", 1),
        ("grey_sd", 1),
        ("haematoxylin_sd", 1),
        ("gradient", 1),
        ("nucleus_size", 0.5),
    ):
        channel = texture[TEXTURE_FEATURES.index(name)]
        assert channel[:, :20].mean() - channel[:, 20:].mean() > gap, name
    # standardised per slide over the image: zero mean, unit spread (constant channels stay 0)
    np.testing.assert_allclose(texture.mean(axis=(1, 2)), 0.0, atol=0.01)  # (values clipped at +-5)
    spread = texture.std(axis=(1, 2))
    assert np.all((np.abs(spread - 1) < 0.05) | (spread < 1e-3))


def test_texture_is_zero_outside_the_image_and_refuses_coarse_images():
    sdata = _section(_dots_and_grey(), 1.0)
    _, grid = c3diff.pp.histology_raster(sdata, "hne")
    wider = c3diff._geometry.RasterGeometry(y0=grid.y0, x0=grid.x0, sy=10.0, sx=10.0, height=20, width=50)
    texture = histology_texture(sdata, "hne", grid=wider)
    assert np.all(texture[:, :, 40:] == 0) and np.abs(texture[:, :, :40]).max() > 0.5
    coarse = _section(np.full((3, 40, 40), 200, dtype=np.uint8), 5.0)
    with pytest.raises(ValueError, match=r"image_key='hne'.*5 um/px.*at most 2.5 um/px"):
        histology_texture(coarse, "hne", grid=wider)


def _texture_model(genes=("A", "B")):
    config = {**c3diff.models.PRESETS["tiny"]["mean_net_config"], "histology_prior": False, "texture_channels": 2}
    return c3diff.models.build_model("tiny", genes=list(genes), mean_net_config=config)


def _texture_batch(generator: torch.Generator, n_tiles: int = 8, genes_per_tile: int = 2):
    """Counts fall on pixels whose first texture channel is high; the RGB is the same grey everywhere."""
    marked = torch.rand(n_tiles, 1, 64, 64, generator=generator) < 0.3
    texture = torch.cat([marked.float() * 2 - 0.6, torch.randn(n_tiles, 1, 64, 64, generator=generator)], dim=1)
    counts = torch.poisson(3.0 * marked.float(), generator=generator).repeat_interleave(genes_per_tile, dim=0)
    lr = torch.nn.functional.pad(counts, (0, 6, 0, 6)).reshape(len(counts), 1, 7, 10, 7, 10).sum(dim=(3, 5))
    return {
        "histology": torch.full((len(counts), 3, 64, 64), 0.6),
        "texture": texture.repeat_interleave(genes_per_tile, dim=0),
        "lr": lr / lr.amax(dim=(-2, -1), keepdim=True).clamp_min(1),
        "hr": counts / counts.amax(dim=(-2, -1), keepdim=True).clamp_min(1) * 2 - 1,
        "hr_counts": counts,
        "gene_index": torch.arange(len(counts)) % genes_per_tile,
        "patch_index": torch.arange(n_tiles).repeat_interleave(genes_per_tile),
        "lr_missing": torch.zeros(len(counts), dtype=torch.bool),
    }, marked.repeat_interleave(genes_per_tile, dim=0)


def _marked_share(model, batch, marked) -> float:
    model.eval()
    with torch.no_grad():
        histology, lr, gene_index, missing = model._check_batch(batch)
        _, _, log_shares = model._hint(
            histology, lr, gene_index, missing, contrastive=False, with_mean=True, texture=batch["texture"]
        )
    model.train()
    shares = log_shares.exp()
    return float((shares * marked).sum() / shares.sum())


def test_mean_stage_learns_a_pattern_only_the_texture_shows():
    torch.manual_seed(0)
    model = _texture_model()
    held_out, held_marked = _texture_batch(torch.Generator().manual_seed(99))
    before = _marked_share(model, held_out, held_marked)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.trainable_parameters("mean"), lr=3e-3)
    for _ in range(30):
        batch, _ = _texture_batch(generator)
        loss = model.compute_mean_losses(batch, generator=generator)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
    after = _marked_share(model, held_out, held_marked)
    assert before < 0.4  # untrained: the texture term is zero, counts spread over the LR pixel (30 % marked)
    assert after > 0.7, (before, after)


def test_texture_models_need_texture_and_keep_it_through_save_and_predict(tmp_path):
    model = _texture_model().eval()
    histology, lr = torch.rand(2, 3, 64, 64), torch.rand(2, 2, 7, 7)
    with pytest.raises(ValueError, match=r"pass `texture` \(2, 2, 64, 64\).*histology_texture"):
        model.predict(histology, lr)
    batch, _ = _texture_batch(torch.Generator().manual_seed(0), n_tiles=2)
    with pytest.raises(KeyError, match="make_patches.*texture=True"):
        model.compute_mean_losses({k: v for k, v in batch.items() if k != "texture"})
    with torch.no_grad():
        model.mean_net.texture_weights.weight.normal_()
    texture = torch.randn(2, 2, 64, 64)
    mean, _ = model.predict(histology, lr, texture=texture)
    other, _ = model.predict(histology, lr, texture=torch.randn(2, 2, 64, 64))
    assert not torch.allclose(mean, other)  # the texture moves the counts inside each LR pixel
    model.save_pretrained(str(tmp_path / "m"))
    loaded = c3diff.models.from_pretrained(str(tmp_path / "m"))
    assert loaded.texture_channels == 2
    torch.testing.assert_close(loaded.predict(histology, lr, texture=texture)[0], mean)


def test_patches_carry_the_texture_through_save_concat_and_the_dataset(tmp_path, toy_section):
    genes = ["GENE_A", "GENE_B"]
    patches = c3diff.pp.make_patches(
        toy_section, genes=genes, points_key="transcripts", patch_size=32, stride=30, texture=True
    )
    assert patches.texture.shape == (len(patches), len(TEXTURE_FEATURES), 32, 32)
    assert patches.texture.dtype == np.float16 and patches.params["texture"] is True
    # a patch's texture is the section's texture under its window
    rgb, grid = c3diff.pp.histology_raster(toy_section, "hne")
    full = histology_texture(toy_section, "hne", grid=grid, tissue=c3diff.pp.detect_tissue(rgb, pixel_size=10.0))
    r, c = (int(round(v / 10.0)) for v in patches.origins[0])
    np.testing.assert_allclose(patches.texture[0], full[:, r : r + 32, c : c + 32], atol=5e-3)
    patches.save(tmp_path / "p.npz")
    loaded = c3diff.pp.PatchSet.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.texture, patches.texture)
    assert loaded.subset(index=np.array([1])).texture.shape[0] == 1
    item = patches.dataset(genes=genes)[0]
    assert item["texture"].shape == (len(TEXTURE_FEATURES), 32, 32) and item["texture"].dtype == torch.float32
    plain = c3diff.pp.make_patches(toy_section, genes=genes, points_key="transcripts", patch_size=32, stride=30)
    assert plain.texture is None and "texture" not in plain.dataset(genes=genes)[0]
    with pytest.raises(ValueError, match="with and without texture"):
        c3diff.pp.PatchSet.concat([patches, plain])


def test_train_refuses_patches_without_the_texture_its_model_reads_and_validates_with_it(tmp_path, toy_section):
    genes = ["GENE_A", "GENE_B"]
    patches = c3diff.pp.make_patches(toy_section, genes=genes, points_key="transcripts", patch_size=64)
    with pytest.raises(ValueError, match=r"no histology texture.*make_patches\(\.\.\., texture=True\)"):
        c3diff.tl.train(patches, output_dir=tmp_path / "run", model="tiny-texture", max_steps=1, progress=False)
    # given the section itself, train makes the patches with texture and validates the model on them
    result = c3diff.tl.train(
        toy_section,
        val_data=toy_section,
        points_key="transcripts",
        output_dir=tmp_path / "run2",
        model="tiny-texture",
        genes=genes,
        max_steps=2,
        mean_max_steps=2,
        backbone_steps=1,
        batch_size=2,
        progress=False,
    )
    assert result.model.texture_channels == len(TEXTURE_FEATURES)
    assert np.isfinite(result.history["val_pcc"].dropna()).all() and len(result.history["val_pcc"].dropna())


def test_super_resolve_reads_the_texture_and_refuses_coarse_images(toy_section):
    genes = ["GENE_A", "GENE_B"]
    model = c3diff.models.build_model("tiny-texture", genes=genes).eval()
    with torch.no_grad():
        model.mean_net.texture_weights.weight.normal_(std=0.002)
    c3diff.tl.super_resolve(toy_section, "hne", table_key="table", model=model, progress=False, key_added="tex")
    layer = np.asarray(c3diff._geometry.scale0(toy_section.images["tex"]).data)
    assert np.isfinite(layer).all() and layer.sum() > 0
    measured = np.asarray(toy_section.tables["table"][:, genes].X.sum())
    assert layer.sum() < 10 * measured  # counts are placed, not made up (the spots hold ~a quarter of the area)
    from toy_sections import make_toy_section

    coarse = make_toy_section(pixel_size=4.0)
    with pytest.raises(ValueError, match=r"image_key='hne'.*texture features need nuclei resolved"):
        c3diff.tl.super_resolve(coarse, "hne", table_key="table", model=model, progress=False, key_added="tex")
    assert "tex" not in coarse.images  # nothing written by the failed call


def test_fit_slide_reads_the_texture_when_asked(toy_section):
    fitted = c3diff.tl.fit_slide(toy_section, "hne", table_key="table", steps=2, progress=False, texture=True)
    assert fitted.texture_channels == len(TEXTURE_FEATURES)
    before = c3diff.models.build_model("tiny-texture", genes=fitted.genes).mean_net.texture_weights.weight
    assert not torch.equal(fitted.mean_net.texture_weights.weight, before)  # the texture term was fitted
    plain = c3diff.tl.fit_slide(toy_section, "hne", table_key="table", steps=2, progress=False)
    assert plain.texture_channels == 0
