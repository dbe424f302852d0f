"""The first stage: a VQ autoencoder (diffusers :class:`~diffusers.VQModel`) for single-gene maps, and its loss.

C3-Diff diffuses in the latent space of the CelebA-HQ LDM's VQ-f4 autoencoder (256 x 256 -> 3 x 64 x 64). Where
that pretrained autoencoder cannot be downloaded, a random one is useless, so :func:`c3diff.tl.train`'s
``"first_stage"`` stage trains it (:func:`autoencoder_loss`) on the maps it must encode: single-gene HR maps in
[-1, 1], repeated to the autoencoder's channels, then sets its scaling factor (:func:`estimate_scaling_factor`) by
building the model anew. It is frozen while the diffusion model trains. A model config may instead choose pixel
space (no autoencoder), as the ``tiny`` preset does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import VQModel

__all__ = [
    "AutoencoderLossOutput",
    "autoencoder_loss",
    "build_autoencoder",
    "downsampling_factor",
    "estimate_scaling_factor",
]


@dataclass
class AutoencoderLossOutput:
    """Loss components of one first-stage training step."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    codebook: torch.Tensor


def build_autoencoder(config: Mapping[str, Any]) -> VQModel:
    """A ``VQModel`` from a config dict (the ``autoencoder_config`` of a C3-Diff model).

    Examples
    --------
    >>> vq = build_autoencoder({"block_out_channels": (8, 8), "down_block_types": ("DownEncoderBlock2D",) * 2,
    ...                         "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 4,
    ...                         "latent_channels": 3, "num_vq_embeddings": 16})
    >>> downsampling_factor(vq)
    2
    """
    return VQModel(**dict(config))


def downsampling_factor(vqvae: VQModel) -> int:
    """Spatial downsampling factor of a ``VQModel`` (4 for VQ-f4)."""
    return 2 ** (len(vqvae.config.block_out_channels) - 1)


def autoencoder_loss(vqvae: VQModel, images: torch.Tensor, *, reconstruction: str = "l1") -> AutoencoderLossOutput:
    """First-stage loss: reconstruction error plus the vector-quantiser's codebook/commitment loss.

    Parameters
    ----------
    vqvae
        The autoencoder being trained.
    images
        ``(B, C, S, S)`` in [-1, 1].
    reconstruction
        ``"l1"`` (sharper for sparse expression maps) or ``"mse"``.

    Examples
    --------
    >>> import torch
    >>> vq = build_autoencoder({"block_out_channels": (8, 8), "down_block_types": ("DownEncoderBlock2D",) * 2,
    ...                         "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 4,
    ...                         "num_vq_embeddings": 16})
    >>> out = autoencoder_loss(vq, torch.rand(2, 3, 16, 16) * 2 - 1)
    >>> bool(out.total >= out.reconstruction)
    True
    """
    if reconstruction not in ("l1", "mse"):
        raise ValueError(f"`reconstruction` must be 'l1' or 'mse', got {reconstruction!r}.")
    decoded, codebook = vqvae(images, return_dict=False)
    rec = F.l1_loss(decoded, images) if reconstruction == "l1" else F.mse_loss(decoded, images)
    codebook = codebook.mean()
    return AutoencoderLossOutput(total=rec + codebook, reconstruction=rec, codebook=codebook)


@torch.no_grad()
def estimate_scaling_factor(vqvae: VQModel, images: Iterable[torch.Tensor]) -> float:
    """``1 / std`` of the (pre-quantisation) latents of ``images`` (``(B, C, S, S)`` batches in [-1, 1])."""
    latents = [vqvae.encode(x.to(vqvae.device)).latents.flatten() for x in images]
    std = float(torch.cat(latents).std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError("The latents are constant; cannot estimate a scaling factor (are the maps all constant?).")
    return 1.0 / std
