"""ControlNet for UNet2DModel and the UNet forward with residuals."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from c3diff.models._controlnet import UNet2DControlNetModel, unet_decode, unet_encode, unet_forward_with_residuals


def _unet(**kwargs) -> UNet2DModel:
    torch.manual_seed(0)
    config = dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )
    config.update(kwargs)
    return UNet2DModel(**config).eval()


UNET_VARIANTS = {
    "plain": {},
    "skip_blocks": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        sample_size=8,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
    ),
    "fourier_centered": dict(time_embedding_type="fourier", center_input_sample=True),
    "no_mid_block": dict(mid_block_type=None),
}


def _inputs(unet, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return torch.randn(batch, c, s, s, generator=g), torch.tensor([10, 700][:batch])


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_forward_without_residuals_mirrors_unet(variant):
    unet = _unet(**UNET_VARIANTS[variant])
    x, t = _inputs(unet)
    with torch.no_grad():
        expected = unet(x, t).sample
        got = unet_forward_with_residuals(unet, x, t)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_fresh_controlnet_is_a_no_op_and_copies_the_encoder(variant):
    unet = _unet(**UNET_VARIANTS[variant])
    controlnet = UNet2DControlNetModel.from_unet(unet, hint_channels=5).eval()
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        src, dst = getattr(unet, name), getattr(controlnet, name)
        if src is None:
            assert dst is None
            continue
        for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b)
            assert a.data_ptr() != b.data_ptr()  # a copy, not shared storage
    x, t = _inputs(unet)
    hint = torch.randn(2, 5, *x.shape[-2:])  # any hint: the zero convs silence it
    with torch.no_grad():
        control = controlnet(x, t, hint)
        out = unet_forward_with_residuals(
            unet,
            x,
            t,
            down_block_additional_residuals=control.down_block_res_samples,
            mid_block_additional_residual=control.mid_block_res_sample,
        )
        expected = unet(x, t).sample
    n_skips = len(unet_encode(unet, x, t).down_block_res_samples)
    assert len(control.down_block_res_samples) == n_skips
    assert all(float(r.abs().max()) == 0.0 for r in control.down_block_res_samples)
    assert torch.equal(out, expected)


def test_residuals_enter_skips_and_mid_block():
    unet = _unet()
    x, t = _inputs(unet)
    with torch.no_grad():
        encoded = unet_encode(unet, x, t)
        base = unet_decode(unet, encoded)
        skips = tuple(torch.zeros_like(r) for r in encoded.down_block_res_samples)
        mid_only = unet_decode(unet, encoded, mid_block_additional_residual=torch.ones_like(encoded.sample))
        first_skip = unet_decode(unet, encoded, down_block_additional_residuals=(torch.ones_like(skips[0]), *skips[1:]))
    assert not torch.allclose(mid_only, base)
    assert not torch.allclose(first_skip, base)


def test_trained_controlnet_changes_output_with_the_hint():
    unet = _unet()
    controlnet = UNet2DControlNetModel.from_unet(unet, hint_channels=8)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
    x, t = _inputs(unet)
    with torch.no_grad():
        outs = []
        for seed in (0, 1):
            hint = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(seed))
            c = controlnet(x, t, hint)
            outs.append(
                unet_forward_with_residuals(
                    unet,
                    x,
                    t,
                    down_block_additional_residuals=c.down_block_res_samples,
                    mid_block_additional_residual=c.mid_block_res_sample,
                )
            )
    assert not torch.allclose(outs[0], outs[1])


def test_hint_projection_identity_when_widths_match():
    unet = _unet()
    assert isinstance(UNet2DControlNetModel.from_unet(unet, hint_channels=8).hint_proj, torch.nn.Identity)
    assert isinstance(UNet2DControlNetModel.from_unet(unet, hint_channels=5).hint_proj, torch.nn.Conv2d)


def test_errors_name_the_problem():
    unet = _unet()
    controlnet = UNet2DControlNetModel.from_unet(unet, hint_channels=4)
    x, t = _inputs(unet)
    with pytest.raises(ValueError, match="hint"):
        controlnet(x, t, torch.zeros(2, 3, 16, 16))
    encoded = unet_encode(unet, x, t)
    with pytest.raises(ValueError, match="one tensor per UNet skip"):
        unet_decode(unet, encoded, down_block_additional_residuals=encoded.down_block_res_samples[:-1])
    with pytest.raises(TypeError, match="UNet2DModel"):
        UNet2DControlNetModel.from_unet(controlnet, hint_channels=4)
    with_classes = _unet(num_class_embeds=3)  # C3-Diff conditions by the hint only
    with pytest.raises(ValueError, match="class embedding"):
        unet_encode(with_classes, x, t)
    with pytest.raises(ValueError, match="class embedding"):
        UNet2DControlNetModel.from_unet(with_classes, hint_channels=4)
