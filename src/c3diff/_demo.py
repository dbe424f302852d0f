"""``c3diff demo``: the whole flow on a simulated section with the demo model bundled in the package."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from c3diff._constants import IMMUNE_TYPES
from c3diff._provenance import record
from c3diff.datasets import main_types

#: Genes drawn in the demo's figures (when the model predicts them).
FIGURE_GENES = ("GATA3", "CD8A", "MS4A1", "CD68", "CXCL5")


def _say(message: str, *, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


def _celltype_accuracy(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Agreement of two immune label maps on pixels whose true main type is immune (labels 1..T)."""
    immune = truth > 0
    if not immune.any():
        return {"accuracy": float("nan"), "n_pixels": 0}
    return {
        "accuracy": float((predicted[immune] == truth[immune]).mean()),
        "n_pixels": int(immune.sum()),
        "chance": 1.0 / len(IMMUNE_TYPES),
    }


def _markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def run_demo(
    *,
    output: Path,
    seed: int = 1000,
    size: float = 1920.0,
    steps: int = 5,
    n_samples: int = 2,
    model: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Simulate a section and run super-resolution (10x, 5x, bicubic), cell-type mapping and evaluation.

    Writes to ``output``: ``section.zarr`` (the SpatialData with every layer), ``metrics.md`` and ``metrics.json``,
    and PNG figures. Returns the metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import c3diff as c3
    from c3diff.models import demo_model_path

    quiet = not progress
    start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    model_source = model or str(demo_model_path())
    net = c3.models.from_pretrained(model_source)
    genes = net.genes
    _say(
        f"c3diff demo: model {model_source} ({len(genes)} genes, {net.config.image_size} px tiles, "
        f"{net.config.scale}x)",
        quiet=quiet,
    )

    _say(f"[1/6] simulating a {size / 1000:g} mm x {size / 1000:g} mm breast section (seed {seed})", quiet=quiet)
    sdata = c3.datasets.simulate_section(width=size, height=size, seed=seed, progress=progress)

    _say("[2/6] ground truth: transcripts binned at 10 and 20 um, each pixel's main cell type", quiet=quiet)
    for scale in (10, 5):
        c3.pp.bin_transcripts(sdata, bin_size=100.0 / scale, genes=genes, image_key="hne", key_added=f"truth_x{scale}")
    c3.pp.bin_transcripts(sdata, bin_size=100.0, genes=genes, image_key="hne", key_added="lr_input")
    # the type covering most of each pixel, kept where it is immune (as benchmarks/celltype_threshold.py scores): a
    # pixel mostly tumour that an immune cell touches is not that immune type
    true_types, _ = main_types(sdata, IMMUNE_TYPES, pixel_size=10.0)
    sdata.labels["true_immune_types"] = true_types
    record(sdata, "true_immune_types", "c3diff.datasets.main_types", types=list(IMMUNE_TYPES), pixel_size=10.0)
    sdata.attrs["c3diff"]["true_immune_types"]["labels"] = dict(true_types.attrs["c3diff"]["labels"])

    residual = net.mean_net is not None
    if residual:
        what = "the conditional mean" + (
            f", and at 10x {n_samples} mean + residual samples of {steps} DDIM steps for the uncertainty layer"
            if n_samples > 1
            else ""
        )
    else:
        what = f"{steps} DDIM steps, the mean of {max(n_samples, 1)} sample(s)"
    _say(f"[3/6] super-resolving the 100 um transcript bins with C3-Diff ({what}) and bicubic upsampling", quiet=quiet)
    for scale in (10, 5):
        sample = not residual or (scale == 10 and n_samples > 1)
        c3.tl.super_resolve(
            sdata,
            "hne",
            points_key="transcripts",
            scale=scale,
            model=net,
            steps=steps,
            n_samples=max(n_samples, 1) if sample else 1,
            mode="sample" if sample else "mean",
            progress=progress,
        )
        c3.tl.super_resolve(
            sdata,
            "hne",
            points_key="transcripts",
            scale=scale,
            genes=genes,
            method="bicubic",
            tile_size=net.config.image_size,
            progress=progress,
        )

    _say("[4/6] immune cell-type maps (markers' log1p min-max scaled, mean, argmax over the seven types)", quiet=quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # markers outside the model's genes are reported in sdata.attrs
        # min_score=None: every pixel gets its best type, so the accuracy on immune pixels compares the maps alone
        for key, source in (
            ("celltypes_c3diff", "hne_c3diff_x10"),
            ("celltypes_bicubic", "hne_bicubic_x10"),
            ("celltypes_truth_markers", "truth_x10"),
        ):
            c3.tl.celltype_map(sdata, source, key_added=key, min_score=None)
        # the default call (min_score=DEFAULT_MIN_SCORE), what a user runs and the figure shows: pixels without
        # marker evidence stay unassigned; forced to a type, they follow the noise of their 100 um bin's counts
        c3.tl.celltype_map(sdata, "hne_c3diff_x10", key_added="celltypes_c3diff_default")

    _say("[5/6] scoring against the simulated truth", quiet=quiet)
    rows = []
    tile = net.config.image_size
    for scale in (10, 5):
        for method in ("c3diff", "bicubic"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant truth tiles are skipped and counted
                scores = c3.tl.evaluate(
                    sdata,
                    f"hne_{method}_x{scale}",
                    truth_key=f"truth_x{scale}",
                    tile_size=tile * scale // 10,
                    mask=None,
                )
            summary = c3.metrics.summarize_scores(scores).iloc[0]
            rows.append(
                {
                    "method": "C3-Diff" if method == "c3diff" else "bicubic",
                    "scale": f"{scale}x",
                    "RMSE": float(summary["rmse"]),
                    "PCC": float(summary["pcc"]),
                    "SSIM": float(summary["ssim"]),
                }
            )
    truth_types = np.asarray(sdata.labels["true_immune_types"].values)
    celltypes = {
        name: _celltype_accuracy(np.asarray(c3._validation.scale0(sdata.labels[key]).values), truth_types)
        for name, key in (
            ("C3-Diff", "celltypes_c3diff"),
            ("bicubic", "celltypes_bicubic"),
            ("10 um truth maps", "celltypes_truth_markers"),
        )
    }

    _say("[6/6] writing the SpatialData, the metrics and the figures", quiet=quiet)
    figure_genes = [g for g in FIGURE_GENES if g in genes][:3] or genes[:3]
    figures = {}
    for scale in (10, 5):
        fig = c3.pl.super_resolved(
            sdata,
            f"hne_c3diff_x{scale}",
            figure_genes,
            lr_key="lr_input",
            truth_key=f"truth_x{scale}",
            compare_keys={"bicubic": f"hne_bicubic_x{scale}"},
            label="C3-Diff",
        )
        figures[f"genes_x{scale}"] = output / f"genes_x{scale}.png"
        fig.savefig(figures[f"genes_x{scale}"], dpi=90)
        plt.close(fig)
    if "hne_c3diff_x10_std" in sdata.images:
        fig = c3.pl.super_resolved(
            sdata,
            "hne_c3diff_x10",
            figure_genes,
            image_key="hne",
            std_key="hne_c3diff_x10_std",
            label="C3-Diff",
            overlay=True,
        )
        figures["uncertainty_x10"] = output / "uncertainty_x10.png"
        fig.savefig(figures["uncertainty_x10"], dpi=90)
        plt.close(fig)
    fig = c3.pl.celltype_map(sdata, "celltypes_c3diff_default", truth_key="true_immune_types")
    figures["celltypes"] = output / "celltypes.png"
    fig.savefig(figures["celltypes"], dpi=90)
    plt.close(fig)

    zarr_path = output / "section.zarr"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")  # zarr's notice of a future default
        sdata.write(zarr_path, overwrite=True)
    elapsed = time.perf_counter() - start
    metrics = {
        "maps": rows,
        "celltypes": celltypes,
        "seconds": elapsed,
        "model": model_source,
        "genes": genes,
        "seed": seed,
        "size_um": size,
        "steps": steps,
        "n_samples": n_samples,
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    celltype_rows = [
        {"map from": k, "accuracy on immune pixels": v["accuracy"], "pixels": v["n_pixels"]}
        for k, v in celltypes.items()
    ]
    text = "\n".join(
        [
            f"# c3diff demo (seed {seed}, {size / 1000:g} mm section, {len(genes)} genes)",
            "",
            "Per (tile, gene) scores against the simulated truth (the method page's metrics: range-normalised "
            "RMSE, |PCC|, "
            "Gaussian SSIM), averaged:",
            "",
            _markdown_table(rows, ["method", "scale", "RMSE", "PCC", "SSIM"]),
            "",
            "Immune cell types from marker genes vs each pixel's main cell type, on the pixels where that is an "
            f"immune type (chance {1 / len(IMMUNE_TYPES):.3f}):",
            "",
            _markdown_table(celltype_rows, ["map from", "accuracy on immune pixels", "pixels"]),
            "",
            f"Model: {model_source}. C3-Diff: {what}. Took {elapsed:.0f} s.",
        ]
    )
    (output / "metrics.md").write_text(text + "\n")

    if not quiet:
        print()
        print(text)
        print()
        print(f"Everything is in {output.resolve()}:")
        print(f"  {zarr_path.name:<22} the SpatialData (H&E, transcripts, truth, predictions, cell-type maps)")
        print(f"  {'metrics.md / .json':<22} the scores above")
        for path in figures.values():
            print(f"  {path.name:<22} figure")
    return metrics
