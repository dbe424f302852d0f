"""c3diff: super-resolve spatial transcriptomics with histology (C3-Diff) in the scverse stack.

Examples
--------
>>> import c3diff as c3
>>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
>>> c3.tl.super_resolve(sdata, image_key="hne", scale=10, model="path/to/model")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from c3diff._settings import settings
from c3diff._version import __version__

# Subpackages load on first use so that `import c3diff` stays fast (torch, spatialdata and
# diffusers are heavy); `c3.pp`, `c3.tl`, ... behave as ordinary attributes.
_SUBPACKAGES = ("datasets", "io", "pp", "tl", "pl", "models", "metrics")

if TYPE_CHECKING:  # pragma: no cover
    from c3diff import datasets, io, metrics, models, pl, pp, tl  # noqa: F401


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"c3diff.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'c3diff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBPACKAGES])


__all__ = ["__version__", "settings", *_SUBPACKAGES]
