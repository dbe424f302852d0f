"""Quality of C3-Diff against baselines and ablations on held-out simulated sections, every trained row given the
same CPU budget and trained over several seeds.

Simulates sections (one seed each; train / validation / test split by section) and scores on the held-out sections,
per (patch, gene), after the calibration ``c3.tl.super_resolve`` applies by default (per LR pixel for models and
the H&E heuristic, per tile for bicubic), at 10x (10 um) and 5x (20 um, the 2 x 2 sum of the 10x counts against the
20 um truth): range-normalised RMSE, |PCC|, Gaussian SSIM (the method page's metrics), and the within-LR-pixel
pattern r (how well a map places counts *inside* each 100 um LR pixel, the only freedom calibration leaves).

Rows:

- C3-Diff (residual formulation, the ``tiny-texture`` preset: the mean reads the H&E's texture): the conditional
  mean; mean + residual samples (the average of ``--samples`` DDIM samples); the same model at test time without LR
  ST; the ``tiny`` preset (no texture);
- C3-Diff ablations: no contrastive losses; no histology (a blank H&E in training and test: LR + gene code only);
- C3-Diff, the paper's formulation (``formulation="paper"``: the diffusion generates the whole map);
- a deterministic U-Net regressor given the same inputs, texture included (benchmarks/baselines/unet_regressor.py);
- bicubic upsampling of the LR map; the LR count spread by the H&E's squared darkness (a one-line heuristic);
- TESLA (Hu et al. 2023) from its PyPI package (benchmarks/baselines/tesla.py), if installed;
- the noise ceiling: the simulator's noise-free expected 10 um map (cell expectations before the Gamma-Poisson
  draw, spread over each cell's pixels, plus the background rate) scored against the observed counts.

Trained rows run ``--seeds`` times (mean and spread), each for ``--budget`` CPU seconds on one thread, ``--jobs``
at a time. The LR input is Xenium-like: transcripts binned at 100 um.

Run:  python benchmarks/quality.py [--budget 300] [--seeds 0 1 2] [--jobs 2] [--no-tesla]
TESLA (benchmark only):  pip install --no-deps --no-build-isolation TESLAforST && pip install opencv-python-headless
Prints a markdown table and writes docs/benchmarks/quality.md and benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import c3diff as c3
from c3diff.tl._calibration import to_counts as _to_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_report  # noqa: E402

LR_PIXELS = 10  # 10 um output pixels per 100 um LR pixel

#: Trained rows: name -> (training options, test options).
TRAINED = {
    "C3-Diff mean": {"model": "residual"},
    "C3-Diff mean, no texture": {"model": "residual", "preset": "tiny"},
    "C3-Diff, no contrastive losses": {
        "model": "residual",
        "loss_weights": {"modal": 0.0, "content": 0.0, "inter_sphere": 0.0},
    },
    "C3-Diff, no histology": {"model": "residual", "blank_histology": True},
    "C3-Diff, paper formulation": {"model": "paper"},
    "U-Net regressor": {"model": "unet"},
}


# ------------------------------------------------------------------------------------------------------ data
def _sections(args) -> dict:
    seeds = [*args.train_seeds, args.val_seed, *args.test_seeds]
    return {s: c3.datasets.simulate_section(width=args.size, height=args.size, seed=s, progress=False) for s in seeds}


def _patchsets(args, sections, genes):
    def patches(seed: int, scale: int, stride: int) -> c3.pp.PatchSet:
        return c3.pp.make_patches(
            sections[seed],
            genes=genes,
            points_key="transcripts",
            patch_size=64,
            stride=stride,
            scale=scale,
            sample_id=f"seed{seed}",
            texture=True,
        )

    train = [patches(s, 10, 30) for s in args.train_seeds]
    val = patches(args.val_seed, 10, 60)
    test10, test5 = [], []
    for s in args.test_seeds:
        p10, p5 = patches(s, 10, 60), patches(s, 5, 60)
        keep = np.arange(min(len(p10), args.max_test_patches))
        test10.append(p10.subset(index=keep))
        test5.append(p5.subset(index=keep))
    return train, val, test10, test5


def _blank(patches: c3.pp.PatchSet) -> c3.pp.PatchSet:
    """The same patches with a white H&E (no histology signal)."""
    out = patches.subset(index=np.arange(len(patches)))
    out.histology = np.full_like(out.histology, 255)
    out.texture = np.zeros_like(out.texture)  # the texture of a blank slide: its mean everywhere
    return out


# ------------------------------------------------------------------------------------------------ predictions
def _tile(model, patches: c3.pp.PatchSet, i: int, *, with_lr: bool = True) -> dict:
    """Patch ``i`` as the model's input: histology, LR maps (or None) and, for models that read it, the texture."""
    texture = patches.texture[i : i + 1].astype(np.float32) if model.texture_channels else None
    return {
        "histology": torch.from_numpy(patches.histology[i : i + 1].astype(np.float32) / 255.0),
        "lr": torch.from_numpy(patches.lr[i : i + 1]) if with_lr else None,
        "texture": None if texture is None else torch.from_numpy(texture),
    }


