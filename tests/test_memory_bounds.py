"""Whole-slide memory bounds change nothing: the H&E averaged in strips of rows, the footprint correction and the
tissue mask applied in small gene batches give the same values as in one piece."""

from __future__ import annotations

import functools

import numpy as np
from toy_sections import make_toy_section

from c3diff._validation import scale0
from c3diff.pp import _resample, histology_raster
from c3diff.tl import _super_resolve
from c3diff.tl._footprints import match_footprints
from c3diff.tl._tissue import zero_off_tissue


def test_histology_averaged_in_strips_equals_one_piece(monkeypatch):
    sdata = make_toy_section(origin=(3.0, 5.0), height=1003.0)  # 2 um H&E: 5 x 5 blocks, partial blocks at the edges
    whole, grid = histology_raster(sdata, "hne", pixel_size=10.0)
    monkeypatch.setattr(_resample, "STRIP_ELEMENTS", 1)  # one output row per strip
    strips, grid_strips = histology_raster(sdata, "hne", pixel_size=10.0)
    assert grid_strips == grid and whole.shape == (3, grid.height, grid.width)
    np.testing.assert_array_equal(strips, whole)
    assert (whole < 255).any()  # tissue was read, not only the white fill


def test_gene_batches_of_the_layer_passes_change_nothing(monkeypatch):
    sdata = make_toy_section()
    kwargs = dict(table_key="table", method="bicubic", tile_size=32, inplace=False, progress=False)
    default = scale0(_super_resolve.super_resolve(sdata, "hne", **kwargs)["mean"]).values
    monkeypatch.setattr(_super_resolve, "match_footprints", functools.partial(match_footprints, max_elements=1))
    monkeypatch.setattr(_super_resolve, "zero_off_tissue", functools.partial(zero_off_tissue, max_elements=1))
    one_gene_at_a_time = scale0(_super_resolve.super_resolve(sdata, "hne", **kwargs)["mean"]).values
    np.testing.assert_array_equal(one_gene_at_a_time, default)
