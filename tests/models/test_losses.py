"""Contrastive InfoNCE losses, MSE and the overall loss."""

from __future__ import annotations

import math

import pytest
import torch

from c3diff.models._losses import (
    LossWeights,
    content_loss,
    diffusion_mse,
    info_nce,
    inter_sphere_loss,
    min_snr_weights,
    modal_loss,
    overall_loss,
)


def _features(n=8, d=64, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_content_loss_prefers_aligned_pairs_and_matches_nt_xent():
    c_h = _features()
    c_y = c_h + 0.2 * _features(seed=1)
    aligned = content_loss(c_h, c_y)
    shuffled = content_loss(c_h, c_y.roll(3, dims=0))
    assert aligned < shuffled
    # NT-Xent by hand: row i of [c_h; c_y] has positive i+B (mod 2B), all but itself in the softmax
    z = torch.nn.functional.normalize(torch.cat([c_h, c_y]), dim=1)
    logits = z @ z.T / 0.07
    logits.fill_diagonal_(-float("inf"))
    n = len(c_h)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    assert torch.allclose(aligned, torch.nn.functional.cross_entropy(logits, targets), atol=1e-5)


def test_modal_loss_prefers_modality_clusters_and_ignores_same_patch_pairing():
    g = torch.Generator().manual_seed(0)
    h_centre, y_centre = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    m_h = h_centre + 0.3 * torch.randn(8, 64, generator=g)
    m_y = y_centre + 0.3 * torch.randn(8, 64, generator=g)
    clustered = modal_loss(m_h, m_y)
    mixed = modal_loss(torch.cat([m_h[:4], m_y[:4]]), torch.cat([m_y[4:], m_h[4:]]))
    assert clustered < mixed
    # positives are "same modality, other patch": permuting the patches within a modality changes nothing
    assert torch.allclose(clustered, modal_loss(m_h, m_y.roll(2, dims=0)), atol=1e-5)


def test_modal_loss_is_the_supcon_average_over_positives():
    m_h, m_y = _features(3, 16, 0), _features(3, 16, 1)
    z = torch.nn.functional.normalize(torch.cat([m_h, m_y]), dim=1)
    logits = z @ z.T / 0.07
    logits.fill_diagonal_(-float("inf"))
    log_prob = logits.log_softmax(dim=1)
    expected = 0.0
    for i in range(6):
        same = [j for j in range(6) if j != i and (j >= 3) == (i >= 3)]
        expected += -log_prob[i, same].mean()
    assert torch.allclose(modal_loss(m_h, m_y), expected / 6, atol=1e-5)


def test_inter_sphere_loss_prefers_the_diagonal():
    c_h = _features()
    m_h = c_h + 0.2 * _features(seed=2)
    assert inter_sphere_loss(c_h, m_h) < inter_sphere_loss(c_h, m_h.roll(1, dims=0))
    expected = torch.nn.functional.cross_entropy(
        torch.nn.functional.normalize(c_h, dim=1) @ torch.nn.functional.normalize(m_h, dim=1).T / 0.07,
        torch.arange(8),
    )
    assert torch.allclose(inter_sphere_loss(c_h, m_h), expected, atol=1e-5)


@pytest.mark.parametrize("loss", [content_loss, modal_loss, inter_sphere_loss])
def test_gradients_reach_both_inputs(loss):
    a = _features(6, 32, 0).requires_grad_()
    b = (_features(6, 32, 0) + _features(6, 32, 1)).requires_grad_()
    loss(a.view(6, 2, 4, 4), b.view(6, 2, 4, 4)).backward()  # feature maps are flattened inside
    assert float(a.grad.abs().sum()) > 0 and float(b.grad.abs().sum()) > 0


def test_temperature_and_edge_cases():
    a, b = _features(4, 8, 0), _features(4, 8, 1)
    assert not torch.allclose(content_loss(a, b, temperature=0.07), content_loss(a, b, temperature=1.0))
    # a single complete sample: no negatives for content, no positives for the modal loss
    assert float(content_loss(a[:1], b[:1])) == pytest.approx(0.0, abs=1e-6)
    assert float(modal_loss(a[:1], b[:1])) == 0.0
    assert float(inter_sphere_loss(a[:1], b[:1])) == pytest.approx(0.0, abs=1e-6)
    # uniform logits: log of the number of candidates
    eye = torch.eye(3, dtype=torch.bool)
    assert float(info_nce(torch.zeros(3, 3), eye, torch.ones_like(eye))) == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="same shape"):
        content_loss(a, b[:3])
    with pytest.raises(ValueError, match="candidate"):
        info_nce(torch.zeros(2, 2), torch.eye(2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool))


def test_overall_loss_uses_table1_weights_once_each():
    parts = {k: torch.tensor(v) for k, v in dict(mse=1.0, content=10.0, modal=100.0, inter_sphere=1000.0).items()}
    out = overall_loss(**parts)
    assert float(out.total) == 2 * 1 + 10 + 100 + 1000
    custom = overall_loss(**parts, weights=LossWeights(mse=1.0, modal=0.0, content=0.5, inter_sphere=0.1))
    assert float(custom.total) == pytest.approx(1 + 5 + 100)
    assert out.as_dict() == {"total": 1112.0, "mse": 1.0, "content": 10.0, "modal": 100.0, "inter_sphere": 1000.0}


def test_min_snr_weights_cap_low_noise_steps_only():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.arange(0, 1000, 37)
    w = min_snr_weights(scheduler, t, gamma=5.0)
    ab = scheduler.alphas_cumprod[t]
    snr = ab / (1 - ab)
    assert torch.allclose(w, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    assert float(w[-1]) == 1.0 and float(w[0]) < 0.01 and bool((w[1:] >= w[:-1]).all())  # rises with the noise
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weights(scheduler, t, gamma=0.0)
    v = min_snr_weights(scheduler, t, gamma=5.0, prediction_type="v_prediction")
    assert torch.allclose(v, snr.clamp(max=5) / (snr + 1))
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(scheduler, t, gamma=5.0, prediction_type="sample")


def test_weighted_diffusion_mse():
    pred = torch.zeros(3, 2, 4, 4)
    target = torch.arange(1.0, 4.0)[:, None, None, None].expand(3, 2, 4, 4)
    assert float(diffusion_mse(pred, target)) == pytest.approx((1 + 4 + 9) / 3)
    assert float(diffusion_mse(pred, target, weights=torch.tensor([1.0, 0.0, 1.0]))) == pytest.approx(10 / 3)
    unweighted = float(diffusion_mse(pred, target))
    assert float(diffusion_mse(pred, target, weights=torch.ones(3))) == pytest.approx(unweighted)
    with pytest.raises(ValueError, match="one per sample"):
        diffusion_mse(pred, target, weights=torch.ones(2))