def _predict(model, patches: c3.pp.PatchSet, *, mode: str, steps: int, samples: int, with_lr: bool = True):
    out = []
    for i in range(len(patches)):
        mean, _ = model.predict(
            **_tile(model, patches, i, with_lr=with_lr),
            num_inference_steps=steps,
            n_samples=samples,
            seed=i,
            gene_batch_size=64,
            mode=mode,
        )
        out.append(mean.numpy())
    return np.concatenate(out)


def _train_row(job: tuple) -> tuple[str, int, dict[str, np.ndarray], str]:
    """One trained row and seed (runs in a worker process on one thread)."""
    name, seed, spec, args, data = job
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    train, val, t10 = data["train"], data["val"], data["test10"]
    if spec.get("blank_histology"):
        train, val, t10 = [_blank(p) for p in train], _blank(val), _blank(t10)
    torch.manual_seed(seed)
    out: dict[str, np.ndarray] = {}
    if spec["model"] == "unet":
        from baselines import fit_unet_regressor, predict_unet_regressor

        unet = fit_unet_regressor(
            c3.pp.PatchSet.concat(train), val=val, scale=10, time_budget=args.budget, progress=False, seed=seed
        )
        out[name] = predict_unet_regressor(unet, t10)
        return name, seed, out, f"{unet.training_log['steps']} steps"
    preset = spec.get("preset", "tiny-texture" if spec["model"] == "residual" else "tiny-paper")
    with tempfile.TemporaryDirectory() as work:
        learning_rate = args.learning_rate if spec["model"] == "residual" else args.paper_learning_rate
        result = c3.tl.train(
            train,
            val_data=val,
            model=preset,
            genes=data["genes"],
            output_dir=work,
            learning_rate=learning_rate,
            epochs=10**6,
            max_time=args.budget,
            seed=seed,
            batch_size=args.batch_size,
            loss_weights=spec.get("loss_weights"),
            progress=False,
            val_max_patches=8,
            mean_time_fraction=args.mean_fraction,
            lr_schedule="cosine",
        )
    steps = int(result.history["step"].iloc[-1])
    model = result.model.eval()
    if spec["model"] == "paper":
        out[name] = _predict(model, t10, mode="sample", steps=args.steps, samples=args.samples)
    else:
        out[name] = _predict(model, t10, mode="mean", steps=args.steps, samples=1)
    if name == "C3-Diff mean":
        out["C3-Diff mean + residual samples"] = _sample_mean(model, t10, steps=args.steps, samples=args.samples)
        out["C3-Diff mean, no LR ST at test"] = _predict(
            model, t10, mode="mean", steps=args.steps, samples=1, with_lr=False
        )
    return name, seed, out, f"{steps} steps"


def _sample_mean(model, patches, *, steps: int, samples: int) -> np.ndarray:
    """Average of ``samples`` mean + residual samples per (patch, gene)."""
    from c3diff.models import draw_samples

    out = []
    for i in range(len(patches)):
        draws = draw_samples(
            model, **_tile(model, patches, i), num_inference_steps=steps, n_samples=samples, seed=i, gene_batch_size=64
        )
        out.append(draws.mean(dim=2).numpy())
    return np.concatenate(out)


# -------------------------------------------------------------------------------------------------- scoring
def _calibrate(pred: np.ndarray, patches: c3.pp.PatchSet, calibration: str) -> np.ndarray:
    """Counts per output pixel, as super_resolve writes them (see ``c3.tl.super_resolve``'s ``calibration``)."""
    lr_counts = patches.lr_counts()
    return np.stack(
        [
            _to_counts(np.maximum(pred[i], 0), None, lr_counts[i], patches.lr_mask[i], LR_PIXELS, calibration)[0]
            for i in range(len(pred))
        ]
    )


