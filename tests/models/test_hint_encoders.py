"""Hint encoders, gene code, LR conditioning image and on-sphere ST augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from c3diff.models._hint_encoders import HintEncoder, gene_code_map, lr_condition_image, sphere_noise_augment


def test_encoder_reaches_the_latent_size_with_a_zero_hint_and_a_live_embedding():
    enc = HintEncoder(out_channels=55, block_out_channels=(8, 16, 16), num_downsamples=2)
    with torch.no_grad():
        embedding, hint = enc(torch.rand(2, 3, 64, 64))
    assert embedding.shape == hint.shape == (2, 55, 16, 16)
    assert float(hint.abs().max()) == 0.0 and float(embedding.std()) > 0
    with pytest.raises(ValueError, match="stride-2"):
        HintEncoder(block_out_channels=(8, 8), num_downsamples=2)


def test_folding_encoder_keeps_each_sub_pixel_apart():
    enc = HintEncoder(out_channels=6, block_out_channels=(8, 8), num_downsamples=0, fold=4)
    x = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        embedding, hint = enc(x)
    assert embedding.shape == hint.shape == (2, 6, 16, 16) and float(hint.abs().max()) == 0.0
    # the same total darkness in a 4 x 4 block, at two different sub-pixels: a strided encoder may blur these, the
    # fold gives them different input channels, so the embeddings differ
    a, b = x.clone(), x.clone()
    a[:, :, 20, 20] = 1.0
    b[:, :, 23, 23] = 1.0
    with torch.no_grad():
        ea, eb, e0 = enc.embed(a), enc.embed(b), enc.embed(x)
    assert float((ea - eb).abs().max()) > 1e-4
    # the change stays within the receptive field of latent pixel (5, 5): two 3x3 convs and conv_in/conv_embed
    diff = (ea - e0).abs().sum(dim=(0, 1))
    assert float(diff[5, 5]) > 0 and float(diff[:1].sum() + diff[10:].sum()) == 0.0
    with pytest.raises(ValueError, match="no stride-2"):
        HintEncoder(block_out_channels=(8, 8), num_downsamples=1, fold=2)


def test_lr_image_is_geometrically_exact():
    lr = torch.zeros(1, 1, 7, 7)
    lr[0, 0, 0, 1] = 1.0  # LR pixel (0, 1) covers image pixels [0, 10) x [10, 20)
    img = lr_condition_image(lr, image_size=64, upsample_factor=10)
    assert img.shape == (1, 3, 64, 64) and torch.equal(img[:, 0], img[:, 2])
    centre = img[0, 0, :10, 10:20]
    assert float(centre[4:6, 4:6].min()) > 0.9  # the block is centred where the LR pixel lies
    assert float(img[0, 0, 30:, 30:].abs().max()) == 0.0
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0  # bicubic overshoot clipped
    const = lr_condition_image(torch.full((2, 1, 26, 26), 0.3), image_size=256, upsample_factor=10)
    assert const.shape == (2, 3, 256, 256) and torch.allclose(const, torch.tensor(0.3))
    with pytest.raises(ValueError, match="ceil"):
        lr_condition_image(torch.zeros(1, 1, 6, 6), image_size=64, upsample_factor=10)
    with pytest.raises(ValueError, match="integer"):
        lr_condition_image(lr, image_size=64, upsample_factor=10.5)


def test_gene_code():
    code = gene_code_map(torch.tensor([0, 50, 199]), num_genes=200, size=4)
    assert code.shape == (3, 4, 4, 4)
    assert code[:, 0, 0, 0].tolist() == pytest.approx([0.0, 0.25, 0.995])
    assert bool((code[1] == 0.25).all())
    with pytest.raises(ValueError, match="gene_index"):
        gene_code_map(torch.tensor([200]), num_genes=200, size=4)


def test_sphere_augmentation_keeps_the_norm_and_moves_by_about_sigma():
    e = torch.randn(8, 55, 16, 16)
    a = sphere_noise_augment(e, sigma=0.03, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a.flatten(1).norm(dim=1), e.flatten(1).norm(dim=1), rtol=1e-5)
    angle = torch.acos(torch.nn.functional.cosine_similarity(a.flatten(1), e.flatten(1)).clamp(-1, 1))
    assert float(angle.mean()) == pytest.approx(0.03, rel=0.1)
    b = sphere_noise_augment(e, sigma=0.03, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert math.isclose(float(sphere_noise_augment(e, sigma=0.0).sub(e).abs().max()), 0.0, abs_tol=1e-5)
