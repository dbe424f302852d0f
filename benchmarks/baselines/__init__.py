"""Baselines for c3diff's quality benchmark (benchmarks/quality.py); benchmark-only, never imported by ``src/``.

- :mod:`.unet_regressor`: the paper's "U-Net" row - a deterministic U-Net given C3-Diff's inputs (histology, the
  bicubic-upsampled LR map, the gene), trained with MSE for a wall-clock budget; also the bicubic baseline on patches.
- :mod:`.tesla`: TESLA (Hu et al. 2023) from its PyPI package ``TESLAforST`` (needs ``opencv-python-headless``),
  imported only when called.

Smoke runs (each under a minute on a tiny simulated problem): ``python -m benchmarks.baselines.unet_regressor`` and
``python -m benchmarks.baselines.tesla`` from the repository root.
"""

from importlib import import_module

_EXPORTS = {
    "TeslaResult": "tesla",
    "sample_patches": "tesla",
    "tesla_impute": "tesla",
    "tesla_predict": "tesla",
    "UNetRegressor": "unet_regressor",
    "bicubic_predict": "unet_regressor",
    "fit_unet_regressor": "unet_regressor",
    "predict_unet_regressor": "unet_regressor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # lazy, so that `python -m benchmarks.baselines.<module>` does not import its own module twice
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
