"""The conditional-mean stage: where inside each 100 um LR pixel its counts go, predicted in one forward pass.

A deterministic network reads the same hint as the ControlNet (histology and LR features, gene code), plus the
histology and the LR conditioning image folded to the latent grid (``pixel_unshuffle``, lossless, so every 10 um
pixel reaches the output pixel it lies on), and gives one logit ``z_p`` per output pixel. Its histology trunk runs
once per tile and a light gene head once per (tile, gene), so predicting many genes costs little more than one.
Within each LR pixel ``L`` the logits become shares ``pi_p = softmax_{p in L}(z_p)``; the expected count of
pixel ``p`` is ``mu_p = Y_L pi_p`` with ``Y_L`` the LR count, so the prediction is LR-consistent by construction and
the network learns only the placement that per-LR-pixel calibration leaves open (the method page, "Conditional mean").

Count likelihoods (:func:`multinomial_nll`, :func:`poisson_nll`) train it on observed 10 um (or 20 um) counts. The
logits start from the log of the bicubic LR image (times the squared darkness of the H&E with ``histology_prior``),
so an untrained network already spreads each count like a simple baseline and training learns the correction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

__all__ = [
    "ConditionalMeanNet",
    "block_log_softmax",
    "block_pixel_counts",
    "block_totals",
    "log_darkness",
    "multinomial_nll",
    "poisson_nll",
    "pool_log_shares",
    "share_map",
]

#: Floor of the LR image under the log prior (an LR pixel at the tile's minimum still gets a finite logit).
_PRIOR_FLOOR = 1e-2
#: Floor of the H&E darkness under the histology prior (white background keeps a finite logit).
_DARKNESS_FLOOR = 1e-2
#: Initial exponent of the histology prior: counts spread like the squared darkness of the H&E (a one-line heuristic
#: that places counts where the nuclei are and beats bicubic on the benchmarks).
_PRIOR_EXPONENT_INIT = 2.0
#: Neighbourhoods (pixels per side) the texture term reads: the pixel itself and box means around it.
_TEXTURE_CONTEXT = (1, 3, 7)
#: Gain of the texture term: Adam moves each weight by about the learning rate per step, so the linear term (39
#: weights per gene over standardised features) learns about as fast as the network's correction.
_TEXTURE_GAIN = 10.0


def log_darkness(histology: torch.Tensor) -> torch.Tensor:
    """``log(1 - mean RGB)`` of an H&E batch ``(B, 3, S, S)`` in [0, 1], floored: ``(B, 1, S, S)``.

    Dark pixels are nuclei, so darkness is a proxy of cell density: where a spot's counts most likely come from.

    Examples
    --------
    >>> import torch
    >>> x = log_darkness(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2))
    >>> [round(v, 4) for v in x.exp().flatten().tolist()]
    [0.5, 0.5]
    """
    return torch.log((1 - histology.mean(dim=1, keepdim=True)).clamp_min(_DARKNESS_FLOOR))


class ConditionalMeanNet(nn.Module):
    """Histology trunk once per tile, a light gene head per (tile, gene): logits of where each LR pixel's counts go.

    The trunk (a :class:`~diffusers.UNet2DModel` on the latent grid) reads the histology half of the C3-Diff hint
    (``C_h``, ``M_h`` hint features) and the folded histology; it depends on the tile only, so one pass serves every
    gene of the tile. The head reads the trunk's features modulated by a learned gene embedding (FiLM: scale and
    shift per channel, zero at initialisation), the ST half of the hint (``C_y``, ``M_y``), the gene code and the
    folded LR image, and gives ``fold**2`` logits per latent pixel, unfolded to image pixels. The logits are added
    to ``log(LR image)``, so an untrained network spreads each count like bicubic interpolation.

    Parameters
    ----------
    histology_hint_channels, st_hint_channels
        Channels of the histology half and of the ST half (with the gene code) of the hint.
    fold
        Image pixels per latent pixel along each side (the first stage's factor).
    num_genes
        Size of the gene embedding.
    block_out_channels, layers_per_block, norm_num_groups
        The trunk U-Net's width, depth and GroupNorm groups (plain blocks, no attention).
    head_channels
        Width of the trunk's output and of the gene head.
    histology_prior
        Add ``a_g log(darkness)`` to the logits, with a learned exponent ``a_g`` per gene starting at 2: an untrained
        network then spreads each count like bicubic interpolation times the squared darkness of the H&E, and
        training learns the correction (and how strongly each gene follows the cells). ``False`` keeps the bicubic
        prior alone (models saved before this option).
    texture_channels
        Channels of the histology texture (:func:`c3diff.pp.histology_texture`, 0: none). With texture the trunk
        reads it next to the histology, and the logits get a per-gene linear term over the texture and its 30 and
        70 um neighbourhood means (weights zero at initialisation): texture inside a 10 um pixel (nuclear size,
        haematoxylin/eosin balance) tells cell types apart where the 10 um RGB cannot.

    Examples
    --------
    >>> import torch
    >>> net = ConditionalMeanNet(histology_hint_channels=8, st_hint_channels=6, fold=4, num_genes=3,
    ...                          block_out_channels=(16, 32), head_channels=16)
    >>> features = net.trunk(torch.rand(1, 8, 16, 16), torch.rand(1, 3, 64, 64))
    >>> logits = net.head(features.expand(2, -1, -1, -1), torch.rand(2, 6, 16, 16), torch.rand(2, 1, 64, 64),
    ...                   torch.tensor([0, 2]), torch.rand(1, 3, 64, 64).expand(2, -1, -1, -1))
    >>> tuple(logits.shape)
    (2, 1, 64, 64)
    """

    def __init__(
        self,
        *,
        histology_hint_channels: int,
        st_hint_channels: int,
        fold: int,
        num_genes: int,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        head_channels: int = 32,
        histology_prior: bool = False,
        texture_channels: int = 0,
    ) -> None:
        super().__init__()
        self.fold = int(fold)
        self.prior_exponent = None
        if histology_prior:
            self.prior_exponent = nn.Embedding(num_genes, 1)
            nn.init.constant_(self.prior_exponent.weight, _PRIOR_EXPONENT_INIT)
        self.texture_channels = int(texture_channels)
        self.texture_weights = None
        if self.texture_channels:
            self.texture_weights = nn.Embedding(num_genes, len(_TEXTURE_CONTEXT) * self.texture_channels)
            nn.init.zeros_(self.texture_weights.weight)
        n = len(block_out_channels)
        self.trunk_unet = UNet2DModel(
            in_channels=histology_hint_channels + (3 + self.texture_channels) * self.fold**2,
            out_channels=head_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            norm_num_groups=norm_num_groups,
        )
        self.gene_film = nn.Embedding(num_genes, 2 * head_channels)
        nn.init.zeros_(self.gene_film.weight)
        # the head also sees the folded histology itself: a per-pixel path from what the H&E shows to the logits
        self.head_in = nn.Conv2d(head_channels + st_hint_channels + 4 * self.fold**2, head_channels, 3, padding=1)
        self.head_mid = nn.Conv2d(head_channels, head_channels, 3, padding=1)
        self.head_out = nn.Conv2d(head_channels, self.fold**2, 3, padding=1)
        # start from the prior (bicubic shares): the correction is zero at initialisation
        nn.init.zeros_(self.head_out.weight)
        nn.init.zeros_(self.head_out.bias)

    def _check_texture(self, texture: torch.Tensor | None, n: int, size: int) -> None:
        if self.texture_channels and (
            texture is None or tuple(texture.shape) != (n, self.texture_channels, size, size)
        ):
            found = None if texture is None else tuple(texture.shape)
            raise ValueError(
                f"This mean network reads {self.texture_channels} texture channels: pass `texture` "
                f"({n}, {self.texture_channels}, {size}, {size}) from c3diff.pp.histology_texture, got {found}."
            )

    def trunk(
        self, histology_hint: torch.Tensor, histology: torch.Tensor, texture: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-tile features ``(T, head_channels, l, l)`` from the histology hint ``(T, C, l, l)``, the histology
        ``(T, 3, S, S)`` in [0, 1] and (with ``texture_channels``) the texture ``(T, K, S, S)``."""
        parts = [histology_hint, F.pixel_unshuffle(histology * 2 - 1, self.fold)]
        if self.texture_channels:
            self._check_texture(texture, len(histology), histology.shape[-1])
            parts.append(F.pixel_unshuffle(texture, self.fold))
        x = torch.cat(parts, dim=1)
        t = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return self.trunk_unet(x, t).sample

    def head(
        self,
        features: torch.Tensor,
        st_hint: torch.Tensor,
        lr_image: torch.Tensor,
        gene_index: torch.Tensor,
        histology: torch.Tensor,
        texture: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, 1, S, S)`` of ``B`` (tile, gene) items: trunk features of each item's tile, the ST hint with
        the gene code ``(B, C, l, l)``, the LR conditioning image ``(B, 1, S, S)`` in [0, 1], gene indices, the
        histology of each item's tile ``(B, 3, S, S)`` in [0, 1] and (with ``texture_channels``) its texture
        ``(B, K, S, S)``."""
        scale, shift = self.gene_film(gene_index)[:, :, None, None].chunk(2, dim=1)
        h = features * (1 + scale) + shift
        h = torch.cat(
            [
                h,
                st_hint,
                F.pixel_unshuffle(lr_image * 2 - 1, self.fold),
                F.pixel_unshuffle(histology * 2 - 1, self.fold),
            ],
            dim=1,
        )
        h = self.head_out(F.silu(self.head_mid(F.silu(self.head_in(h)))))
        correction = F.pixel_shuffle(h, self.fold) if self.fold > 1 else h
        prior = torch.log(lr_image.clamp_min(0) + _PRIOR_FLOOR)
        if self.prior_exponent is not None:
            exponents = self.prior_exponent(gene_index)[:, :, None, None]
            prior = prior + (exponents * log_darkness(histology)).sum(dim=1, keepdim=True)
        if self.texture_weights is not None:
            self._check_texture(texture, len(histology), histology.shape[-1])
            weights = self.texture_weights(gene_index)[:, :, None, None]
            prior = prior + _TEXTURE_GAIN * (weights * texture_context(texture)).sum(dim=1, keepdim=True)
        return correction + prior


def texture_context(texture: torch.Tensor) -> torch.Tensor:
    """The texture ``(B, K, S, S)`` and its box means over :data:`_TEXTURE_CONTEXT` pixels (edges averaging the
    pixels inside the tile only): ``(B, 3K, S, S)``."""
    parts = [
        texture if k == 1 else F.avg_pool2d(texture, k, stride=1, padding=k // 2, count_include_pad=False)
        for k in _TEXTURE_CONTEXT
    ]
    return torch.cat(parts, dim=1)


def block_log_softmax(logits: torch.Tensor, block: int) -> torch.Tensor:
    """``log pi``: log-softmax of ``(B, 1, H, W)`` logits within each ``block x block`` cell anchored at (0, 0).

    Cells cut by the right or bottom edge normalise over their visible pixels.

    Examples
    --------
    >>> import torch
    >>> pi = block_log_softmax(torch.randn(2, 1, 15, 15), 10).exp()
    >>> round(float(pi[0, 0, :10, :10].sum()), 5), round(float(pi[0, 0, 10:, 10:].sum()), 5)
    (1.0, 1.0)
    """
    b, c, h, w = logits.shape
    ny, nx = -(-h // block), -(-w // block)
    padded = F.pad(logits, (0, nx * block - w, 0, ny * block - h), value=float("-inf"))
    cells = padded.reshape(b, c, ny, block, nx, block).permute(0, 1, 2, 4, 3, 5).reshape(b, c, ny, nx, block**2)
    log_pi = torch.log_softmax(cells, dim=-1)
    log_pi = log_pi.reshape(b, c, ny, nx, block, block).permute(0, 1, 2, 4, 3, 5).reshape(b, c, ny * block, nx * block)
    return log_pi[..., :h, :w]


def pool_log_shares(log_pi: torch.Tensor, factor: int) -> torch.Tensor:
    """Log-shares of ``factor x factor`` super-pixels (the 20 um grid of a 5x map from 10 um shares)."""
    if factor == 1:
        return log_pi
    b, c, h, w = log_pi.shape
    cells = log_pi.reshape(b, c, h // factor, factor, w // factor, factor)
    return torch.logsumexp(cells.permute(0, 1, 2, 4, 3, 5).flatten(-2), dim=-1)


def share_map(log_pi: torch.Tensor, block: int) -> torch.Tensor:
    """``n_L pi_p``: shares times the pixels of their LR cell (1 everywhere for an even spread)."""
    h, w = log_pi.shape[-2:]
    counts = block_pixel_counts(h, w, block, device=log_pi.device)
    return log_pi.exp() * counts.to(log_pi.dtype)  # (counts <= 100: exact in bf16/fp16; keeps a half model half)


def block_pixel_counts(h: int, w: int, block: int, *, device: torch.device | None = None) -> torch.Tensor:
    """``(h, w)`` map of the number of visible pixels in each pixel's ``block x block`` cell."""
    rows = torch.clamp(h - torch.arange(h, device=device) // block * block, max=block)
    cols = torch.clamp(w - torch.arange(w, device=device) // block * block, max=block)
    return (rows[:, None] * cols[None, :]).float()


def block_totals(counts: torch.Tensor, block: int) -> torch.Tensor:
    """Each pixel's LR-cell total: the sum of ``counts`` over its ``block x block`` cell (cells anchored at (0, 0),
    those cut by the edge summed over their visible pixels).

    Examples
    --------
    >>> import torch
    >>> block_totals(torch.arange(9.0).view(1, 1, 3, 3), 2)[0, 0].tolist()
    [[8.0, 8.0, 7.0], [8.0, 8.0, 7.0], [13.0, 13.0, 8.0]]
    """
    h, w = counts.shape[-2:]
    ny, nx = -(-h // block), -(-w // block)
    padded = F.pad(counts, (0, nx * block - w, 0, ny * block - h))
    totals = F.avg_pool2d(padded, block) * block**2
    return totals.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :h, :w]


def multinomial_nll(log_pi: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``-sum_p y_p log pi_p / sum_p y_p`` over the batch: the log-likelihood of where the counts fell inside their LR
    pixels, given their totals (the calibrated form; exact LR consistency).

    Examples
    --------
    >>> import torch
    >>> y = torch.tensor([[[[3.0, 1.0]]]])
    >>> even, right = torch.log(torch.tensor([[[[0.5, 0.5]]]])), torch.log(torch.tensor([[[[0.75, 0.25]]]]))
    >>> bool(multinomial_nll(right, y) < multinomial_nll(even, y))
    True
    """
    if log_pi.shape != counts.shape:
        raise ValueError(f"log-shares {tuple(log_pi.shape)} and counts {tuple(counts.shape)} differ in shape.")
    total = counts.sum().clamp_min(1.0)
    return -(counts * log_pi).sum() / total


def poisson_nll(logits: torch.Tensor, counts: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """Poisson NLL of counts under rates ``mu_p = exp(z_p) * d_p``, normalised by the total count: the uncalibrated
    alternative to :func:`multinomial_nll`, which must also get each LR pixel's level right.

    ``d_p`` is the measured LR density (the LR pixel's count over its pixels), so ``z = 0`` is an even spread.

    Examples
    --------
    >>> import torch
    >>> y, d = torch.tensor([[[[3.0, 1.0]]]]), torch.tensor([[[[2.0, 2.0]]]])
    >>> right = torch.log(torch.tensor([[[[1.5, 0.5]]]]))
    >>> bool(poisson_nll(right, y, d) < poisson_nll(torch.zeros_like(y), y, d))
    True
    """
    if logits.shape != counts.shape or density.shape != counts.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, counts {tuple(counts.shape)} and density "
            f"{tuple(density.shape)} must have the same shape."
        )
    log_mu = logits + torch.log(density.clamp_min(1e-6))
    return (log_mu.exp() - counts * log_mu).sum() / counts.sum().clamp_min(1.0)
