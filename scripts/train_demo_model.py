"""Train the demo model bundled with c3diff (``src/c3diff/data/demo_model``), reproducibly, on the CPU.

It is a ``tiny`` C3-Diff trained on simulated breast sections only: a model for ``c3diff demo``, the tutorial and
tests, not for real tissue. Sections (seeds 0..N-1) are simulated with ``c3.datasets.simulate_section``; the genes
are the immune markers of ``c3.tl.DEFAULT_MARKERS`` plus the most variable other genes (``c3.pp.select_genes``);
the last section is held out for validation; the demo itself runs on seed 1000, which training never sees.

Run from the repository root:  python scripts/train_demo_model.py  [--minutes 60] [--sections 10] [--genes 48]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import c3diff as c3

OUT = Path(__file__).resolve().parents[1] / "src" / "c3diff" / "data" / "demo_model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget (wall clock)")
    parser.add_argument("--sections", type=int, default=10, help="simulated sections (the last one validates)")
    parser.add_argument("--size", type=float, default=2560.0, help="section edge in um")
    parser.add_argument("--genes", type=int, default=48, help="genes the model predicts (markers included)")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="AdamW learning rate (from scratch; the paper's 1e-5 fine-tunes a pretrained backbone)")
    parser.add_argument("--hint-channels", type=int, default=None,
                        help="channels of each hint encoder (default: the tiny preset's)")
    parser.add_argument("--hint-encoder-channels", type=int, nargs="+", default=None,
                        help="widths of each hint encoder's conv stack (default: the tiny preset's)")
    parser.add_argument("--hint-space-to-depth", action="store_true",
                        help="hint encoders fold their inputs like the map instead of stride-2 convs")
    parser.add_argument("--min-snr-gamma", type=float, default=None,
                        help="weight the diffusion loss by min(SNR, gamma) / SNR (default: the paper's plain mean)")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="what the denoiser predicts (default: the tiny preset's)")
    parser.add_argument("--latent-scaling", choices=["std", "range"], default=None,
                        help="scale of the pixel-space diffusion space (default: the tiny preset's)")
    parser.add_argument("--timestep-spacing", choices=["leading", "trailing"], default=None,
                        help="DDIM timestep spacing used when sampling (default: the tiny preset's)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue training this saved model instead of starting from the tiny preset")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                        help="learning-rate schedule of each training stage (see c3.tl.train)")
    parser.add_argument("--mean-fraction", type=float, default=0.75,
                        help="share of the budget for the conditional-mean stage (residual models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny-texture", choices=["tiny", "tiny-texture"],
                        help="model preset to start from (tiny-texture: the mean network reads the H&E's texture)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="keep the training run (checkpoints, best/, log.jsonl) here; default: a temporary folder")
    args = parser.parse_args()

    start = time.perf_counter()
    sections = [c3.datasets.simulate_section(width=args.size, height=args.size, seed=s, progress=False)
                for s in range(args.sections)]
    markers = sorted({g for genes in c3.tl.DEFAULT_MARKERS.values() for g in genes})
    panel = set(sections[0].tables["cell_table"].var_names)
    genes = c3.pp.select_genes(sections[0], table_key="cell_table", n_top_genes=args.genes,
                               include=[g for g in markers if g in panel])
    texture = bool(c3.models.PRESETS[args.preset]["mean_net_config"].get("texture_channels"))
    if args.init_from is not None:
        texture = c3.models.from_pretrained(str(args.init_from)).texture_channels > 0
    patches = [c3.pp.make_patches(s, genes=genes, points_key="transcripts", patch_size=64, stride=30,
                                  sample_id=f"simulated_seed{i}", texture=texture) for i, s in enumerate(sections)]
    print(f"{len(genes)} genes; {sum(len(p) for p in patches)} patches from {len(sections)} sections "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    overrides = {}
    if args.hint_channels is not None:
        overrides["hint_channels"] = args.hint_channels
    if args.hint_encoder_channels is not None:
        overrides["hint_encoder_channels"] = list(args.hint_encoder_channels)
    if args.hint_space_to_depth:
        overrides["hint_space_to_depth"] = True
    if args.prediction_type is not None:
        overrides["scheduler_config"] = {"prediction_type": args.prediction_type}
    if args.init_from is not None and overrides:
        parser.error(f"--init-from continues a saved model with its own architecture; drop {sorted(overrides)}.")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run_dir or tmp
        result = c3.tl.train(
            patches[:-1], val_data=patches[-1], model=str(args.init_from) if args.init_from else args.preset,
            genes=genes, output_dir=run, model_overrides=overrides,
            learning_rate=args.learning_rate, epochs=10**6, max_time=args.minutes * 60, seed=args.seed,
            val_steps=10, val_max_patches=16, lr_schedule=args.lr_schedule, mean_time_fraction=args.mean_fraction,
            min_snr_gamma=args.min_snr_gamma, latent_scaling=args.latent_scaling or "std",
        )
        model = result.model
        if args.timestep_spacing is not None:  # sampling only: training noise does not depend on it
            scheduler = {**model.noise_scheduler.config, "timestep_spacing": args.timestep_spacing}
            model.set_scheduler(type(model.noise_scheduler).from_config(scheduler))  # saved as scheduler_config.json
        start_from = f"continued from {args.init_from.name}" if args.init_from else f"{args.preset} preset"
        recipe = {"min_snr_gamma": args.min_snr_gamma, "latent_scaling": args.latent_scaling}
        options = {**overrides, **{k: v for k, v in recipe.items() if v is not None}}
        options.update({"timestep_spacing": args.timestep_spacing} if args.timestep_spacing else {})
        description = (
            f"DEMO MODEL FOR SIMULATED TISSUE, NOT FOR REAL DATA. Trained by scripts/train_demo_model.py (c3diff "
            f"{c3.__version__}) for {args.minutes:g} min on a CPU: {len(sections) - 1} simulated breast sections "
            f"(c3diff.datasets.simulate_section, seeds 0-{len(sections) - 2}, {args.size / 1000:g} mm; seed "
            f"{len(sections) - 1} for validation), 64 px patches at 10 um/px, Xenium-like LR (100 um transcript bins), "
            f"{len(genes)} genes (immune markers + HVGs), AdamW lr {args.learning_rate:g} ({args.lr_schedule}), "
            f"{args.mean_fraction:g} of the budget for the conditional-mean stage"
            + f", {start_from}" + (f" with {options}." if options else ".")
        )
        if args.out.exists():
            shutil.rmtree(args.out)
        model.save_pretrained(str(args.out), training_data=description)
    print(result.history.to_string(), flush=True)
    print(f"Saved to {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
