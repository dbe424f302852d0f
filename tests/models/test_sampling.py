"""DDIM sampling through ``C3DiffModel.predict``: determinism, batching invariance, uncertainty, 5x/10x, no LR ST."""

from __future__ import annotations

import pytest
import torch

STEPS = 3


@pytest.fixture
def trained_tiny(tiny, make_batch, perturb_zero_convs):
    """A tiny model whose conditioning is active (non-zero zero convs) and whose memory bank is filled."""
    perturb_zero_convs(tiny)
    tiny.train()
    with torch.no_grad():
        tiny.compute_losses(make_batch(tiny, 6), generator=torch.Generator().manual_seed(0))
    return tiny.eval()


def _inputs(model, tiles=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, lr = model.config.image_size, model.config.lr_size
    return torch.rand(tiles, 3, s, s, generator=g), torch.rand(tiles, model.num_genes, lr, lr, generator=g)


def test_shapes_range_and_determinism(trained_tiny):
    histology, lr = _inputs(trained_tiny)
    mean, std = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, seed=[3, 4])
    assert mean.shape == (2, 4, 64, 64) and mean.dtype == torch.float32 and std is None
    assert float(mean.min()) >= 0.0 and float(mean.max()) <= 1.0
    again, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, seed=[3, 4])
    assert torch.equal(mean, again)
    other, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, seed=[5, 4])
    assert not torch.equal(other[0], mean[0]) and torch.equal(other[1], mean[1])  # seeds are per tile
    assert trained_tiny.training is False


def test_gene_batches_subsets_and_tile_batches_give_the_same_maps(trained_tiny):
    histology, lr = _inputs(trained_tiny)
    batched, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, gene_batch_size=4, seed=7)
    single, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, gene_batch_size=1, seed=7)
    assert torch.allclose(batched, single, atol=1e-5)
    subset, _ = trained_tiny.predict(histology, lr[:, [3, 1]], gene_indices=[3, 1], num_inference_steps=STEPS, seed=7)
    assert torch.allclose(subset, batched[:, [3, 1]], atol=1e-5)
    tile1, _ = trained_tiny.predict(histology[1:], lr[1:], num_inference_steps=STEPS, seed=8)  # int seed: s + t
    assert torch.allclose(tile1, batched[1:], atol=1e-5)


def test_each_map_follows_its_own_conditioning(trained_tiny):
    histology, lr = _inputs(trained_tiny)
    base, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, seed=7)
    # one gene's LR changes: that gene's maps change (slightly: the conditioning of an untrained model is weak), the
    # others' (sampled from their own LR with the same noise) do not change
    lr_changed = lr.clone()
    lr_changed[:, 0] = 1 - lr_changed[:, 0]
    changed, _ = trained_tiny.predict(histology, lr_changed, num_inference_steps=STEPS, seed=7)
    assert float((changed[:, 0] - base[:, 0]).abs().max()) > 1e-5
    torch.testing.assert_close(changed[:, 1:], base[:, 1:], atol=1e-6, rtol=0)
    # the histology reaches every gene's map
    flipped, _ = trained_tiny.predict(histology.flip(-1), lr, num_inference_steps=STEPS, seed=7)
    assert all(float((flipped[:, g] - base[:, g]).abs().max()) > 1e-5 for g in range(trained_tiny.num_genes))


def test_several_samples_give_an_uncertainty_map(trained_tiny):
    histology, lr = _inputs(trained_tiny, tiles=1)
    lr = lr[:, [0, 2]]
    mean, std = trained_tiny.predict(
        histology, lr, num_inference_steps=STEPS, n_samples=3, gene_indices=[0, 2], gene_batch_size=1
    )
    assert mean.shape == std.shape == (1, 2, 64, 64)
    assert float(std.min()) >= 0 and float(std.max()) > 0
    # the mean over samples is not one sample
    single, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, gene_indices=[0, 2])
    assert not torch.allclose(single, mean)


