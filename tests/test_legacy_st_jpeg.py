"""read_legacy_st's JPEG path: pyramid levels decoded at reduced size (DCT scaling) instead of from the whole image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from c3diff.io._common import index_transform, load_rgb, parse_rgb
from c3diff.io._legacy_st import _read_hne


def test_jpeg_levels_match_the_whole_image_pyramid(tmp_path):
    # a smooth 2120 x 2200 px "H&E" (over the 2048 px pyramid top: one level, 1/2)
    y, x = np.mgrid[0:2120, 0:2200]
    rgb = np.stack([200 + 40 * np.sin(x / 97.0), 150 + 60 * np.cos(y / 53.0), 190 + 30 * np.sin((x + y) / 71.0)], -1)
    path = tmp_path / "he.jpg"
    Image.fromarray(rgb.astype(np.uint8)).save(path, quality=95)
    transform = index_transform(sy=0.7, sx=0.7)
    lazy, eager = _read_hne(path, transform), parse_rgb(load_rgb(path, arg="image"), transform)
    assert list(lazy.keys()) == list(eager.keys()) == ["scale0", "scale1"]
    level0 = lazy["scale0"]["image"]
    assert hasattr(level0.data, "dask")  # not decoded until read
    np.testing.assert_array_equal(np.asarray(level0.data), np.asarray(eager["scale0"]["image"].data))
    a, b = (np.asarray(e["scale1"]["image"].data, dtype=float) for e in (lazy, eager))
    assert a.shape == b.shape == (3, 1060, 1100)
    assert np.abs(a - b).mean() < 2.0  # DCT-domain 1/2 decode vs 2 x 2 means of the decoded image
    assert lazy["scale1"]["image"].attrs["transform"].keys() == eager["scale1"]["image"].attrs["transform"].keys()
