"""Sphinx configuration of the c3diff documentation.

Build (warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Besides the usual settings, this file makes three kinds of pages from what exists at build time, so that the site
builds without warnings before and after these inputs exist:

- the command-line reference (``api/cli.md``) includes the ``--help`` texts of the ``c3diff`` command, written to
  ``api/generated/cli/`` from the installed parser;
- ``benchmarks.md`` gets one section per script in ``benchmarks/`` (its docstring) with the results files that the
  script wrote to ``docs/benchmarks/`` (``<script>.md``, ``<script>_*.md``), as they are at build time;
- ``tutorials.md`` lists the tutorial notebook ``tutorials/c3diff_tutorial.ipynb`` only when it exists; Sphinx reads
  no pages outside ``docs/``, so the notebook is copied to ``docs/tutorials/`` (relative links of its markdown cells
  rewritten to the new place) and shown with its stored outputs, never executed.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import pprint
import re
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Document the checkout this file belongs to, even when another c3diff is installed.
sys.path.insert(0, str(ROOT / "src"))

import c3diff  # noqa: E402

# -- Project -----------------------------------------------------------------------------------------------------
project = "c3diff"
author = "c3diff developers"
copyright = f"{date.today().year}, {author}"
release = c3diff.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------------------------------------------
extensions = [
    "myst_nb",  # Markdown pages (MyST) and the tutorial notebook; loads myst_parser itself
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpydoc-style docstrings
    "sphinx.ext.mathjax",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
    # Results written by benchmarks/*.py: shown inside benchmarks.md (see _insert_benchmarks), not pages.
    "benchmarks/**",
]
nitpicky = False
# No intersphinx: the build must not need the network, and no offline inventories ship with the dependencies.

# -- MyST / myst-nb ----------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the tutorial is shown as committed, with its stored outputs

# -- autodoc / autosummary / napoleon ----------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
# Our "Returns" sections are prose (no "name : type" lines): render them as written, under a rubric.
napoleon_custom_sections = ["Returns"]

# -- HTML --------------------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"c3diff {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path = ["_static"] if (HERE / "_static").is_dir() else []
html_show_sourcelink = False

# -- Pages made at build time ------------------------------------------------------------------------------------
CLI_COMMANDS = ("", "demo", "predict", "train", "fit")
CLI_DIR = HERE / "api" / "generated" / "cli"
TUTORIAL_SOURCE = ROOT / "tutorials" / "c3diff_tutorial.ipynb"
TUTORIAL_COPY = HERE / "tutorials" / "c3diff_tutorial.ipynb"
BENCHMARK_SCRIPTS = ROOT / "benchmarks"
BENCHMARK_RESULTS = HERE / "benchmarks"
# Main scripts first, in this order; any other benchmarks/*.py follows alphabetically.
BENCHMARK_ORDER = ("quality", "histology_uptake", "histology_signal", "scaling", "model_cost")
_BENCHMARKS_MARKER = "<!-- benchmark-scripts -->"
_TUTORIAL_MARKER = "<!-- tutorial-notebook -->"


def _defining_comment(name: str, obj) -> list[str] | None:
    """The ``#:`` doc-comment of a constant that a subpackage re-exports from the private module defining it.

    autodoc looks for the comment only in the module it documents (``c3diff.tl``), not where the constant is assigned
    (``c3diff.tl._celltype``), and would otherwise show the docstring of the value's type (``dict``).
    """
    from sphinx.errors import PycodeError
    from sphinx.pycode import ModuleAnalyzer

    package, _, attr = name.rpartition(".")
    for modname, module in sorted(sys.modules.items()):
        if not (modname == package or modname.startswith(f"{package}.")) or getattr(module, attr, None) is not obj:
            continue
        try:
            comment = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", attr))
        except PycodeError:  # a module without source has no comments to find
            continue
        if comment:
            return list(comment)
    return None


def _document_constant(app, what, name, obj, options, lines) -> None:
    """Constants (``autodata``): the comment where they are defined, then their value, pretty-printed."""
    if what != "data" or not name.startswith("c3diff."):
        return
    comment = _defining_comment(name, obj)
    if comment is not None:
        lines[:] = comment
    elif getattr(obj, "__doc__", None) == getattr(type(obj), "__doc__", None):
        lines[:] = []  # the docstring autodoc found is the value's type's (``dict``), which says nothing about it
    value = pprint.pformat(obj, width=100, sort_dicts=False)
    if len(value.splitlines()) > 100 and isinstance(obj, dict):
        lines += ["", "Keys: " + ", ".join(f"``{key!r}``" for key in obj), ""]
        return
    lines += ["", ".. code-block:: python", ""] + [f"   {line}" for line in value.splitlines()] + [""]


def _write_if_changed(path: Path, text: str) -> None:
    """Write only on change, so that incremental builds do not re-read the pages that include ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def cli_help(command: str = "") -> str:
    """The ``--help`` text of ``c3diff [command]``, at a fixed width (80 columns)."""
    from c3diff.cli import main

    argv = [command, "--help"] if command else ["--help"]
    buffer = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal width
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(argv)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    text = buffer.getvalue()
    if not text.strip():
        raise RuntimeError(f"`c3diff {' '.join(argv)}` printed nothing; cannot build the CLI reference.")
    return text


