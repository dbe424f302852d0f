"""Imputation of ST features for samples without LR ST (:doc:`/method`, *Patches without low-resolution ST*).

Training
    For a sample ``m`` without LR ST, ``C_y^m = alpha * sum_k softmax_k(<C_h^m, C_h^k> / tau) C_y^k`` and
    ``M_y^m = beta * sum_k softmax_k(<M_h^m, M_h^k> / tau) M_y^k`` over the complete samples ``k`` of the batch,
    with learnable scalars ``alpha``, ``beta`` (initialised to 1). Similarities use the normalised embeddings, the
    imputed values are embeddings (see :mod:`c3diff.models._hint_encoders`); imputed samples enter only ``L_mse``.

Inference
    A tile without LR ST has no batch of complete samples to borrow from (and its result should not depend on which
    other tiles happen to share its batch). The imputer therefore keeps a *memory bank*: a FIFO ring buffer of the
    last ``size`` complete training samples, each stored as its four embeddings average-pooled to ``pool x pool``
    (``(C_h, C_y, M_h, M_y)``, detached). It is filled during training (train mode only), saved with the model as
    buffers, and at inference the same formula runs against it: pooled, normalised histology embeddings give the
    softmax weights and the pooled ST embeddings, upsampled bilinearly to the latent size, are mixed and scaled by
    ``alpha`` / ``beta``. The imputed maps mix *other* patches' ST features, which are not spatially aligned with the
    tile, so pooling discards little that the mixture could have carried, and it keeps the bank small (paper: 55 x
    8 x 8 per map). FIFO rather than reservoir: the newest entries come from the final encoders.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from c3diff.models._losses import TEMPERATURE, sphere_normalize

__all__ = ["FeatureImputer", "impute_features"]


def impute_features(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    scale: torch.Tensor | float = 1.0,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """``scale * sum_k softmax_k(<q, k> / tau) v_k`` for every query row.

    Parameters
    ----------
    query
        ``(M, ...)`` features of the samples to impute (normalised inside).
    keys
        ``(K, ...)`` features of the donors in the same space as ``query`` (normalised inside).
    values
        ``(K, ...)`` donor features to mix.
    scale
        ``alpha`` or ``beta``.
    temperature
        ``tau``.

    Returns
    -------
    ``(M, *values.shape[1:])``.

    Examples
    --------
    >>> import torch
    >>> keys = torch.eye(3)
    >>> values = torch.tensor([[1.0], [2.0], [3.0]])
    >>> impute_features(keys[1:2] * 5, keys, values, temperature=0.01).round().tolist()
    [[2.0]]
    """
    if len(keys) == 0:
        raise ValueError("Cannot impute from an empty set of donors (no complete sample).")
    if len(keys) != len(values):
        raise ValueError(f"`keys` ({len(keys)}) and `values` ({len(values)}) must have one row per donor.")
    weights = (sphere_normalize(query) @ sphere_normalize(keys).T / temperature).softmax(dim=1)
    mixed = weights @ values.flatten(1)
    return scale * mixed.view(len(query), *values.shape[1:])


class FeatureImputer(nn.Module):
    """Learnable ``alpha``, ``beta`` and the memory bank used to impute ``C_y``, ``M_y``.

    Parameters
    ----------
    feature_channels
        Channels of each embedding.
    bank_size
        Number of complete training samples kept for inference-time imputation.
    bank_pool
        Spatial size the bank's embeddings are average-pooled to.
    temperature
        ``tau`` of the softmax weights.

    Examples
    --------
    >>> import torch
    >>> imputer = FeatureImputer(feature_channels=2, bank_size=4, bank_pool=2)
    >>> c_h, m_h = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    >>> c_y, m_y = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    >>> missing = torch.tensor([False, False, True])
    >>> c_y2, m_y2 = imputer.impute_from_batch(c_h, m_h, c_y, m_y, missing)
    >>> bool(torch.equal(c_y2[:2], c_y[:2])), bool(torch.equal(c_y2[2], c_y[2]))
    (True, False)
    """

    def __init__(
        self, *, feature_channels: int, bank_size: int = 128, bank_pool: int = 8, temperature: float = TEMPERATURE
    ):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.ones(()))
        self.temperature = temperature
        self.bank_pool = bank_pool
        shape = (bank_size, feature_channels, bank_pool, bank_pool)
        for name in ("bank_histology_content", "bank_st_content", "bank_histology_modal", "bank_st_modal"):
            self.register_buffer(name, torch.zeros(shape))
        self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))  # filled entries
        self.register_buffer("bank_next", torch.zeros((), dtype=torch.long))  # next slot to overwrite

    @property
    def bank_size(self) -> int:
        """Capacity of the memory bank."""
        return self.bank_histology_content.shape[0]

    def impute_from_batch(
        self,
        c_h: torch.Tensor,
        m_h: torch.Tensor,
        c_y: torch.Tensor,
        m_y: torch.Tensor,
        missing: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the ST embeddings of ``missing`` samples by imputations from the batch's complete samples.

        When the batch has no complete sample, the memory bank is the donor set (see :meth:`impute_from_bank`).

        Parameters
        ----------
        c_h, m_h
            ``(B, C, l, l)`` histology content / modality embeddings.
        c_y, m_y
            ``(B, C, l, l)`` ST content / modality embeddings (rows of missing samples are ignored).
        missing
            ``(B,)`` bool, True where the sample has no LR ST.

        Returns
        -------
        ``(C_y, M_y)`` with the missing rows imputed and the others unchanged.
        """
        missing = missing.to(device=c_h.device, dtype=torch.bool)
        if not bool(missing.any()):
            return c_y, m_y
        complete = ~missing
        if bool(complete.any()):
            c_imp = impute_features(
                c_h[missing], c_h[complete], c_y[complete], scale=self.alpha, temperature=self.temperature
            )
            m_imp = impute_features(
                m_h[missing], m_h[complete], m_y[complete], scale=self.beta, temperature=self.temperature
            )
        else:
            c_imp, m_imp = self.impute_from_bank(c_h[missing], m_h[missing])
        c_out, m_out = c_y.clone(), m_y.clone()
        c_out[missing] = c_imp.to(c_out.dtype)
        m_out[missing] = m_imp.to(m_out.dtype)
        return c_out, m_out

    def impute_from_bank(self, c_h: torch.Tensor, m_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Impute ``(C_y, M_y)`` at the size of ``c_h`` from the memory bank (inference; batches with no donor).

        An empty bank (a model that never trained on complete samples) gives zero embeddings, with a warning.

        Parameters
        ----------
        c_h, m_h
            ``(M, C, l, l)`` histology content / modality embeddings.
        """
        size = c_h.shape[-2:]
        n = int(self.bank_count)
        if n == 0:
            warnings.warn(
                "The imputation memory bank is empty (the model has not been trained on samples with LR ST), so the "
                "ST features of tiles without LR ST are imputed as zeros. Train the model first.",
                UserWarning,
                stacklevel=3,
            )
            return torch.zeros_like(c_h), torch.zeros_like(m_h)
        pool = self.bank_pool
        c_key, m_key = F.adaptive_avg_pool2d(c_h, pool), F.adaptive_avg_pool2d(m_h, pool)
        c_imp = impute_features(
            c_key,
            self.bank_histology_content[:n],
            self.bank_st_content[:n],
            scale=self.alpha,
            temperature=self.temperature,
        )
        m_imp = impute_features(
            m_key,
            self.bank_histology_modal[:n],
            self.bank_st_modal[:n],
            scale=self.beta,
            temperature=self.temperature,
        )
        c_imp = F.interpolate(c_imp, size=size, mode="bilinear", align_corners=False)
        m_imp = F.interpolate(m_imp, size=size, mode="bilinear", align_corners=False)
        return c_imp.to(c_h.dtype), m_imp.to(m_h.dtype)

    @torch.no_grad()
    def update_bank(self, c_h: torch.Tensor, m_h: torch.Tensor, c_y: torch.Tensor, m_y: torch.Tensor) -> None:
        """Push complete samples' embeddings (pooled, detached) into the FIFO memory bank."""
        if len(c_h) == 0 or self.bank_size == 0:
            return
        pool = self.bank_pool
        entries = [F.adaptive_avg_pool2d(x.detach().float(), pool) for x in (c_h, c_y, m_h, m_y)]
        banks = [self.bank_histology_content, self.bank_st_content, self.bank_histology_modal, self.bank_st_modal]
        n_new = min(len(c_h), self.bank_size)  # a batch larger than the bank keeps its last entries
        slots = (int(self.bank_next) + torch.arange(n_new)) % self.bank_size
        slots = slots.to(self.bank_count.device)
        for bank, entry in zip(banks, entries, strict=True):
            bank[slots] = entry[-n_new:].to(bank)
        self.bank_next.fill_((int(self.bank_next) + n_new) % self.bank_size)
        self.bank_count.fill_(min(int(self.bank_count) + n_new, self.bank_size))
