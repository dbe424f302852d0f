"""A ControlNet for diffusers' :class:`~diffusers.UNet2DModel`, and the UNet forward that accepts its residuals.

Diffusers ships ControlNets only for ``UNet2DConditionModel`` (text-conditioned). C3-Diff's backbone is an
unconditional ``UNet2DModel`` (the CelebA-HQ LDM), so this module provides

- :class:`UNet2DControlNetModel`: a trainable copy of a ``UNet2DModel``'s input conv, time embedding, down blocks and
  mid block; the hint is added to the output of the copy's first conv; every residual leaves through a
  zero-initialised 1x1 conv, so a fresh ControlNet is a no-op (Zhang et al. 2023).
- :func:`unet_encode` / :func:`unet_decode` / :func:`unet_forward_with_residuals`: ``UNet2DModel.forward`` split at
  the skip connections, so ControlNet residuals can be added to the skips and to the mid-block output (where
  ``UNet2DConditionModel`` adds them), and so the frozen encoder half can run without autograd. The two halves mirror
  ``UNet2DModel.forward`` statement by statement (centring, Fourier/positional/learned time embeddings, class
  embeddings, skip-conv blocks), reusing the UNet's own submodules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetOutput, zero_module
from diffusers.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

__all__ = [
    "ControlNetOutput",
    "UNet2DControlNetModel",
    "UNetEncoderOutput",
    "unet_decode",
    "unet_encode",
    "unet_forward_with_residuals",
]

#: ``UNet2DModel`` config entries that define its encoder half (input conv, time/class embedding, down + mid blocks).
ENCODER_CONFIG_KEYS = (
    "sample_size",
    "in_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
    "num_train_timesteps",
)

#: Submodules of a ``UNet2DModel`` that form its encoder half; frozen while C3-Diff trains.
ENCODER_MODULES = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")
_CLASS_EMBEDDING = (
    "This UNet has a class embedding (`num_class_embeds` / `class_embed_type`); C3-Diff conditions its denoiser by "
    "the ControlNet hint only. Build the UNet without a class embedding."
)

#: Submodules of a ``UNet2DModel`` that form its decoder half; trained with the ControlNet.
DECODER_MODULES = ("up_blocks", "conv_norm_out", "conv_out")


@dataclass
class UNetEncoderOutput:
    """What the encoder half of a ``UNet2DModel`` hands to its decoder half."""

    #: time embedding, ``(B, time_embed_dim)``
    emb: torch.Tensor
    #: skip features, first the input conv's output, then every resnet/downsampler output of every down block
    down_block_res_samples: tuple[torch.Tensor, ...]
    #: mid-block output (the last down block's output when the UNet has no mid block)
    sample: torch.Tensor
    #: the timesteps broadcast to the batch (Fourier embeddings divide the output by them)
    timesteps: torch.Tensor


def unet_encode(
    unet: UNet2DModel | UNet2DControlNetModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    *,
    hint: torch.Tensor | None = None,
) -> UNetEncoderOutput:
    """Run the encoder half of ``unet`` (steps 0-4 of ``UNet2DModel.forward``).

    Parameters
    ----------
    unet
        A ``UNet2DModel``, or a :class:`UNet2DControlNetModel` (same submodule names).
    sample
        Noisy input ``(B, C, H, W)``.
    timestep
        Timestep(s): a number, a 0-d tensor or a ``(B,)`` tensor.
    hint
        Added to the output of the input conv (ControlNet conditioning); ``(B, block_out_channels[0], H, W)``.

    Returns
    -------
    The time embedding, the skip features and the mid-block output.

    Examples
    --------
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...                    layers_per_block=1, norm_num_groups=4)
    >>> enc = unet_encode(unet, torch.randn(2, 1, 16, 16), 10)
    >>> len(enc.down_block_res_samples), tuple(enc.sample.shape)
    (4, (2, 16, 8, 8))
    """
    config = unet.config
    # 0. center input if necessary
    if config.center_input_sample:
        sample = 2 * sample - 1.0

    # 1. time
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
    elif torch.is_tensor(timesteps) and len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)

    t_emb = unet.time_proj(timesteps)
    t_emb = t_emb.to(dtype=unet.dtype)
    emb = unet.time_embedding(t_emb)

    if getattr(unet, "class_embedding", None) is not None:
        raise ValueError(_CLASS_EMBEDDING)

    # 2. pre-process
    skip_sample = sample
    sample = unet.conv_in(sample)
    if hint is not None:
        if hint.shape != sample.shape:
            raise ValueError(
                f"`hint` must have the shape of the input conv's output {tuple(sample.shape)}, got {tuple(hint.shape)}."
            )
        sample = sample + hint

    # 3. down
    down_block_res_samples = (sample,)
    for downsample_block in unet.down_blocks:
        if hasattr(downsample_block, "skip_conv"):
            sample, res_samples, skip_sample = downsample_block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
        else:
            sample, res_samples = downsample_block(hidden_states=sample, temb=emb)
        down_block_res_samples += res_samples

    # 4. mid
    if unet.mid_block is not None:
        sample = unet.mid_block(sample, emb)
    return UNetEncoderOutput(emb=emb, down_block_res_samples=down_block_res_samples, sample=sample, timesteps=timesteps)


def unet_decode(
    unet: UNet2DModel,
    encoded: UNetEncoderOutput,
    *,
    down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the decoder half of ``unet`` (steps 5-6 of ``UNet2DModel.forward``), adding ControlNet residuals.

    The residuals are added to the skip features and to the mid-block output, as ``UNet2DConditionModel`` does.

    Parameters
    ----------
    unet
        The ``UNet2DModel`` whose :func:`unet_encode` output is ``encoded``.
    encoded
        Output of :func:`unet_encode`.
    down_block_additional_residuals
        One tensor per skip feature (same shapes), e.g. ``UNet2DControlNetModel(...).down_block_res_samples``.
    mid_block_additional_residual
        Added to the mid-block output.

    Returns
    -------
    The UNet output ``(B, out_channels, H, W)``.

    Examples
    --------
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...                    layers_per_block=1, norm_num_groups=4)
    >>> x = torch.randn(2, 1, 16, 16)
    >>> torch.equal(unet_decode(unet, unet_encode(unet, x, 10)), unet(x, 10).sample)
    True
    """
    emb = encoded.emb
    down_block_res_samples = encoded.down_block_res_samples
    sample = encoded.sample

    if down_block_additional_residuals is not None:
        if len(down_block_additional_residuals) != len(down_block_res_samples):
            raise ValueError(
                f"`down_block_additional_residuals` must hold one tensor per UNet skip feature "
                f"({len(down_block_res_samples)}), got {len(down_block_additional_residuals)}. Build the ControlNet "
                "with `UNet2DControlNetModel.from_unet(unet, ...)` so that the two match."
            )
        down_block_res_samples = tuple(
            res + extra for res, extra in zip(down_block_res_samples, down_block_additional_residuals, strict=True)
        )
    if mid_block_additional_residual is not None:
        sample = sample + mid_block_additional_residual

    # 5. up
    skip_sample = None
    for upsample_block in unet.up_blocks:
        res_samples = down_block_res_samples[-len(upsample_block.resnets) :]
        down_block_res_samples = down_block_res_samples[: -len(upsample_block.resnets)]
        if hasattr(upsample_block, "skip_conv"):
            sample, skip_sample = upsample_block(sample, res_samples, emb, skip_sample)
        else:
            sample = upsample_block(sample, res_samples, emb)

    # 6. post-process
    sample = unet.conv_norm_out(sample)
    sample = unet.conv_act(sample)
    sample = unet.conv_out(sample)
    if skip_sample is not None:
        sample += skip_sample
    if unet.config.time_embedding_type == "fourier":
        timesteps = encoded.timesteps.reshape((sample.shape[0], *([1] * len(sample.shape[1:]))))
        sample = sample / timesteps
    return sample


