"""First stage: a VQ autoencoder trained on single-gene maps by c3.tl.train's "first_stage" stage."""

from __future__ import annotations

import accelerate
import pytest
import torch

import c3diff
from c3diff.models import TrainingConfig
from c3diff.models._autoencoder import autoencoder_loss
from c3diff.tl._train import _fit_map_stage

CONFIG = {
    "block_out_channels": [16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 4,
    "latent_channels": 3,
    "num_vq_embeddings": 32,
    "layers_per_block": 1,
    "sample_size": 64,
}


def _model(scale=10):
    torch.manual_seed(0)
    return c3diff.models.build_model(
        "tiny-paper",
        genes=["A", "B"],
        scale=scale,
        autoencoder_config=CONFIG,
        space_to_depth=1,
        hint_encoder_channels=[8, 8],
        unet_config={"sample_size": 32, "in_channels": 3, "out_channels": 3},
    )


def _maps(n=16, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") * 2 - 1


def _first_stage(model, maps, steps, batch_size=8):
    recipe = TrainingConfig(batch_size=batch_size, autoencoder_steps=steps)
    accelerator = accelerate.Accelerator(cpu=True)
    return _fit_map_stage(
        "first_stage", model, maps, recipe=recipe, accelerator=accelerator, max_seconds=None, show=False
    )


def test_first_stage_lowers_the_reconstruction_loss_freezes_and_whitens():
    model, maps = _model(), _maps()
    images = model.target_image(maps)
    with torch.no_grad():
        before = float(autoencoder_loss(model.vqvae, images).reconstruction)
    fitted = _first_stage(model, maps, steps=30)
    with torch.no_grad():
        after = float(autoencoder_loss(fitted.vqvae, images).reconstruction)
    assert after < 0.7 * before
    assert not any(p.requires_grad for p in fitted.vqvae.parameters()) and not fitted.vqvae.training
    # the scaling factor whitens the latents; it is written at construction: a new model, the old config unchanged
    assert fitted is not model and fitted.is_fitted("first_stage") and not model.is_fitted("first_stage")
    factor = fitted.config.autoencoder_config["scaling_factor"]
    assert fitted.vqvae.config.scaling_factor == factor and model.vqvae.config.scaling_factor == 0.18215
    with torch.no_grad():
        latents = fitted.vqvae.encode(images).latents * factor
    assert float(latents.std()) == pytest.approx(1.0, rel=0.3)


def test_5x_targets_are_upsampled_and_a_bad_loss_name_fails():
    model = _model(scale=5)
    fitted = _first_stage(model, _maps(4, 32), steps=2, batch_size=4)  # 5x targets: half the tile size
    assert fitted.is_fitted("first_stage")
    with pytest.raises(ValueError, match="reconstruction"):
        autoencoder_loss(fitted.vqvae, torch.zeros(1, 3, 64, 64), reconstruction="l3")


def test_a_fitted_first_stage_survives_save_and_load(tmp_path):
    model = _first_stage(_model(), _maps(8, 64), steps=2, batch_size=4)
    factor = model.vqvae.config.scaling_factor
    assert factor != 0.18215
    model.save_pretrained(tmp_path / "m")
    loaded = c3diff.models.from_pretrained(tmp_path / "m")
    assert loaded.vqvae.config.scaling_factor == pytest.approx(factor) and loaded.is_fitted("first_stage")
    latents = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.decode_latents(latents), model.eval().decode_latents(latents))
