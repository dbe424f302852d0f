"""First stage: VQ autoencoder training on single-gene maps."""

from __future__ import annotations

import pytest
import torch

from c3diff.models.autoencoder import autoencoder_loss, build_autoencoder, fit_autoencoder

CONFIG = {
    "block_out_channels": [16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 4,
    "latent_channels": 3,
    "num_vq_embeddings": 32,
    "layers_per_block": 1,
}


def _maps(n=16, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") * 2 - 1


def test_fit_lowers_the_reconstruction_loss_and_freezes():
    torch.manual_seed(0)
    vqvae = build_autoencoder(CONFIG)
    maps = _maps()
    images = maps.expand(-1, 3, -1, -1)
    with torch.no_grad():
        before = float(autoencoder_loss(vqvae, images).reconstruction)
    history = fit_autoencoder(vqvae, maps, steps=30, batch_size=8, learning_rate=2e-3, progress=False)
    with torch.no_grad():
        after = float(autoencoder_loss(vqvae, images).reconstruction)
    assert len(history) == 30 and after < 0.7 * before
    assert not any(p.requires_grad for p in vqvae.parameters()) and not vqvae.training
    # the scaling factor now whitens the latents
    with torch.no_grad():
        latents = vqvae.encode(images).latents * vqvae.config.scaling_factor
    assert float(latents.std()) == pytest.approx(1.0, rel=0.3)


def test_fit_accepts_patch_batches_and_upsamples_5x_targets():
    torch.manual_seed(0)
    vqvae = build_autoencoder(CONFIG)
    loader = [{"hr": _maps(4, 16, seed=i)} for i in range(3)]  # 5x targets: half the tile size
    history = fit_autoencoder(vqvae, loader, steps=4, image_size=32, update_scaling_factor=False, progress=False)
    assert len(history) == 4 and vqvae.config.scaling_factor == 0.18215
    with pytest.raises(ValueError, match="integer factor"):
        fit_autoencoder(vqvae, _maps(2, 24), steps=1, image_size=32, progress=False)
    with pytest.raises(ValueError, match="reconstruction"):
        autoencoder_loss(vqvae, torch.zeros(1, 3, 32, 32), reconstruction="l3")


def test_a_fitted_first_stage_survives_save_and_load(tmp_path):
    import c3diff

    torch.manual_seed(0)
    model = c3diff.models.build_model(
        "tiny-paper",
        genes=["A", "B"],
        autoencoder_config={**CONFIG, "sample_size": 64},
        space_to_depth=1,
        hint_encoder_channels=[8, 8],
        unet_config={"sample_size": 32, "in_channels": 3, "out_channels": 3},
    )
    fit_autoencoder(model.vqvae, _maps(8, 64), steps=2, batch_size=4, progress=False)
    factor = model.vqvae.config.scaling_factor
    assert factor != 0.18215
    model.save_pretrained(tmp_path / "m")
    loaded = c3diff.models.from_pretrained(tmp_path / "m")
    assert loaded.vqvae.config.scaling_factor == pytest.approx(factor)
    latents = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.decode_latents(latents), model.eval().decode_latents(latents))
