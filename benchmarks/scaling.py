"""How super_resolve scales with the slide: a Visium-sized section at 200 genes, time split by stage, peak memory,
flatness in slide area, comparison rows (bicubic, TESLA), and the sampling steps against quality.

Parts (``--parts``, comma-separated; all by default):

``slide``
    A ``--edge`` x ``--edge`` um simulated section (default 6.5 mm, a Visium capture area) is simulated and written to
    zarr (not timed); then a fresh Python process per run reads it back lazily and runs ``c3.tl.super_resolve`` with
    a ``tiny``-preset model built for ``--genes`` genes (random weights: the time does not depend on training, only on
    the network's sizes and the number of genes), 10x, LR from the transcripts binned at 100 um, output streamed to a
    zarr store: once in mean mode and once in sample mode (mean + ``--samples`` residual samples of ``--steps`` DDIM
    steps). Reported: wall time, tiles/s, genes x tiles/s, peak resident memory (whole process, and above the level
    before the call), and the time split by stage: *read* (``read_zarr`` and the H&E read and resampled to 10 um),
    *inputs* (LR raster, tissue mask, tile plan, tile inputs), *model* (waiting on the dask tasks that run the model),
    *calibrate* (counts from each tile's prediction), *write* (blending into the zarr store, pyramid of the layer).
``areas``
    The same mean-mode run on sections of 1/16 and 1/4 of the area (each simulated with its own seed), with the
    ``slide`` run as the 16x row: time should grow with the tissue area and peak memory stay flat.
``compare``
    On the ``slide`` section: ``method="bicubic"`` through the same path, and TESLA (``benchmarks/baselines/tesla.py``,
    its vectorised backend - the package's own loops would take ~30 min here; see that module) imputing the same
    genes on a 10 um lattice.
``steps``
    Steps against quality of the sample mode, with the bundled demo model on a held-out simulated section (seed 1000
    and 1.92 mm, as ``c3diff demo``): 64 px patches every 60 px (as benchmarks/quality.py), ``--samples`` mean +
    residual samples per (patch, gene) at each step count; PCC (the method page's per-map |PCC|, after the
    ``lr_pixel`` calibration ``super_resolve`` applies) of one sample and of the average of the samples, the
    samples' spread relative to the 50-step spread, and seconds per patch.

Run:  python benchmarks/scaling.py [--edge 6500] [--genes 200] [--steps STEPS] [--samples 4] [--parts ...]
Prints markdown tables and writes docs/benchmarks/scaling.md and benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine, write_report  # noqa: E402

PARTS = ("slide", "areas", "compare", "steps", "sample")


# ------------------------------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident memory of this process, sampled every 20 ms on a thread."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self.window = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set():
            rss = self._process.memory_info().rss
            self.peak, self.window = max(self.peak, rss), max(self.window, rss)
            time.sleep(0.02)

    def open_window(self) -> None:
        """Start a new window: :attr:`window` is then the peak since this call."""
        self.window = self._process.memory_info().rss

    def close_window(self) -> int:
        self.window = max(self.window, self._process.memory_info().rss)
        return self.window

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        return {"peak_rss_mib": self.peak / 2**20, "peak_above_start_mib": (self.peak - self.start) / 2**20}


class StageTimer:
    """Wall time of super_resolve's stages, by wrapping the module-level helpers it calls (names that a later version
    of ``c3diff.tl._super_resolve`` no longer has are skipped; their time lands in *inputs*, the remainder)."""

    STAGES = {
        "read": ("histology_raster", "histology_texture"),
        "model": ("_load_model",),
        "calibrate": (
            "to_counts",
            "layer_tissue_mask",
            "zero_off_tissue",
            "spot_footprints",
            "bin_footprints",
            "match_footprints",
        ),
        "write": ("_parse_layer",),
    }

    #: Timed within *inputs* only for the peak memory of that stage (its time is the remainder, see :meth:`split`).
    INPUTS = ("bin_transcripts", "spots_to_grid", "detect_tissue", "plan_tiles")

    def __init__(self, memory: PeakRSS | None = None) -> None:
        self.seconds = {"read": 0.0, "inputs": 0.0, "model": 0.0, "calibrate": 0.0, "write": 0.0}
        self.peak_rss = dict.fromkeys(self.seconds, 0.0)  # MiB, the largest RSS seen during each stage
        self.memory = memory
        self._patches: list[tuple[object, str, object]] = []

    def _enter(self) -> None:
        if self.memory is not None:
            self.memory.open_window()

    def _leave(self, stage: str) -> None:
        if self.memory is not None:
            self.peak_rss[stage] = max(self.peak_rss[stage], self.memory.close_window() / 2**20)

    def _wrap(self, owner, name: str, stage: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            start = time.perf_counter()
            self._enter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self._leave(stage)

        self._patches.append((owner, name, original))
        setattr(owner, name, timed)

    def _wrap_tasks(self, module) -> None:
        original = getattr(module, "run_tasks", None)
        if original is None:
            return

        def timed_tasks(*args, **kwargs):  # the time spent waiting for each result is the model's
            iterator = iter(original(*args, **kwargs))
            while True:
                start = time.perf_counter()
                self._enter()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    self.seconds["model"] += time.perf_counter() - start
                    self._leave("model")
                yield item

        self._patches.append((module, "run_tasks", original))
        module.run_tasks = timed_tasks

    @contextlib.contextmanager
    def patched(self):
        import c3diff.pp._model_inputs as inputs_module
        import c3diff.pp._texture as texture_module
        import c3diff.tl._super_resolve as module
        from c3diff.tl import _tiling

        for stage, names in {**self.STAGES, "inputs": self.INPUTS}.items():
            for name in names:  # super_resolve's helpers, and those its inputs are built with
                for owner in (module, inputs_module, texture_module):
                    self._wrap(owner, name, stage)
        self._wrap_tasks(module)
        for cls_name in ("BlendAccumulator",):
            cls = getattr(module, cls_name, getattr(_tiling, cls_name, None))
            if cls is not None:
                for method in ("add", "result"):
                    self._wrap(cls, method, "write")
        try:
            yield self
        finally:
            for owner, name, original in reversed(self._patches):
                setattr(owner, name, original)

    def split(self, total: float, read_zarr: float) -> dict[str, float]:
        out = dict(self.seconds)
        out["read"] += read_zarr
        out["inputs"] = max(0.0, total + read_zarr - sum(v for k, v in out.items() if k != "inputs"))
        return out


# --------------------------------------------------------------------------------------------------- worker
def _worker(spec: dict) -> dict:
    """One timed run in this (fresh) process; prints nothing but returns the numbers."""
    import spatialdata as sd
    import torch

    warnings.filterwarnings("ignore")
    import c3diff as c3

    memory = PeakRSS()
    start = time.perf_counter()
    sdata = sd.read_zarr(spec["zarr"])
    read_zarr = time.perf_counter() - start
    genes = spec["genes"]
    if spec["method"] == "tesla":
        from baselines.tesla import tesla_impute

        result = tesla_impute(sdata, genes=genes, points_key="transcripts", res_um=10.0, backend="vectorized")
        total = time.perf_counter() - start
        return {
            "seconds": total,
            "tiles": None,
            "lattice": list(result.maps.shape[1:]),
            **memory.stop(),
            "stages": {"read": read_zarr, "model": result.params.get("seconds_imputation")},
            "torch_threads": torch.get_num_threads(),
        }
    if spec.get("store") and Path(spec["store"]).exists():  # the benchmark's own output of an earlier run
        import shutil

        shutil.rmtree(spec["store"])
    timer = StageTimer(memory)
    timer.peak_rss["read"] = memory.peak / 2**20  # read_zarr's
    kwargs = dict(points_key="transcripts", store=spec["store"], progress=False, genes=genes)
    if spec["method"] == "bicubic":
        kwargs.update(method="bicubic", tile_size=64)
    else:
        kwargs.update(model=spec["model"], mode=spec["mode"])
        if spec["mode"] == "sample":
            kwargs.update(steps=spec["steps"], n_samples=spec["samples"])
    call = time.perf_counter()
    with timer.patched():
        c3.tl.super_resolve(sdata, "hne", **kwargs)
    total = time.perf_counter() - call
    key = f"hne_{spec['method']}_x10"
    params = sdata.attrs["c3diff"][key]["params"]
    return {
        "seconds": total + read_zarr,
        "tiles": params["n_tiles"],
        **memory.stop(),
        "stages": timer.split(total, read_zarr),
        "stage_peak_rss_mib": timer.peak_rss,
        "steps": params.get("steps"),
        "n_samples": params.get("n_samples"),
        "torch_threads": torch.get_num_threads(),
    }


def _run_worker(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode:
        raise RuntimeError(f"worker failed ({spec}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({k: spec.get(k) for k in ("method", "mode", "zarr")} | result), flush=True)
    return result


# --------------------------------------------------------------------------------------------------- parts
def _section(work: Path, edge: float, seed: int, pixel_size: float = 1.0) -> tuple[Path, dict]:
    """Simulate (once) and write a section; its size and tissue area."""
    import c3diff as c3

    path = work / f"section_{edge:.0f}um_seed{seed}_{pixel_size:g}umpx.zarr"
    info_path = path.with_suffix(".json")
    if not info_path.exists():
        start = time.perf_counter()
        sdata = c3.datasets.simulate_section(width=edge, height=edge, seed=seed, pixel_size=pixel_size, progress=False)
        simulated = time.perf_counter() - start
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata.write(path, overwrite=True)
        info = {
            "edge_mm": edge / 1000,
            "seed": seed,
            "simulate_s": simulated,
            "pixel_size": pixel_size,
            "tissue_mm2": float(sdata.attrs["c3diff"]["simulation"]["tissue_fraction_realised"]) * (edge / 1000) ** 2,
            "transcripts": int(len(sdata.points["transcripts"])),
            "cells": int(len(sdata.shapes["cells"])),
        }
        info_path.write_text(json.dumps(info))
        print(f"simulated {info}", flush=True)
        del sdata
    return path, json.loads(info_path.read_text())


def _model(work: Path, n_genes: int) -> tuple[str, list[str]]:
    import c3diff as c3
    from c3diff._panels import paper_genes

    panel = set(
        c3.datasets.simulate_section(width=300, height=300, seed=0, progress=False).tables["cell_table"].var_names
    )
    genes = [g for g in paper_genes() if g in panel]
    genes += sorted(panel - set(genes))
    genes = genes[:n_genes]
    path = work / f"tiny_{n_genes}"
    if not (path / "config.json").exists():
        c3.models.build_model("tiny", genes=genes).save_pretrained(str(path))
    return str(path), genes


def _row(name: str, result: dict, n_genes: int, info: dict) -> dict:
    tiles = result.get("tiles")
    return {
        "run": name,
        "edge_mm": info["edge_mm"],
        "tissue_mm2": info["tissue_mm2"],
        "genes": n_genes,
        **result,
        "tiles_per_s": None if not tiles else tiles / result["seconds"],
        "gene_tiles_per_s": None if not tiles else tiles * n_genes / result["seconds"],
    }


def _steps_table(args) -> list[dict]:
    """Sample mode's steps against quality with the bundled demo model (in this process)."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler

    import c3diff as c3
    from c3diff.models import draw_samples
    from c3diff.tl._calibration import to_counts as _to_counts

    warnings.filterwarnings("ignore")
    model = c3.models.load_demo_model().eval()
    sdata = c3.datasets.simulate_section(width=args.steps_size, height=args.steps_size, seed=1000, progress=False)
    patches = c3.pp.make_patches(
        sdata,
        genes=model.genes,
        points_key="transcripts",
        patch_size=64,
        stride=60,
        scale=10,
        sample_id="seed1000",
        texture=model.texture_channels > 0,
    )
    lr_counts = patches.lr_counts()

    def calibrated(pred: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                _to_counts(np.maximum(pred[i], 0), None, lr_counts[i], patches.lr_mask[i], 10, "lr_pixel")[0]
                for i in range(len(pred))
            ]
        )

    def pcc(pred: np.ndarray) -> float:
        scores = c3.metrics.score_maps(calibrated(pred), patches.hr, genes=patches.genes)
        return float(c3.metrics.summarize_scores(scores)["pcc"].iloc[0])

    def inputs(i: int):
        return (
            torch.from_numpy(patches.histology[i : i + 1].astype(np.float32) / 255.0),
            torch.from_numpy(patches.lr[i : i + 1]),
        )

    def texture(i: int) -> dict:  # for a demo model whose mean reads the H&E's texture
        if not model.texture_channels:
            return {}
        return {"texture": torch.from_numpy(patches.texture[i : i + 1].astype(np.float32))}

    mean = np.concatenate(
        [
            model.predict(*inputs(i), mode="mean", gene_batch_size=None, **texture(i))[0].numpy()
            for i in range(len(patches))
        ]
    )

    def spread(draws: np.ndarray) -> float:  # the std layer super_resolve writes: scaled as the mean is, in counts
        std = draws.std(axis=2, ddof=1)
        return float(
            np.mean(
                [
                    _to_counts(np.maximum(mean[i], 0), std[i], lr_counts[i], patches.lr_mask[i], 10, "lr_pixel")[1]
                    for i in range(len(mean))
                ]
            )
        )

    rows = [
        {
            "sampler": "conditional mean (the layer written in both modes)",
            "steps": 0,
            "pcc_one": pcc(mean),
            "pcc_avg": pcc(mean),
            "spread": 0.0,
            "s_per_patch": None,
        }
    ]
    ddim = model.noise_scheduler
    runs = [("DDIM", s) for s in sorted(set(args.steps_grid) | {args.steps_default, 50})]
    runs += [("DPM-Solver++ (2M)", s) for s in args.dpm_grid]
    spreads = {}
    for sampler, steps in runs:
        model.set_scheduler(ddim if sampler == "DDIM" else DPMSolverMultistepScheduler.from_config(ddim.config))
        start = time.perf_counter()
        draws = np.concatenate(
            [
                draw_samples(
                    model,
                    *inputs(i),
                    n_samples=args.samples,
                    num_inference_steps=steps,
                    seed=i,
                    gene_batch_size=None,
                    **texture(i),
                ).numpy()
                for i in range(len(patches))
            ]
        )
        seconds = (time.perf_counter() - start) / len(patches)
        spreads[(sampler, steps)] = spread(draws)
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "pcc_one": pcc(draws[:, :, 0]),
                "pcc_avg": pcc(draws.mean(2)),
                "spread": spreads[(sampler, steps)],
                "s_per_patch": seconds,
            }
        )
        print(rows[-1], flush=True)
    model.set_scheduler(ddim)
    reference = spreads[("DDIM", 50)]
    for row in rows:
        row["spread_vs_50"] = row["spread"] / reference if reference > 0 else float("nan")
        row["patches"], row["genes"], row["samples"] = len(patches), len(model.genes), args.samples
    return rows


