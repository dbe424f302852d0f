"""A torch Dataset over (patch, gene) pairs, in the model's batch layout."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from c3diff._validation import check_genes

if TYPE_CHECKING:  # pragma: no cover
    from c3diff.pp._patches import PatchSet

try:  # torch is a dependency, but keep this module importable for docs builds without it
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object


class PatchDataset(_TorchDataset):
    """One item per (patch, gene): the paper trains one gene map per sample (:doc:`/method`, *Architecture*).

    Each item is a dict of tensors: ``histology`` float32 ``(3, S, S)`` in [0, 1]; ``lr`` float32 ``(1, L, L)`` in
    [0, 1]; ``hr`` float32 ``(1, H, H)`` in [-1, 1] (when the patches have ground truth); ``gene_index`` int64 (the
    gene's index in ``genes``, the model's order); ``lr_missing`` bool (a modality-incomplete sample, :doc:`/method`,
    *Patches without low-resolution ST*); ``patch_index`` int64; with ground truth also ``hr_counts`` float32
    ``(1, H, H)``, the observed counts (what the conditional-mean stage's count likelihood needs).

    Parameters
    ----------
    patches
        The patches.
    genes
        The model's genes, in order; every one must be in ``patches.genes``. Default: ``patches.genes``.
    lr_missing_fraction
        Fraction of items whose LR map is withheld (``lr_missing=True``, ``lr`` zeroed) to train imputation; the draw
        is deterministic for (``seed``, epoch, item) - call :meth:`set_epoch` to redraw each epoch.
    skip_constant
        Leave out (patch, gene) pairs whose HR map is constant (a gene absent from the patch): nothing to learn.
    seed
        Seed of the modality-incomplete draw.
    """

    def __init__(
        self,
        patches: PatchSet,
        *,
        genes: list[str] | None = None,
        lr_missing_fraction: float = 0.0,
        skip_constant: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= lr_missing_fraction <= 1.0:
            raise ValueError(f"`lr_missing_fraction` must be in [0, 1], got {lr_missing_fraction!r}.")
        self.patches = patches
        self.genes = list(patches.genes) if genes is None else check_genes(genes, patches.genes)
        self._channel = np.array([patches.genes.index(g) for g in self.genes], dtype=np.int64)
        self.lr_missing_fraction = float(lr_missing_fraction)
        self.seed = int(seed)
        self.epoch = 0
        pairs = np.stack(np.meshgrid(np.arange(len(patches)), np.arange(len(self.genes)), indexing="ij"), -1)
        pairs = pairs.reshape(-1, 2)
        if skip_constant and patches.hr is not None:
            varying = (patches.hr_high - patches.hr_low)[:, self._channel] > 0
            pairs = pairs[varying.reshape(-1)]
        if len(pairs) == 0:
            raise ValueError("The dataset is empty: no (patch, gene) pair has a non-constant HR map.")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Redraw which items are modality-incomplete (deterministically for the epoch)."""
        self.epoch = int(epoch)

    def is_lr_missing(self, index: int) -> bool:
        if self.lr_missing_fraction <= 0:
            return False
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        return bool(rng.random() < self.lr_missing_fraction)

    def __getitem__(self, index: int) -> dict:
        import torch

        patch, gene = (int(v) for v in self.pairs[index])
        channel = self._channel[gene]
        missing = self.is_lr_missing(index)
        lr = self.patches.lr[patch, channel][None]
        item = {
            "histology": torch.from_numpy(self.patches.histology[patch].astype(np.float32) / 255.0),
            "lr": torch.zeros(lr.shape, dtype=torch.float32) if missing else torch.from_numpy(lr.copy()),
            "gene_index": torch.tensor(gene, dtype=torch.long),
            "lr_missing": torch.tensor(missing),
            "patch_index": torch.tensor(patch, dtype=torch.long),
        }
        if self.patches.hr is not None:
            item["hr"] = torch.from_numpy(self.patches.hr[patch, channel][None] * 2.0 - 1.0)
            low, high = self.patches.hr_low[patch, channel], self.patches.hr_high[patch, channel]
            counts = self.patches.hr[patch, channel][None] * (high - low) + low
            item["hr_counts"] = torch.from_numpy(np.maximum(counts, 0).astype(np.float32))
        if self.patches.texture is not None:
            item["texture"] = torch.from_numpy(self.patches.texture[patch].astype(np.float32))
        return item
