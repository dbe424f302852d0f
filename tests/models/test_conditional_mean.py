"""The conditional-mean stage and the residual formulation: shares, likelihoods, learning, sampling, loading."""

from __future__ import annotations

import json

import pytest
import torch

import c3diff
from c3diff.models._conditional_mean import block_log_softmax, multinomial_nll, poisson_nll, share_map


def _toy_batch(generator: torch.Generator, n_tiles: int = 8, genes_per_tile: int = 2):
    """Tiles whose counts fall only on dark 10 um pixels: the LR map cannot say where, the H&E can."""
    dark = torch.rand(n_tiles, 1, 64, 64, generator=generator) < 0.3
    histology = torch.where(dark, 0.15, 0.9).expand(-1, 3, -1, -1).clone()
    histology = histology.repeat_interleave(genes_per_tile, dim=0)
    dark = dark.repeat_interleave(genes_per_tile, dim=0)
    counts = torch.poisson(3.0 * dark.float(), generator=generator)
    lr = torch.nn.functional.pad(counts, (0, 6, 0, 6)).reshape(len(counts), 1, 7, 10, 7, 10).sum(dim=(3, 5))
    lr = lr / lr.amax(dim=(-2, -1), keepdim=True).clamp_min(1)
    return {
        "histology": histology,
        "lr": lr,
        "hr": counts / counts.amax(dim=(-2, -1), keepdim=True).clamp_min(1) * 2 - 1,
        "hr_counts": counts,
        "gene_index": torch.arange(len(counts)) % genes_per_tile,
        "patch_index": torch.arange(n_tiles).repeat_interleave(genes_per_tile),
        "lr_missing": torch.zeros(len(counts), dtype=torch.bool),
    }, dark


def _dark_share(model, batch, dark) -> float:
    """The mean's share of each LR pixel's count that lands on dark pixels (1 = all counts where they belong)."""
    model.eval()
    with torch.no_grad():
        histology, lr, gene_index, missing = model._check_batch(batch)
        _, _, log_shares = model._hint(histology, lr, gene_index, missing, contrastive=False, with_mean=True)
    model.train()
    shares = log_shares.exp()
    return float((shares * dark).sum() / shares.sum())


def test_block_shares_sum_to_one_in_every_lr_pixel_cut_ones_included():
    logits = torch.randn(3, 1, 64, 64)
    pi = block_log_softmax(logits, 10).exp()
    padded = torch.nn.functional.pad(pi, (0, 6, 0, 6)).reshape(3, 1, 7, 10, 7, 10).sum(dim=(3, 5))
    torch.testing.assert_close(padded, torch.ones_like(padded))
    # n_L * pi is 1 everywhere for an even spread, the cut 4-pixel-wide cells included
    even = share_map(block_log_softmax(torch.zeros(1, 1, 64, 64), 10), 10)
    torch.testing.assert_close(even, torch.ones_like(even))


def test_likelihoods_prefer_the_true_placement():
    counts = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]]])
    right = block_log_softmax(torch.tensor([[[[3.0, 0.0], [0.0, 0.0]]]]), 2)
    even = block_log_softmax(torch.zeros(1, 1, 2, 2), 2)
    assert multinomial_nll(right, counts) < multinomial_nll(even, counts)
    density = torch.full_like(counts, 1.0)
    assert poisson_nll(torch.tensor([[[[1.386, -5, -5, -5]]]]).view(1, 1, 2, 2), counts, density) < poisson_nll(
        torch.zeros_like(counts), counts, density
    )


def test_mean_stage_learns_a_histology_pattern_the_lr_cannot_give():
    torch.manual_seed(0)
    # without the darkness prior, which would already put the counts on the dark pixels: this tests learning
    config = {**c3diff.models.PRESETS["tiny"]["mean_net_config"], "histology_prior": False}
    model = c3diff.models.build_model("tiny", genes=["A", "B"], mean_net_config=config)
    generator = torch.Generator().manual_seed(0)
    held_out, held_dark = _toy_batch(torch.Generator().manual_seed(99))
    before = _dark_share(model, held_out, held_dark)
    optimizer = torch.optim.AdamW(model.trainable_parameters("mean"), lr=3e-3)
    model.train()
    for _ in range(50):
        batch, _ = _toy_batch(generator)
        loss = model.compute_mean_losses(batch, generator=generator)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
    after = _dark_share(model, held_out, held_dark)
    assert before < 0.45  # the bicubic prior spreads counts over dark and light pixels alike (30 % dark)
    assert after > 0.55, (before, after)  # most of each LR pixel's count now sits on the dark pixels


