"""The composite model: geometry, training losses, gradients, freezing, imputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import c3diff
from c3diff.models import C3DiffModel, TrainingConfig
from c3diff.models._controlnet import unet_forward_with_residuals

ENCODERS = ("histology_content", "st_content", "histology_modal", "st_modal")


def _grad_norms(model, loss) -> dict[str, float]:
    """Gradient norm of ``loss`` w.r.t. each hint encoder's and each imputation scalar's parameters."""
    named = {name: list(getattr(model.hint_encoders, name).parameters()) for name in ENCODERS}
    named["alpha"], named["beta"] = [model.imputer.alpha], [model.imputer.beta]
    flat = [p for ps in named.values() for p in ps]
    grads = torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=True)
    out, i = {}, 0
    for name, ps in named.items():
        gs = grads[i : i + len(ps)]
        out[name] = sum(float(g.abs().sum()) for g in gs if g is not None)
        i += len(ps)
    return out


def test_geometry_of_the_presets(tiny, tiny5):
    assert (tiny.config.image_size, tiny.config.lr_size, tiny.latent_size) == (64, 7, 16)
    assert tiny.vqvae is None and tiny.output_size() == 64 and tiny5.output_size() == 32
    assert tiny.config.space_to_depth == 4 and tiny.unet.config.in_channels == 16
    assert tiny.hint_encoders.hint_channels == 4 * 7 + 4
    folded = c3diff.models.build_model("tiny-paper", genes=["A"], hint_space_to_depth=True, hint_channels=16)
    assert folded.hint_encoders.histology_content.fold == 4  # histology folded like the map, no stride-2 steps
    assert folded.hint_encoders.hint_channels == 4 * 16 + 4 and folded.latent_size == 16
    paper = c3diff.models.preset_config("paper")
    assert paper["image_size"] == 256 and len(paper["genes"]) == 200
    assert (
        4 * paper["hint_channels"] + paper["gene_code_channels"] == paper["unet_config"]["block_out_channels"][0] == 224
    )
    assert paper["unet_config"]["block_out_channels"] == [224, 448, 672, 896]
    assert paper["autoencoder_config"]["latent_channels"] == 3
    assert paper["scheduler_config"]["beta_start"] == 0.00085 and paper["scheduler_config"]["beta_end"] == 0.012


def test_space_to_depth_first_stage_is_lossless(tiny):
    maps = torch.rand(3, 1, 64, 64) * 2 - 1
    latents = tiny.encode_images(maps)
    assert latents.shape == (3, 16, 16, 16)
    torch.testing.assert_close(tiny.decode_latents(latents), (maps + 1) / 2)
    with pytest.raises(ValueError, match="power of two"):
        c3diff.models.build_model("tiny-paper", genes=["A"], space_to_depth=3)
    with pytest.raises(ValueError, match="multiple of 16"):
        c3diff.models.build_model("tiny-paper", genes=["A"], unet_config={"in_channels": 1, "out_channels": 1})


def test_config_errors():
    with pytest.raises(ValueError, match="scale"):
        c3diff.models.build_model("tiny-paper", genes=["A"], scale=3)
    with pytest.raises(ValueError, match="lr_size"):
        c3diff.models.build_model("tiny-paper", genes=["A"], lr_size=8)
    with pytest.raises(ValueError, match="more than once"):
        c3diff.models.build_model("tiny-paper", genes=["A", "A"])
    with pytest.raises(TypeError, match="Unknown model option"):
        c3diff.models.build_model("tiny-paper", genes=["A"], hint_chanels=3)
    with pytest.raises(ValueError, match="preset"):
        c3diff.models.build_model("huge", genes=["A"])


@pytest.mark.parametrize("fixture", ["tiny", "tiny5"])
def test_losses_at_5x_and_10x(fixture, make_batch, request):
    model = request.getfixturevalue(fixture)
    batch = make_batch(model, 4)
    assert batch["hr"].shape[-1] == model.output_size()
    out = model.compute_losses(batch, generator=torch.Generator().manual_seed(0))
    values = out.as_dict()
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values()), values
    expected = 2 * values["mse"] + values["content"] + values["modal"] + values["inter_sphere"]
    assert values["total"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="hr"):
        bad = dict(batch, hr=make_batch(model, 4, scale=10 if model.config.scale == 5 else 5)["hr"])
        model.compute_losses(bad)


def test_min_snr_gamma_reweights_only_the_diffusion_loss(tiny, make_batch):
    # gamma below every step's SNR (>= 0.0047 on this schedule): every sample's weight is gamma / SNR < 1
    batch = make_batch(tiny, 6)
    plain = tiny.compute_losses(batch, generator=torch.Generator().manual_seed(3)).as_dict()
    recipe = TrainingConfig(min_snr_gamma=1e-3)
    snr = tiny.compute_losses(batch, recipe=recipe, generator=torch.Generator().manual_seed(3)).as_dict()
    assert snr["content"] == pytest.approx(plain["content"]) and snr["modal"] == pytest.approx(plain["modal"])
    assert 0 < snr["mse"] < 0.25 * plain["mse"]
    with pytest.raises(ValueError, match="min_snr_gamma"):
        TrainingConfig(min_snr_gamma=-1.0)
    with pytest.raises(ValueError, match="latent_scaling"):
        TrainingConfig(latent_scaling="max")
    # the recipe is no network option any more
    with pytest.raises(TypeError, match="training recipe, not model options: pass them to `c3diff.tl.train`"):
        c3diff.models.build_model("tiny-paper", genes=tiny.genes, min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="hint_space_to_depth"):
        c3diff.models.build_model(
            "tiny-paper",
            genes=tiny.genes,
            space_to_depth=1,
            hint_space_to_depth=True,
            unet_config={"in_channels": 1, "out_channels": 1, "sample_size": 64},
        )


def test_v_prediction_trains_on_the_velocity_and_samples(make_batch):
    model = c3diff.models.build_model(
        "tiny-paper", genes=["A", "B"], scheduler_config={"prediction_type": "v_prediction"}
    )
    x0, noise, t = torch.randn(3, 16, 16, 16), torch.randn(3, 16, 16, 16), torch.tensor([0, 500, 999])
    ab = model.noise_scheduler.alphas_cumprod[t][:, None, None, None]
    torch.testing.assert_close(model.diffusion_target(x0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    out = model.compute_losses(make_batch(model, 4), generator=torch.Generator().manual_seed(0)).as_dict()
    assert all(np.isfinite(v) for v in out.values())
    mean, _ = model.predict(torch.rand(1, 3, 64, 64), torch.rand(1, 2, 7, 7), num_inference_steps=2)
    assert mean.shape == (1, 2, 64, 64) and 0 <= float(mean.min()) <= float(mean.max()) <= 1
    eps_model = c3diff.models.build_model(
        "tiny-paper", genes=["A", "B"], scheduler_config={"prediction_type": "epsilon"}
    )
    assert torch.equal(eps_model.diffusion_target(x0, noise, t), noise)
    with pytest.raises(ValueError, match="prediction_type"):
        c3diff.models.build_model("tiny-paper", genes=["A"], scheduler_config={"prediction_type": "sample"})


def test_denoiser_equals_plain_unet_at_initialisation(tiny):
    size, channels = tiny.latent_size, tiny.unet.config.in_channels
    x, hint = torch.randn(3, channels, size, size), torch.randn(3, tiny.hint_encoders.hint_channels, size, size)
    t = torch.tensor([5, 400, 999])
    with torch.no_grad():
        assert torch.equal(tiny.denoise(x, t, hint), tiny.unet(x, t).sample)
        assert torch.equal(unet_forward_with_residuals(tiny.unet, x, t), tiny.unet(x, t).sample)


def test_contrastive_gradients_reach_their_encoders_at_initialisation(tiny, make_batch):
    out = tiny.compute_losses(make_batch(tiny, 6), generator=torch.Generator().manual_seed(0))
    content, modal, inter = (
        _grad_norms(tiny, out.content),
        _grad_norms(tiny, out.modal),
        _grad_norms(tiny, out.inter_sphere),
    )
    assert content["histology_content"] > 0 and content["st_content"] > 0
    assert content["histology_modal"] == content["st_modal"] == 0
    assert modal["histology_modal"] > 0 and modal["st_modal"] > 0
    assert modal["histology_content"] == modal["st_content"] == 0
    assert inter["histology_content"] > 0 and inter["histology_modal"] > 0
    assert inter["st_content"] == inter["st_modal"] == 0
    total = _grad_norms(tiny, out.total)
    assert all(total[name] > 0 for name in ENCODERS)


def test_imputation_feeds_mse_and_alpha_beta_but_not_contrastive_losses(tiny, make_batch, perturb_zero_convs):
    perturb_zero_convs(tiny)  # at exact initialisation the zero convs silence the hint, so no gradient yet
    batch = make_batch(tiny, 6, missing=[4, 5])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = tiny.compute_losses(batch, generator=gen())
    grads = _grad_norms(tiny, out.mse)
    assert grads["alpha"] > 0 and grads["beta"] > 0
    # changing what the imputed samples contain changes L_mse only
    other = {k: v.clone() for k, v in batch.items()}
    other["histology"][4:] = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    other["hr"][4:] = -other["hr"][4:]
    other["lr"][4:] = 0.5  # ignored for missing samples
    out2 = tiny.compute_losses(other, generator=gen())
    assert out2.as_dict()["content"] == out.as_dict()["content"]
    assert out2.as_dict()["modal"] == out.as_dict()["modal"]
    assert out2.as_dict()["inter_sphere"] == out.as_dict()["inter_sphere"]
    assert out2.as_dict()["mse"] != out.as_dict()["mse"]
    # the missing samples' own LR is ignored entirely
    only_lr = dict(batch, lr=other["lr"])
    assert tiny.compute_losses(only_lr, generator=gen()).as_dict()["total"] == out.as_dict()["total"]
    # marking them complete brings them into the contrastive losses
    complete = dict(batch, lr_missing=torch.zeros(6, dtype=torch.bool))
    out3 = tiny.compute_losses(complete, generator=gen())
    assert out3.as_dict()["content"] != out.as_dict()["content"]
    # no missing sample: alpha and beta get no gradient
    assert _grad_norms(tiny, out3.mse)["alpha"] == 0


def test_all_missing_batch_imputes_from_the_memory_bank(tiny, make_batch):
    tiny.train()
    tiny.compute_losses(make_batch(tiny, 4), generator=torch.Generator().manual_seed(0))
    assert int(tiny.imputer.bank_count) == 4
    out = tiny.compute_losses(make_batch(tiny, 3, missing=[0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert out.as_dict()["content"] == out.as_dict()["modal"] == out.as_dict()["inter_sphere"] == 0.0
    assert torch.isfinite(out.mse)
    assert int(tiny.imputer.bank_count) == 4  # incomplete samples never enter the bank


def test_frozen_parts_get_no_gradient_and_trainable_parts_do(tiny, make_batch):
    tiny.train()
    trainable = tiny.trainable_parameters()
    ids = {id(p) for p in trainable}
    assert ids == {id(p) for p in tiny.parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in tiny.named_parameters() if id(p) not in ids}
    assert frozen and all(n.startswith("unet.") for n in frozen)
    assert all(
        any(n.startswith(f"unet.{m}") for m in ("conv_in", "time_embedding", "down_blocks", "mid_block"))
        for n in frozen
    )
    assert any(n.startswith("unet.up_blocks") for n, p in tiny.named_parameters() if id(p) in ids)

    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    batch = make_batch(tiny, 6, missing=[5])
    for step in range(3):  # zero convs feed zero convs: after two steps every path carries gradient
        optimizer.zero_grad()
        tiny.compute_losses(batch, generator=torch.Generator().manual_seed(step)).total.backward()
        optimizer.step()
    for name, p in tiny.named_parameters():
        if id(p) in ids:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:
            assert p.grad is None, name
            assert torch.equal(p.detach(), frozen[name]), name


def test_augmentation_and_bank_updates_only_in_train_mode(tiny, make_batch):
    batch = make_batch(tiny, 4)
    tiny.eval()
    a = tiny.compute_losses(batch, generator=torch.Generator().manual_seed(0))
    assert int(tiny.imputer.bank_count) == 0
    tiny.train()
    b = tiny.compute_losses(batch, generator=torch.Generator().manual_seed(0))
    assert int(tiny.imputer.bank_count) == 4
    assert a.as_dict()["content"] != b.as_dict()["content"]  # the ST features were augmented in train mode
    assert a.as_dict()["inter_sphere"] == pytest.approx(
        b.as_dict()["inter_sphere"], abs=1e-6
    )  # histology only: no augmentation


def test_batch_validation(tiny, make_batch):
    batch = make_batch(tiny, 2)
    with pytest.raises(KeyError, match="gene_index"):
        tiny.compute_losses({k: v for k, v in batch.items() if k != "gene_index"})
    with pytest.raises(ValueError, match="lr"):
        tiny.compute_losses(dict(batch, lr=torch.rand(2, 1, 26, 26)))
    with pytest.raises(ValueError, match="gene_index"):
        tiny.compute_losses(dict(batch, gene_index=torch.tensor([0, 7])))


def test_pixel_space_and_latent_space_share_the_code_path(make_batch):
    vq = {
        "block_out_channels": [8, 8],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 4,
        "latent_channels": 3,
        "num_vq_embeddings": 32,
        "sample_size": 64,
    }
    model = c3diff.models.build_model(
        "tiny-paper",
        genes=["A", "B"],
        autoencoder_config=vq,
        space_to_depth=1,
        hint_encoder_channels=[8, 8],
        unet_config={"sample_size": 32, "in_channels": 3, "out_channels": 3},
    )
    assert isinstance(model, C3DiffModel) and model.latent_size == 32
    assert all(not p.requires_grad for p in model.vqvae.parameters())
    out = model.compute_losses(make_batch(model, 3), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.total)
    mean, _ = model.predict(torch.rand(1, 3, 64, 64), torch.rand(1, 2, 7, 7), num_inference_steps=2)
    assert mean.shape == (1, 2, 64, 64) and float(mean.min()) >= 0 and float(mean.max()) <= 1


@pytest.mark.parametrize("scaling", ["std", "range"])
def test_first_stage_statistics_centre_and_scale_the_latents(scaling):
    built = c3diff.models.build_model("tiny-paper", genes=["A", "B"])
    maps = -torch.ones(20, 1, 64, 64)
    maps[:, :, ::9, ::7] = 1.0  # sparse maps: mostly at -1
    assert not built.is_fitted("first_stage")
    stats = built.first_stage_statistics(maps, latent_scaling=scaling)
    model = built.with_config(**stats)  # a new model: the config is written at construction only
    assert built.config.latent_shift == 0.0 and built.config.latent_scale == 1.0
    latents = model.encode_images(model.target_image(maps))
    assert abs(float(latents.mean())) < 1e-4
    if scaling == "std":
        assert float(latents.std()) == pytest.approx(1.0, rel=1e-3)  # peaks then stand ~8 sd high
        assert float(latents.max()) > 7
    else:  # the maps keep their range: a peak is 2 above the background, as in [-1, 1]
        assert model.config.latent_scale == 1.0
        assert float(latents.max() - latents.min()) == pytest.approx(2.0)
    torch.testing.assert_close(model.decode_latents(latents), (maps + 1) / 2)  # still lossless
    for (k, a), (_, b) in zip(built.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # same weights
    with pytest.raises(ValueError, match="non-empty"):
        model.first_stage_statistics(torch.zeros(0, 1, 64, 64))
    with pytest.raises(TypeError, match="Unknown model option"):
        model.with_config(latent_shiftt=1.0)


def test_backbone_stage_pretrains_the_unet_and_copies_it_into_the_controlnet():
    import accelerate

    from c3diff.tl._train import _fit_map_stage

    model = c3diff.models.build_model("tiny-paper", genes=["A", "B"])
    maps = -torch.ones(16, 1, 64, 64)
    maps[:, :, 10:20, 30:50] = 1.0
    recipe = TrainingConfig(batch_size=8, backbone_steps=30, backbone_learning_rate=2e-3)
    accelerator = accelerate.Accelerator(cpu=True)
    model = _fit_map_stage(
        "first_stage", model, maps, recipe=recipe, accelerator=accelerator, max_seconds=None, show=False
    )
    assert model.is_fitted("first_stage") and model.config.latent_scale > 1
    g = torch.Generator().manual_seed(0)
    loss_before = float(model.compute_backbone_losses(maps, generator=g).total)
    before = {k: v.clone() for k, v in model.unet.conv_in.state_dict().items()}
    model = _fit_map_stage(
        "backbone", model, maps, recipe=recipe, accelerator=accelerator, max_seconds=None, show=False
    )
    g = torch.Generator().manual_seed(0)
    assert float(model.compute_backbone_losses(maps, generator=g).total) < loss_before
    assert model.is_fitted("backbone")
    assert not torch.equal(model.unet.conv_in.weight, before["weight"])
    torch.testing.assert_close(model.controlnet.conv_in.weight, model.unet.conv_in.weight)
    # the UNet encoder is frozen again, its decoder trains
    assert not model.unet.conv_in.weight.requires_grad and model.unet.conv_out.weight.requires_grad


def test_no_config_is_changed_after_construction():
    """`register_to_config` is called in constructors only: fitted statistics go into a new model
    (`with_config`), fitted stages into a buffer, the recipe into a TrainingConfig."""
    import ast
    from pathlib import Path

    calls = []
    for path in Path(c3diff.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "register_to_config":
                    calls.append((path.name, func.name))
    assert calls and all(name == "__init__" for _, name in calls), calls
