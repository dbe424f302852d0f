"""C3-Diff's losses (:doc:`/method`, *Losses*): three contrastive InfoNCE losses, the diffusion MSE and their sum.

Every feature map is flattened and L2-normalised onto a unit hypersphere; similarities are ``<a, b> / tau`` with
``tau = 0.07`` and negatives come from the batch. Each loss is a masked log-softmax InfoNCE: a row's candidates are
all entries except excluded ones (the anchor itself), and the loss is the mean negative log-probability of the row's
positives. Unlike the authors' code (:doc:`/method`, *Differences from the authors' code*) the logits stay in the
autograd graph, the pair masks follow the paper's definitions, and every component enters the total exactly once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LossOutput",
    "LossWeights",
    "content_loss",
    "diffusion_mse",
    "info_nce",
    "inter_sphere_loss",
    "min_snr_weights",
    "modal_loss",
    "overall_loss",
    "sphere_normalize",
]

#: Temperature of the contrastive losses (the paper's tau).
TEMPERATURE = 0.07


@dataclass(frozen=True)
class LossWeights:
    """Weights of ``L_overall`` (supplementary Table 1 defaults)."""

    mse: float = 2.0
    modal: float = 1.0
    content: float = 1.0
    inter_sphere: float = 1.0

    def as_dict(self) -> dict[str, float]:
        """The weights as a plain dict."""
        return asdict(self)


@dataclass
class LossOutput:
    """Every loss component of one training step (scalars with autograd history).

    ``mean`` is the conditional-mean stage's count likelihood (``None`` in the diffusion stages); ``mse`` is the
    diffusion MSE (zero in the mean stage).
    """

    total: torch.Tensor
    mse: torch.Tensor
    content: torch.Tensor
    modal: torch.Tensor
    inter_sphere: torch.Tensor
    mean: torch.Tensor | None = None

    def as_dict(self) -> dict[str, float]:
        """Detached floats for logging, e.g. ``{"total": 1.9, "mse": 0.4, ...}`` (components that are ``None`` are
        left out)."""
        return {
            f.name: float(getattr(self, f.name).detach()) for f in fields(self) if getattr(self, f.name) is not None
        }


def sphere_normalize(features: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Flatten ``(B, ...)`` features to ``(B, D)`` and L2-normalise each row onto the unit sphere.

    Examples
    --------
    >>> import torch
    >>> sphere_normalize(torch.randn(3, 2, 4, 4)).norm(dim=1).round(decimals=4).tolist()
    [1.0, 1.0, 1.0]
    """
    return F.normalize(features.flatten(1), dim=1, eps=eps)