def test_histology_prior_starts_from_bicubic_times_squared_darkness():
    torch.manual_seed(0)
    model = c3diff.models.build_model("tiny", genes=["A", "B"])
    batch, dark = _toy_batch(torch.Generator().manual_seed(3))
    # an untrained model already puts most of each LR pixel's count on the dark pixels (30 % of them)
    assert _dark_share(model, batch, dark) > 0.8
    net = model.mean_net
    gene_index = torch.tensor([0, 1])
    histology, lr_image = batch["histology"][:2], torch.rand(2, 1, 64, 64)
    width = net.head_mid.in_channels
    features = torch.randn(2, width, 16, 16)
    st = torch.randn(2, net.head_in.in_channels - width - 4 * net.fold**2, 16, 16)
    logits = net.head(features, st, lr_image, gene_index, histology)
    darkness = 1 - histology.mean(dim=1, keepdim=True)
    expected = torch.log(lr_image + 1e-2) + 2 * torch.log(darkness.clamp_min(1e-2))
    torch.testing.assert_close(logits, expected)  # the learned correction and exponent start at 0 and 2
    # the exponent is per gene and trainable: a gene can learn to follow the cells more, less, or avoid them
    assert net.prior_exponent.weight.shape == (2, 1)
    assert any(p is net.prior_exponent.weight for p in model.trainable_parameters("mean"))


def test_mean_is_lr_consistent_and_deterministic():
    model = c3diff.models.build_model("tiny", genes=["A", "B", "C"]).eval()
    histology, lr = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 7, 7)
    mean, std = model.predict(histology, lr)
    again, _ = model.predict(histology, lr, seed=5)
    assert std is None and torch.equal(mean, again)
    # in normalised-LR units: the mean of each complete LR pixel is its LR value (floored at 1e-3)
    pooled = mean[..., :60, :60].reshape(2, 3, 6, 10, 6, 10).mean(dim=(3, 5))
    torch.testing.assert_close(pooled, lr[..., :6, :6].clamp_min(1e-3), rtol=1e-4, atol=1e-6)


def test_sampling_keeps_the_exact_mean_and_adds_spread():
    model = c3diff.models.build_model("tiny", genes=["A", "B"]).eval()
    histology, lr = torch.rand(1, 3, 64, 64), torch.rand(1, 2, 7, 7)
    mean, _ = model.predict(histology, lr, mode="mean")
    sampled_mean, std = model.predict(histology, lr, mode="sample", n_samples=3, num_inference_steps=2)
    assert torch.equal(mean, sampled_mean)
    assert std.shape == mean.shape and float(std.max()) > 0
    draws = c3diff.models.draw_samples(model, histology, lr, n_samples=3, num_inference_steps=2)
    assert draws.shape == (1, 2, 3, 64, 64) and float(draws.min()) >= 0
    torch.testing.assert_close(draws.std(dim=2), std)


def test_residual_target_is_zero_when_counts_follow_the_mean():
    model = c3diff.models.build_model("tiny", genes=["A"])
    log_shares = block_log_softmax(torch.randn(2, 1, 64, 64), 10)
    totals = torch.tensor([7.0, 3.0])[:, None, None, None]
    counts = log_shares.exp() * totals  # every LR pixel holds `total` counts, placed exactly as the mean says
    torch.testing.assert_close(model.residual_target(log_shares, counts), torch.zeros_like(counts), atol=1e-5, rtol=0)
    # any placement: the residual sums to zero inside each LR pixel that has counts
    other = torch.poisson(torch.rand(2, 1, 64, 64) * 2)
    residual = model.residual_target(log_shares, other)
    sums = residual[..., :60, :60].reshape(2, 1, 6, 10, 6, 10).sum(dim=(3, 5))
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-3, rtol=0)


def test_mean_mode_needs_a_mean_stage():
    paper = c3diff.models.build_model("tiny-paper", genes=["A"])
    assert paper.mean_net is None and paper.config.formulation == "paper"
    with pytest.raises(ValueError, match="no conditional-mean stage"):
        paper.predict(torch.rand(1, 3, 64, 64), torch.rand(1, 1, 7, 7), mode="mean")
    with pytest.raises(ValueError, match="formulation"):
        c3diff.models.build_model("tiny", genes=["A"], formulation="regression")


def test_residual_model_round_trips_and_old_configs_load_as_the_paper_formulation(tmp_path):
    model = c3diff.models.build_model("tiny", genes=["A", "B"]).eval()
    model.save_pretrained(str(tmp_path / "new"))
    loaded = c3diff.models.from_pretrained(str(tmp_path / "new")).eval()
    histology, lr = torch.rand(1, 3, 64, 64), torch.rand(1, 2, 7, 7)
    torch.testing.assert_close(loaded.predict(histology, lr)[0], model.predict(histology, lr)[0])
    # a model saved before the residual formulation existed has no such keys: it is the paper's formulation
    old = c3diff.models.build_model("tiny-paper", genes=["A", "B"])
    old.save_pretrained(str(tmp_path / "old"))
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("formulation", "mean_net_config", "mean_fitted"):
        config.pop(key, None)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert c3diff.models.from_pretrained(str(tmp_path / "old")).config.formulation == "paper"