# ----------------------------------------------------------------------------------------------------- main
def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    from c3diff.tl._super_resolve import DEVICE_DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge", type=float, default=6500.0, help="edge of the whole section in um (16x area)")
    parser.add_argument("--genes", type=int, default=200, help="genes predicted")
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=1.0,
        help="H&E pixel size (um) of the simulated sections (the simulator caps an H&E at 1.5e8 px: "
        "6.5 mm needs >= 0.54 um/px; super_resolve reads a 10 um-or-finer pyramid level anyway)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEVICE_DEFAULTS["cpu"]["steps"],
        help="DDIM steps of the sample-mode run (default: super_resolve's CPU default)",
    )
    parser.add_argument("--samples", type=int, default=4, help="residual samples per (tile, gene) in sample mode")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--steps-size", type=float, default=1920.0, help="edge (um) of the steps-table section")
    parser.add_argument("--steps-grid", type=int, nargs="+", default=[1, 2, 5, 10, 50])
    parser.add_argument("--dpm-grid", type=int, nargs="*", default=[2, 5])
    parser.add_argument("--work", default=None, help="folder for sections, model and outputs (default: a temp dir)")
    parser.add_argument("--out", default=None, help="markdown output (default docs/benchmarks/scaling.md)")
    parser.add_argument(
        "--sample-area",
        default="16x",
        choices=["1x", "4x", "16x"],
        help="section of the sample-mode run (parts slide, sample)",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only write the report from the rows a run saved in --work (rows.json, steps.json)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    args.steps_default = DEVICE_DEFAULTS["cpu"]["steps"]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    warnings.filterwarnings("ignore")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="c3diff_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "machine": machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    rows: list[dict] = []
    sections: dict = {}
    n = args.genes
    if {"slide", "areas", "compare", "sample"} & set(parts) and not args.render:
        model_path, genes = _model(work, n)
        path, info = _section(work, args.edge, seed=16, pixel_size=args.pixel_size)
        sections["16x"] = info
        base = {"zarr": str(path), "genes": genes, "model": model_path}
        if "areas" in parts:  # every section first: the timed runs then follow one another
            for factor, seed in ((1, 1), (4, 4)):
                sections[f"{factor}x"] = _section(
                    work, args.edge / (16 / factor) ** 0.5, seed=seed, pixel_size=args.pixel_size
                )[1]
    progress = work / "rows.json"  # rows so far: `--render` writes the report from them (e.g. after a stopped run)

    if progress.exists():  # rows of earlier runs in this --work folder; a rerun replaces its own (run, area) rows
        saved = json.loads(progress.read_text())
        rows[:] = saved["rows"]
        sections = {**saved["sections"], **sections}

    def add(row: dict) -> None:
        rows[:] = [r for r in rows if (r["run"], r["area"]) != (row["run"], row["area"])] + [row]
        progress.write_text(json.dumps({"sections": sections, "rows": rows}))

    if args.render:
        saved = json.loads(progress.read_text())
        rows, sections = saved["rows"], saved["sections"]
    if not args.render and ("slide" in parts or "areas" in parts):
        mean = _run_worker(base | {"method": "c3diff", "mode": "mean", "store": str(work / "out_mean.zarr")})
        add(_row("C3-Diff mean", mean, n, info) | {"area": "16x"})
    if not args.render and "areas" in parts:
        for factor, seed in ((1, 1), (4, 4)):
            sub_path, sub_info = _section(work, args.edge / (16 / factor) ** 0.5, seed=seed, pixel_size=args.pixel_size)
            result = _run_worker(
                base
                | {
                    "zarr": str(sub_path),
                    "method": "c3diff",
                    "mode": "mean",
                    "store": str(work / f"out_mean_{factor}x.zarr"),
                }
            )
            add(_row("C3-Diff mean", result, n, sub_info) | {"area": f"{factor}x"})
    if not args.render and ("slide" in parts or "sample" in parts):
        factor = int(args.sample_area.rstrip("x"))
        sub_path, sub_info = (
            (path, info)
            if factor == 16
            else _section(work, args.edge / (16 / factor) ** 0.5, seed=factor, pixel_size=args.pixel_size)
        )
        result = _run_worker(
            base
            | {
                "zarr": str(sub_path),
                "method": "c3diff",
                "mode": "sample",
                "steps": args.steps,
                "samples": args.samples,
                "store": str(work / "out_sample.zarr"),
            }
        )
        add(
            _row(f"C3-Diff mean + {args.samples} samples ({args.steps} steps)", result, n, sub_info)
            | {"area": args.sample_area}
        )
    if not args.render and "compare" in parts:
        result = _run_worker(base | {"method": "bicubic", "mode": None, "store": str(work / "out_bicubic.zarr")})
        add(_row("bicubic", result, n, info) | {"area": "16x"})
        try:
            result = _run_worker(base | {"method": "tesla", "mode": None, "store": None})
            add(_row("TESLA (vectorised)", result, n, info) | {"area": "16x"})
        except RuntimeError as err:
            print(f"TESLA row skipped: {err}", flush=True)
            add({"run": "TESLA (vectorised)", "area": "16x", "skipped": str(err)[-300:]})
    steps_cache = work / "steps.json"  # the steps table, reused by later runs in the same --work folder
    if "steps" in parts:
        steps_cache.write_text(json.dumps(_steps_table(args)))
    steps_rows = json.loads(steps_cache.read_text()) if steps_cache.exists() else []
    results |= {"sections": sections, "rows": rows, "steps": steps_rows}
    write_report("scaling", _markdown(args, results), results, out=args.out)


def _markdown(args, results: dict) -> str:
    rows, sections = results["rows"], results["sections"]
    lines = ["### Whole-slide scaling (`benchmarks/scaling.py`)", ""]
    if rows:
        big = sections["16x"]
        lines += [
            f"A {big['edge_mm']:g} x {big['edge_mm']:g} mm simulated section (a Visium capture area; "
            f"{big['tissue_mm2']:.1f} mm^2 of tissue, {big['cells']:,} cells, {big['transcripts']:,} transcripts, "
            f"H&E at {big.get('pixel_size', 0.5):g} um/px), "
            f"{args.genes} genes, 10x (10 um output pixels), LR = transcripts binned at 100 um. C3-Diff: a "
            "`tiny`-preset model built for those genes with random weights - the time does not depend on training, "
            "only on the "
            "network's sizes and the gene count. Each row is a fresh process reading the section lazily from zarr and "
            "streaming the output to a zarr store; super_resolve's CPU defaults (batch of tiles, genes per model call) "
            "unless stated.",
            "",
            "| run | area | section (mm) | tissue (mm^2) | tiles | time (s) | tiles / s | genes x tiles / s | "
            "peak RSS (MiB) | peak above start (MiB) | read | inputs | model | calibrate | write |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        runs = list(dict.fromkeys(r["run"] for r in rows))
        areas = {"1x": 0, "4x": 1, "16x": 2}
        for r in sorted(rows, key=lambda r: (runs.index(r["run"]), areas.get(r["area"], 3))):
            if "skipped" in r:
                lines.append(f"| {r['run']} | {r['area']} | skipped: {r['skipped'][-120:]!r} |" + " |" * 12)
                continue
            st = r["stages"]
            lines.append(
                f"| {r['run']} | {r['area']} | {r['edge_mm']:.2f} | {r['tissue_mm2']:.1f} | {_fmt(r['tiles'], 'd')} | "
                f"{r['seconds']:.1f} | "
                f"{_fmt(r['tiles_per_s'], '.2f')} | {_fmt(r['gene_tiles_per_s'], '.0f')} | {r['peak_rss_mib']:.0f} | "
                f"{r['peak_above_start_mib']:.0f} | "
                + " | ".join(_fmt(st.get(k)) for k in ("read", "inputs", "model", "calibrate", "write"))
                + " |"
            )
        with_rss = [r for r in rows if r.get("stage_peak_rss_mib")]
        if with_rss:
            lines += [
                "",
                "Peak RSS during each stage (MiB, whole process; the stages as above, *inputs* measured over the LR "
                "raster, tissue mask and tile plan):",
                "",
                "| run | area | start | read | inputs | model | calibrate | write |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in sorted(with_rss, key=lambda r: (runs.index(r["run"]), areas.get(r["area"], 3))):
                rss = r["stage_peak_rss_mib"]
                start = r["peak_rss_mib"] - r["peak_above_start_mib"]
                lines.append(
                    f"| {r['run']} | {r['area']} | {start:.0f} | "
                    + " | ".join(
                        _fmt(rss.get(k) or None, ".0f") for k in ("read", "inputs", "model", "calibrate", "write")
                    )
                    + " |"
                )
        lines += [
            "",
            "Stage columns are seconds; *model* includes loading the model (imports, weights). TESLA's "
            "row: *read* is `read_zarr`, *model* its imputation; the rest "
            "of its time is binning the transcripts and resampling the H&E for it. Sections of the area rows: "
            + ", ".join(
                f"{k}: {v['edge_mm']:.2f} mm, {v['tissue_mm2']:.1f} mm^2 tissue (seed {v['seed']}), "
                f"simulated in {v['simulate_s']:.0f} s"
                for k, v in sorted(sections.items())
            )
            + ".",
            "",
        ]
    if results["steps"]:
        first = results["steps"][0]
        lines += [
            f"#### Sample mode: steps against quality (bundled demo model, held-out section seed 1000, "
            f"{args.steps_size / 1000:g} mm, {first['patches']} patches x {first['genes']} genes, {first['samples']} "
            "samples each)",
            "",
            "| sampler | steps | PCC, one sample | PCC, average of the samples | spread vs 50 DDIM steps | s / patch |",
            "|---|---|---|---|---|---|",
            *[
                f"| {r['sampler']} | {r['steps'] or '-'} | {r['pcc_one']:.3f} | {r['pcc_avg']:.3f} | "
                f"{r['spread_vs_50']:.2f} | {_fmt(r['s_per_patch'], '.2f')} |"
                for r in results["steps"]
            ],
            "",
            "PCC: the method page's per-(patch, gene) |PCC| against the 10 um truth, after the `lr_pixel` calibration "
            "super_resolve applies, averaged. Spread: the mean per-pixel standard deviation of the samples (counts), "
            "relative to 50 DDIM steps'.",
            "",
        ]
    lines += [
        f"Machine: {results['machine']}; torch threads in the workers: "
        f"{sorted({r.get('torch_threads') for r in rows if r.get('torch_threads')}) or '-'}."
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
