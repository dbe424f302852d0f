"""Per-tile predictors run by super_resolve: the C3-Diff model and the bicubic baseline.

Predictors are small picklable objects so that dask (threads, processes or a distributed cluster) can ship them to
workers; a model given by path or Hub id is loaded once per worker process and cached there.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TileBatch:
    """Inputs of a batch of tiles: histology ``(B, 3, S, S)`` uint8, normalised LR ``(B, G, L, L)``, one seed per
    tile, and for models that read it the texture ``(B, K, S, S)``."""

    histology: np.ndarray
    lr: np.ndarray
    seeds: tuple[int, ...]
    texture: np.ndarray | None = None


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# One model call at a time per process: each call already uses all of torch's intra-op threads, and concurrent calls
# from dask's threads would oversubscribe the cores (OpenMP threads spin-waiting: ~10x slower on a busy CPU).
_MODEL_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _load_model(source: str, revision: str | None, device: str):
    from c3diff.models import from_pretrained

    return from_pretrained(source, revision=revision).to(device).eval()


@dataclass(frozen=True)
class BicubicPredictor:
    """Bicubic upsampling of the LR map by ``factor`` (LR px / HR px), cropped to ``out_size``: our baseline."""

    factor: int
    out_size: int

    def __call__(self, batch: TileBatch, model: Any = None) -> tuple[np.ndarray, None]:
        import torch
        import torch.nn.functional as F

        lr = torch.from_numpy(np.ascontiguousarray(batch.lr, dtype=np.float32))
        up = F.interpolate(lr, scale_factor=self.factor, mode="bicubic", align_corners=False)
        up = up[..., : self.out_size, : self.out_size].clamp(0.0, 1.0)
        return up.numpy(), None


class ModelPayload:
    """A model object as plain bytes for dask workers, rebuilt once per worker process.

    distributed serialises torch modules its own way, which does not restore a ``ConfigMixin`` config; scattering
    the pickled bytes (see :meth:`C3DiffModel.__reduce__ <c3diff.models.C3DiffModel>`) keeps the model whole.
    """

    def __init__(self, model: Any) -> None:
        import pickle

        self.blob = pickle.dumps(model)
        self._model = None

    def __getstate__(self) -> dict:
        return {"blob": self.blob}

    def __setstate__(self, state: dict) -> None:
        self.blob, self._model = state["blob"], None

    def build(self):
        import pickle

        if self._model is None:
            self._model = pickle.loads(self.blob)
        return self._model


@dataclass(frozen=True)
class ModelPredictor:
    """Runs a C3-Diff model on a tile batch. The model comes with each call: a model object (dask resolves a
    scattered future into it), or a local folder / Hub repo id, loaded once per worker process."""

    revision: str | None
    gene_indices: tuple[int, ...]
    scale: int
    steps: int
    eta: float
    n_samples: int
    device: str
    gene_batch_size: int = 16
    mode: str | None = None

    def _model(self, model: Any):
        if isinstance(model, str):
            return _load_model(model, self.revision, resolve_device(self.device))
        if isinstance(model, ModelPayload):
            model = model.build()
        return model.to(resolve_device(self.device)).eval()

    def __call__(self, batch: TileBatch, model: Any) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        model = self._model(model)
        with _MODEL_LOCK, torch.no_grad():
            mean, std = model.predict(
                torch.from_numpy(batch.histology.astype(np.float32) / 255.0),
                torch.from_numpy(np.ascontiguousarray(batch.lr, dtype=np.float32)),
                gene_indices=list(self.gene_indices),
                num_inference_steps=self.steps,
                eta=self.eta,
                n_samples=self.n_samples,
                seed=list(batch.seeds),
                gene_batch_size=self.gene_batch_size,
                scale=self.scale,
                mode=self.mode,
                texture=None if batch.texture is None else torch.from_numpy(batch.texture.astype(np.float32)),
            )

        def to_numpy(t):
            return None if t is None else (t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t))

        return to_numpy(mean).astype(np.float32), (None if std is None else to_numpy(std).astype(np.float32))


def run_predictor(batch: TileBatch, predictor, model: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Module-level entry point for dask tasks."""
    return predictor(batch, model)