def info_nce(logits: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Masked log-softmax InfoNCE, averaged over each row's positives and then over rows that have positives.

    Parameters
    ----------
    logits
        ``(N, M)`` similarities divided by the temperature.
    positives
        ``(N, M)`` bool, the positive pairs (must be candidates).
    candidates
        ``(N, M)`` bool, the entries of each row's softmax (positives and negatives; excluded pairs False).

    Returns
    -------
    A scalar; 0 when no row has a positive.

    Examples
    --------
    >>> import torch
    >>> eye = torch.eye(3, dtype=torch.bool)
    >>> round(float(info_nce(torch.zeros(3, 3), eye, torch.ones(3, 3, dtype=torch.bool))), 4)  # log(3)
    1.0986
    """
    if positives.shape != logits.shape or candidates.shape != logits.shape:
        raise ValueError("`logits`, `positives` and `candidates` must have the same shape.")
    if bool((positives & ~candidates).any()):
        raise ValueError("Every positive pair must also be a candidate of its row's softmax.")
    # a large finite negative (not -inf) keeps log_softmax and its backward finite in every row
    masked = logits.masked_fill(~candidates, torch.finfo(logits.dtype).min)
    log_prob = masked.log_softmax(dim=1)
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return logits.sum() * 0.0
    row_loss = -torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / n_pos.clamp_min(1)
    return row_loss[has_pos].mean()


def _stacked_similarities(
    a: torch.Tensor, b: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarities / tau of the anchors ``[a; b]`` with each other, their indices and the not-self mask."""
    z = sphere_normalize(torch.cat([a, b]))
    idx = torch.arange(len(z), device=z.device)
    return z @ z.T / temperature, idx, idx[:, None] != idx[None, :]


def content_loss(c_h: torch.Tensor, c_y: torch.Tensor, *, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Cross-content loss ``L_content``: symmetric InfoNCE (NT-Xent) between histology and ST content features.

    Anchors ``z = [C_h^1..C_h^B, C_y^1..C_y^B]``; the positive of ``C_h^j`` is ``C_y^j`` and vice versa; every other
    entry except the anchor itself is a negative.

    Parameters
    ----------
    c_h, c_y
        ``(B, ...)`` content features of histology and of the (noise-augmented) LR ST maps of the same patches.
    temperature
        ``tau``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> c_h = torch.randn(8, 32, generator=g)
    >>> aligned = content_loss(c_h, c_h + 0.1 * torch.randn(8, 32, generator=g))
    >>> shuffled = content_loss(c_h, c_h.roll(1, dims=0))
    >>> bool(aligned < shuffled)
    True
    """
    _check_pair(c_h, c_y, "c_h", "c_y")
    logits, idx, not_self = _stacked_similarities(c_h, c_y, temperature)
    n = len(c_h)
    positives = idx[None, :] == ((idx + n) % (2 * n))[:, None]
    return info_nce(logits, positives, not_self)


def modal_loss(m_h: torch.Tensor, m_y: torch.Tensor, *, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Cross-modal loss ``L_modal``: multi-positive (SupCon-style) InfoNCE over modalities.

    Anchors ``[M_h; M_y]``; the positives of an anchor are all other samples of the same modality (other patches);
    every histology/ST pair, the same patch included, is a negative; self-pairs are excluded. Needs ``B >= 2``
    (0 otherwise).

    Parameters
    ----------
    m_h, m_y
        ``(B, ...)`` modality features of histology and of the (noise-augmented) LR ST maps.
    temperature
        ``tau``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> h, y = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    >>> m_h = h + 0.1 * torch.randn(6, 32, generator=g)
    >>> m_y = y + 0.1 * torch.randn(6, 32, generator=g)
    >>> mixed = torch.cat([m_h[:3], m_y[:3]]), torch.cat([m_y[3:], m_h[3:]])
    >>> bool(modal_loss(m_h, m_y) < modal_loss(*mixed))
    True
    """
    _check_pair(m_h, m_y, "m_h", "m_y")
    logits, idx, not_self = _stacked_similarities(m_h, m_y, temperature)
    modality = idx >= len(m_h)
    positives = (modality[:, None] == modality[None, :]) & not_self
    return info_nce(logits, positives, not_self)


def inter_sphere_loss(c_h: torch.Tensor, m_h: torch.Tensor, *, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Inter-sphere loss ``L_inter-sphere``: ``B x B`` similarities between ``C_h^j`` and ``M_h^k``.

    Positives on the diagonal ``(C_h^j, M_h^j)``; InfoNCE over ``k``.

    Parameters
    ----------
    c_h, m_h
        ``(B, ...)`` content and modality features of the same histology tiles.
    temperature
        ``tau``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> c_h = torch.randn(8, 32, generator=g)
    >>> bool(inter_sphere_loss(c_h, c_h) < inter_sphere_loss(c_h, c_h.roll(1, dims=0)))
    True
    """
    _check_pair(c_h, m_h, "c_h", "m_h")
    a, b = sphere_normalize(c_h), sphere_normalize(m_h)
    n = len(c_h)
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    return info_nce(a @ b.T / temperature, eye, torch.ones_like(eye))


def diffusion_mse(
    prediction: torch.Tensor, target: torch.Tensor, *, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_mse``: mean squared error of the denoiser's prediction, optionally weighted per sample.

    Parameters
    ----------
    prediction, target
        ``(B, ...)`` predicted and true target: the noise (the paper), or the velocity for a v-prediction model
        (see :meth:`c3diff.models.C3DiffModel.diffusion_target`).
    weights
        ``(B,)`` per-sample weights (e.g. :func:`min_snr_weights`); ``None``: the plain mean (:doc:`/method`, *Losses*).

    Examples
    --------
    >>> import torch
    >>> p, t = torch.zeros(2, 1, 2, 2), torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    >>> float(diffusion_mse(p, t)), float(diffusion_mse(p, t, weights=torch.tensor([1.0, 0.5])))
    (2.5, 1.5)
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape.")
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    if weights.shape != prediction.shape[:1]:
        raise ValueError(f"`weights` must be ({prediction.shape[0]},), one per sample, got {tuple(weights.shape)}.")
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (weights.float() * per_sample).mean()


def min_snr_weights(
    scheduler: Any, timesteps: torch.Tensor, *, gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): ``min(SNR(t), gamma) / SNR(t)`` for epsilon prediction,
    ``min(SNR(t), gamma) / (SNR(t) + 1)`` for v-prediction.

    The plain epsilon MSE spends most of its effort on low-noise steps, where the noisy map already shows where the
    counts are; the conditioning (histology, LR map) matters at high noise. These weights cap the low-noise steps
    (``SNR > gamma``) and leave the rest at 1. The SNR comes from :func:`diffusers.training_utils.compute_snr`.

    Examples
    --------
    >>> import torch
    >>> from diffusers import DDIMScheduler
    >>> w = min_snr_weights(DDIMScheduler(), torch.tensor([0, 999]), gamma=5.0)
    >>> bool(w[0] < 0.01), float(w[1])
    (True, 1.0)
    """
    from diffusers.training_utils import compute_snr

    if not gamma > 0:
        raise ValueError(f"`gamma` (min-SNR) must be a positive number, got {gamma!r}.")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"`prediction_type` must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
    snr = compute_snr(scheduler, timesteps)
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


def overall_loss(
    *,
    mse: torch.Tensor,
    content: torch.Tensor,
    modal: torch.Tensor,
    inter_sphere: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> LossOutput:
    """``L_overall = l_mse L_mse + l_modal L_modal + l_content L_content + l_inter L_inter-sphere``.

    Examples
    --------
    >>> import torch
    >>> out = overall_loss(mse=torch.tensor(1.0), content=torch.tensor(2.0), modal=torch.tensor(3.0),
    ...                    inter_sphere=torch.tensor(4.0))
    >>> float(out.total)
    11.0
    """
    total = weights.mse * mse + weights.modal * modal + weights.content * content + weights.inter_sphere * inter_sphere
    return LossOutput(total=total, mse=mse, content=content, modal=modal, inter_sphere=inter_sphere)


def _check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"`{name_a}` {tuple(a.shape)} and `{name_b}` {tuple(b.shape)} must have the same shape.")
