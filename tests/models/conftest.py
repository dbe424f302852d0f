"""Shared fixtures of the model tests: the tiny preset on CPU and synthetic batches."""

from __future__ import annotations

import pytest
import torch

import c3diff

GENES = ["EPCAM", "PTPRC", "ACTA2", "CD68"]


def _make_batch(model, batch_size: int = 6, *, missing=(), seed: int = 0, scale: int | None = None) -> dict:
    """A PatchDataset-like batch with structure (LR = pooled HR, histology correlated with the map)."""
    g = torch.Generator().manual_seed(seed)
    s, lr_size = model.config.image_size, model.config.lr_size
    factor = model.lr_upsample_factor
    hr10 = torch.rand(batch_size, 1, s // 8, s // 8, generator=g)
    hr10 = torch.nn.functional.interpolate(hr10, size=(s, s), mode="bilinear", align_corners=False)
    lr = torch.nn.functional.adaptive_avg_pool2d(
        torch.nn.functional.pad(hr10, (0, lr_size * factor - s, 0, lr_size * factor - s)), lr_size
    )
    histology = torch.cat([hr10, 1 - hr10, torch.rand(batch_size, 1, s, s, generator=g)], dim=1)
    hr = hr10 if (scale or model.config.scale) == 10 else torch.nn.functional.avg_pool2d(hr10, 2)
    lr_missing = torch.zeros(batch_size, dtype=torch.bool)
    lr_missing[list(missing)] = True
    return {
        "histology": histology,
        "lr": lr,
        "hr": hr * 2 - 1,
        "gene_index": torch.arange(batch_size) % model.num_genes,
        "lr_missing": lr_missing,
    }


def _perturb_zero_convs(model, *, scale: float = 0.05, seed: int = 0) -> None:
    """Give every zero-initialised parameter small random values (as after some training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim > 0 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return c3diff.models.build_model("tiny-paper", genes=GENES, scale=10)


@pytest.fixture
def tiny5():
    torch.manual_seed(0)
    return c3diff.models.build_model("tiny-paper", genes=GENES, scale=5)


@pytest.fixture
def make_batch():
    """Factory of synthetic batches: ``make_batch(model, batch_size, missing=(...), seed=..., scale=...)``."""
    return _make_batch


@pytest.fixture
def perturb_zero_convs():
    """``perturb_zero_convs(model)``: random small values in every zero-initialised trainable parameter."""
    return _perturb_zero_convs
