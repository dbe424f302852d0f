"""c3.settings: verbosity through the "c3diff" logger, one-line warnings, ome_zarr's label notice dropped."""

from __future__ import annotations

import logging
import warnings

import pytest

import c3diff as c3
from c3diff._settings import Verbosity, format_warning


@pytest.fixture(autouse=True)
def _restore_verbosity():
    before = logging.getLogger("c3diff").level
    yield
    logging.getLogger("c3diff").setLevel(before)


def test_verbosity_sets_the_c3diff_logger_level():
    assert c3.settings.verbosity == Verbosity.warning
    c3.settings.verbosity = "info"
    assert logging.getLogger("c3diff").level == logging.INFO and c3.settings.verbosity == Verbosity.info
    c3.settings.verbosity = 3
    assert logging.getLogger("c3diff").level == logging.DEBUG and c3.settings.verbosity.name == "debug"
    c3.settings.verbosity = Verbosity.error
    assert logging.getLogger("c3diff").getEffectiveLevel() == logging.ERROR
    # the standard logging configuration is read back
    logging.getLogger("c3diff").setLevel(logging.INFO)
    assert c3.settings.verbosity == Verbosity.info
    assert "verbosity='info'" in repr(c3.settings)
    for bad in ("loud", 7, True, 1.5):
        with pytest.raises(ValueError, match="`verbosity` must be one of"):
            c3.settings.verbosity = bad


def test_info_messages_follow_the_verbosity(caplog):
    import numpy as np
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    values = np.zeros((2, 4, 4), dtype=np.float32)
    values[0, :2] = 1.0
    values[1, 2:] = 1.0
    sdata = SpatialData(images={"sr": Image2DModel.parse(values, dims=("c", "y", "x"), c_coords=["CD8A", "MS4A1"])})
    with caplog.at_level(logging.NOTSET):
        c3.settings.verbosity = "warning"
        c3.tl.celltype_map(sdata, "sr", markers={"T": ["CD8A"], "B": ["MS4A1"]}, inplace=False)
        assert not [r for r in caplog.records if r.name.startswith("c3diff")]
        c3.settings.verbosity = "info"
        c3.tl.celltype_map(sdata, "sr", markers={"T": ["CD8A"], "B": ["MS4A1"]}, inplace=False)
    (record,) = [r for r in caplog.records if r.name.startswith("c3diff")]
    assert record.name == "c3diff.tl._celltype" and record.levelno == logging.INFO
    assert record.getMessage() == (
        "celltype_map: 16 of 16 pixels with data assigned to 2 type(s), 0 unassigned (min_score=0.1)"
    )


def test_messages_reach_stderr_without_a_logging_configuration(capsys, monkeypatch):
    """Like scanpy: with no handler on the root logger, c3diff's own handler prints the bare message."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    c3.settings.verbosity = "info"
    logging.getLogger("c3diff.tl").info("hello %d", 3)
    logging.getLogger("c3diff.tl").debug("hidden")
    assert capsys.readouterr().err == "hello 3\n"


def test_format_warning_is_one_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("a message\nover  two lines", UserWarning, stacklevel=1)
    (w,) = caught
    text = format_warning(w.message, w.category, w.filename, w.lineno, "source = line()")
    assert text == "UserWarning: a message over two lines\n"


def test_ome_zarr_no_parent_notice_is_dropped_but_other_messages_kept(caplog):
    reader = logging.getLogger("ome_zarr.reader")
    with caplog.at_level(logging.INFO, logger="ome_zarr.reader"):
        reader.warning("no parent found for %s: %s", "<ome_zarr.reader.Label object>", None)
        reader.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == "ome_zarr.reader"] == ["something else"]