def _pattern_r(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pearson r over pixels of each map divided by its LR-pixel mean, against the truth's (complete LR pixels)."""
    n = pred.shape[-1] // LR_PIXELS * LR_PIXELS

    def pattern(maps):
        maps = maps[..., :n, :n].astype(np.float64)
        *lead, h, w = maps.shape
        pooled = maps.reshape(*lead, h // LR_PIXELS, LR_PIXELS, w // LR_PIXELS, LR_PIXELS).mean(axis=(-3, -1))
        mean = np.repeat(np.repeat(pooled, LR_PIXELS, -2), LR_PIXELS, -1)
        return np.where(mean > 0, maps / np.where(mean > 0, mean, 1.0), np.nan)

    a, b = pattern(pred), pattern(truth)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any() or a[ok].std() == 0:
        return 0.0
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _score(pred: np.ndarray, patches: c3.pp.PatchSet) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant truth maps are skipped (counted in score_maps' status)
        summary = c3.metrics.summarize_scores(c3.metrics.score_maps(pred, patches.hr, genes=patches.genes))
    return {k: float(summary[k].iloc[0]) for k in ("rmse", "pcc", "ssim")}


def _sum_pool(pred: np.ndarray) -> np.ndarray:
    n, g, h, w = pred.shape
    return pred.reshape(n, g, h // 2, 2, w // 2, 2).sum(axis=(3, 5))


def _noise_ceiling(sections, patches: c3.pp.PatchSet, genes: list[str], seeds: list[int]) -> np.ndarray:
    """The simulator's expected 10 um map on the test patches (see :func:`c3diff.datasets.expected_counts`)."""
    out = []
    for seed, part in zip(seeds, patches, strict=True):
        raster = c3.datasets.expected_counts(sections[seed], genes=genes, pixel_size=10.0)
        for y, x in part.origins:  # patch corners in um; the raster starts at the H&E's corner, (0, 0) here
            row, col = round(y / 10.0), round(x / 10.0)
            out.append(raster[:, row : row + 64, col : col + 64])
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--val-seed", type=int, default=6)
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[7, 8])
    parser.add_argument("--size", type=float, default=2560.0, help="section edge in um")
    parser.add_argument("--genes", type=int, default=48, help="genes (immune markers + HVGs)")
    parser.add_argument("--budget", type=float, default=300.0, help="CPU seconds of training per trained row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per trained row")
    parser.add_argument("--jobs", type=int, default=2, help="trained rows run at once (one thread each)")
    parser.add_argument("--rows", nargs="+", default=list(TRAINED), help="trained rows to run")
    parser.add_argument("--mean-fraction", type=float, default=0.8, help="share of the budget for the mean stage")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="patches per C3-Diff batch (residual models: x 8 genes each)"
    )
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="AdamW lr of the residual models")
    parser.add_argument(
        "--paper-learning-rate",
        type=float,
        default=1e-3,
        help="AdamW lr of the paper formulation (the bundled model's previous setting)",
    )
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps at test time")
    parser.add_argument("--samples", type=int, default=4, help="samples averaged per (patch, gene)")
    parser.add_argument("--max-test-patches", type=int, default=16, help="test patches per section")
    parser.add_argument("--no-tesla", action="store_true")
    parser.add_argument("--out", default=None, help="markdown output (default docs/benchmarks/quality.md)")
    args = parser.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(1)
    sections = _sections(args)
    markers = sorted({g for genes in c3.tl.DEFAULT_MARKERS.values() for g in genes})
    first = sections[args.train_seeds[0]]
    genes = c3.pp.select_genes(
        first,
        table_key="cell_table",
        n_top_genes=args.genes,
        include=[g for g in markers if g in set(first.tables["cell_table"].var_names)],
    )
    train, val, test10, test5 = _patchsets(args, sections, genes)
    t10, t5 = c3.pp.PatchSet.concat(test10), c3.pp.PatchSet.concat(test5)
    print(
        f"{len(genes)} genes; train {sum(len(p) for p in train)} patches, val {len(val)}, test {len(t10)} "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )

    # ---- trained rows: name -> seed -> prediction ----------------------------------------------------------
    data = {"train": train, "val": val, "test10": t10, "genes": genes}
    jobs = [(name, seed, TRAINED[name], args, data) for name in args.rows for seed in args.seeds]
    trained: dict[str, dict[int, np.ndarray]] = {}
    notes: dict[str, str] = {}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for name, seed, out, note in pool.map(_train_row, jobs):
            for row, pred in out.items():
                trained.setdefault(row, {})[seed] = pred
            notes.setdefault(name, note)
            print(f"{name} (seed {seed}): {note} in {args.budget:g} s", flush=True)

    # ---- untrained rows -------------------------------------------------------------------------------------
    fixed: dict[str, tuple[np.ndarray, str]] = {}
    lr = torch.from_numpy(t10.lr)
    fixed["bicubic"] = (
        torch.nn.functional.interpolate(lr, scale_factor=LR_PIXELS, mode="bicubic")[..., :64, :64].clamp(0, 1).numpy(),
        "tile",
    )
    darkness = (1.0 - t10.histology.astype(np.float32).mean(axis=1, keepdims=True) / 255.0) ** 2
    fixed["LR spread by H&E darkness^2"] = (np.broadcast_to(darkness + 1e-6, t10.hr.shape).copy(), "lr_pixel")
    if not args.no_tesla:
        try:
            from baselines import tesla_predict

            fixed["TESLA"] = (
                np.concatenate(
                    [
                        tesla_predict(sections[s], part, genes=genes)
                        for s, part in zip(args.test_seeds, test10, strict=True)
                    ]
                ),
                "lr_pixel",
            )
        except ImportError as err:
            notes["TESLA"] = f"not run: {err}"
    fixed["noise ceiling (simulator's expected map)"] = (
        _noise_ceiling(sections, test10, genes, args.test_seeds),
        "none",
    )

    # ---- scores ---------------------------------------------------------------------------------------------
    def scores(pred: np.ndarray, calibration: str) -> dict[str, float]:
        counts = pred if calibration == "none" else _calibrate(pred, t10, calibration)
        s10, s5 = _score(counts, t10), _score(_sum_pool(counts), t5)
        truth = t10.hr_counts()
        return {
            **{f"{k}_10x": v for k, v in s10.items()},
            **{f"{k}_5x": v for k, v in s5.items()},
            "pattern_r": _pattern_r(counts, truth),
        }

    rows = []
    for name, by_seed in trained.items():
        per_seed = [scores(pred, "lr_pixel") for pred in by_seed.values()]
        row = {"method": name, "n_seeds": len(per_seed), "note": notes.get(name, notes.get("C3-Diff mean", ""))}
        for key in per_seed[0]:
            values = np.array([s[key] for s in per_seed])
            row[key], row[f"{key}_sd"] = float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)
        rows.append(row)
        print(row, flush=True)
    for name, (pred, calibration) in fixed.items():
        rows.append(
            {
                "method": name,
                "n_seeds": 0,
                "note": notes.get(name, f"calibration: {calibration}"),
                **scores(pred, calibration),
            }
        )
        print(rows[-1], flush=True)
    elapsed = time.perf_counter() - start

    def cell(row, key):
        sd = row.get(f"{key}_sd")
        return f"{row[key]:.3f}" + (f" ± {sd:.3f}" if sd is not None and row["n_seeds"] > 1 else "")

    keys = ["rmse_10x", "pcc_10x", "ssim_10x", "rmse_5x", "pcc_5x", "ssim_5x", "pattern_r"]
    lines = [
        "### Quality on held-out simulated sections (`benchmarks/quality.py`)",
        "",
        f"Trained on sections {args.train_seeds} (validation {args.val_seed}), tested on {args.test_seeds} "
        f"({args.size / 1000:g} mm, {len(t10)} test patches of 64 px, {len(genes)} genes). Every trained row: "
        f"tiny presets, AdamW lr {args.learning_rate:g} (paper formulation {args.paper_learning_rate:g}) with "
        f"cosine decay, batches of {args.batch_size} patches, {args.budget:g} s of CPU training on one thread, seeds "
        f"{args.seeds} (mean ± sd over seeds); residual models give {args.mean_fraction:g} of it to the mean stage. "
        f"Samples: {args.steps} DDIM steps, mean of {args.samples}. Every row calibrated as super_resolve does by "
        "default (per LR pixel; bicubic per tile); 5x = 2 x 2 sums of the 10x counts against the 20 um truth.",
        "",
        "| method | RMSE 10x | PCC 10x | SSIM 10x | RMSE 5x | PCC 5x | SSIM 5x | pattern r | training |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['method']} | " + " | ".join(cell(r, k) for k in keys) + f" | {r['note']} |" for r in rows],
        "",
        f"Machine: {machine()}; {args.jobs} jobs of one torch thread; {elapsed / 60:.0f} min in all.",
    ]
    write_report("quality", "\n".join(lines) + "\n", {"args": vars(args), "rows": rows}, out=args.out)


if __name__ == "__main__":
    main()
