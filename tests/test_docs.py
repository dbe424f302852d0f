"""The documentation builds without warnings (``sphinx-build -W``) and has its key pages.

Two builds: the real site (``docs/``, as the repository has it), and a small copy of the page machinery of
``docs/conf.py`` with a benchmark script, its results file and a tutorial notebook, so that the pages made at build
time are checked both without those inputs (the real site may not have them yet) and with them.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SUBPACKAGES = ("datasets", "io", "pp", "tl", "pl", "models", "metrics")

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("sphinx") is None,
        reason="sphinx is not installed; install the documentation tools with pip install '.[test]' or '.[doc]'",
    ),
    # Sphinx's own napoleon and myst-parser use APIs that Sphinx 11 will remove (RemovedInSphinx11Warning, a
    # PendingDeprecationWarning): their notice, not ours.
    pytest.mark.filterwarnings("ignore:.*deprecated.*:PendingDeprecationWarning"),
]


def _build(srcdir: Path, outdir: Path) -> tuple[int, str]:
    """Build ``srcdir`` as HTML into ``outdir`` with warnings as errors; return the status and the warnings."""
    from sphinx.cmd.build import build_main

    warnings = outdir.parent / f"{outdir.name}-warnings.txt"
    status = build_main(
        [
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-w",
            str(warnings),
            "-d",
            str(outdir / ".doctrees"),
            str(srcdir),
            str(outdir),
        ]
    )
    return status, warnings.read_text() if warnings.exists() else ""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("site") / "html"
    status, warnings = _build(DOCS, outdir)
    assert warnings == "", f"the documentation build warned:\n{warnings}"
    assert status == 0
    return outdir


def _text(page: Path) -> str:
    """Visible text of an HTML page, tags stripped and whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page.read_text()))


def test_key_pages_exist(site):
    for page in (
        "index",
        "installation",
        "usage",
        "tutorials",
        "conventions",
        "method",
        "benchmarks",
        "api",
        "api/cli",
        "api/generated/c3diff.tl.super_resolve",
        "api/generated/c3diff.tl.train",
    ):
        assert (site / f"{page}.html").is_file(), page


def test_every_public_name_has_an_api_page(site):
    missing = []
    for sub in SUBPACKAGES:
        module = importlib.import_module(f"c3diff.{sub}")
        missing += [
            f"c3diff.{sub}.{name}"
            for name in module.__all__
            if not (site / "api" / "generated" / f"c3diff.{sub}.{name}.html").is_file()
        ]
    assert missing == []


def test_api_pages_render_the_numpydoc_sections(site):
    text = _text(site / "api" / "generated" / "c3diff.tl.super_resolve.html")
    for expected in ("Parameters", "table_key", "n_samples", "Returns", "Examples", "hne_c3diff_x10"):
        assert expected in text, expected
    # a re-exported constant shows the comment where it is defined and its value, not the docstring of its type
    markers = _text(site / "api" / "generated" / "c3diff.tl.DEFAULT_MARKERS.html")
    assert "Marker genes" in markers and "MS4A1" in markers
    for page in (site / "api" / "generated").glob("*.html"):
        text = _text(page)
        for builtin_doc in ("new empty dictionary", "Built-in immutable sequence", "str(object="):
            assert builtin_doc not in text, (page.name, builtin_doc)


def test_cli_page_has_every_commands_help(site):
    text = _text(site / "api" / "cli.html")
    assert "usage: c3diff [-h] [--version]" in text
    for command in ("demo", "predict", "train"):
        assert f"usage: c3diff {command}" in text, command
    for option in ("--table-key", "--points-key", "--samples", "--celltypes", "--resume", "--max-time"):
        assert option in text, option


def test_method_page_has_the_losses_and_the_differences(site):
    text = _text(site / "method.html")
    for expected in ("Differences from the authors", "memory bank", "Tile blending", "Calibration to counts"):
        assert expected in text, expected
    for loss in ("overall", "mse", "content", "modal", "inter-sphere"):  # LaTeX, typeset by MathJax in the browser
        assert f"\\mathcal{{L}}_\\text{{{loss}}}" in text, loss


