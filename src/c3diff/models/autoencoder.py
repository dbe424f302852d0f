"""The first stage: a VQ autoencoder (diffusers :class:`~diffusers.VQModel`) for single-gene maps, and its training.

C3-Diff diffuses in the latent space of the CelebA-HQ LDM's VQ-f4 autoencoder (256 x 256 -> 3 x 64 x 64). Where
that pretrained autoencoder cannot be downloaded, a random one is useless, so the first stage is trained here on
the maps it must encode: single-gene HR maps in [-1, 1], repeated to the autoencoder's channels. It is frozen while
the diffusion model trains. A model config may instead choose pixel space (no autoencoder), as the ``tiny`` preset
does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import VQModel
from tqdm.auto import tqdm

__all__ = [
    "AutoencoderLossOutput",
    "autoencoder_loss",
    "build_autoencoder",
    "downsampling_factor",
    "estimate_scaling_factor",
    "fit_autoencoder",
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


def _to_images(maps: torch.Tensor, channels: int, image_size: int | None) -> torch.Tensor:
    """``(N, 1, H, W)`` / ``(N, H, W)`` maps in [-1, 1] -> ``(N, channels, S, S)`` (nearest upsampling to S)."""
    if maps.ndim == 3:
        maps = maps[:, None]
    if maps.ndim != 4 or maps.shape[1] not in (1, channels):
        raise ValueError(
            f"Gene maps must be (N, 1, H, W) or (N, {channels}, H, W) in [-1, 1], got shape {tuple(maps.shape)}."
        )
    if image_size is not None and maps.shape[-1] != image_size:
        factor = image_size / maps.shape[-1]
        if factor != int(factor):
            raise ValueError(
                f"Maps of {maps.shape[-1]} px cannot be upsampled by an integer factor to {image_size} px."
            )
        maps = F.interpolate(maps, size=(image_size, image_size), mode="nearest")
    return maps.expand(-1, channels, -1, -1).float()


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


def _batches(data: torch.Tensor | Iterable, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of map batches from a tensor (random minibatches) or an iterable (cycled)."""
    if isinstance(data, torch.Tensor):
        if len(data) == 0:
            raise ValueError("`maps` is empty.")
        while True:
            yield data[torch.randint(len(data), (batch_size,), generator=generator)]
    while True:
        n = 0
        for item in data:
            n += 1
            yield item["hr"] if isinstance(item, Mapping) else item
        if n == 0:
            raise ValueError("`maps` yielded no batch.")


def fit_autoencoder(
    vqvae: VQModel,
    maps: torch.Tensor | Iterable,
    *,
    steps: int = 1000,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    reconstruction: str = "l1",
    image_size: int | None = None,
    update_scaling_factor: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train the first-stage autoencoder to reconstruct single-gene maps, then freeze it.

    Parameters
    ----------
    vqvae
        The ``VQModel`` to train (e.g. ``model.vqvae`` of a C3-Diff model built without a pretrained backbone).
    maps
        HR gene maps in [-1, 1]: a tensor ``(N, 1, H, W)`` sampled in random minibatches, or an iterable (a
        ``DataLoader`` over ``c3diff.pp.PatchDataset``) yielding tensors or dicts with an ``"hr"`` entry.
    steps
        Optimisation steps (AdamW).
    batch_size
        Minibatch size when ``maps`` is a tensor.
    learning_rate
        AdamW learning rate.
    reconstruction
        ``"l1"`` or ``"mse"``, see :func:`autoencoder_loss`.
    image_size
        Upsample maps (nearest) to this size first, as the diffusion model does for 5x targets; ``None``: as given.
    update_scaling_factor
        Afterwards set ``vqvae.config.scaling_factor`` to ``1 / std`` of the latents of up to 16 batches, so that the
        diffusion model sees unit-variance latents.
    seed
        Seeds the minibatch sampling.
    progress
        Show a progress bar.

    Returns
    -------
    The total loss of every step.

    Examples
    --------
    >>> import torch
    >>> vq = build_autoencoder({"block_out_channels": (8, 8), "down_block_types": ("DownEncoderBlock2D",) * 2,
    ...                         "up_block_types": ("UpDecoderBlock2D",) * 2, "norm_num_groups": 4,
    ...                         "num_vq_embeddings": 16})
    >>> history = fit_autoencoder(vq, torch.rand(8, 1, 16, 16) * 2 - 1, steps=2, batch_size=4, progress=False)
    >>> len(history), any(p.requires_grad for p in vq.parameters())
    (2, False)
    """
    generator = torch.Generator().manual_seed(seed)
    channels = vqvae.config.in_channels
    device = vqvae.device
    vqvae.train()
    vqvae.requires_grad_(True)
    optimizer = torch.optim.AdamW(vqvae.parameters(), lr=learning_rate)
    stream = _batches(maps, batch_size, generator)
    history: list[float] = []
    try:
        for _ in tqdm(range(steps), desc="first stage", disable=not progress):
            images = _to_images(next(stream), channels, image_size).to(device)
            loss = autoencoder_loss(vqvae, images, reconstruction=reconstruction)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            history.append(float(loss.total.detach()))
    finally:
        vqvae.eval()
        vqvae.requires_grad_(False)
    if update_scaling_factor:
        stream = _batches(maps, batch_size, generator)
        n_batches = 16 if isinstance(maps, torch.Tensor) else min(16, _length(maps))
        factor = estimate_scaling_factor(
            vqvae, (_to_images(next(stream), channels, image_size) for _ in range(n_batches))
        )
        vqvae.register_to_config(scaling_factor=factor)
    return history


def _length(data: Iterable) -> int:
    try:
        return max(1, len(data))  # type: ignore[arg-type]
    except TypeError:
        return 16


@torch.no_grad()
def estimate_scaling_factor(vqvae: VQModel, images: Iterable[torch.Tensor]) -> float:
    """``1 / std`` of the (pre-quantisation) latents of ``images`` (``(B, C, S, S)`` batches in [-1, 1])."""
    latents = [vqvae.encode(x.to(vqvae.device)).latents.flatten() for x in images]
    std = float(torch.cat(latents).std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError("The latents are constant; cannot estimate a scaling factor (are the maps all constant?).")
    return 1.0 / std
