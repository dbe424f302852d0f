"""C3-Diff's hint encoders, the gene code, the LR conditioning image and the on-sphere ST feature augmentation.

Four small CNNs trained from scratch (:doc:`/method`, *Architecture*) map a ``3 x S x S`` input to feature maps at the
latent size: ``E_h^c(h) = C_h`` and ``E_h^m(h) = M_h`` from histology, ``E_y^c(y) = C_y`` and ``E_y^m(y) = M_y`` from
the upsampled LR ST map. Each encoder is a conv3x3 stack with SiLU and stride-2 steps down to the latent size, ending in
a zero-initialised conv (so the hint starts as a no-op, as a ControlNet's zero convs do).

Where the contrastive losses read the features
    A zero-initialised last conv outputs exactly zero at initialisation: every normalised feature would then be 0 (or
    undefined), every similarity 0, and the contrastive gradients exactly 0, so the contrastive losses could not
    start shaping the encoders. Each encoder therefore exposes two outputs: its *embedding*, the activations of the
    conv just before the zero conv (randomly initialised, so it lies on the sphere from step 1), which the
    contrastive losses, the imputation and the noise augmentation use; and its *hint feature*
    ``zero_conv(SiLU(embedding))``, which enters the ControlNet hint. The hint is a learned function of the
    embedding, so what the contrastive losses teach the embedding reaches the denoiser once the zero conv has moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.controlnets.controlnet import zero_module
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

__all__ = [
    "HintEncoder",
    "HintEncoders",
    "ModalityFeatures",
    "gene_code_map",
    "lr_condition_image",
    "sphere_noise_augment",
]


class HintEncoder(nn.Module):
    """One hint encoder: ``3 x S x S`` -> ``out_channels x S/2^k x S/2^k`` (``k = num_downsamples``).

    Parameters
    ----------
    in_channels
        Input channels (3: RGB histology, or the LR map repeated to 3 channels).
    out_channels
        Feature channels (55 in the paper).
    block_out_channels
        Widths of the conv stack; stage ``i`` goes from ``block_out_channels[i]`` to ``block_out_channels[i + 1]``
        and has stride 2 for the first ``num_downsamples`` stages.
    num_downsamples
        Number of stride-2 steps, ``log2(S / latent size)`` (2 for a factor-4 autoencoder, 0 in pixel space).
    fold
        Fold each ``fold x fold`` block of the input into channels (``pixel_unshuffle``) before the conv stack, which
        then runs at ``S / fold`` without stride-2 steps (``num_downsamples`` must be 0). Every input pixel keeps
        its own channels, so detail finer than a latent pixel reaches the hint exactly, the way a space-to-depth
        denoiser sees the map. 1 (default): no fold.

    Examples
    --------
    >>> import torch
    >>> enc = HintEncoder(out_channels=5, block_out_channels=(8, 16, 16), num_downsamples=2)
    >>> embedding, hint = enc(torch.rand(2, 3, 32, 32))
    >>> tuple(embedding.shape), hint.abs().max().item()
    ((2, 5, 8, 8), 0.0)
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 55,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        num_downsamples: int = 2,
        fold: int = 1,
    ):
        super().__init__()
        if fold < 1 or (fold > 1 and num_downsamples):
            raise ValueError(
                f"`fold={fold}` must be >= 1, and a folding encoder has no stride-2 steps "
                f"(`num_downsamples` must be 0, got {num_downsamples})."
            )
        self.fold = fold
        stages = len(block_out_channels) - 1
        if num_downsamples > stages:
            raise ValueError(
                f"A hint encoder with `block_out_channels={tuple(block_out_channels)}` has {stages} stage(s) and can "
                f"downsample at most {stages} time(s), but {num_downsamples} stride-2 steps are needed to reach the "
                "latent size. Give `hint_encoder_channels` more entries."
            )
        self.conv_in = nn.Conv2d(in_channels * fold**2, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList([])
        for i in range(stages):
            c_in, c_out = block_out_channels[i], block_out_channels[i + 1]
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2 if i < num_downsamples else 1))
        self.conv_embed = nn.Conv2d(block_out_channels[-1], out_channels, kernel_size=3, padding=1)
        self.conv_out = zero_module(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (pre-zero-conv features) that the contrastive losses compare."""
        if self.fold > 1:
            x = F.pixel_unshuffle(x, self.fold)
        h = F.silu(self.conv_in(x))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_embed(h)

    def to_hint(self, embedding: torch.Tensor) -> torch.Tensor:
        """The hint feature made from an embedding (zero at initialisation)."""
        return self.conv_out(F.silu(embedding))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding, hint feature)`` of ``x``."""
        embedding = self.embed(x)
        return embedding, self.to_hint(embedding)


@dataclass
class ModalityFeatures:
    """Content and modality embeddings of one input modality (histology or LR ST), ``(B, C, l, l)`` each."""

    content: torch.Tensor
    modal: torch.Tensor

    def expand(self, index: torch.Tensor) -> ModalityFeatures:
        """Select/repeat rows, e.g. expand per-tile histology features to a batch of genes."""
        return ModalityFeatures(content=self.content[index], modal=self.modal[index])


class HintEncoders(nn.Module):
    """The four C3-Diff hint encoders and the assembly of the ControlNet hint.

    ``hint = concat[C_h, C_y, M_h, M_y, gene code x gene_code_channels]`` (hint features, see the module docstring),
    ``4 * feature_channels + gene_code_channels`` channels (224 in the paper).

    Parameters
    ----------
    feature_channels
        Channels per encoder (55 in the paper).
    block_out_channels
        Widths of each encoder's conv stack.
    num_downsamples
        Stride-2 steps from the image size to the latent size.
    fold
        Fold the inputs by this factor instead of downsampling (see :class:`HintEncoder`); then ``num_downsamples``
        must be 0.
    gene_code_channels
        Channels of the constant gene code map.

    Examples
    --------
    >>> import torch
    >>> enc = HintEncoders(feature_channels=5, block_out_channels=(8, 8), num_downsamples=1, gene_code_channels=4)
    >>> h, y = enc.encode_histology(torch.rand(2, 3, 16, 16)), enc.encode_st(torch.rand(2, 3, 16, 16))
    >>> hint = enc.assemble(enc.histology_hint(h), enc.st_hint(y), torch.tensor([0, 3]), num_genes=10)
    >>> tuple(hint.shape), enc.hint_channels
    ((2, 24, 8, 8), 24)
    """

    def __init__(
        self,
        *,
        feature_channels: int = 55,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        num_downsamples: int = 2,
        fold: int = 1,
        gene_code_channels: int = 4,
    ):
        super().__init__()
        kwargs = {
            "out_channels": feature_channels,
            "block_out_channels": tuple(block_out_channels),
            "num_downsamples": num_downsamples,
            "fold": fold,
        }
        self.histology_content = HintEncoder(**kwargs)  # E_h^c
        self.st_content = HintEncoder(**kwargs)  # E_y^c
        self.histology_modal = HintEncoder(**kwargs)  # E_h^m
        self.st_modal = HintEncoder(**kwargs)  # E_y^m
        self.feature_channels = feature_channels
        self.gene_code_channels = gene_code_channels

    @property
    def hint_channels(self) -> int:
        """Channels of the assembled hint."""
        return 4 * self.feature_channels + self.gene_code_channels

    def encode_histology(self, histology: torch.Tensor) -> ModalityFeatures:
        """``C_h, M_h`` embeddings of histology tiles ``(B, 3, S, S)`` in [0, 1]."""
        return ModalityFeatures(
            content=self.histology_content.embed(histology), modal=self.histology_modal.embed(histology)
        )

    def encode_st(self, lr_image: torch.Tensor) -> ModalityFeatures:
        """``C_y, M_y`` embeddings of LR conditioning images ``(B, 3, S, S)`` (see :func:`lr_condition_image`)."""
        return ModalityFeatures(content=self.st_content.embed(lr_image), modal=self.st_modal.embed(lr_image))

    def histology_hint(self, features: ModalityFeatures) -> ModalityFeatures:
        """Hint features of histology embeddings (per tile; expand them to genes afterwards)."""
        return ModalityFeatures(
            content=self.histology_content.to_hint(features.content), modal=self.histology_modal.to_hint(features.modal)
        )

    def st_hint(self, features: ModalityFeatures) -> ModalityFeatures:
        """Hint features of (measured, augmented or imputed) ST embeddings."""
        return ModalityFeatures(
            content=self.st_content.to_hint(features.content), modal=self.st_modal.to_hint(features.modal)
        )

    def assemble(
        self, histology: ModalityFeatures, st: ModalityFeatures, gene_index: torch.Tensor, *, num_genes: int
    ) -> torch.Tensor:
        """Concatenate hint features and the gene code into the ControlNet hint."""
        size = histology.content.shape[-1]
        code = gene_code_map(gene_index, num_genes=num_genes, size=size, channels=self.gene_code_channels)
        return torch.cat([histology.content, st.content, histology.modal, st.modal, code.to(histology.content)], dim=1)


def gene_code_map(gene_index: torch.Tensor, *, num_genes: int, size: int, channels: int = 4) -> torch.Tensor:
    """The gene "barcode": a constant map of value ``index / num_genes``, ``(B, channels, size, size)``.

    Examples
    --------
    >>> import torch
    >>> gene_code_map(torch.tensor([0, 5]), num_genes=10, size=2, channels=1)[:, 0, 0, 0].tolist()
    [0.0, 0.5]
    """
    gene_index = torch.as_tensor(gene_index)
    if gene_index.ndim != 1:
        raise ValueError(f"`gene_index` must be 1-D (one index per sample), got shape {tuple(gene_index.shape)}.")
    if len(gene_index) and (int(gene_index.min()) < 0 or int(gene_index.max()) >= num_genes):
        raise ValueError(
            f"`gene_index` must lie in [0, {num_genes}) (the model's genes), got values in "
            f"[{int(gene_index.min())}, {int(gene_index.max())}]."
        )
    value = gene_index.to(torch.float32) / num_genes
    return value[:, None, None, None].expand(-1, channels, size, size)


def lr_condition_image(lr: torch.Tensor, *, image_size: int, upsample_factor: float, channels: int = 3) -> torch.Tensor:
    """The LR ST map as an encoder input: bicubic upsampling by the pixel-size ratio, top-left crop, 3 channels.

    Upsampling by ``lr_pixel_size / hr_pixel_size`` (10) keeps LR pixel ``(0, 0)`` and image pixel ``(0, 0)`` on the
    same top-left corner and every LR pixel exactly ``factor`` image pixels wide; the LR grid may extend past the
    tile (26 x 100 um > 2560 um), so the result is cropped to ``image_size``. Resizing 26 -> 256 instead would stretch
    the map by 1.6 %. Bicubic overshoot is clipped to [0, 1].

    Parameters
    ----------
    lr
        ``(B, 1, L, L)`` (or ``(B, L, L)``) maps in [0, 1].
    image_size
        ``S``, the histology tile size in pixels.
    upsample_factor
        ``lr_pixel_size / hr_pixel_size``; must be an integer (up to rounding).
    channels
        Channels of the output (the map is repeated).

    Examples
    --------
    >>> import torch
    >>> img = lr_condition_image(torch.rand(2, 1, 7, 7), image_size=64, upsample_factor=10)
    >>> tuple(img.shape)
    (2, 3, 64, 64)
    """
    if lr.ndim == 3:
        lr = lr[:, None]
    if lr.ndim != 4 or lr.shape[1] != 1:
        raise ValueError(f"`lr` must be (B, 1, L, L) (one gene per sample), got shape {tuple(lr.shape)}.")
    factor = round(upsample_factor)
    if abs(factor - upsample_factor) > 1e-6 or factor < 1:
        raise ValueError(
            f"The LR/HR pixel-size ratio must be a positive integer for an exact upsampling, got {upsample_factor}."
        )
    size = (lr.shape[-2] * factor, lr.shape[-1] * factor)
    if size[0] < image_size or size[1] < image_size:
        raise ValueError(
            f"`lr` of {tuple(lr.shape[-2:])} px upsampled x{factor} covers {size} px, less than the tile's "
            f"{image_size} px; expected L = ceil({image_size} / {factor}) = {math.ceil(image_size / factor)}."
        )
    up = F.interpolate(lr, size=size, mode="bicubic", align_corners=False)
    up = up[..., :image_size, :image_size].clamp(0.0, 1.0)
    return up.expand(-1, channels, -1, -1)


def sphere_noise_augment(
    embedding: torch.Tensor, *, sigma: float, generator: torch.Generator | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """On-sphere noise augmentation of ST embeddings (training only).

    The flattened embedding ``e`` is moved on its hypersphere, ``u = normalise(e/|e| + sigma * n)`` with
    ``n ~ N(0, I / D)`` (``|n| ~ 1``, so ``sigma`` is the perturbation's size relative to the unit feature, about
    ``sigma`` radians, whatever the feature dimension ``D``), and given back its norm: ``|e| u``. The contrastive
    losses use its direction; the hint uses the rescaled embedding, so at inference (no augmentation) the hint sees
    embeddings of the same scale.

    Examples
    --------
    >>> import torch
    >>> e = torch.randn(4, 3, 8, 8)
    >>> a = sphere_noise_augment(e, sigma=0.03, generator=torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(a.flatten(1).norm(dim=1), e.flatten(1).norm(dim=1)))
    True
    """
    flat = embedding.flatten(1)
    norm = flat.norm(dim=1, keepdim=True).clamp_min(eps)
    noise = randn_tensor(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype) / math.sqrt(
        flat.shape[1]
    )
    direction = F.normalize(flat / norm + sigma * noise, dim=1, eps=eps)
    return (direction * norm).view_as(embedding)
