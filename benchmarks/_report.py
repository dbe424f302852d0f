"""Shared output of the benchmark scripts: a markdown table for the docs and the raw numbers as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line describing where the numbers were measured."""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, CPU only, Python {platform.python_version()} "
        f"({time.strftime('%Y-%m-%d')})"
    )


def write_report(name: str, text: str, data: Any, *, out: str | Path | None = None) -> None:
    """Print ``text``; write it to ``docs/benchmarks/<name>.md`` (or ``out``) and ``data`` to
    ``benchmarks/results/<name>.json`` (the docs' benchmarks page includes the markdown)."""
    print(text)
    markdown = Path(out) if out is not None else ROOT / "docs" / "benchmarks" / f"{name}.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(data, indent=1))
