"""The tutorial notebook executes top to bottom (FAST mode, CPU) and its key results come out right.

The notebook is run from a copy of its code cells, untouched, in the ``tutorials/`` folder (so its relative paths
hold); its stored outputs are not rewritten.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tutorials" / "c3diff_tutorial.ipynb"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nbclient") is None or importlib.util.find_spec("ipykernel") is None,
    reason="nbclient/ipykernel are not installed; install the test tools with pip install '.[test]'",
)


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.fixture(scope="module")
def executed():
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []  # run what the code does, not what was stored
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    # the kernel inherits the environment: without conftest's MPLBACKEND=Agg it draws inline, as in Jupyter
    backend = os.environ.pop("MPLBACKEND", None)
    try:
        client.execute()
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend
    return notebook


def test_notebook_is_valid_and_fast_by_default():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    setup = next(c for c in notebook.cells if c.cell_type == "code" and "FAST =" in c.source)
    assert "FAST = True" in setup.source  # CI and newcomers run the small version


def test_notebook_uses_the_public_api_only():
    import re

    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    pattern = r"(?:from|import)\s+c3diff(?:\.\w+)*\._\w+|\bc3\.(?:\w+\.)*_(?!_)\w+"  # (dunders are public)
    private = [m.group(0) for m in re.finditer(pattern, code)]
    assert not private, f"the tutorial reaches into private c3diff names: {private}"
    assert re.search(pattern, "from c3diff._constants import X") and re.search(pattern, "c3.tl._celltype")


@pytest.mark.slow
def test_notebook_executes_and_reports(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = "\n".join(_text(c) for c in code)
    # the pooled 10 um bins equal the 100 um bins (counts conserved through binning)
    assert "equal the 100 um bins: True" in text
    # super_resolve wrote the C3-Diff mean and std layers and the bicubic baseline
    for key in ("hne_c3diff_x10", "hne_c3diff_x10_std", "hne_bicubic_x10", "hne_c3diff_x5"):
        assert f"'{key}'" in text
    # the real-data part fits C3-Diff on the slide and super-resolves with it
    assert "fitted on one slide by c3.tl.fit_slide" in text
    # the saved store holds the cell-type labels and the recorded parameters
    assert "hne_c3diff_x10_celltypes" in text
    # figures were drawn (matplotlib PNGs in the outputs)
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert pngs >= 10
