"""benchmarks/gpu.py runs: its --quick mode on the CPU (tiny models, one tile), its projection and its refusal to
report CPU numbers as a GPU benchmark."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_benchmark():
    spec = importlib.util.spec_from_file_location("c3diff_benchmark_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_visium_tiles_follow_super_resolve_plan(gpu_benchmark):
    # 650 px at 10 um: 256 px tiles every 190 px -> 4 per side; 64 px tiles every 40 px -> 16 per side
    assert gpu_benchmark.visium_tiles(256) == 16
    assert gpu_benchmark.visium_tiles(64) == 256


def test_quick_run_on_cpu(gpu_benchmark, tmp_path):
    out = tmp_path / "gpu.md"
    result = gpu_benchmark.main(["--quick", "--device", "cpu", "--models", "paper", "demo", "--out", str(out)])
    rows = result["rows"]
    # paper formulation: sampling only; the demo model (residual): its mean and mean + samples
    assert [(r["model"], r["mode"]) for r in rows] == [("paper", "sample"), ("demo", "mean"), ("demo", "sample")]
    for row in rows:
        assert row["precision"] == "fp32" and row["genes"] == 8 and row["tiles"] == 1
        assert row["tiles_per_s"] > 0 and row["gene_tiles_per_s"] == pytest.approx(8 * row["tiles_per_s"])
        assert row["visium_tiles"] == 256 and row["visium_s"] == pytest.approx(256 / row["tiles_per_s"])
    assert rows[0]["steps"] == 2 and rows[2]["n_samples"] == 2 and rows[1]["steps"] is None
    text = out.read_text()
    assert "quick check, not a benchmark" in text and text.count("| demo |") == 2 and "Device: cpu" in text


def test_refuses_without_gpu_unless_quick(gpu_benchmark):
    with pytest.raises(SystemExit, match="no GPU visible"):
        gpu_benchmark.main(["--device", "cpu"])
