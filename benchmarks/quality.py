"""Quality of C3-Diff against baselines on held-out simulated sections, after a fixed CPU training budget.

Simulates sections (one seed each; train / validation / test split by section), trains the ``tiny`` preset for a
fixed wall-clock budget on the CPU, and scores on the held-out sections, per (patch, gene) on [0, 1]-normalised maps
(range-normalised RMSE, |PCC|, Gaussian SSIM; METHOD.md section 7), at 10x (10 um) and 5x (20 um):

- C3-Diff (DDIM, ``--samples`` samples averaged);
- C3-Diff trained without the contrastive losses (ablation: lambda_modal = lambda_content = lambda_inter = 0);
- C3-Diff at test time without LR ST (histology only; ST features imputed from the memory bank);
- bicubic upsampling of the LR map;
- a deterministic U-Net regressor given the same inputs (benchmarks/baselines/unet_regressor.py);
- TESLA (Hu et al. 2023) from its PyPI package (benchmarks/baselines/tesla.py), if installed.

5x scores use the 2 x 2 mean of each 10x prediction against the 20 um truth (every method alike). The LR input is
Xenium-like: transcripts binned at 100 um.

Run:  python benchmarks/quality.py [--budget 1200] [--samples 8] [--no-tesla]
TESLA (benchmark only):  pip install --no-deps --no-build-isolation TESLAforST && pip install opencv-python-headless
Prints a markdown table and writes docs/benchmarks/quality.md and benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import c3diff as c3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_report  # noqa: E402


def _bicubic(patches: c3.pp.PatchSet) -> np.ndarray:
    lr = torch.from_numpy(patches.lr)
    up = torch.nn.functional.interpolate(lr, scale_factor=10, mode="bicubic", align_corners=False)
    size = patches.histology.shape[-1]
    return up[..., :size, :size].clamp(0, 1).numpy()


def _pool(pred: np.ndarray) -> np.ndarray:
    n, g, h, w = pred.shape
    return pred.reshape(n, g, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def _score(pred: np.ndarray, patches: c3.pp.PatchSet) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant truth maps are skipped (counted in score_maps' status)
        summary = c3.metrics.summarize_scores(c3.metrics.score_maps(pred, patches.hr, genes=patches.genes))
    return {k: float(summary[k].iloc[0]) for k in ("rmse", "pcc", "ssim")}


def _predict(model, patches: c3.pp.PatchSet, *, steps: int, samples: int, with_lr: bool = True) -> np.ndarray:
    out = []
    for i in range(len(patches)):
        histology = torch.from_numpy(patches.histology[i : i + 1].astype(np.float32) / 255.0)
        lr = torch.from_numpy(patches.lr[i : i + 1]) if with_lr else None
        mean, _ = model.predict(histology, lr, num_inference_steps=steps, n_samples=samples, seed=i,
                                gene_batch_size=64)
        out.append(mean.numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--val-seed", type=int, default=6)
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[7, 8])
    parser.add_argument("--size", type=float, default=2560.0, help="section edge in um")
    parser.add_argument("--genes", type=int, default=48, help="genes (immune markers + HVGs)")
    parser.add_argument("--budget", type=float, default=1200.0, help="CPU training seconds per C3-Diff model")
    parser.add_argument("--unet-budget", type=float, default=600.0, help="CPU training seconds of the U-Net")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps at test time")
    parser.add_argument("--samples", type=int, default=8, help="samples averaged per (patch, gene)")
    parser.add_argument("--max-test-patches", type=int, default=16, help="test patches per section")
    parser.add_argument("--no-tesla", action="store_true")
    parser.add_argument("--out", default=None, help="markdown output (default docs/benchmarks/quality.md)")
    args = parser.parse_args()

    start = time.perf_counter()
    seeds = [*args.train_seeds, args.val_seed, *args.test_seeds]
    sections = {s: c3.datasets.simulate_section(width=args.size, height=args.size, seed=s, progress=False)
                for s in seeds}
    markers = sorted({g for genes in c3.tl.DEFAULT_MARKERS.values() for g in genes})
    first = sections[args.train_seeds[0]]
    genes = c3.pp.select_genes(first, table_key="cell_table", n_top_genes=args.genes,
                               include=[g for g in markers if g in set(first.tables["cell_table"].var_names)])

    def patches(seed: int, scale: int, stride: int) -> c3.pp.PatchSet:
        return c3.pp.make_patches(sections[seed], genes=genes, points_key="transcripts", patch_size=64,
                                  stride=stride, scale=scale, sample_id=f"seed{seed}")

    train = [patches(s, 10, 30) for s in args.train_seeds]
    val = patches(args.val_seed, 10, 60)
    test10, test5 = [], []
    for s in args.test_seeds:
        p10, p5 = patches(s, 10, 60), patches(s, 5, 60)
        keep = np.arange(min(len(p10), args.max_test_patches))
        test10.append(p10.subset(index=keep))
        test5.append(p5.subset(index=keep))
    t10, t5 = c3.pp.PatchSet.concat(test10), c3.pp.PatchSet.concat(test5)
    assert np.array_equal(t10.origins, t5.origins)
    print(f"{len(genes)} genes; train {sum(len(p) for p in train)} patches, val {len(val)}, test {len(t10)} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    predictions: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as work:
        for name, weights in (("C3-Diff", None), ("C3-Diff, no contrastive losses",
                                                  {"modal": 0.0, "content": 0.0, "inter_sphere": 0.0})):
            result = c3.tl.train(train, val_data=val, model="tiny", genes=genes, output_dir=Path(work) / name,
                                 learning_rate=args.learning_rate, epochs=10**6, max_time=args.budget,
                                 loss_weights=weights, progress=False, val_max_patches=8)
            steps_done = int(result.history["step"].iloc[-1])
            notes[name] = f"{steps_done} steps in {args.budget:g} s"
            print(f"{name}: {notes[name]}", flush=True)
            predictions[name] = _predict(result.model, t10, steps=args.steps, samples=args.samples)
            if weights is None:
                predictions["C3-Diff, no LR ST at test"] = _predict(result.model, t10, steps=args.steps,
                                                                    samples=args.samples, with_lr=False)
    predictions["bicubic"] = _bicubic(t10)

    from baselines import fit_unet_regressor, predict_unet_regressor

    unet = fit_unet_regressor(c3.pp.PatchSet.concat(train), val=val, scale=10, time_budget=args.unet_budget,
                              progress=False)
    predictions["U-Net regressor"] = predict_unet_regressor(unet, t10)
    notes["U-Net regressor"] = f"{unet.training_log['steps']} steps in {args.unet_budget:g} s"

    if not args.no_tesla:
        try:
            from baselines import tesla_predict

            predictions["TESLA"] = np.concatenate([
                tesla_predict(sections[s], part, genes=genes) for s, part in zip(args.test_seeds, test10, strict=True)
            ])
            notes["TESLA"] = "TESLAforST defaults, LR pixels as spots"
        except ImportError as err:
            notes["TESLA"] = f"not run: {err}"

    rows = []
    for name, pred in predictions.items():
        rows.append({"method": name, **{f"{k}_10x": v for k, v in _score(pred, t10).items()},
                     **{f"{k}_5x": v for k, v in _score(_pool(pred), t5).items()}, "note": notes.get(name, "")})
        print(rows[-1], flush=True)
    elapsed = time.perf_counter() - start

    header = "| method | RMSE 10x | PCC 10x | SSIM 10x | RMSE 5x | PCC 5x | SSIM 5x | training |"
    lines = [
        "### Quality on held-out simulated sections (`benchmarks/quality.py`)",
        "",
        f"Trained on sections {args.train_seeds} (validation {args.val_seed}), tested on {args.test_seeds} "
        f"({args.size / 1000:g} mm, {len(t10)} test patches of 64 px, {len(genes)} genes); C3-Diff: tiny preset, "
        f"AdamW lr {args.learning_rate:g}, {args.budget / 60:g} min of CPU training per model, {args.steps} DDIM "
        f"steps, mean of {args.samples} samples. Per (patch, gene) scores, averaged.",
        "",
        header,
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['method']} | {r['rmse_10x']:.3f} | {r['pcc_10x']:.3f} | {r['ssim_10x']:.3f} | {r['rmse_5x']:.3f} | "
          f"{r['pcc_5x']:.3f} | {r['ssim_5x']:.3f} | {r['note']} |" for r in rows],
        "",
        f"Machine: {machine()}; torch threads: {torch.get_num_threads()}; {elapsed / 60:.0f} min in all.",
    ]
    write_report("quality", "\n".join(lines) + "\n", {"args": vars(args), "rows": rows}, out=args.out)


if __name__ == "__main__":
    main()
