"""Readers: Visium (Space Ranger), legacy Spatial Transcriptomics and Xenium into SpatialData in micrometres; spot
data held in memory through :func:`spots_from_arrays`.

Every reader returns a :class:`spatialdata.SpatialData` that follows ``docs/conventions.md``: one coordinate system,
``"global"``, in micrometres, built from the data's own calibration; element names from
:class:`c3diff._constants.Key`; the reader and its calibration in ``sdata.attrs["c3diff"]["reader"]``.
"""

from c3diff.io._arrays import spots_from_arrays
from c3diff.io._legacy_st import read_legacy_st
from c3diff.io._visium import read_visium, visium_from_arrays
from c3diff.io._xenium import cells_from_arrays, read_xenium

__all__ = [
    "cells_from_arrays",
    "read_legacy_st",
    "read_visium",
    "read_xenium",
    "spots_from_arrays",
    "visium_from_arrays",
]