def _write_cli_help(app) -> None:
    for command in CLI_COMMANDS:
        _write_if_changed(CLI_DIR / f"{command or 'c3diff'}.txt", cli_help(command))


_MARKDOWN_TARGET = re.compile(r"(\]\(\s*<?|\bsrc=[\"'])([^)\s\"'>]+)")


def _relocate(target: str) -> str:
    """A relative path written from ``tutorials/``, rewritten to point at the same file from ``docs/tutorials/``."""
    if re.match(r"[a-z][a-z0-9+.-]*:|[#/]", target, flags=re.IGNORECASE):  # URL, anchor, absolute, data:, ...
        return target
    path, sep, anchor = target.partition("#")
    moved = os.path.relpath((TUTORIAL_SOURCE.parent / path).resolve(), TUTORIAL_COPY.parent)
    return Path(moved).as_posix() + sep + anchor


def tutorial_copy(notebook: str) -> str:
    """The notebook as the docs read it: relative links and images of markdown cells follow the copy's new place."""
    content = json.loads(notebook)
    for cell in content.get("cells", []):
        if cell.get("cell_type") == "markdown":
            text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            cell["source"] = _MARKDOWN_TARGET.sub(lambda m: m.group(1) + _relocate(m.group(2)), text)
    return json.dumps(content, indent=1, ensure_ascii=False) + "\n"


def _sync_tutorial(app) -> None:
    """Copy the tutorial notebook into the source tree (Sphinx reads no pages outside it); drop a stale copy."""
    if TUTORIAL_SOURCE.is_file():
        _write_if_changed(TUTORIAL_COPY, tutorial_copy(TUTORIAL_SOURCE.read_text()))
    elif TUTORIAL_COPY.is_file():
        TUTORIAL_COPY.unlink()


def benchmark_scripts() -> list[Path]:
    """``benchmarks/*.py``: the main ones in reading order, then any others alphabetically."""
    if not BENCHMARK_SCRIPTS.is_dir():
        return []
    scripts = sorted(p for p in BENCHMARK_SCRIPTS.glob("*.py") if not p.name.startswith("_"))
    rank = {name: i for i, name in enumerate(BENCHMARK_ORDER)}
    return sorted(scripts, key=lambda p: (rank.get(p.stem, len(rank)), p.stem))


def benchmark_results(name: str) -> list[Path]:
    """Results files of ``benchmarks/<name>.py``: ``docs/benchmarks/<name>.md`` and ``<name>_*.md``."""
    if not BENCHMARK_RESULTS.is_dir():
        return []
    return sorted(p for p in BENCHMARK_RESULTS.glob("*.md") if p.stem == name or p.stem.startswith(f"{name}_"))


