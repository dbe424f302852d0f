"""How much of each gene's 10 um map does histology alone explain, on simulated tissue?

A simple histology-only predictor is fitted on some simulated sections and scored on held-out ones: per 10 um pixel,
colour, stain (H, E) and texture features of the H&E with neighbourhood context, standardised per section (stain
normalisation), clustered with k-means; a pixel's prediction is its cluster's mean in training. Two targets:

- *counts*: the gene's transcripts per 10 um pixel. Histology predicts where cells are, so every gene that cells
  express gets some signal here, type-linked or not.
- *composition*: the gene's share of the pixel's transcripts (smoothed over 15 um, pixels with >= 20 transcripts).
  This removes cellularity and asks which cells are there: clearly above zero for type-linked genes if morphology
  carries cell type, about zero for genes driven by a spatial field independent of the tissue.

Scores are |PCC| and r^2 = PCC^2 (variance explained after an affine recalibration; plain R^2 across sections is
dominated by section-level offsets of the spatial fields).

Run:  python benchmarks/histology_signal.py [--size 2560] [--train-seeds 0 1] [--test-seeds 2 3]
Prints a markdown table and writes docs/benchmarks/histology_signal.md and benchmarks/results/histology_signal.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import c3diff as c3
from c3diff._validation import raster_geometry, scale0

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_report  # noqa: E402

BIN = 10.0  # um: the paper's 10x pixel
N_CLUSTERS = 96


def _features(sdata) -> tuple[np.ndarray, tuple[int, int]]:
    """Per 10 um pixel: RGB / H / E / DAB block means and within-block standard deviations (texture at the H&E's
    resolution), plus the same means smoothed over ~30 and ~80 um neighbourhoods (context)."""
    from scipy import ndimage
    from skimage.color import rgb2hed

    image = sdata.images["hne"]
    geom = raster_geometry(image)
    grid = c3.pp.histology_raster(sdata, "hne", pixel_size=BIN)[1]
    rgb = np.asarray(scale0(image).values, dtype=np.float32)
    h, w = grid.height, grid.width
    f = round(BIN / geom.sy)
    rgb = rgb[:, : h * f, : w * f] / 255.0
    hed = np.moveaxis(rgb2hed(np.moveaxis(rgb, 0, -1)), -1, 0)
    stacks = np.concatenate([rgb, hed], axis=0).reshape(6, h, f, w, f)
    means = stacks.mean(axis=(2, 4))
    stds = stacks.std(axis=(2, 4))
    context = [ndimage.gaussian_filter(means, sigma=(0, s, s)) for s in (1.5, 4.0)]
    features = np.concatenate([means, stds, *context], axis=0)
    return features.reshape(features.shape[0], -1).T, (h, w)


def _section(sdata, genes: list[str]) -> dict[str, np.ndarray]:
    """Standardised features and both targets on the section's tissue pixels."""
    from scipy import ndimage

    x, (h, w) = _features(sdata)
    rgb, _ = c3.pp.histology_raster(sdata, "hne", pixel_size=BIN)
    tissue = c3.pp.detect_tissue(rgb, pixel_size=BIN).reshape(-1)
    x = x[tissue]
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    counts = np.asarray(
        c3.pp.bin_transcripts(sdata, bin_size=BIN, genes=genes, image_key="hne", inplace=False).data, dtype=np.float32
    )
    smooth = ndimage.gaussian_filter(counts, sigma=(0, 1.5, 1.5)).reshape(len(genes), -1).T[tissue]
    total = smooth.sum(axis=1)
    dense = total >= 20
    return {
        "x": x,
        "counts": counts.reshape(len(genes), -1).T[tissue],
        "x_dense": x[dense],
        "composition": smooth[dense] / total[dense, None],
    }


def _cluster_predictor(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(N_CLUSTERS, random_state=seed, n_init=3).fit(x_train)
    means = np.stack(
        [
            y_train[kmeans.labels_ == c].mean(axis=0) if (kmeans.labels_ == c).any() else y_train.mean(axis=0)
            for c in range(N_CLUSTERS)
        ]
    )
    return means[kmeans.predict(x_test)]


def _pcc(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    pred = pred - pred.mean(axis=0)
    truth = truth - truth.mean(axis=0)
    denominator = np.sqrt((pred**2).sum(axis=0) * (truth**2).sum(axis=0))
    return np.where(
        denominator > 0, np.abs((pred * truth).sum(axis=0)) / np.where(denominator > 0, denominator, 1), np.nan
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=2560.0, help="section edge in um")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--out", default=None, help="markdown output (default docs/benchmarks/histology_signal.md)")
    args = parser.parse_args()

    start = time.perf_counter()
    first = None
    data = {}
    for s in [*args.train_seeds, *args.test_seeds]:
        sdata = c3.datasets.simulate_section(width=args.size, height=args.size, seed=s, progress=False)
        if first is None:
            first = sdata.attrs["c3diff"]["simulation"]["gene_kinds"]
            genes = [g for names in first.values() for g in names]
        data[s] = _section(sdata, genes)
    kinds = first
    kind_of = {g: k for k, names in kinds.items() for g in names}

    scores = {}
    for target, xkey in (("counts", "x"), ("composition", "x_dense")):
        x_train = np.concatenate([data[s][xkey] for s in args.train_seeds])
        y_train = np.concatenate([data[s][target] for s in args.train_seeds])
        x_test = np.concatenate([data[s][xkey] for s in args.test_seeds])
        y_test = np.concatenate([data[s][target] for s in args.test_seeds])
        scores[target] = _pcc(_cluster_predictor(x_train, y_train, x_test), y_test)

    rows = []
    for kind in kinds:
        idx = [i for i, g in enumerate(genes) if kind_of[g] == kind]
        row = {"genes": kind, "n": len(idx)}
        for target, pcc in scores.items():
            row[f"{target}_pcc"] = float(np.nanmean(pcc[idx]))
            row[f"{target}_r2"] = float(np.nanmean(pcc[idx] ** 2))
        rows.append(row)
    order = np.argsort(-np.nan_to_num(scores["composition"], nan=-1))
    top = [(genes[i], float(scores["composition"][i])) for i in order[:8]]
    elapsed = time.perf_counter() - start

    lines = [
        "### Histology-only signal in simulated tissue (`benchmarks/histology_signal.py`)",
        "",
        f"A k-means ({N_CLUSTERS} clusters) predictor on per-10-um-pixel H&E colour/stain/texture/context features, "
        f"trained on simulated sections {args.train_seeds} and scored on held-out sections {args.test_seeds} "
        f"({args.size / 1000:g} mm square, tissue pixels). Means over genes of each kind.",
        "",
        "| genes | n | counts PCC | counts r^2 | composition PCC | composition r^2 |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['genes']} | {r['n']} | {r['counts_pcc']:.3f} | {r['counts_r2']:.3f} | {r['composition_pcc']:.3f} | "
            f"{r['composition_r2']:.3f} |"
            for r in rows
        ],
        "",
        "Genes whose composition histology predicts best: " + ", ".join(f"{g} ({v:.2f})" for g, v in top) + ".",
        "",
        f"Machine: {machine()}; {elapsed:.0f} s.",
    ]
    per_gene = {
        g: {"kind": kind_of[g], **{f"{t}_pcc": float(p[i]) for t, p in scores.items()}} for i, g in enumerate(genes)
    }
    write_report("histology_signal", "\n".join(lines) + "\n", {"summary": rows, "per_gene": per_gene}, out=args.out)


if __name__ == "__main__":
    main()
