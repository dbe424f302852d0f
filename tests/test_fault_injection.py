"""Fault injection: runs killed with SIGKILL (in a subprocess) after and during a write, then resumed or rerun.

Each test checks what the user sees (the error type and the words that say what to do) and that nothing already on
disk changed; a resumed training run must equal the uninterrupted run bit for bit (CPU, one torch thread).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_sections import make_toy_section

import c3diff as c3
from c3diff._geometry import scale0
from c3diff.tl._train import _clean_checkpoints, _latest_checkpoint, _write_folder_atomically, train

#: the training runs (the killed ones in subprocesses too, see ``_killed_run``) run on one torch thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")

GENES = ["GENE_A", "GENE_B", "GENE_C"]
#: 2 sections x 4 patches x 3 genes: 2 mean-stage and 4 residual steps per epoch. Steps 1-4 the mean (checkpoints at
#: steps 2 and 4), the first stage (pixel space: no steps; its checkpoint replaces step 4's), 5-6 the backbone
#: (checkpoint at 6), 7-14 the residual stage (checkpoints at 10 and 14)
RUN = dict(
    model="tiny",
    genes=GENES,
    epochs=2,
    batch_size=4,
    learning_rate=1e-3,
    seed=1,
    backbone_steps=2,
    autoencoder_steps=2,
    val_fraction=0,
    progress=False,
    log_every=1,
)

#: A training run that SIGKILLs itself at a chosen point of a checkpoint write (argv: patch files, output dir, mode,
#: step, number of torch threads).
TRAIN_SCRIPT = textwrap.dedent("""
    import io, json, os, signal, sys, warnings
    import torch
    import c3diff.tl._train as T
    from c3diff.pp import PatchSet

    warnings.simplefilter("ignore")
    patch_files, out, mode = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    step, threads = int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "after":  # killed right after step-N was renamed into place
        original = T._write_folder_atomically
        def write(final, fn):
            original(final, fn)
            if final.name == f"step-{step}":
                kill()
        T._write_folder_atomically = write
    else:  # killed half-way through writing step-N's optimizer state
        save = torch.save
        def partial_save(obj, path, *args, **kwargs):
            if f".step-{step}.c3diff-tmp-" in str(path) and str(path).endswith("optimizer.pt"):
                buffer = io.BytesIO()
                save(obj, buffer)
                with open(path, "wb") as fh:
                    fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                kill()
            return save(obj, path, *args, **kwargs)
        T.torch.save = partial_save
    kwargs = json.loads(os.environ["C3DIFF_TEST_RUN"])
    T.train([PatchSet.load(f) for f in patch_files], output_dir=out, **kwargs)
