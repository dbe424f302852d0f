"""The composite C3-Diff model: first stage, denoiser, ControlNet, hint encoders, imputation and losses.

:class:`C3DiffModel` holds every trainable and frozen part and the geometry it was built for; it computes the
training losses of a batch (:meth:`C3DiffModel.compute_losses`) and super-resolves tiles
(:meth:`C3DiffModel.predict`, DDIM, see :mod:`c3diff.models._sampling`). Persistence goes through
:func:`c3diff.models.save_pretrained` / :func:`c3diff.models.from_pretrained` (:mod:`c3diff.models._hub`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

from c3diff._validation import check_genes
from c3diff.models._autoencoder import build_autoencoder, downsampling_factor
from c3diff.models._conditional_mean import (
    ConditionalMeanNet,
    block_log_softmax,
    block_pixel_counts,
    block_totals,
    multinomial_nll,
    poisson_nll,
    pool_log_shares,
    share_map,
)
from c3diff.models._controlnet import (
    DECODER_MODULES,
    ENCODER_MODULES,
    UNet2DControlNetModel,
    unet_decode,
    unet_encode,
)
from c3diff.models._hint_encoders import (
    HintEncoders,
    ModalityFeatures,
    gene_code_map,
    lr_condition_image,
    sphere_noise_augment,
)
from c3diff.models._imputation import FeatureImputer
from c3diff.models._losses import (
    LossOutput,
    content_loss,
    diffusion_mse,
    inter_sphere_loss,
    min_snr_weights,
    modal_loss,
    overall_loss,
)
from c3diff.models._training_config import MEAN_LOSSES, TrainingConfig

__all__ = ["C3DiffModel"]

_SCALES = (5, 10)

#: How the model describes a map: the paper's diffusion of the whole map, or a conditional mean plus a residual
#: diffusion (see :class:`C3DiffModel`).
FORMULATIONS = ("paper", "residual")

#: Training stages whose completion a model records with its weights (:meth:`C3DiffModel.is_fitted`).
FITTED_STAGES = ("first_stage", "backbone", "mean")


def _stage_index(stage: str) -> int:
    if stage not in FITTED_STAGES:
        raise ValueError(f"`stage` must be one of {FITTED_STAGES}, got {stage!r}.")
    return FITTED_STAGES.index(stage)


class C3DiffModel(ModelMixin, ConfigMixin):
    r"""C3-Diff: a ControlNet-conditioned (latent) diffusion model that super-resolves ST gene maps with histology.

    One sample is one gene of one tile: the HR map of the gene is the image to generate; the hint combines
    histology features (``C_h``, ``M_h``), LR ST features (``C_y``, ``M_y``; imputed when the tile has no LR ST) and a
    gene code. The UNet's encoder and the autoencoder are frozen; the ControlNet, the UNet decoder, the hint encoders
    and the imputation scalars train. Build one with :func:`~c3diff.models.build_model` (presets),
    :func:`~c3diff.models.from_ldm` (a pretrained LDM backbone) or :func:`~c3diff.models.from_pretrained`.

    Parameters
    ----------
    genes
        Gene names; the position of a gene is its gene index (and its gene code ``index / G``).
    image_size
        ``S``: histology and HR tile size in pixels, at ``hr_pixel_size``.
    lr_size
        ``L = ceil(S * hr_pixel_size / lr_pixel_size)``; computed when ``None``, checked otherwise.
    hr_pixel_size, lr_pixel_size, histology_pixel_size
        Pixel sizes in micrometres (10, 100, 10 in the paper). The LR conditioning image is the LR map upsampled by
        ``lr_pixel_size / hr_pixel_size``.
    scale
        10 (targets ``S x S`` at ``hr_pixel_size``) or 5 (targets ``S/2 x S/2`` at twice that; upsampled nearest to
        ``S`` for the network).
    unet_config
        Arguments of :class:`~diffusers.UNet2DModel` (the denoiser); ``sample_size`` defaults to the latent size.
    autoencoder_config
        Arguments of :class:`~diffusers.VQModel`, or ``None`` for pixel-space diffusion.
    space_to_depth
        Pixel space only: fold each ``p x p`` block of the map into ``p**2`` channels (``pixel_unshuffle``), so the
        denoiser works on a ``S/p`` grid - a lossless, parameter-free first stage that makes small models fast
        (the ``tiny`` preset uses 4). 1 = plain pixel space.
    hint_channels
        Channels of each hint encoder (55 in the paper).
    hint_encoder_channels
        Widths of each hint encoder's conv stack (one stride-2 stage per factor 2 of the autoencoder).
    hint_space_to_depth
        Pixel space with ``space_to_depth > 1`` only: the hint encoders fold their inputs the way the map is folded
        (each ``p x p`` block of histology into channels) and run at the latent size without stride-2 steps, so
        every 10 um histology pixel reaches the hint of the latent pixel whose sub-pixels it lies on (strided
        encoders must learn to keep that position). ``False`` (default): the paper's strided encoders.
    gene_code_channels
        Channels of the gene code in the hint (4).
    scheduler_config
        Arguments of :class:`~diffusers.DDIMScheduler` (used for training noise and for sampling). Its
        ``prediction_type`` is ``"epsilon"`` (the paper) or ``"v_prediction"`` (for models trained from scratch; see
        :meth:`diffusion_target`).
    temperature
        ``tau`` of the imputation's softmax over donor features (0.07; used at inference for tiles without LR ST).
        The contrastive losses take theirs from the training recipe
        (:class:`~c3diff.models.TrainingConfig`).
    memory_bank_size, memory_bank_pool
        Inference-time imputation memory bank: entries and pooled size (see :mod:`c3diff.models._imputation`).
    latent_shift, latent_scale
        Pixel space only: the diffusion space is ``(fold(x) - latent_shift) * latent_scale`` (zero mean, unit
        variance over training maps, as the LDM's ``scaling_factor`` does for VQ latents). Sparse single-gene maps
        sit almost entirely at -1; without this, the UNet's group norms discard that offset and sampling drifts.
        Estimated by :func:`c3diff.tl.train`'s first stage (its ``latent_scaling`` says how), which then builds the
        model anew with them: a config is never changed after construction.
    formulation
        ``"paper"``: the diffusion generates the whole normalised HR map (the paper). ``"residual"``: a
        deterministic conditional-mean stage (:class:`~c3diff.models._conditional_mean.ConditionalMeanNet`, on the
        same hint) predicts where each LR pixel's counts go, and the ControlNet diffusion models only the residual
        (truth minus mean, in within-LR-pixel share units), with the mean's share map as an extra hint; a sample is
        mean + sampled residual (CorrDiff's regression-then-residual-diffusion pattern).
    mean_net_config
        ``"residual"`` only: ``block_out_channels``, ``layers_per_block`` and ``norm_num_groups`` of the mean
        network's histology trunk (a U-Net), ``head_channels``, the width of its gene head, ``histology_prior``
        (start the logits from bicubic times the squared H&E darkness, with a learned exponent per gene) and
        ``texture_channels`` (read the H&E's texture, :func:`c3diff.pp.histology_texture`; 0: none); see the
        class :class:`~c3diff.models._conditional_mean.ConditionalMeanNet`.
    training_data
        Free text recorded in the model card (what the model was trained on).

    Notes
    -----
    The config holds the network only: architecture, geometry and the noise schedule it was trained with. The
    training recipe (loss weights, contrastive temperature, feature augmentation, min-SNR, stage budgets) is a
    :class:`~c3diff.models.TrainingConfig`, passed to the loss methods and saved by
    :func:`c3diff.tl.train` as ``training_config.json`` beside the model. Which training stages are done (first
    stage, backbone, conditional mean) is state saved with the weights (:meth:`is_fitted`).

    Examples
    --------
    >>> import torch, c3diff
    >>> model = c3diff.models.build_model("tiny", genes=["EPCAM", "PTPRC"])
    >>> batch = {"histology": torch.rand(4, 3, 64, 64), "lr": torch.rand(4, 1, 7, 7),
    ...          "hr": torch.rand(4, 1, 64, 64) * 2 - 1, "hr_counts": torch.poisson(torch.ones(4, 1, 64, 64)),
    ...          "gene_index": torch.tensor([0, 1, 0, 1]), "lr_missing": torch.tensor([False, False, False, True])}
    >>> losses = model.compute_mean_losses(batch, generator=torch.Generator().manual_seed(0))
    >>> sorted(losses.as_dict())
    ['content', 'inter_sphere', 'mean', 'modal', 'mse', 'total']
    >>> mean, std = model.predict(torch.rand(1, 3, 64, 64), torch.rand(1, 2, 7, 7), num_inference_steps=2)
    >>> tuple(mean.shape), std is None
    ((1, 2, 64, 64), True)
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        *,
        genes: Sequence[str] | None = None,
        image_size: int = 256,
        lr_size: int | None = None,
        hr_pixel_size: float = 10.0,
        lr_pixel_size: float = 100.0,
        histology_pixel_size: float = 10.0,
        scale: int = 10,
        unet_config: Mapping[str, Any] | None = None,
        autoencoder_config: Mapping[str, Any] | None = None,
        space_to_depth: int = 1,
        hint_channels: int = 55,
        hint_encoder_channels: Sequence[int] = (32, 64, 128),
        hint_space_to_depth: bool = False,
        gene_code_channels: int = 4,
        scheduler_config: Mapping[str, Any] | None = None,
        temperature: float = 0.07,
        memory_bank_size: int = 128,
        memory_bank_pool: int = 8,
        latent_shift: float = 0.0,
        latent_scale: float = 1.0,
        formulation: str = "paper",
        mean_net_config: Mapping[str, Any] | None = None,
        training_data: str | None = None,
    ):
        super().__init__()
        if genes is None:
            raise TypeError("`genes` is required: the gene names the model predicts, in gene-index order.")
        genes = check_genes(genes, list(genes), arg="genes")
        if scale not in _SCALES:
            raise ValueError(f"`scale` must be 5 or 10, got {scale!r}.")
        ratio = lr_pixel_size / hr_pixel_size
        if abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(
                f"`lr_pixel_size / hr_pixel_size` must be an integer, got {lr_pixel_size} / {hr_pixel_size}."
            )
        expected_lr = math.ceil(image_size * hr_pixel_size / lr_pixel_size - 1e-9)
        if lr_size is not None and lr_size != expected_lr:
            raise ValueError(
                f"`lr_size={lr_size}` disagrees with the geometry: ceil({image_size} px x {hr_pixel_size} um / "
                f"{lr_pixel_size} um) = {expected_lr}. Leave `lr_size=None` to compute it."
            )
        if scale == 5 and image_size % 2:
            raise ValueError(f"A 5x model needs an even `image_size`, got {image_size}.")

        # first stage (frozen), or pixel space with an optional lossless space-to-depth fold
        if space_to_depth < 1 or space_to_depth & (space_to_depth - 1):
            raise ValueError(f"`space_to_depth` must be a power of two >= 1, got {space_to_depth!r}.")
        if autoencoder_config is not None and space_to_depth != 1:
            raise ValueError("`space_to_depth` applies to pixel space only; set it to 1 with an `autoencoder_config`.")
        self.vqvae = None if autoencoder_config is None else build_autoencoder(autoencoder_config)
        factor = space_to_depth if self.vqvae is None else downsampling_factor(self.vqvae)
        if image_size % factor:
            raise ValueError(f"`image_size={image_size}` is not divisible by the first stage's factor {factor}.")
        latent_size = image_size // factor
        image_channels = self.vqvae.config.in_channels if self.vqvae is not None else None
        latent_channels = self.vqvae.config.latent_channels if self.vqvae is not None else None

        # denoiser
        unet_config = dict(unet_config or {})
        unet_config.setdefault("sample_size", latent_size)
        if latent_channels is not None:
            unet_config.setdefault("in_channels", latent_channels)
            unet_config.setdefault("out_channels", latent_channels)
        self.unet = UNet2DModel(**unet_config)
        unet_in = self.unet.config.in_channels
        if self.unet.config.out_channels != unet_in:
            raise ValueError(
                f"The UNet must output as many channels as it takes ({unet_in}), got {self.unet.config.out_channels}."
            )
        if latent_channels is not None and unet_in != latent_channels:
            raise ValueError(
                f"`unet_config['in_channels']={unet_in}` must equal the autoencoder's latent channels "
                f"{latent_channels}."
            )
        if self.unet.config.sample_size != latent_size:
            raise ValueError(
                f"`unet_config['sample_size']={self.unet.config.sample_size}` must be the latent size {latent_size} "
                f"(image_size {image_size} / autoencoder factor {factor})."
            )

        # conditioning
        if hint_space_to_depth and (self.vqvae is not None or space_to_depth == 1):
            raise ValueError(
                "`hint_space_to_depth=True` folds the hint inputs like the map and needs pixel space with "
                f"`space_to_depth > 1`; got space_to_depth={space_to_depth} and "
                f"{'an' if self.vqvae is not None else 'no'} autoencoder. Set it to False."
            )
        self.hint_encoders = HintEncoders(
            feature_channels=hint_channels,
            block_out_channels=tuple(hint_encoder_channels),
            num_downsamples=0 if hint_space_to_depth else int(math.log2(factor)),
            fold=factor if hint_space_to_depth else 1,
            gene_code_channels=gene_code_channels,
        )
        if formulation not in FORMULATIONS:
            raise ValueError(f"`formulation` must be one of {FORMULATIONS}, got {formulation!r}.")
        self.mean_net = None
        mean_hint_channels = 0
        if formulation == "residual":
            mean_net_config = {
                "block_out_channels": [32, 64],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "head_channels": 32,
                **dict(mean_net_config or {}),
            }
            allowed = {
                "block_out_channels",
                "layers_per_block",
                "norm_num_groups",
                "head_channels",
                "histology_prior",
                "texture_channels",
            }
            unknown = sorted(set(mean_net_config) - allowed)
            if unknown:
                raise ValueError(f"`mean_net_config` has unknown entries {unknown}; use {sorted(allowed)}.")
            mean_net_config["block_out_channels"] = list(mean_net_config["block_out_channels"])
            self.mean_net = ConditionalMeanNet(
                histology_hint_channels=2 * hint_channels,
                st_hint_channels=2 * hint_channels + gene_code_channels,
                fold=factor,
                num_genes=len(genes),
                **mean_net_config,
            )
            mean_hint_channels = factor**2  # the mean's share map, folded to the latent grid
        elif mean_net_config is not None:
            raise ValueError("`mean_net_config` applies to formulation='residual' only.")
        self._fold = factor
        self.controlnet = UNet2DControlNetModel.from_unet(
            self.unet, hint_channels=self.hint_encoders.hint_channels + mean_hint_channels
        )
        self.imputer = FeatureImputer(
            feature_channels=hint_channels,
            bank_size=memory_bank_size,
            bank_pool=memory_bank_pool,
            temperature=temperature,
        )

        scheduler_config = dict(scheduler_config or {})
        self.noise_scheduler = DDIMScheduler(**scheduler_config)
        if self.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                "C3-Diff's denoiser predicts the noise ('epsilon', the paper) or the velocity ('v_prediction'): "
                f"`scheduler_config['prediction_type']` is {self.noise_scheduler.config.prediction_type!r}."
            )

        self.register_to_config(
            genes=list(genes),
            lr_size=expected_lr,
            unet_config=config_kwargs(self.unet.config),
            autoencoder_config=None if self.vqvae is None else config_kwargs(self.vqvae.config),
            scheduler_config=config_kwargs(self.noise_scheduler.config),
            hint_encoder_channels=list(hint_encoder_channels),
            mean_net_config=mean_net_config,
        )
        if self.vqvae is None and unet_in % space_to_depth**2:
            raise ValueError(
                f"With `space_to_depth={space_to_depth}` the UNet's in_channels must be a multiple of "
                f"{space_to_depth**2} (image channels x {space_to_depth}^2), got {unet_in}."
            )
        self._image_channels = image_channels or unet_in // space_to_depth**2
        # training progress (state, not config): which stages are fitted, saved with the weights
        self.register_buffer("fitted_stages", torch.zeros(len(FITTED_STAGES), dtype=torch.bool))
        #: the recipe the model was trained with (provenance; ``training_config.json``), when known
        self.training_config: TrainingConfig | None = None
        self._freeze()

    # ------------------------------------------------------------------ geometry
    @property
    def genes(self) -> list[str]:
        """Gene names in gene-index order."""
        return list(self.config.genes)

    @property
    def num_genes(self) -> int:
        """``G``."""
        return len(self.config.genes)

    @property
    def latent_size(self) -> int:
        """Spatial size of the diffusion space (``S / 4`` with VQ-f4, ``S`` in pixel space)."""
        return self.unet.config.sample_size

    @property
    def lr_upsample_factor(self) -> int:
        """``lr_pixel_size / hr_pixel_size`` (10)."""
        return round(self.config.lr_pixel_size / self.config.hr_pixel_size)

    def output_size(self, scale: int | None = None) -> int:
        """Side of an output map at ``scale`` (``S`` at 10x, ``S / 2`` at 5x)."""
        scale = self.config.scale if scale is None else scale
        return self.config.image_size if scale == 10 else self.config.image_size // 2

    # ------------------------------------------------------------------ parts
    def _encoder_modules(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.unet, name) for name in ENCODER_MODULES) if m is not None]

    def _freeze(self) -> None:
        self.requires_grad_(True)
        if self.vqvae is not None:
            self.vqvae.requires_grad_(False)
            self.vqvae.eval()
        for module in self._encoder_modules():
            module.requires_grad_(False)

    def trainable_parameters(self, stage: str = "diffusion") -> list[torch.nn.Parameter]:
        """The parameters a training stage updates.

        ``"diffusion"``: ControlNet and UNet decoder, plus (paper formulation) the hint encoders, ``alpha`` and
        ``beta``. ``"mean"`` (residual formulation): the hint encoders, the mean network, ``alpha`` and ``beta``;
        the residual diffusion then keeps them frozen, so the mean it refines stays the one that was validated.

        Examples
        --------
        >>> import c3diff
        >>> model = c3diff.models.build_model("tiny", genes=["A"])
        >>> n = sum(p.numel() for stage in ("mean", "diffusion") for p in model.trainable_parameters(stage))
        >>> n == sum(p.numel() for p in model.parameters() if p.requires_grad)
        True
        """
        if stage not in ("diffusion", "mean"):
            raise ValueError(f"`stage` must be 'diffusion' or 'mean', got {stage!r}.")
        if stage == "mean":
            if self.mean_net is None:
                raise ValueError("This model has no conditional-mean stage (formulation='paper').")
            params = [p for m in (self.hint_encoders, self.mean_net) for p in m.parameters()]
            return [*params, self.imputer.alpha, self.imputer.beta]
        if self.mean_net is not None:
            modules: list[torch.nn.Module] = [self.controlnet]
            modules += [getattr(self.unet, name) for name in DECODER_MODULES]
            return [p for m in modules for p in m.parameters()]
        modules = [self.controlnet, self.hint_encoders]
        modules += [getattr(self.unet, name) for name in DECODER_MODULES]
        params = [p for m in modules for p in m.parameters()]
        return [*params, self.imputer.alpha, self.imputer.beta]

    def train(self, mode: bool = True) -> C3DiffModel:
        """Set train/eval mode; the frozen autoencoder always stays in eval mode."""
        super().train(mode)
        if self.vqvae is not None:
            self.vqvae.eval()
        return self

    # ------------------------------------------------------------------ image <-> latent
    def lr_image(self, lr: torch.Tensor) -> torch.Tensor:
        """``(B, 1, L, L)`` LR maps -> ``(B, 3, S, S)`` encoder inputs (see :func:`lr_condition_image`)."""
        return lr_condition_image(lr, image_size=self.config.image_size, upsample_factor=self.lr_upsample_factor)

    def target_image(self, hr: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, H)`` HR maps in [-1, 1] (``H = S`` at 10x, ``S/2`` at 5x) -> ``(B, C, S, S)`` network images."""
        size = self.config.image_size
        expected = self.output_size()
        if hr.ndim != 4 or hr.shape[1] != 1 or hr.shape[-1] != expected or hr.shape[-2] != expected:
            raise ValueError(
                f"`hr` must be (B, 1, {expected}, {expected}) for this {self.config.scale}x model with "
                f"{size} px tiles, got {tuple(hr.shape)}."
            )
        if expected != size:  # 5x: nearest upsampling to the network's size (docs/method.md, Geometry)
            hr = F.interpolate(hr, size=(size, size), mode="nearest")
        return hr.expand(-1, self._image_channels, -1, -1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> (scaled) latents; identity (or the space-to-depth fold) in pixel space."""
        if self.vqvae is None:
            fold = self.config.space_to_depth
            images = F.pixel_unshuffle(images.to(self.dtype), fold) if fold > 1 else images.to(self.dtype)
            return (images - self.config.latent_shift) * self.config.latent_scale
        latents = self.vqvae.encode(images.to(self.dtype)).latents
        return latents * self.vqvae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> ``(B, 1, S, S)`` maps in [0, 1] (channel mean of the decoded image)."""
        if self.vqvae is not None:
            latents = self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample
        else:
            latents = latents / self.config.latent_scale + self.config.latent_shift
            if self.config.space_to_depth > 1:
                latents = F.pixel_shuffle(latents, self.config.space_to_depth)
        return ((latents.mean(dim=1, keepdim=True) + 1.0) / 2.0).clamp(0.0, 1.0)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> ``(B, 1, S, S)`` maps in the units they were encoded in (no [-1, 1] -> [0, 1] mapping); the
        residual formulation's residuals."""
        if self.vqvae is not None:
            latents = self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample
        else:
            latents = latents / self.config.latent_scale + self.config.latent_shift
            if self.config.space_to_depth > 1:
                latents = F.pixel_shuffle(latents, self.config.space_to_depth)
        return latents.mean(dim=1, keepdim=True)

    # ------------------------------------------------------------------ training stages (run by c3diff.tl.train)
    def is_fitted(self, stage: str) -> bool:
        """Whether a training stage is done: ``"first_stage"`` (VQ autoencoder trained, or the pixel-space latent
        shift/scale estimated), ``"backbone"`` (the denoiser is a trained unconditional model: pretrained, see
        :func:`~c3diff.models.from_ldm`, or by :func:`c3diff.tl.train`) or ``"mean"`` (the conditional-mean stage).
        Saved with the weights; :func:`c3diff.tl.train` skips the stages that are done.

        Examples
        --------
        >>> import c3diff
        >>> model = c3diff.models.build_model("tiny", genes=["A"])
        >>> model.is_fitted("mean"), c3diff.models.load_demo_model().is_fitted("mean")
        (False, True)
        """
        return bool(self.fitted_stages[_stage_index(stage)])

    def mark_fitted(self, stage: str, fitted: bool = True) -> None:
        """Record that a training stage is done (or not); see :meth:`is_fitted`."""
        self.fitted_stages[_stage_index(stage)] = bool(fitted)

    def with_config(self, **changes: Any) -> C3DiffModel:
        """A new model built from this one's config with ``changes``, holding the same weights, fitted stages and
        sampling scheduler: how :func:`c3diff.tl.train` records what a stage estimated (the first stage's latent
        shift/scale, a VQ autoencoder's scaling factor) and how a description of the training data is attached,
        without changing a config after construction.

        Examples
        --------
        >>> import c3diff
        >>> model = c3diff.models.build_model("tiny", genes=["A"])
        >>> shifted = model.with_config(latent_shift=-0.9, latent_scale=2.0)
        >>> shifted.config.latent_shift, model.config.latent_shift
        (-0.9, 0.0)
        """
        unknown = sorted(set(changes) - set(self.config))
        if unknown:
            valid = sorted(config_kwargs(self.config))
            raise TypeError(f"Unknown model option(s) {unknown}; valid options are {valid}.")
        model = type(self).from_config({**config_kwargs(self.config), **changes})
        model.load_state_dict(self.state_dict())
        model.noise_scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)
        model.training_config = self.training_config
        model = model.to(self.device)
        if model.dtype != self.dtype:  # (diffusers warns about every dtype cast: only when there is one)
            model = model.to(self.dtype)
        return model.train(self.training)

    @torch.no_grad()
    def first_stage_statistics(self, maps: torch.Tensor, *, latent_scaling: str = "std") -> dict[str, float]:
        """Pixel space: the ``latent_shift`` (mean) and ``latent_scale`` (one over the standard deviation with
        ``latent_scaling="std"``, 1 with ``"range"``) of the folded training ``maps`` ``(N, 1, H, H)`` in [-1, 1]:
        the config entries :func:`c3diff.tl.train` builds the model with (see :meth:`with_config`)."""
        if self.vqvae is not None:
            raise ValueError("A VQ first stage is trained (c3diff.tl.train's 'first_stage' stage), not estimated.")
        if latent_scaling not in ("std", "range"):
            raise ValueError(f"`latent_scaling` must be 'std' or 'range', got {latent_scaling!r}.")
        if maps.ndim != 4 or maps.shape[1] != 1 or len(maps) == 0:
            raise ValueError(f"`maps` must be a non-empty (N, 1, H, H) tensor in [-1, 1], got {tuple(maps.shape)}.")
        images = self.target_image(maps).to(self.dtype)
        fold = self.config.space_to_depth
        folded = F.pixel_unshuffle(images, fold) if fold > 1 else images
        std = float(folded.std())
        scale = 1.0 / std if std > 0 and latent_scaling == "std" else 1.0
        return {"latent_shift": float(folded.mean()), "latent_scale": scale}

    def compute_backbone_losses(self, maps: torch.Tensor, *, generator: torch.Generator | None = None) -> LossOutput:
        """The backbone stage's loss: the whole UNet as an unconditional diffusion model of gene maps (no hint),
        uniform timesteps, on ``maps`` ``(B, 1, H, H)`` in [-1, 1]; the first stage must be fitted.

        C3-Diff builds on a pretrained unconditional LDM whose UNet encoder is frozen (:doc:`/method`,
        *Architecture*); without one, :func:`c3diff.tl.train` runs this stage (then :meth:`finish_backbone`)."""
        x0 = self.encode_images(self.target_image(maps.to(self.device)))
        noise = randn_tensor(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        n_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(
            0, n_steps, (len(x0),), generator=generator, device=generator.device if generator else "cpu"
        ).to(self.device)
        prediction = self.unet(self.noise_scheduler.add_noise(x0, noise, timesteps), timesteps).sample
        mse = diffusion_mse(prediction, self.diffusion_target(x0, noise, timesteps))
        zero = mse.new_zeros(())
        return LossOutput(total=mse, mse=mse, content=zero, modal=zero, inter_sphere=zero)

    def finish_backbone(self) -> None:
        """End of the backbone stage: copy the trained UNet encoder into the ControlNet, freeze the encoder again and
        mark the stage fitted."""
        self.controlnet.copy_encoder_from(self.unet)
        self._freeze()
        self.mark_fitted("backbone")

    # ------------------------------------------------------------------ denoiser
    def diffusion_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to output: the noise (``"epsilon"``, the paper) or the velocity
        ``sqrt(a) noise - sqrt(1 - a) x0`` (``"v_prediction"``), as the scheduler's ``prediction_type`` says."""
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, timesteps)
        return noise

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor | int, hint: torch.Tensor) -> torch.Tensor:
        """Noise (or velocity, see :meth:`diffusion_target`) prediction of the UNet with the ControlNet residuals of
        ``hint`` added.

        The frozen UNet encoder runs without autograd (its features need no gradient; the ControlNet residuals
        added to them do).
        """
        control = self.controlnet(sample, timestep, hint)
        with torch.no_grad():
            encoded = unet_encode(self.unet, sample, timestep)
        return unet_decode(
            self.unet,
            encoded,
            down_block_additional_residuals=control.down_block_res_samples,
            mid_block_additional_residual=control.mid_block_res_sample,
        )

    # ------------------------------------------------------------------ hint and conditional mean
    def _features(
        self,
        histology: torch.Tensor,
        lr: torch.Tensor,
        gene_index: torch.Tensor,
        missing: torch.Tensor,
        *,
        patch_index: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        contrastive: bool = True,
        recipe: TrainingConfig | None = None,
    ) -> tuple[ModalityFeatures, ModalityFeatures, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Hint features of a batch of ``B`` (tile, gene) items and the contrastive losses of their embeddings.

        Items of the same tile (same ``patch_index``) share one histology encoding, and the contrastive losses
        compare tiles (one item per tile: the paper's negatives are the other tiles). In train mode the ST features
        of complete items get on-sphere noise augmentation (``recipe.st_noise_sigma``) and are pushed into the
        imputation memory bank; items with ``missing`` LR ST get imputed ST features. ``recipe`` (default: the
        paper's, :class:`~c3diff.models.TrainingConfig`) also gives the contrastive temperature.

        Returns
        -------
        ``(histology_hint, st_hint, tile_of_item, losses, tile_rows)``: the histology hint features per tile, the ST
        hint features per item, each item's tile row, the contrastive losses and each tile's first item.
        """
        encoders = self.hint_encoders
        recipe = TrainingConfig() if recipe is None else recipe
        if patch_index is None:
            inverse = torch.arange(len(histology), device=histology.device)
        else:
            _, inverse = torch.unique(torch.as_tensor(patch_index, device=histology.device), return_inverse=True)
        n_tiles = int(inverse.max()) + 1 if len(inverse) else 0
        first = torch.full((n_tiles,), len(inverse), dtype=torch.long, device=histology.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(inverse), device=histology.device), reduce="amin")
        h = encoders.encode_histology(histology[first])
        y = encoders.encode_st(self.lr_image(lr))
        if self.training and recipe.st_noise_sigma > 0:
            sigma = recipe.st_noise_sigma
            y_aug = ModalityFeatures(
                content=sphere_noise_augment(y.content, sigma=sigma, generator=generator),
                modal=sphere_noise_augment(y.modal, sigma=sigma, generator=generator),
            )
        else:
            y_aug = y
        zero = histology.new_zeros(())
        losses = {"content": zero, "modal": zero, "inter_sphere": zero}
        complete_tiles = ~missing[first]
        if contrastive:
            tau = recipe.temperature
            c_y, m_y = y_aug.content[first][complete_tiles], y_aug.modal[first][complete_tiles]
            losses = {
                "content": content_loss(h.content[complete_tiles], c_y, temperature=tau),
                "modal": modal_loss(h.modal[complete_tiles], m_y, temperature=tau),
                "inter_sphere": inter_sphere_loss(h.content[complete_tiles], h.modal[complete_tiles], temperature=tau),
            }
        c_y, m_y = self.imputer.impute_from_batch(
            h.content[inverse], h.modal[inverse], y_aug.content, y_aug.modal, missing
        )
        if self.training:
            keep = first[complete_tiles]
            self.imputer.update_bank(h.content[complete_tiles], h.modal[complete_tiles], y.content[keep], y.modal[keep])
        st_hint = encoders.st_hint(ModalityFeatures(content=c_y, modal=m_y))
        return encoders.histology_hint(h), st_hint, inverse, losses, first

    def _hint(
        self,
        histology: torch.Tensor,
        lr: torch.Tensor,
        gene_index: torch.Tensor,
        missing: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        contrastive: bool = True,
        with_mean: bool = False,
        recipe: TrainingConfig | None = None,
        texture: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """The ControlNet hint of a training batch (one item per tile), the contrastive losses and, ``with_mean``,
        the mean's log-shares (see :meth:`mean_log_shares`) from the same features (``texture`` per item, for
        mean networks that read it)."""
        h_hint, st_hint, inverse, losses, _ = self._features(
            histology, lr, gene_index, missing, generator=generator, contrastive=contrastive, recipe=recipe
        )
        hint = self.hint_encoders.assemble(h_hint.expand(inverse), st_hint, gene_index, num_genes=self.num_genes)
        log_shares = None
        if with_mean:
            logits = self.mean_logits(h_hint, histology, st_hint, lr, gene_index, inverse, texture=texture)
            log_shares = self.mean_log_shares(logits)
        return hint, losses, log_shares

    def _require_mean(self) -> ConditionalMeanNet:
        if self.mean_net is None:
            raise ValueError(
                "This model has no conditional-mean stage (formulation='paper'); build one with "
                "`formulation='residual'` (e.g. the 'tiny' preset) or sample with mode='sample'."
            )
        return self.mean_net

    def output_block(self, scale: int | None = None) -> int:
        """Output pixels per LR pixel along a side at ``scale`` (10 at 10x, 5 at 5x)."""
        scale = self.config.scale if scale is None else scale
        return self.lr_upsample_factor * scale // 10

    def mean_logits(
        self,
        histology_hint: ModalityFeatures,
        histology: torch.Tensor,
        st_hint: ModalityFeatures,
        lr: torch.Tensor,
        gene_index: torch.Tensor,
        tile_of_item: torch.Tensor,
        *,
        texture: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean network's logits ``(B, 1, S, S)`` at the image grid (10 um in the paper's geometry).

        ``histology_hint``, ``histology`` and ``texture`` (:func:`c3diff.pp.histology_texture`, for mean networks
        with ``texture_channels``) are per tile (``T``), the rest per item (``B``); ``tile_of_item`` maps items to
        tiles.
        """
        features = self.mean_trunk(histology_hint, histology, texture)
        item_texture = None if texture is None else texture[tile_of_item]
        return self.mean_head(
            features[tile_of_item], st_hint, lr, gene_index, histology[tile_of_item], texture=item_texture
        )

    @property
    def texture_channels(self) -> int:
        """Texture channels the mean network reads (:func:`c3diff.pp.histology_texture`; 0: none)."""
        return 0 if self.mean_net is None else self.mean_net.texture_channels

    def mean_trunk(
        self, histology_hint: ModalityFeatures, histology: torch.Tensor, texture: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The mean network's per-tile histology features (compute once per tile, reuse for every gene)."""
        net = self._require_mean()
        hint = torch.cat([histology_hint.content, histology_hint.modal], dim=1)
        return net.trunk(hint, histology, None if texture is None else texture.to(histology))

    def mean_head(
        self,
        features: torch.Tensor,
        st_hint: ModalityFeatures,
        lr: torch.Tensor,
        gene_index: torch.Tensor,
        histology: torch.Tensor,
        *,
        texture: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, 1, S, S)`` of items from their tile's trunk ``features``, ``histology`` and ``texture``,
        their ST hint, LR maps and genes."""
        code = gene_code_map(
            gene_index, num_genes=self.num_genes, size=features.shape[-1], channels=self.config.gene_code_channels
        ).to(features)
        st = torch.cat([st_hint.content, st_hint.modal, code], dim=1)
        texture = None if texture is None else texture.to(histology)
        return self._require_mean().head(features, st, self.lr_image(lr)[:, :1], gene_index, histology, texture)

    def mean_log_shares(self, logits: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """``log pi``: each output pixel's share of its LR pixel's count, ``(B, 1, H, H)`` at ``scale``."""
        log_pi = block_log_softmax(logits, self.lr_upsample_factor)
        return pool_log_shares(log_pi, self.config.image_size // self.output_size(scale))

    def expected_map(self, log_shares: torch.Tensor, lr: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """The conditional mean in units of the normalised LR map: ``n_L pi_p * lr_L`` (an LR pixel of value ``v``
        spreads ``v`` per output pixel on average), ``(B, 1, H, H)``.

        The LR value is floored at 1e-3 so that an LR pixel at the tile's minimum keeps its predicted pattern through
        the calibration that maps these values to counts.
        """
        return self.shares_in_lr_units(share_map(log_shares, self.output_block(scale)), lr, scale)

    def shares_in_lr_units(self, shares: torch.Tensor, lr: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """Share maps ``n_L pi_p`` (or samples of them) ``(B, 1, H, H)`` times each LR pixel's normalised value
        (floored at 1e-3, see :meth:`expected_map`)."""
        block = self.output_block(scale)
        size = shares.shape[-1]
        lr_block = lr.clamp_min(1e-3).repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
        return shares * lr_block[..., :size, :size]

    def compute_mean_losses(
        self,
        batch: Mapping[str, torch.Tensor],
        *,
        loss: str | None = None,
        recipe: TrainingConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Losses of the conditional-mean stage: a count likelihood of the observed HR counts plus the three
        contrastive losses of the hint features.

        Parameters
        ----------
        batch
            As for :meth:`compute_losses`, plus ``"hr_counts"`` ``(B, 1, H, H)``: the observed counts.
        loss
            ``"multinomial"``: :func:`~c3diff.models._conditional_mean.multinomial_nll` of the counts inside each LR
            pixel given its total (calibrated, exactly LR-consistent). ``"poisson"``:
            :func:`~c3diff.models._conditional_mean.poisson_nll` of rates relative to the LR pixel's density.
            ``None``: ``recipe.mean_loss``.
        recipe
            The training recipe: contrastive loss weights and temperature, feature augmentation (default: the
            paper's, :class:`~c3diff.models.TrainingConfig`).
        generator
            Seeds the feature augmentation.
        """
        recipe = TrainingConfig() if recipe is None else recipe
        loss = recipe.mean_loss if loss is None else loss
        if loss not in MEAN_LOSSES:
            raise ValueError(f"`loss` must be one of {MEAN_LOSSES}, got {loss!r}.")
        histology, lr, gene_index, missing = self._check_batch(batch)
        if "hr_counts" not in batch:
            raise KeyError(
                "`batch` lacks 'hr_counts' (the observed HR counts), which the mean stage learns from; "
                "`c3diff.pp.PatchDataset` provides it."
            )
        counts = batch["hr_counts"].to(self.device, self.dtype)
        h_hint, st_hint, inverse, contrastive, first = self._features(
            histology,
            lr,
            gene_index,
            missing,
            patch_index=batch.get("patch_index"),
            generator=generator,
            recipe=recipe,
        )
        texture = self._batch_texture(batch)
        logits = self.mean_logits(
            h_hint,
            histology[first],
            st_hint,
            lr,
            gene_index,
            inverse,
            texture=None if texture is None else texture[first],
        )
        if loss == "multinomial":
            nll = multinomial_nll(self.mean_log_shares(logits), counts)
        else:
            factor = self.config.image_size // self.output_size()
            # rates add up over the factor x factor image pixels of an output pixel
            pooled = pool_log_shares(logits, factor) - 2 * math.log(factor)
            block = self.output_block()
            density = block_totals(counts, block) / block_pixel_counts(*counts.shape[-2:], block, device=counts.device)
            nll = poisson_nll(pooled, counts, density)
        weights = recipe.loss_weights()
        out = overall_loss(mse=nll.new_zeros(()), weights=dataclasses.replace(weights, mse=0.0), **contrastive)
        return LossOutput(
            total=out.total + nll,
            mse=out.mse,
            content=out.content,
            modal=out.modal,
            inter_sphere=out.inter_sphere,
            mean=nll,
        )

    def residual_target(self, log_shares: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """What the residual diffusion learns: observed minus expected, in share units ``n_L y_p / Y_L - n_L pi_p``
        (0 in LR pixels without counts)."""
        block = self.output_block()
        expected = share_map(log_shares, block)
        totals = block_totals(counts, block)
        n_l = block_pixel_counts(*counts.shape[-2:], block, device=counts.device)
        observed = torch.where(totals > 0, counts * n_l / totals.clamp_min(1e-12), expected)
        return observed - expected

    def _mean_hint(self, shares: torch.Tensor) -> torch.Tensor:
        """The mean's share map ``(B, 1, H, H)`` folded to the latent grid: the residual ControlNet's extra hint."""
        size = self.config.image_size
        if shares.shape[-1] != size:
            shares = F.interpolate(shares, size=(size, size), mode="nearest")
        return F.pixel_unshuffle(shares, self._fold) if self._fold > 1 else shares

    # ------------------------------------------------------------------ training
    def compute_losses(
        self,
        batch: Mapping[str, torch.Tensor],
        *,
        recipe: TrainingConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """All diffusion-stage losses of a training batch (noise and timesteps are sampled inside).

        Paper formulation: the diffusion MSE of the normalised HR map and the three contrastive losses. Residual
        formulation: the diffusion MSE of the residual (:meth:`residual_target`; needs ``"hr_counts"``), with the
        hint encoders and the mean network frozen (contrastive losses 0).

        In train mode the ST features of complete samples get on-sphere noise augmentation and are pushed into the
        imputation memory bank; in eval mode (validation loss) neither happens. Samples with ``lr_missing`` get
        imputed ST features and count only in ``L_mse``.

        Parameters
        ----------
        batch
            ``"histology"`` ``(B, 3, S, S)`` in [0, 1]; ``"lr"`` ``(B, 1, L, L)`` in [0, 1]; ``"hr"`` ``(B, 1, H, H)``
            in [-1, 1] (``H = S`` at 10x, ``S/2`` at 5x); ``"gene_index"`` ``(B,)`` int; optional ``"lr_missing"``
            ``(B,)`` bool; ``"hr_counts"`` ``(B, 1, H, H)`` (residual formulation).
        recipe
            The training recipe: loss weights, contrastive temperature, feature augmentation, min-SNR weighting
            (default: the paper's, :class:`~c3diff.models.TrainingConfig`).
        generator
            Seeds the diffusion noise, the timesteps and the feature augmentation.

        Returns
        -------
        ``LossOutput(total, mse, content, modal, inter_sphere)``.
        """
        recipe = TrainingConfig() if recipe is None else recipe
        histology, lr, gene_index, missing = self._check_batch(batch)
        device = self.device
        if self.mean_net is None:
            hint, contrastive, _ = self._hint(histology, lr, gene_index, missing, generator=generator, recipe=recipe)
            x0 = self.encode_images(self.target_image(batch["hr"].to(device)))
        else:
            if "hr_counts" not in batch:
                raise KeyError("`batch` lacks 'hr_counts', which the residual diffusion needs.")
            with torch.no_grad():
                hint, contrastive, log_shares = self._hint(
                    histology,
                    lr,
                    gene_index,
                    missing,
                    generator=generator,
                    contrastive=False,
                    with_mean=True,
                    recipe=recipe,
                    texture=self._batch_texture(batch),
                )
                residual = self.residual_target(log_shares, batch["hr_counts"].to(device, self.dtype))
                hint = torch.cat([hint, self._mean_hint(share_map(log_shares, self.output_block()))], dim=1)
            x0 = self.encode_images(self.target_image(residual))
        noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        n_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(
            0, n_steps, (len(x0),), generator=generator, device=generator.device if generator else "cpu"
        )
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        gamma = recipe.min_snr_gamma
        snr_weights = (
            None
            if gamma is None
            else min_snr_weights(
                self.noise_scheduler,
                timesteps,
                gamma=gamma,
                prediction_type=self.noise_scheduler.config.prediction_type,
            )
        )
        l_mse = diffusion_mse(
            self.denoise(noisy, timesteps, hint), self.diffusion_target(x0, noise, timesteps), weights=snr_weights
        )
        return overall_loss(mse=l_mse, weights=recipe.loss_weights(), **contrastive)

    def _batch_texture(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The batch's ``"texture"`` ``(B, K, S, S)`` on the model's device, when the mean network reads it."""
        if not self.texture_channels:
            return None
        if "texture" not in batch:
            raise KeyError(
                f"`batch` lacks 'texture': this model's mean network reads {self.texture_channels} texture channels. "
                "Make the patches with `c3diff.pp.make_patches(..., texture=True)`."
            )
        return torch.as_tensor(batch["texture"]).to(self.device, self.dtype)

    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        required = ("histology", "lr", "hr", "gene_index")
        absent = [k for k in required if k not in batch]
        if absent:
            raise KeyError(
                f"`batch` lacks {absent}; it needs {list(required)} (+ optional 'lr_missing'), as made by "
                "`c3diff.pp.PatchDataset` with the default collate."
            )
        s, lr_size = self.config.image_size, self.config.lr_size
        histology, lr = batch["histology"], batch["lr"]
        b = len(histology)
        if histology.shape != (b, 3, s, s):
            raise ValueError(f"`batch['histology']` must be (B, 3, {s}, {s}), got {tuple(histology.shape)}.")
        if lr.shape != (b, 1, lr_size, lr_size):
            raise ValueError(f"`batch['lr']` must be ({b}, 1, {lr_size}, {lr_size}), got {tuple(lr.shape)}.")
        gene_index = torch.as_tensor(batch["gene_index"]).long()
        if gene_index.shape != (b,):
            raise ValueError(f"`batch['gene_index']` must be ({b},), got {tuple(gene_index.shape)}.")
        missing = batch.get("lr_missing")
        missing = torch.zeros(b, dtype=torch.bool) if missing is None else torch.as_tensor(missing).bool()
        if missing.shape != (b,):
            raise ValueError(f"`batch['lr_missing']` must be ({b},), got {tuple(missing.shape)}.")
        device, dtype = self.device, self.dtype
        return (histology.to(device, dtype), lr.to(device, dtype), gene_index.to(device), missing.to(device))

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict(
        self,
        histology: torch.Tensor,
        lr: torch.Tensor | None = None,
        *,
        gene_indices: Sequence[int] | None = None,
        lr_available: Sequence[bool] | torch.Tensor | None = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        n_samples: int = 1,
        seed: int | Sequence[int] = 0,
        gene_batch_size: int = 16,
        scale: int | None = None,
        mode: str | None = None,
        progress: bool = False,
        scheduler: Any = None,
        texture: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Super-resolve gene maps of ``T`` tiles: the conditional mean and/or DDIM samples (see
        :func:`c3diff.models._sampling.sample`).

        Parameters
        ----------
        histology
            ``(T, 3, S, S)`` H&E tiles in [0, 1].
        lr
            ``(T, G', L, L)`` LR maps in [0, 1] of the requested genes, or ``None`` (no LR ST for any tile).
        gene_indices
            Model gene indices to predict (``G'`` of them); default: all genes in model order.
        lr_available
            ``(T,)`` bool; False tiles ignore ``lr`` and impute their ST features from the memory bank.
        num_inference_steps, eta
            DDIM steps (50) and eta (0: deterministic).
        n_samples
            Samples per (tile, gene); with more than one, the per-pixel standard deviation is returned as well.
        seed
            An int (tile ``t`` gets ``seed + t``) or one int per tile. Every (tile, gene, sample) draws its noise from
            its own generator seeded by (tile seed, gene index, sample index): results do not depend on batching.
        gene_batch_size
            Genes of one tile denoised together (times ``n_samples``).
        scale
            10 or 5; ``None``: the model's scale. 5 on a 10x model is the 2 x 2 mean of the 10x output.
        mode
            ``"mean"`` (residual formulation): the conditional mean alone, one forward pass per tile and gene batch;
            the sampling arguments are unused. ``"sample"``: DDIM samples; in the residual formulation ``mean`` is
            still the exact conditional mean and ``std`` the spread of ``n_samples`` mean + residual samples; in
            the paper formulation ``mean`` is the average of the samples. ``None``: ``"mean"`` when the model has a
            mean stage, else ``"sample"``.
        progress
            Show a progress bar.
        scheduler
            ``mode="sample"``: sample with this diffusers scheduler instead of the model's (a component, as in
            diffusers pipelines; checked like :meth:`set_scheduler`, the model's own is unchanged).
        texture
            ``(T, K, S, S)`` texture of the tiles (:func:`c3diff.pp.histology_texture`), for models whose mean
            network reads it (:attr:`texture_channels`).

        Returns
        -------
        ``(mean, std)``: ``(T, G', H, H)`` float32 on the CPU (``H = S`` at 10x, ``S/2`` at 5x), in [0, 1] (paper
        formulation) or in normalised-LR units (residual formulation, :meth:`expected_map`); ``std`` is ``None``
        with one sample or ``mode="mean"``.
        """
        from c3diff.models._sampling import sample

        return sample(
            self,
            histology,
            lr,
            gene_indices=gene_indices,
            lr_available=lr_available,
            num_inference_steps=num_inference_steps,
            eta=eta,
            n_samples=n_samples,
            seed=seed,
            gene_batch_size=gene_batch_size,
            scale=scale,
            mode=mode,
            progress=progress,
            scheduler=scheduler,
            texture=texture,
        )

    def set_scheduler(self, scheduler: Any) -> None:
        """Sample with another diffusers scheduler (e.g. ``DPMSolverMultistepScheduler``); it must share the training
        noise schedule (build it with ``Cls.from_config(model.noise_scheduler.config)``). Saved as
        ``scheduler_config.json`` by :meth:`save_pretrained` and restored by :meth:`from_pretrained`.

        Examples
        --------
        >>> import c3diff
        >>> from diffusers import DPMSolverMultistepScheduler
        >>> model = c3diff.models.build_model("tiny", genes=["A"])
        >>> model.set_scheduler(DPMSolverMultistepScheduler.from_config(model.noise_scheduler.config))
        >>> type(model.noise_scheduler).__name__
        'DPMSolverMultistepScheduler'
        """
        self.noise_scheduler = self.check_scheduler(scheduler)

    def check_scheduler(self, scheduler: Any) -> Any:
        """``scheduler`` when it is a diffusers scheduler with the model's training noise schedule (timesteps, betas,
        prediction type), else an error that says how to build one."""
        from diffusers import SchedulerMixin

        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(f"`scheduler` must be a diffusers scheduler, got {type(scheduler).__name__}.")
        ours = self.noise_scheduler.config
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
            if key in scheduler.config and scheduler.config[key] != ours[key]:
                raise ValueError(
                    f"`scheduler.config[{key!r}]` is {scheduler.config[key]!r}, but the model was trained "
                    f"with {ours[key]!r}; build it with `{type(scheduler).__name__}.from_config("
                    "model.noise_scheduler.config)`."
                )
        return scheduler

    def __reduce__(self):
        # pickling (dask workers, multiprocessing) rebuilds the model from its config, weights and scheduler: a
        # pickled ModelMixin would come back with a plain dict as its config
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        scheduler = (type(self.noise_scheduler).__name__, dict(self.noise_scheduler.config))
        recipe = None if self.training_config is None else self.training_config.to_dict()
        return _rebuild_model, (type(self), dict(self.config), state, scheduler, self.training, recipe)

    # ------------------------------------------------------------------ persistence (see hub.py)
    def save_pretrained(self, save_directory: str, *, training_data: str | None = None, **kwargs: Any) -> None:
        """Write ``config.json``, ``model.safetensors``, ``scheduler_config.json`` and a model card ``README.md`` to
        ``save_directory`` (``safe_serialization`` and ``variant`` as in diffusers).

        See :func:`c3diff.models.save_pretrained`.
        """
        from c3diff.models import _hub as hub

        hub.save_pretrained(self, save_directory, training_data=training_data, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> C3DiffModel:
        """Load a model from a local folder or a Hub repo id; see :func:`c3diff.models.from_pretrained`."""
        from c3diff.models import _hub as hub

        return hub.from_pretrained(pretrained_model_name_or_path, model_class=cls, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the model to the Hub; see :func:`c3diff.models.push_to_hub`."""
        from c3diff.models import _hub as hub

        return hub.push_to_hub(self, repo_id, **kwargs)

    def model_card(self, **kwargs: Any):
        """The model card (``huggingface_hub.ModelCard``); see :func:`c3diff.models._model_card.make_model_card`."""
        from c3diff.models._model_card import make_model_card

        return make_model_card(self, **kwargs)


def _rebuild_model(cls, config, state, scheduler, training, recipe=None):
    """Inverse of :meth:`C3DiffModel.__reduce__`."""
    import diffusers

    model = cls.from_config(config)
    model.load_state_dict(state)
    name, scheduler_config = scheduler
    model.noise_scheduler = getattr(diffusers, name).from_config(scheduler_config)
    model.training_config = None if recipe is None else TrainingConfig.from_dict(recipe)
    return model.train(training)


def config_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """A component's config as a plain dict of constructor arguments (no private ``_`` entries)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}
