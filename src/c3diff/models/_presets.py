"""Model presets: named configurations of :class:`~c3diff.models.C3DiffModel` (a preset is a config, not a code path).

``paper``
    The paper's formulation and sizes (the method page): 256 px tiles at 10 um/px; a VQ-f4 autoencoder with a
    3-channel 64 x 64 latent (the CelebA-HQ LDM's first stage); a UNet with model channels 224, multipliers 1, 2, 3,
    4, two res blocks per level, self-attention at the three lower resolutions (downsampling 2, 4, 8) with head dim
    32; four hint encoders of 55 channels, so the hint has 4 x 55 + 4 = 224 channels; the paper's 200 genes.
``residual``
    ``paper``'s sizes with the residual formulation: a conditional-mean stage (histology trunk U-Net 64, 128, 256;
    gene head 64 channels) and a ControlNet diffusion of the residual. For new models on a GPU.
``tiny``
    For CPU tests, demos and minutes of training, in the residual formulation: 64 px tiles in pixel space with a
    lossless space-to-depth fold (each 4 x 4 block of the map becomes 16 channels, so the denoiser works on a
    16 x 16 grid), a two-level UNet (32, 64 channels, one res block per level, attention at 8 x 8 and in the mid
    block), 8-channel hint encoders that fold their inputs the same way (widths 16, 32, 32), a mean network with a
    32, 64 trunk and a 32-channel gene head. The bundled demo model is built from it.
``tiny-paper``
    ``tiny``'s sizes in the paper's formulation (7-channel strided hint encoders, no mean stage): the paper's
    method at CPU scale, for tests and the benchmarks' paper row.

All use the DDIM scheduler of the method page: epsilon prediction, 1000 steps, betas 0.00085 -> 0.012 spaced linearly in
``sqrt(beta)`` (LDM's "linear" schedule, which diffusers calls ``"scaled_linear"``).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

from c3diff._panels import paper_genes
from c3diff.models._c3diff import C3DiffModel
from c3diff.models._training_config import LEGACY_RECIPE_KEYS
from c3diff.pp import TEXTURE_FEATURES

__all__ = ["PRESETS", "build_model", "preset_config"]

_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

_GEOMETRY = {
    "hr_pixel_size": 10.0,
    "lr_pixel_size": 100.0,
    "histology_pixel_size": 10.0,
}

_PAPER = {
    **_GEOMETRY,
    "image_size": 256,
    "autoencoder_config": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [128, 256, 512],
        "layers_per_block": 2,
        "latent_channels": 3,
        "num_vq_embeddings": 8192,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    },
    "unet_config": {
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [224, 448, 672, 896],
        "layers_per_block": 2,
        "attention_head_dim": 32,
        "norm_num_groups": 32,
    },
    "hint_channels": 55,
    "hint_encoder_channels": [32, 64, 128],
    "gene_code_channels": 4,
    "scheduler_config": _SCHEDULER,
    "memory_bank_size": 128,
    "memory_bank_pool": 8,
}

_TINY = {
    **_GEOMETRY,
    "image_size": 64,
    "autoencoder_config": None,
    "space_to_depth": 4,
    "unet_config": {
        "sample_size": 16,
        "in_channels": 16,
        "out_channels": 16,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": 32,
        "norm_num_groups": 8,
    },
    "hint_channels": 7,
    "hint_encoder_channels": [16, 32, 32],
    "gene_code_channels": 4,
    "scheduler_config": _SCHEDULER,
    "memory_bank_size": 128,
    "memory_bank_pool": 8,
}

_TINY_PAPER = {**_TINY, "formulation": "paper"}

# the residual formulation (conditional mean + residual diffusion): what new models use, see the benchmarks page
_TINY_RESIDUAL = {
    **_TINY,
    "formulation": "residual",
    "hint_space_to_depth": True,
    "hint_channels": 8,
    "hint_encoder_channels": [16, 32, 32],
    "mean_net_config": {
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "head_channels": 32,
        "histology_prior": True,
    },
}
# with the H&E's texture (c3diff.pp.histology_texture): what a 10 um pixel holds, nuclei resolved; needs the H&E at
# 2.5 um/px or finer
_TINY_TEXTURE = {
    **_TINY_RESIDUAL,
    "mean_net_config": {**_TINY_RESIDUAL["mean_net_config"], "texture_channels": len(TEXTURE_FEATURES)},
}
_PAPER_RESIDUAL = {
    **_PAPER,
    "formulation": "residual",
    "mean_net_config": {
        "block_out_channels": [64, 128, 256],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "head_channels": 64,
        "histology_prior": True,
        "texture_channels": len(TEXTURE_FEATURES),
    },
}

#: The named presets: ``paper`` and ``tiny-paper`` reproduce the paper's formulation; ``residual`` (paper sizes),
#: ``tiny-texture`` and ``tiny`` use the conditional mean + residual diffusion that wins the benchmarks, the first two
#: with the H&E's texture (:func:`c3diff.pp.histology_texture`, for H&E scanned at 2.5 um/px or finer), ``tiny``
#: without it (any H&E; the fast model of the tests).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": _PAPER,
    "residual": _PAPER_RESIDUAL,
    "tiny": _TINY_RESIDUAL,
    "tiny-texture": _TINY_TEXTURE,
    "tiny-paper": _TINY_PAPER,
}


def preset_config(preset: str, *, genes: list[str] | None = None, scale: int = 10, **overrides: Any) -> dict[str, Any]:
    """The full constructor config of a preset, with overrides merged in.

    Parameters
    ----------
    preset
        ``"paper"`` or ``"tiny"``.
    genes
        Gene names in model order; default: the paper's 200 genes (:func:`c3diff._panels.paper_genes`).
    scale
        10 or 5, the scale the model is trained for.
    **overrides
        Any :class:`~c3diff.models.C3DiffModel` argument. Dict-valued entries (``unet_config``,
        ``autoencoder_config``, ``scheduler_config``) are merged key by key into the preset's; pass
        ``autoencoder_config=None`` for pixel space.

    Examples
    --------
    >>> cfg = preset_config("tiny", genes=["A", "B"], unet_config={"layers_per_block": 2})
    >>> cfg["unet_config"]["layers_per_block"], cfg["unet_config"]["block_out_channels"]
    (2, [32, 64])
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown `preset` {preset!r}; choose one of {sorted(PRESETS)}.")
    allowed = set(inspect.signature(C3DiffModel.__init__).parameters) - {"self"}
    recipe = sorted(set(overrides) & set(LEGACY_RECIPE_KEYS))
    if recipe:
        raise TypeError(
            f"{recipe} are training recipe, not model options: pass them to `c3diff.tl.train` (they are recorded in "
            "its TrainingConfig, `training_config.json`)."
        )
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"Unknown model option(s) {unknown}; valid options are {sorted(allowed)}.")
    config = copy.deepcopy(PRESETS[preset])
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(config.get(key), Mapping):
            config[key] = {**config[key], **copy.deepcopy(dict(value))}
        else:
            config[key] = copy.deepcopy(value)
    if config.get("formulation") == "paper":  # e.g. tiny with formulation="paper": no mean stage to configure
        config.pop("mean_net_config", None)
    if genes is None:
        genes = paper_genes()
    config["genes"] = list(genes)
    config["scale"] = scale
    return config


def build_model(preset: str = "tiny", *, genes: list[str] | None = None, scale: int = 10, **overrides: Any):
    """Build a randomly initialised :class:`~c3diff.models.C3DiffModel` from a preset.

    Parameters
    ----------
    preset
        A name in :data:`PRESETS`: ``"paper"``, ``"residual"``, ``"tiny"`` or ``"tiny-paper"``.
    genes
        Gene names in model order (gene index = position); default: the paper's 200 genes.
    scale
        10 or 5.
    **overrides
        Model options replacing the preset's (see :func:`preset_config`).

    Returns
    -------
    The model, in train mode, with its frozen parts (autoencoder, UNet encoder) set ``requires_grad=False``.

    Examples
    --------
    >>> import c3diff
    >>> model = c3diff.models.build_model("tiny", genes=["EPCAM", "PTPRC", "ACTA2"], scale=10)
    >>> model.config.image_size, model.config.lr_size, model.latent_size, model.config.formulation
    (64, 7, 16, 'residual')
    """
    return C3DiffModel(**preset_config(preset, genes=genes, scale=scale, **overrides))
