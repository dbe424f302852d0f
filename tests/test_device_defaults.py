"""super_resolve's device defaults: ``steps``, ``n_samples`` and ``batch_size`` come from the device's row of
``DEVICE_DEFAULTS`` when not given (paper-formulation models keep 50 steps and 1 sample), are announced, and given
values win. The run is stopped at the first model task: what is checked is what the tasks would receive."""

from __future__ import annotations

import logging

import pytest
from toy_sections import make_toy_section

import c3diff as c3
from c3diff.tl import _super_resolve
from c3diff.tl._super_resolve import DEVICE_DEFAULTS, PAPER_FORMULATION_DEFAULTS, _device_defaults

GENES = ["GENE_A", "GENE_B", "GENE_C"]


class _Stop(Exception):
    pass


@pytest.fixture
def tasks(monkeypatch):
    """What super_resolve hands its model tasks: the predictor's steps / samples and the tiles per task."""
    seen = {}

    def stop(func, items, *, extra_args=(), **kwargs):
        predictor = extra_args[0]
        seen.update(steps=predictor.steps, n_samples=predictor.n_samples, mode=predictor.mode)
        seen["tiles_per_task"] = [len(item.seeds) for item in items]
        raise _Stop

    monkeypatch.setattr(_super_resolve, "run_tasks", stop)
    return seen


def _run(model, **kwargs):
    sdata = make_toy_section()
    with pytest.raises(_Stop):
        _super_resolve.super_resolve(sdata, "hne", table_key="table", model=model, tile_size=None, **kwargs)


@pytest.fixture(scope="module")
def residual():
    import torch

    torch.manual_seed(0)
    return c3.models.build_model("tiny", genes=GENES).eval()


def test_device_kinds_map_to_their_row(monkeypatch):
    assert _device_defaults("cpu") == ("cpu", DEVICE_DEFAULTS["cpu"])
    monkeypatch.setattr(_super_resolve, "resolve_device", lambda device: "cuda:1")
    assert _device_defaults("auto") == ("cuda", DEVICE_DEFAULTS["cuda"])
    monkeypatch.setattr(_super_resolve, "resolve_device", lambda device: "mps")
    assert _device_defaults("mps") == ("mps", DEVICE_DEFAULTS["cpu"])  # kinds without a row take the CPU's
    gpu, cpu = DEVICE_DEFAULTS["cuda"], DEVICE_DEFAULTS["cpu"]
    assert gpu["steps"] > cpu["steps"] and gpu["batch_size"] > cpu["batch_size"]


def test_defaults_reach_the_tasks_and_are_announced(residual, tasks, caplog, monkeypatch):
    monkeypatch.setitem(DEVICE_DEFAULTS, "cpu", {"steps": 3, "n_samples": 2, "batch_size": 1})  # a distinct row
    with caplog.at_level(logging.INFO, logger="c3diff"):
        _run(residual, mode="sample", device="cpu", progress=False)
    assert (tasks["steps"], tasks["n_samples"], tasks["mode"]) == (3, 2, "sample")
    assert set(tasks["tiles_per_task"]) == {1}
    assert "super_resolve on cpu: steps=3, batch_size=1, n_samples=2" in caplog.text

    monkeypatch.setitem(DEVICE_DEFAULTS, "cpu", {"steps": 3, "n_samples": 2, "batch_size": 4})
    _run(residual, mode="sample", device="cpu", progress=False)
    assert max(tasks["tiles_per_task"]) == 4 and len(tasks["tiles_per_task"]) > 1


def test_given_values_win_and_mean_mode_takes_one_sample(residual, tasks, caplog):
    with caplog.at_level(logging.INFO, logger="c3diff"):
        _run(residual, mode="sample", device="cpu", steps=5, n_samples=3, batch_size=2, progress=False)
    assert (tasks["steps"], tasks["n_samples"]) == (5, 3)
    assert max(tasks["tiles_per_task"]) == 2
    assert "defaults for this device" not in caplog.text  # nothing was chosen for the user
    _run(residual, mode="mean", device="cpu", progress=False)
    assert tasks["n_samples"] == 1 and max(tasks["tiles_per_task"]) == DEVICE_DEFAULTS["cpu"]["batch_size"]


def test_paper_formulation_keeps_its_steps_and_one_sample(tasks):
    paper = c3.models.build_model("tiny-paper", genes=GENES).eval()
    _run(paper, device="cpu", progress=False)
    assert tasks["mode"] in (None, "sample")
    assert (tasks["steps"], tasks["n_samples"]) == (PAPER_FORMULATION_DEFAULTS["steps"], 1)
    assert max(tasks["tiles_per_task"]) == DEVICE_DEFAULTS["cpu"]["batch_size"]
