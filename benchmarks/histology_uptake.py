"""Does a C3-Diff model use the histology? Where inside each LR pixel it puts the counts, and what that is worth.

Once the output is calibrated to the LR counts (``calibration="lr_pixel"``, the default), every 100 um LR pixel's
total is fixed by the measurement: all a model adds over "spread the count evenly" is *where inside the LR pixel*
the counts go. In the simulator that is the cells, which the H&E shows. This script measures, on a held-out
simulated section (never seen in training):

- **histology sensitivity**: the relative change of the super-resolved maps (the conditional mean of a residual
  model; a paper-formulation model's mean of ``--samples`` samples, same noise) when every tile's histology is
  replaced by another tile's; 0 means the histology is ignored;
- **within-LR-pixel pattern r**: the Pearson correlation, over all pixels and genes, of each map divided by its own
  LR-pixel mean (the pattern inside each LR pixel) with the same quantity of the 10 um truth;
- **PCC** of the whole-section map against the 10 um truth (``c3.tl.evaluate``, as the demo reports it).

References in the same table: bicubic upsampling; the LR count spread evenly over each LR pixel; the LR count spread
in proportion to a one-line histology heuristic, the squared darkness of the H&E (``(1 - mean RGB)^2``, nuclei are
dark): not a model, but a floor for what a model that reads the H&E should reach; and the truth's own pattern
(the ceiling). Run:  python benchmarks/histology_uptake.py [--model DIR] [--size 1800] [--steps 20]
Prints a markdown table and writes docs/benchmarks/histology_uptake.md and benchmarks/results/histology_uptake.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import c3diff as c3
from c3diff._validation import scale0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_report  # noqa: E402

LR_PIXELS = 10  # output pixels (10 um) per LR pixel (100 um)


def _pool(maps: np.ndarray) -> np.ndarray:
    """Sum over each LR pixel; ``(..., H, W)`` with H, W multiples of :data:`LR_PIXELS`."""
    *lead, h, w = maps.shape
    return maps.reshape(*lead, h // LR_PIXELS, LR_PIXELS, w // LR_PIXELS, LR_PIXELS).sum(axis=(-3, -1))


def _spread(lr_values: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(lr_values, LR_PIXELS, axis=-2), LR_PIXELS, axis=-1)


def _pattern(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its LR-pixel mean (NaN where that mean is 0)."""
    mean = _spread(_pool(maps)) / LR_PIXELS**2
    return np.where(mean > 0, maps / np.where(mean > 0, mean, 1.0), np.nan)