# -- pages made from what exists at build time --------------------------------------------------------------------
# a 1 x 1 PNG, as notebooks store figures (base64)
_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _notebook(path: Path) -> None:
    """A small notebook with the kinds of outputs a tutorial has: text, stderr, a figure and a progress widget."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "# A tutorial\n\nSome text, a figure of the repository and a link to a page.\n\n"
            "![an H&E](../docs/_static/hne.png)\n\nSee [the usage page](../docs/usage.md).\n"
        ),
        nbformat.v4.new_code_cell(
            "print('hello')",
            execution_count=1,
            outputs=[
                nbformat.v4.new_output("stream", name="stdout", text="hello from the stored output\n"),
                nbformat.v4.new_output("stream", name="stderr", text="a warning\n"),
                nbformat.v4.new_output(
                    "display_data",
                    data={
                        "application/vnd.jupyter.widget-view+json": {
                            "model_id": "abc",
                            "version_major": 2,
                            "version_minor": 0,
                        },
                        "text/plain": "  0%|          | 0/3",
                    },
                ),
                nbformat.v4.new_output("display_data", data={"image/png": _PNG, "text/plain": "<Figure>"}),
                nbformat.v4.new_output("execute_result", data={"text/plain": "4"}, execution_count=1),
            ],
        ),
    ]
    nbformat.write(nb, path)


@pytest.fixture
def mini_repo(tmp_path) -> Path:
    """A repository with docs/conf.py and the three pages that it fills at build time, nothing else."""
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(DOCS / "conf.py", docs / "conf.py")
    for page in ("benchmarks.md", "tutorials.md"):
        shutil.copy(DOCS / page, docs / page)
    (docs / "api").mkdir()
    shutil.copy(DOCS / "api" / "cli.md", docs / "api" / "cli.md")
    (docs / "usage.md").write_text("# Usage\n")  # pages that the others link to with {doc}
    (docs / "method.md").write_text("# Method\n")
    (docs / "index.md").write_text("# Test\n\n```{toctree}\nbenchmarks\ntutorials\napi/cli\nusage\nmethod\n```\n")
    return tmp_path


def test_generated_pages_without_inputs(mini_repo):
    status, warnings = _build(mini_repo / "docs", mini_repo / "html")
    assert (status, warnings) == (0, "")
    assert "was made without the notebook" in _text(mini_repo / "html" / "tutorials.html")
    assert not (mini_repo / "html" / "tutorials" / "c3diff_tutorial.html").exists()
    assert "usage: c3diff train" in _text(mini_repo / "html" / "api" / "cli.html")


def test_generated_pages_with_scripts_results_and_notebook(mini_repo):
    (mini_repo / "benchmarks").mkdir()
    (mini_repo / "benchmarks" / "quality.py").write_text(
        '"""Quality against the simulated truth.\n\n'
        "Scores C3-Diff and bicubic per tile and gene: RMSE, |PCC|, SSIM.\n\n"  # |PCC| is text, not RST
        'Usage::\n\n    python benchmarks/quality.py --seeds 3\n"""\n'
    )
    (mini_repo / "benchmarks" / "scaling.py").write_text('"""Scaling of super_resolve with the slide size."""\n')
    results = mini_repo / "docs" / "benchmarks"
    results.mkdir()
    (results / "quality.md").write_text("# Quality\n\n## 10x\n\n| method | PCC |\n|---|---|\n| bicubic | 0.31 |\n")
    (results / "quality_5x.md").write_text("| method | PCC |\n|---|---|\n| c3diff | 0.42 |\n")
    (results / "orphan.md").write_text("## Orphan\n\nA table of no script.\n")
    (mini_repo / "docs" / "_static").mkdir()
    (mini_repo / "docs" / "_static" / "hne.png").write_bytes(base64.b64decode(_PNG))
    (mini_repo / "tutorials").mkdir()
    _notebook(mini_repo / "tutorials" / "c3diff_tutorial.ipynb")

    status, warnings = _build(mini_repo / "docs", mini_repo / "html")
    assert (status, warnings) == (0, "")
    text = _text(mini_repo / "html" / "benchmarks.html")
    # one section per script, from its docstring, with its results files; main scripts first
    assert text.index("Quality against the simulated truth") < text.index("Scaling of super_resolve")
    for expected in (
        "Scores C3-Diff and bicubic per tile and gene: RMSE, |PCC|, SSIM",
        "python benchmarks/quality.py --seeds 3",
        "0.31",
        "0.42",
        "Other results",
        "A table of no script",
    ):
        assert expected in text, expected
    # the results files' own headings nest below their section: the page keeps a single title
    assert (mini_repo / "html" / "benchmarks.html").read_text().count("<h1") == 1
    # the notebook is shown with its stored outputs (executing it would print "hello" alone)
    page = (mini_repo / "html" / "tutorials" / "c3diff_tutorial.html").read_text()
    assert "A tutorial" in _text(mini_repo / "html" / "tutorials" / "c3diff_tutorial.html")
    assert "hello from the stored output" in page
    # links written from tutorials/ still reach their targets from the copy in docs/tutorials/
    assert 'src="../_images/hne.png"' in page and 'href="../usage.html"' in page

    # the notebook removed: the stale copy goes and the page says so
    (mini_repo / "tutorials" / "c3diff_tutorial.ipynb").unlink()
    status, warnings = _build(mini_repo / "docs", mini_repo / "html2")
    assert (status, warnings) == (0, "")
    assert not (mini_repo / "docs" / "tutorials" / "c3diff_tutorial.ipynb").exists()
    assert "was made without the notebook" in _text(mini_repo / "html2" / "tutorials.html")