def unet_forward_with_residuals(
    unet: UNet2DModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    *,
    down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``UNet2DModel.forward`` with ControlNet residuals added to the skip features and the mid-block output.

    Without residuals the result equals ``unet(sample, timestep).sample`` exactly.

    Examples
    --------
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...                    layers_per_block=1, norm_num_groups=4)
    >>> controlnet = UNet2DControlNetModel.from_unet(unet, hint_channels=3)
    >>> x, hint = torch.randn(2, 1, 16, 16), torch.randn(2, 3, 16, 16)
    >>> control = controlnet(x, 10, hint)
    >>> out = unet_forward_with_residuals(unet, x, 10, down_block_additional_residuals=control.down_block_res_samples,
    ...                                   mid_block_additional_residual=control.mid_block_res_sample)
    >>> torch.equal(out, unet(x, 10).sample)  # a fresh ControlNet is a no-op
    True
    """
    encoded = unet_encode(unet, sample, timestep)
    return unet_decode(
        unet,
        encoded,
        down_block_additional_residuals=down_block_additional_residuals,
        mid_block_additional_residual=mid_block_additional_residual,
    )


class UNet2DControlNetModel(ModelMixin, ConfigMixin):
    r"""A ControlNet for :class:`~diffusers.UNet2DModel`.

    A trainable copy of the UNet's input conv, time embedding, down blocks and mid block. The hint is
    projected to ``block_out_channels[0]`` channels (identity when ``hint_channels`` already equals it, as in C3-Diff's
    224-channel hint on a 224-channel UNet) and added after the copy's first conv. Each skip feature and the mid-block
    output pass a zero-initialised 1x1 conv; add them to the UNet with :func:`unet_forward_with_residuals`.

    The constructor takes the encoder-related arguments of ``UNet2DModel`` (same names and defaults) plus
    ``hint_channels``; :meth:`from_unet` builds one from a UNet and copies its weights.

    Parameters
    ----------
    hint_channels
        Channels of the conditioning hint, given at the UNet's input resolution.
    **unet_kwargs
        See :class:`~diffusers.UNet2DModel`.

    Examples
    --------
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ...                    layers_per_block=1, norm_num_groups=4)
    >>> controlnet = UNet2DControlNetModel.from_unet(unet, hint_channels=8)
    >>> out = controlnet(torch.randn(2, 1, 16, 16), 10, torch.randn(2, 8, 16, 16))
    >>> len(out.down_block_res_samples), out.mid_block_res_sample.abs().max().item()
    (4, 0.0)
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        hint_channels: int = 224,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(
                f"`block_out_channels` ({len(block_out_channels)} entries) and `down_block_types` "
                f"({len(down_block_types)} entries) must have the same length."
            )
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4

        # The construction below matches UNet2DModel.__init__ (encoder half) so that state dicts transfer 1:1.
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=(1, 1))
        if time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=block_out_channels[0], scale=16)
            timestep_input_dim = 2 * block_out_channels[0]
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = block_out_channels[0]
        elif time_embedding_type == "learned":
            self.time_proj = nn.Embedding(num_train_timesteps, block_out_channels[0])
            timestep_input_dim = block_out_channels[0]
        else:
            raise ValueError(
                f"`time_embedding_type` must be 'fourier', 'positional' or 'learned', got {time_embedding_type!r}."
            )
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)

        # the conditioning enters after the first conv; a 1x1 projection only when the widths differ
        self.hint_proj = (
            nn.Identity()
            if hint_channels == block_out_channels[0]
            else nn.Conv2d(hint_channels, block_out_channels[0], kernel_size=1)
        )

        self.down_blocks = nn.ModuleList([])
        self.controlnet_down_blocks = nn.ModuleList(
            [zero_module(nn.Conv2d(block_out_channels[0], block_out_channels[0], 1))]
        )
        output_channel = block_out_channels[0]
        for i, down_block_type in enumerate(down_block_types):
            input_channel = output_channel
            output_channel = block_out_channels[i]
            is_final_block = i == len(block_out_channels) - 1
            down_block = get_down_block(
                down_block_type,
                num_layers=layers_per_block,
                in_channels=input_channel,
                out_channels=output_channel,
                temb_channels=time_embed_dim,
                add_downsample=not is_final_block,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                downsample_padding=downsample_padding,
                resnet_time_scale_shift=resnet_time_scale_shift,
                downsample_type=downsample_type,
                dropout=dropout,
            )
            self.down_blocks.append(down_block)
            # one zero conv per skip feature the block emits (its resnets, then its downsampler)
            n_res = layers_per_block + (0 if is_final_block else 1)
            for _ in range(n_res):
                self.controlnet_down_blocks.append(zero_module(nn.Conv2d(output_channel, output_channel, 1)))

        if mid_block_type is None:
            self.mid_block = None
            self.controlnet_mid_block = None
        else:
            self.mid_block = UNetMidBlock2D(
                in_channels=block_out_channels[-1],
                temb_channels=time_embed_dim,
                dropout=dropout,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift,
                attention_head_dim=attention_head_dim if attention_head_dim is not None else block_out_channels[-1],
                resnet_groups=norm_num_groups,
                attn_groups=attn_norm_num_groups,
                add_attention=add_attention,
            )
            self.controlnet_mid_block = zero_module(nn.Conv2d(block_out_channels[-1], block_out_channels[-1], 1))

    @classmethod
    def from_unet(cls, unet: UNet2DModel, *, hint_channels: int) -> UNet2DControlNetModel:
        """Build a ControlNet matching ``unet`` and copy its encoder weights.

        Parameters
        ----------
        unet
            The denoiser to control.
        hint_channels
            Channels of the conditioning hint.

        Returns
        -------
        The ControlNet; its zero convs make it a no-op until trained.

        Examples
        --------
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
        >>> controlnet = UNet2DControlNetModel.from_unet(unet, hint_channels=8)
        >>> bool((controlnet.conv_in.weight == unet.conv_in.weight).all())
        True
        """
        if not isinstance(unet, UNet2DModel):
            raise TypeError(f"`unet` must be a diffusers UNet2DModel, got {type(unet).__name__}.")
        if unet.class_embedding is not None:
            raise ValueError(_CLASS_EMBEDDING)
        kwargs = {key: unet.config[key] for key in ENCODER_CONFIG_KEYS if key in unet.config}
        controlnet = cls(hint_channels=hint_channels, **kwargs).to(unet.device)
        if unet.dtype != controlnet.dtype:
            controlnet.to(dtype=unet.dtype)
        controlnet.copy_encoder_from(unet)
        return controlnet

    def copy_encoder_from(self, unet: UNet2DModel) -> None:
        """Copy (strictly) the encoder-half weights of ``unet`` into this ControlNet."""
        for name in ENCODER_MODULES:
            source, target = getattr(unet, name), getattr(self, name)
            if (source is None) != (target is None):
                raise ValueError(
                    f"UNet and ControlNet disagree on `{name}` (one of them has none); rebuild with from_unet."
                )
            if source is not None:
                target.load_state_dict(source.state_dict(), strict=True)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        hint: torch.Tensor,
    ) -> ControlNetOutput:
        """Residuals for the UNet's skip features and mid block.

        Parameters
        ----------
        sample
            The noisy UNet input ``(B, in_channels, H, W)``.
        timestep
            Timestep(s), as for ``UNet2DModel``.
        hint
            Conditioning ``(B, hint_channels, H, W)`` (same spatial size as ``sample``).

        Returns
        -------
        ``down_block_res_samples`` (one per UNet skip) and ``mid_block_res_sample`` (``None`` without a mid block).
        """
        if hint.shape[-2:] != sample.shape[-2:] or hint.shape[1] != self.config.hint_channels:
            raise ValueError(
                f"`hint` must be (B, {self.config.hint_channels}, {sample.shape[-2]}, {sample.shape[-1]}) to match "
                f"`sample`, got {tuple(hint.shape)}."
            )
        encoded = unet_encode(self, sample, timestep, hint=self.hint_proj(hint))
        down = tuple(
            zero_conv(res)
            for zero_conv, res in zip(self.controlnet_down_blocks, encoded.down_block_res_samples, strict=True)
        )
        mid = None
        if self.controlnet_mid_block is not None:
            mid = self.controlnet_mid_block(encoded.sample)
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
