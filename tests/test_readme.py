"""The README's Usage runs as written (bundled demo model, then a model fitted on the slide); the models a user can
get are named where a model is missing; the demo model warns once on data that was not simulated."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import c3diff as c3
from c3diff.models import _bundled as bundled

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    """The python code block right after ``<!-- marker -->`` in the README."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```python\n(.*?)```", README.read_text(), flags=re.S)
    assert match, f"README.md has no python block after <!-- {marker} -->"
    return match.group(1)


@pytest.fixture(scope="module")
def usage(tmp_path_factory):
    """Run the Usage block as written (in a scratch folder) and return its namespace."""
    import matplotlib.pyplot as plt

    namespace: dict = {}
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(bundled, "_warned_demo_on_real_data", False)
        mp.chdir(tmp_path_factory.mktemp("usage"))
        exec(compile(_block("usage"), "README.md (usage)", "exec"), namespace)
    plt.close("all")
    namespace["caught"] = [str(w.message) for w in caught]
    return namespace


def test_usage_block_runs_on_the_demo_model(usage):
    sdata = usage["sdata"]
    layer = np.asarray(c3._validation.scale0(sdata.images["hne_c3diff_x10"]).values)
    assert layer.shape[0] == 48 and np.isfinite(layer).all() and layer.max() > 0
    assert "hne_c3diff_x10_celltypes" in sdata.labels
    assert usage["fig"].axes
    assert bundled.is_demo_model(usage["model"]) and bundled.is_simulated(sdata)
    assert not any("simulated tissue only" in m for m in usage["caught"])  # simulated data: no demo warning


def test_usage_real_block_fits_on_the_slide(usage, monkeypatch, tmp_path):
    # as written, with the fit capped at a few steps and genes (the README gives it 300 s and 48 genes)
    genes = ["CD8A", "MS4A1", "CD68", "EPCAM"]
    monkeypatch.setattr(c3.tl, "fit_slide", functools.partial(c3.tl.fit_slide, steps=3, genes=genes, progress=False))
    monkeypatch.chdir(tmp_path)
    namespace = dict(usage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_block("usage-real"), "README.md (usage-real)", "exec"), namespace)
    sdata = namespace["sdata"]
    assert "hne_fitted_x10" in sdata.images and not bundled.is_demo_model(namespace["model"])
    assert (tmp_path / "models" / "my_slide" / "config.json").is_file()


def test_missing_model_error_names_the_models_there_are(usage):
    sdata = usage["sdata"]
    with pytest.raises(ValueError, match="`model` is required") as error:
        c3.tl.super_resolve(sdata, "hne", table_key="visium_table", progress=False)
    for name in ("c3.models.load_demo_model()", "c3.tl.fit_slide", "method='bicubic'", "published"):
        assert name in str(error.value), name


def test_demo_model_warns_once_on_data_that_was_not_simulated(usage, monkeypatch):
    sdata, model = usage["sdata"], usage["model"]
    monkeypatch.setattr(bundled, "_warned_demo_on_real_data", False)
    monkeypatch.setitem(sdata.attrs, "c3diff", {"reader": {"name": "read_visium", "path": "outs"}})
    run = functools.partial(
        c3.tl.super_resolve,
        sdata,
        "hne",
        table_key="visium_table",
        model=model,
        genes=["CD8A"],
        inplace=False,
        progress=False,
    )
    with pytest.warns(UserWarning, match="simulated tissue only.*fit_slide"):
        run()
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        run()
    assert not any("simulated tissue only" in str(w.message) for w in again)
    # a model that is not the demo model never warns
    assert not bundled.is_demo_model(c3.models.build_model("tiny", genes=["CD8A"]))