def _script_docstring(path: Path) -> tuple[str, str]:
    """(title, body) of a script's module docstring: its first line and the rest."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=True) or ""
    title, _, body = doc.partition("\n")
    return title.strip().rstrip("."), body.strip()


def _min_heading_level(markdown: str) -> int | None:
    """Smallest ATX heading level outside code fences (``None`` if there is no heading)."""
    levels, fence = [], None
    for line in markdown.splitlines():
        stripped = line.lstrip()
        match = re.match(r"(`{3,}|~{3,})", stripped)
        if match:
            if fence is None:
                fence = match.group(1)
            elif stripped.startswith(fence):
                fence = None
            continue
        heading = re.match(r"(#{1,6})\s", stripped) if fence is None and len(line) - len(stripped) < 4 else None
        if heading:
            levels.append(len(heading.group(1)))
    return min(levels) if levels else None


def _include_results(path: Path, level: int) -> str:
    """A MyST ``include`` of a results file whose own headings nest below a heading of ``level``."""
    top = _min_heading_level(path.read_text())
    offset = 0 if top is None else max(0, level + 1 - top)
    relative = path.relative_to(HERE).as_posix()
    return f"```{{include}} {relative}\n:relative-images:\n:heading-offset: {offset}\n```\n"


def _results_sections(files: list[Path], level: int) -> str:
    return "\n".join(
        f"{'#' * level} Results: `{path.relative_to(ROOT).as_posix()}`\n\n{_include_results(path, level)}"
        for path in files
    )


def _script_section(path: Path) -> str:
    title, body = _script_docstring(path)
    script = path.relative_to(ROOT).as_posix()
    parts = [f"## {title or path.stem}\n", f"`{script}`\n"]
    if body:
        # Shown as written: script docstrings are plain text for readers of the script (``|PCC|`` is not markup).
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", body)), default=0))
        parts.append(f"{fence}text\n{body}\n{fence}\n")
    parts.append(f"Run it from the repository root with `python {script}` (`--help` lists its options).\n")
    results = benchmark_results(path.stem)
    if results:
        parts.append(_results_sections(results, 3))
    return "\n".join(parts)


def _insert_benchmarks(source: str) -> str:
    """Replace the scripts marker by one section per ``benchmarks/*.py`` (its docstring and its results files),
    then the results files that belong to no script."""
    scripts = benchmark_scripts()
    sections = [_script_section(p) for p in scripts]
    claimed = {r for p in scripts for r in benchmark_results(p.stem)}
    unclaimed = sorted(set(BENCHMARK_RESULTS.glob("*.md")) - claimed) if BENCHMARK_RESULTS.is_dir() else []
    if unclaimed:
        sections.append("## Other results\n\n" + _results_sections(unclaimed, 3))
    return source.replace(_BENCHMARKS_MARKER, "\n".join(sections))


def _insert_tutorial(source: str) -> str:
    if not TUTORIAL_COPY.is_file():
        note = (
            "This build of the documentation was made without the notebook: "
            f"`{TUTORIAL_SOURCE.relative_to(ROOT).as_posix()}` was not found.\n"
        )
        return source.replace(_TUTORIAL_MARKER, note)
    toctree = "```{toctree}\n:maxdepth: 1\n\ntutorials/c3diff_tutorial\n```\n"
    return source.replace(_TUTORIAL_MARKER, toctree)


def _source_read(app, docname: str, source: list[str]) -> None:
    if docname == "benchmarks":
        source[0] = _insert_benchmarks(source[0])
    elif docname == "tutorials":
        source[0] = _insert_tutorial(source[0])


def _always_reread(app, env, added, changed, removed) -> list[str]:
    # Scripts, results files and the notebook may appear, change or vanish without these pages changing.
    return ["benchmarks", "tutorials"]


def setup(app):
    app.connect("builder-inited", _write_cli_help)
    app.connect("builder-inited", _sync_tutorial)
    app.connect("source-read", _source_read)
    app.connect("autodoc-process-docstring", _document_constant, priority=600)  # after napoleon: it re-indents blocks
    app.connect("env-get-outdated", _always_reread)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