""")

#: super_resolve to a store that SIGKILLs itself after a number of tiles (argv: store, tests folder, tiles, kwargs).
SUPER_RESOLVE_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, warnings
    import c3diff as c3
    from c3diff.tl import _tiling

    sys.path.insert(0, sys.argv[2])
    from toy_sections import make_toy_section

    warnings.simplefilter("ignore")
    added, add = [], _tiling.BlendAccumulator.add
    def add_then_die(self, *args, **kwargs):
        add(self, *args, **kwargs)
        added.append(1)
        if len(added) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    _tiling.BlendAccumulator.add = add_then_die
    c3.tl.super_resolve(make_toy_section(), "hne", store=sys.argv[1], key_added="b", **json.loads(sys.argv[4]))
""")


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with the sha1 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b) -> None:
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _log_steps(folder: Path) -> list[tuple[str, int]]:
    return [(row["type"], row["step"]) for row in map(json.loads, (folder / "log.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def patch_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("patches")
    files = []
    for seed in range(2):
        section = make_toy_section(seed=seed, height=1400, width=1400, pixel_size=4.0, n_transcripts=40_000)
        patches = c3.pp.make_patches(section, genes=GENES, points_key="transcripts", patch_size=64, min_tissue=0.3)
        files.append(folder / f"toy{seed}.npz")
        patches.save(files[-1])
    return files


@pytest.fixture(scope="module")
def uninterrupted(one_torch_thread, patch_files, tmp_path_factory):
    """The reference: the whole run without interruption."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    with pytest.warns(UserWarning, match="no validation data"):
        result = train([str(f) for f in patch_files], output_dir=folder, **RUN)
    return result, folder


def _killed_run(patch_files, out: Path, mode: str, step: int) -> None:
    env = {**os.environ, "C3DIFF_TEST_RUN": json.dumps(RUN), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TRAIN_SCRIPT,
            ",".join(map(str, patch_files)),
            str(out),
            mode,
            str(step),
            str(torch.get_num_threads()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ training
def test_killed_after_a_checkpoint_resumes_exactly(patch_files, uninterrupted, tmp_path):
    reference, reference_dir = uninterrupted
    out = tmp_path / "run"
    _killed_run(patch_files, out, "after", 10)  # in the residual stage, after its first epoch's checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-2", "step-4", "step-6"]
    before = _digest(out / "checkpoints")
    with pytest.warns(UserWarning, match="no validation data"):
        resumed = train([str(f) for f in patch_files], output_dir=out, resume="latest", **RUN)
    _assert_same_weights(reference.model, resumed.model)
    after = _digest(out / "checkpoints")
    assert {k: v for k, v in after.items() if k in before} == before  # the checkpoints it resumed from are intact
    assert _log_steps(out) == _log_steps(reference_dir)  # one row per step: nothing of the dead run past step 10
    assert resumed.history.drop(columns="time").equals(reference.history.drop(columns="time"))


def test_killed_during_a_checkpoint_write_resumes_from_the_last_complete_one(patch_files, uninterrupted, tmp_path):
    reference, reference_dir = uninterrupted
    out = tmp_path / "run"
    _killed_run(patch_files, out, "during", 10)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-10" not in names and any(n.startswith(".step-10.c3diff-tmp-") for n in names)  # never half-written
    partial = next((out / "checkpoints").glob(".step-10.c3diff-tmp-*"))
    before = _digest(out)
    # the half-written folder is refused by name, with the way out, and nothing is changed
    with pytest.raises(FileNotFoundError, match="not a c3diff checkpoint .* resume='latest'"):
        train([str(f) for f in patch_files], output_dir=out, resume=partial, **RUN)
    assert _digest(out) == before
    rows = _log_steps(out)
    assert max(step for _, step in rows) == 10  # the dead run logged past its last complete checkpoint (step 6)
    with pytest.warns(UserWarning, match="no validation data"):
        resumed = train([str(f) for f in patch_files], output_dir=out, resume="latest", **RUN)
    _assert_same_weights(reference.model, resumed.model)
    assert not list((out / "checkpoints").glob(".*.c3diff-tmp-*"))  # cleaned up
    assert _log_steps(out) == _log_steps(reference_dir)
    after = _digest(out)
    complete = {k: v for k, v in before.items() if k.startswith("checkpoints/step-")}  # step-2, step-4 and step-6
    assert {k: after.get(k) for k in complete} == complete


def test_clean_stop_mid_epoch_resumes_exactly_and_the_data_order_is_checked(patch_files, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "run"
    files = [str(f) for f in patch_files]
    with pytest.warns(UserWarning, match="no validation data"):
        # max_steps counts the mean and residual steps: stopped at step 8, mid-epoch, and a whole epoch follows
        train(files, output_dir=out, max_steps=6, **RUN)
    before = _digest(out)
    with (
        pytest.raises(ValueError, match=r"different data order \(batch_size 4 -> 2\).*same `data`, `batch_size`"),
        pytest.warns(UserWarning, match="no validation data"),
    ):
        train(files, output_dir=out, resume="latest", **{**RUN, "batch_size": 2})
    assert _digest(out) == before
    with pytest.warns(UserWarning, match="no validation data"):
        resumed = train(files, output_dir=out, resume="latest", **RUN)
    _assert_same_weights(reference.model, resumed.model)
    steps = [step for kind, step in _log_steps(out) if kind == "step"]
    assert steps == list(range(1, 15))  # the backbone's steps 5 and 6 among them


def test_a_stop_and_resume_with_validation_keeps_the_uninterrupted_runs_best(patch_files, tmp_path, monkeypatch):
    """A run stopped by ``max_steps`` validates at the stop (so ``best/`` can hold its last weights); resumed, it must
    forget that validation, which an uninterrupted run never made: same ``best/``, model, log and history.

    The validation is replaced by a scorer that calls the weights the run had at the stop (step 8, after 6 steps of
    the mean and residual stages, mid-epoch in the residual stage) the best ever seen, and every other state equally
    good: remembered across the resume, they would stay in ``best/`` instead of the step-10 weights the uninterrupted
    run keeps."""
    favourite: dict[str, torch.Tensor] = {}

    def losses(model, loader, **kwargs):
        weights = model.state_dict()
        best = bool(favourite) and all(torch.equal(weights[k].cpu(), v) for k, v in favourite.items())
        return {"val_total": 1.0, "val_mse": 0.0 if best else 1.0}

    scope = train.__globals__  # the namespace the train function reads, whatever sys.modules holds now
    monkeypatch.setitem(scope, "_validation_losses", losses)
    monkeypatch.setitem(scope, "validation_scores", lambda *args, **kwargs: {"val_pcc": 0.5, "val_rmse": 1.0})
    files = [str(f) for f in patch_files]
    run = {**RUN, "val_data": files[1]}
    train(files, output_dir=tmp_path / "probe", max_steps=6, **run)  # the weights at the stop
    favourite.update(_weights(c3.models.from_pretrained(str(tmp_path / "probe" / "checkpoints" / "step-8" / "model"))))

    reference = train(files, output_dir=tmp_path / "full", **run)
    stopped = train(files, output_dir=tmp_path / "split", max_steps=6, **run)
    _assert_same_weights(
        stopped.model, c3.models.from_pretrained(str(tmp_path / "probe" / "checkpoints" / "step-8" / "model"))
    )
    resumed = train(files, output_dir=tmp_path / "split", resume="latest", **run)
    assert reference.best_checkpoint is not None and resumed.best_checkpoint is not None
    _assert_same_weights(reference.model, resumed.model)
    _assert_same_weights(
        c3.models.from_pretrained(str(tmp_path / "full" / "best")),
        c3.models.from_pretrained(str(tmp_path / "split" / "best")),
    )
    assert _log_steps(tmp_path / "split") == _log_steps(tmp_path / "full")
    assert resumed.history.drop(columns="time").equals(reference.history.drop(columns="time"))
    # the stopped run itself: its last weights were validated at the stop, logged as such, and kept as its best
    last = stopped.history.iloc[-1]
    assert last["stopped"] is True and last["step"] == 8 and last["val_mse"] == 0.0
    assert stopped.best_checkpoint == tmp_path / "split" / "best"


class _Killed(Exception):
    """Ends a run in-process where a SIGKILL would."""


def test_map_stages_log_validate_and_checkpoint_and_a_resume_after_the_backbone_skips_it(
    patch_files, tmp_path, monkeypatch
):
    """The first stage and the backbone are stages of the run: their steps are numbered and logged, the backbone is
    validated, and each ends with a checkpoint; a run killed right after the backbone's checkpoint resumes with the
    residual stage (no map stage again) to the uninterrupted run's weights, log and history."""
    files = [str(f) for f in patch_files]
    # 1 epoch: steps 1-2 the mean, the first stage (checkpoint at 2), 3-4 the backbone (checkpoint at 4), 5-8 residual
    run = {**RUN, "epochs": 1, "val_data": files[1], "val_steps": 2, "val_max_patches": 2, "val_samples": 1}
    reference = train(files, output_dir=tmp_path / "full", **run)
    rows = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    backbone = [r for r in rows if r["stage"] == "backbone"]
    assert [(r["type"], r["step"]) for r in backbone] == [("step", 3), ("step", 4), ("validation", 4)]
    assert {"total", "mse"} <= set(backbone[0]) and backbone[0]["total"] > 0
    assert np.isfinite(backbone[-1]["val_mse"]) and backbone[-1]["val_mse"] > 0
    assert [r["stage"] for r in rows if r["type"] == "step"] == ["mean"] * 2 + ["backbone"] * 2 + ["residual"] * 4
    assert reference.history["stage"].tolist() == ["mean", "backbone", "residual"]
    at_backbone_end = tmp_path / "full" / "checkpoints" / "step-4"
    state = json.loads((at_backbone_end / "trainer_state.json").read_text())
    assert (state["stage"], state["global_step"], state["map_steps"]) == ("backbone", 4, 2)
    assert not (at_backbone_end / "optimizer.pt").exists()  # the residual stage starts with its own
    assert c3.models.from_pretrained(str(at_backbone_end / "model")).is_fitted("backbone")

    scope = train.__globals__
    write = scope["_write_folder_atomically"]

    def write_then_die(final, fn):
        write(final, fn)
        if final.name == "step-4":
            raise _Killed

    monkeypatch.setitem(scope, "_write_folder_atomically", write_then_die)
    with pytest.raises(_Killed):
        train(files, output_dir=tmp_path / "split", **run)
    monkeypatch.setitem(scope, "_write_folder_atomically", write)
    assert _latest_checkpoint(tmp_path / "split") == tmp_path / "split" / "checkpoints" / "step-4"
    fitted = []
    fit = scope["_fit_map_stage"]
    monkeypatch.setitem(
        scope, "_fit_map_stage", lambda stage, *args, **kwargs: fitted.append(stage) or fit(stage, *args, **kwargs)
    )
    resumed = train(files, output_dir=tmp_path / "split", resume="latest", **run)
    assert fitted == []  # neither map stage ran again
    _assert_same_weights(reference.model, resumed.model)
    assert _log_steps(tmp_path / "split") == _log_steps(tmp_path / "full")  # the backbone's rows once
    assert resumed.history.drop(columns="time").equals(reference.history.drop(columns="time"))


def _dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _complete(folder: Path, text: str = "{}") -> None:
    folder.mkdir()
    (folder / "trainer_state.json").write_text(text)


def test_latest_ignores_incomplete_checkpoints_and_undoes_a_killed_replace(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (3, 12):
        _write_folder_atomically(checkpoints / f"step-{step}", _complete)
    (checkpoints / "step-20" / "model").mkdir(parents=True)  # written in place by an older version, then killed
    dead = _dead_pid()
    (checkpoints / f".step-30.c3diff-tmp-{dead}").mkdir()  # a write killed before its rename
    (checkpoints / f".step-40.c3diff-tmp-{os.getppid()}").mkdir()  # being written by a live process: kept
    with pytest.warns(UserWarning, match=r"ignoring incomplete checkpoint folder\(s\) \['step-20'\]"):
        assert _latest_checkpoint(tmp_path) == checkpoints / "step-12"
    assert not (checkpoints / f".step-30.c3diff-tmp-{dead}").exists()
    (checkpoints / f".step-40.c3diff-tmp-{os.getppid()}").rmdir()
    # killed between moving the old folder aside and renaming the new one in: the old one comes back
    (checkpoints / "step-12").rename(checkpoints / f".step-12.c3diff-old-{dead}")
    _clean_checkpoints(checkpoints)
    assert (checkpoints / "step-12" / "trainer_state.json").exists()

    def failing(folder: Path) -> None:
        _complete(folder, '{"new": true}')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a replace that fails while writing changes nothing
        _write_folder_atomically(checkpoints / "step-12", failing)
    assert (checkpoints / "step-12" / "trainer_state.json").read_text() == "{}"
    _write_folder_atomically(checkpoints / "step-12", lambda folder: _complete(folder, '{"new": true}'))
    assert (checkpoints / "step-12" / "trainer_state.json").read_text() == '{"new": true}'
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-12", "step-20", "step-3"]  # nothing left over


# --------------------------------------------------------------------------------------------- super_resolve
def test_super_resolve_to_a_store_killed_midway_then_rerun(tmp_path):
    sdata = make_toy_section()
    kwargs = dict(table_key="table", method="bicubic", tile_size=40, progress=False)  # small tiles: many
    c3.tl.super_resolve(sdata, "hne", store=tmp_path / "a.zarr", key_added="a", **kwargs)
    before = _digest(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SUPER_RESOLVE_SCRIPT,
            str(tmp_path / "b.zarr"),
            str(Path(__file__).parent),
            "5",
            json.dumps(kwargs),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (tmp_path / "b.zarr").exists()  # a partial layer never appears at the store's path
    (partial,) = tmp_path.glob(".b.zarr.c3diff-tmp-*")
    assert (partial / "mean").exists()
    assert {k: v for k, v in _digest(tmp_path).items() if k.startswith("a.zarr")} == before  # the other layer's store

    c3.tl.super_resolve(sdata, "hne", store=tmp_path / "b.zarr", key_added="b", **kwargs)  # rerun
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr"]
    in_memory = c3.tl.super_resolve(sdata, "hne", inplace=False, **kwargs)["mean"]
    np.testing.assert_array_equal(scale0(sdata.images["b"]).values, scale0(in_memory).values)
    assert sdata.attrs["c3diff"]["b"]["params"]["store"] == str((tmp_path / "b.zarr").resolve())

    # a store is never shared between layers: refused, nothing on disk or in the SpatialData changes
    before, images, attrs = _digest(tmp_path), dict(sdata.images), json.dumps(sdata.attrs, default=str)
    for overwrite in (False, True):
        with pytest.raises(
            ValueError,
            match=r"`store='.*a.zarr'` already exists and holds the layer 'a'. A store "
            r"holds one layer.*Pass a new path for `store`",
        ):
            c3.tl.super_resolve(sdata, "hne", store=tmp_path / "a.zarr", key_added="c", overwrite=overwrite, **kwargs)
    assert _digest(tmp_path) == before and dict(sdata.images) == images
    assert json.dumps(sdata.attrs, default=str) == attrs
    # the layer's own store, replaced with overwrite=True: the layer and its provenance match the new data
    c3.tl.super_resolve(
        sdata, "hne", store=tmp_path / "a.zarr", key_added="a", overwrite=True, **{**kwargs, "genes": ["GENE_B"]}
    )
    assert list(scale0(sdata.images["a"]).coords["c"].values) == ["GENE_B"]
    assert sdata.attrs["c3diff"]["a"]["params"]["genes"] == ["GENE_B"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr"]


def test_a_store_whose_replacement_was_killed_between_the_renames_comes_back(tmp_path):
    """`super_resolve(store=..., overwrite=True)` killed after moving the old store aside and before renaming the new
    one in: the next call on that store puts the old one back (it was deleted), and drops the dead call's folders;
    a folder another running process is writing stays."""
    from c3diff._atomic import recover, staging

    final = tmp_path / "layer.zarr"
    final.mkdir()
    (final / "mean").write_text("old layer")
    dead = _dead_pid()
    final.rename(staging(final, "old", dead))
    staging(final, "tmp", dead).mkdir()  # the dead call's complete new store, never renamed in
    staging(final, "tmp", os.getppid()).mkdir()  # a live process writing the same place
    recover(final)
    assert (final / "mean").read_text() == "old layer"
    live = staging(final, "tmp", os.getppid()).name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["layer.zarr", live])
