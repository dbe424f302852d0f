"""Recording what made each layer, next to the result (``sdata.attrs["c3diff"][key]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import ATTRS_KEY
from c3diff._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def _plain(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples into JSON- and zarr-attrs-friendly Python objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def record(sdata: SpatialData, key: str, tool: str, **params: Any) -> dict[str, Any]:
    """Store ``{"tool", "params", "c3diff_version"}`` for the layer ``key`` in ``sdata.attrs["c3diff"]``."""
    entry = {"tool": tool, "params": _plain(params), "c3diff_version": __version__}
    sdata.attrs.setdefault(ATTRS_KEY, {})[key] = entry
    return entry