def _pattern_r(maps: np.ndarray, truth: np.ndarray) -> float:
    a, b = _pattern(maps), _pattern(truth)
    ok = np.isfinite(a) & np.isfinite(b)
    if a[ok].std() == 0:  # a constant pattern (e.g. the count spread evenly) says nothing about where counts are
        return 0.0
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    parser.add_argument("--size", type=float, default=1800.0, help="section edge in um (a multiple of 100)")
    parser.add_argument("--seed", type=int, default=1000, help="section seed (the demo's; training used 0-9)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--samples", type=int, default=4, help="samples averaged")
    parser.add_argument("--out", default=None, help="markdown output (default docs/benchmarks/histology_uptake.md)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    start = time.perf_counter()
    model = c3.models.from_pretrained(args.model) if args.model else c3.models.load_demo_model()
    genes = model.genes
    sdata = c3.datasets.simulate_section(width=args.size, height=args.size, seed=args.seed, progress=False)
    c3.pp.bin_transcripts(sdata, bin_size=10, genes=genes, image_key="hne", key_added="truth_x10")
    c3.pp.bin_transcripts(sdata, bin_size=100, genes=genes, image_key="hne", key_added="lr_x1")
    c3.tl.super_resolve(sdata, "hne", points_key="transcripts", genes=genes, method="bicubic", progress=False)
    c3.tl.super_resolve(
        sdata, "hne", points_key="transcripts", model=model, steps=args.steps, n_samples=args.samples, progress=False
    )
    truth = scale0(sdata["truth_x10"]).values.astype(np.float64)
    n_genes, height, width = truth.shape
    if height % LR_PIXELS or width % LR_PIXELS:
        raise ValueError(f"`--size` must be a multiple of 100 um, got {args.size}.")
    lr = scale0(sdata["lr_x1"]).values.astype(np.float64)[:, : height // LR_PIXELS, : width // LR_PIXELS]

    # the H&E at 10 um, as the model sees it, and the darkness heuristic
    rgb, _ = c3.pp.histology_raster(sdata, "hne", pixel_size=10.0)
    rgb = rgb[:, :height, :width].astype(np.float64) / 255.0
    darkness = np.broadcast_to((1.0 - rgb.mean(axis=0)) ** 2 + 1e-9, truth.shape)

    maps = {
        "C3-Diff": scale0(sdata["hne_c3diff_x10"]).values.astype(np.float64),
        "bicubic": scale0(sdata["hne_bicubic_x10"]).values.astype(np.float64),
        "LR count spread evenly": _spread(lr) / LR_PIXELS**2,
        "LR count spread by H&E darkness^2": _spread(lr) * darkness / _spread(_pool(darkness)),
        "LR count spread by the truth's pattern": _spread(lr) * np.nan_to_num(_pattern(truth)) / LR_PIXELS**2,
    }
    transformations = get_transformation(scale0(sdata["hne_bicubic_x10"]), get_all=True)
    rows = []
    for name, values in maps.items():
        sdata["benchmark_map"] = Image2DModel.parse(
            values.astype(np.float32), dims=("c", "y", "x"), c_coords=genes, transformations=transformations
        )
        scores = c3.metrics.summarize_scores(c3.tl.evaluate(sdata, "benchmark_map", truth_key="truth_x10"))
        del sdata["benchmark_map"]
        rows.append({"map": name, "pcc": float(scores["pcc"].iloc[0]), "pattern_r": _pattern_r(values, truth)})

    # histology sensitivity on training-style tiles: swap each tile's histology with another tile's
    patches = c3.pp.make_patches(
        sdata,
        genes=genes,
        points_key="transcripts",
        patch_size=model.config.image_size,
        stride=30,
        sample_id="benchmark",
        texture=model.texture_channels > 0,
    )
    if len(patches) < 2:
        raise ValueError(f"The section has {len(patches)} tissue tile(s); the swap test needs two. Raise `--size`.")
    histology = torch.from_numpy(patches.histology.astype(np.float32) / 255.0)
    lr_tiles = torch.from_numpy(patches.lr.astype(np.float32))
    with torch.no_grad():
        kwargs = {"num_inference_steps": args.steps, "n_samples": args.samples, "seed": 0}
        texture = None if patches.texture is None else torch.from_numpy(patches.texture.astype(np.float32))
        own, _ = model.predict(histology, lr_tiles, texture=texture, **kwargs)
        shift = len(patches) // 2  # the histology swapped, its texture with it
        swapped, _ = model.predict(
            histology.roll(shift, dims=0),
            lr_tiles,
            texture=None if texture is None else texture.roll(shift, dims=0),
            **kwargs,
        )
    sensitivity = float((own - swapped).abs().mean() / own.abs().mean())

    elapsed = time.perf_counter() - start
    sampler = (
        "the conditional mean (one forward pass)"
        if model.mean_net is not None
        else f"{args.steps} DDIM steps, mean of {args.samples} samples"
    )
    lines = [
        "### Histology uptake (`benchmarks/histology_uptake.py`)",
        "",
        (
            f"Model: {args.model or 'the bundled demo model'}; held-out simulated section seed {args.seed} "
            f"({args.size / 1000:g} mm, {n_genes} genes), {sampler}, calibrated to the LR counts per LR pixel."
        ),
        "",
        (
            f"Histology sensitivity (relative change of the maps when the tiles' histology is swapped, {len(patches)} "
            f"tiles): **{sensitivity:.4f}**"
        ),
        "",
        "| map | PCC 10x | within-LR-pixel pattern r |",
        "|---|---|---|",
        *[f"| {r['map']} | {r['pcc']:.3f} | {r['pattern_r']:.3f} |" for r in rows],
        "",
        f"Machine: {machine()}; torch threads: {torch.get_num_threads()}; {elapsed:.0f} s in all.",
    ]
    write_report(
        "histology_uptake",
        "\n".join(lines) + "\n",
        {"args": vars(args), "histology_sensitivity": sensitivity, "rows": rows},
        out=args.out,
    )


if __name__ == "__main__":
    main()