def test_eta_positive_is_seeded_too(trained_tiny):
    histology, lr = _inputs(trained_tiny, tiles=1)
    a, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, eta=1.0, gene_batch_size=4)
    b, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, eta=1.0, gene_batch_size=1)
    assert torch.allclose(a, b, atol=1e-5)


def test_5x_from_a_10x_model_is_the_mean_pooled_10x_output(trained_tiny):
    histology, lr = _inputs(trained_tiny, tiles=1)
    ten, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS)
    five, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS, scale=5)
    assert five.shape == (1, 4, 32, 32)
    assert torch.allclose(five, torch.nn.functional.avg_pool2d(ten, 2), atol=1e-6)


def test_5x_model(tiny5, make_batch):
    histology, lr = _inputs(tiny5, tiles=1)
    mean, _ = tiny5.predict(histology, lr, num_inference_steps=STEPS)
    assert mean.shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="5x"):
        tiny5.predict(histology, lr, num_inference_steps=STEPS, scale=10)


def test_no_lr_st(trained_tiny):
    histology, lr = _inputs(trained_tiny)
    none, _ = trained_tiny.predict(histology, None, num_inference_steps=STEPS)
    assert none.shape == (2, 4, 64, 64) and torch.isfinite(none).all()
    mixed, _ = trained_tiny.predict(histology, lr, lr_available=[True, False], num_inference_steps=STEPS)
    full, _ = trained_tiny.predict(histology, lr, num_inference_steps=STEPS)
    assert torch.allclose(mixed[1], none[1], atol=1e-5)  # the missing tile ignores `lr`, as with lr=None
    assert torch.allclose(mixed[0], full[0], atol=1e-5)
    assert not torch.allclose(mixed[1], full[1])


def test_no_lr_st_on_an_untrained_model_warns(tiny):
    histology, _ = _inputs(tiny, tiles=1)
    with pytest.warns(UserWarning, match="memory bank is empty"):
        mean, _ = tiny.predict(histology, None, num_inference_steps=1, gene_indices=[0])
    assert mean.shape == (1, 1, 64, 64)


def test_argument_errors(tiny):
    histology, lr = _inputs(tiny)
    with pytest.raises(ValueError, match="histology"):
        tiny.predict(histology[:, :, :32], lr)
    with pytest.raises(ValueError, match="one map per requested gene"):
        tiny.predict(histology, lr, gene_indices=[0])
    with pytest.raises(ValueError, match="gene_indices"):
        tiny.predict(histology, lr[:, :1], gene_indices=[9])
    with pytest.raises(ValueError, match="lr_available"):
        tiny.predict(histology, None, lr_available=[True, False])
    with pytest.raises(ValueError, match="seed"):
        tiny.predict(histology, lr, seed=[1, 2, 3])


def test_a_bfloat16_residual_model_samples_like_its_float32_self():
    # a half-precision model (from_pretrained(torch_dtype=torch.bfloat16), or .to(torch.bfloat16)) once failed in
    # sample mode: the mean's share map came out float32 and met the ControlNet's bf16 weights
    import c3diff as c3

    torch.manual_seed(0)
    model = c3.models.build_model("tiny", genes=["A", "B", "C"])
    model.mark_fitted("mean")
    histology, lr = _inputs(model, tiles=1)
    kwargs = {"mode": "sample", "n_samples": 2, "num_inference_steps": 1, "seed": 3}
    mean32, std32 = model.predict(histology, lr, **kwargs)
    mean16, std16 = model.to(torch.bfloat16).predict(histology, lr, **kwargs)
    assert mean16.dtype == std16.dtype == torch.float32  # results come back as float32
    assert float((mean16 - mean32).abs().mean() / mean32.abs().mean()) < 0.05
    assert float(torch.corrcoef(torch.stack([std16.flatten(), std32.flatten()]))[0, 1]) > 0.9
