"""Which ``min_score`` (and ``log1p``) should ``c3.tl.celltype_map`` use by default, so that tumour and stroma stay
unassigned?

On simulated sections the true type of every 10 um pixel is known: the type covering most of the pixel
(``c3.datasets.true_cell_types`` over all simulated types). A pixel whose majority type is one of the seven immune
types should get that type; any other tissue pixel (tumour, stroma, fat, vessels, ...) should stay unassigned. Two
kinds of maps are scored, on tissue pixels only (pixels covered by a cell):

- *bicubic*: ``c3.tl.super_resolve(method="bicubic")`` from the Visium-like spots (55 um on a 100 um pitch) to 10 um
  (smooth maps, as C3-Diff's are);
- *10 um counts*: the simulated transcripts binned at 10 um (``c3.pp.bin_transcripts``), the best a measurement can
  give (sparse, noisy counts).

For each threshold: *macro F1* (the mean over the seven types and "unassigned" of each class's F1, the harmonic mean
of its precision and recall), *immune accuracy* (the share of immune pixels given their true type, as in the demo),
the share of non-immune tissue left unassigned and the precision of the calls. Balanced accuracy (mean recall) is
not used to choose: it weighs "unassigned" as one class of eight and so prefers calling every pixel, however wrong.
The default is the threshold of highest macro F1 averaged over the two kinds of maps; per-type precision and recall
are shown at that threshold and without one.

Both normalisations of ``celltype_map`` are swept: ``log1p=True`` (each marker's ``log1p`` min-max scaled, the
default) and ``log1p=False`` (the counts min-max scaled, the paper's formulation); the threshold is chosen for the
default one.

Run:  python benchmarks/celltype_threshold.py [--size 2560] [--seeds 1 2 3]
Prints a markdown table and writes docs/benchmarks/celltype_threshold.md and benchmarks/results/celltype_threshold.json.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np

import c3diff as c3
from c3diff._constants import IMMUNE_TYPES
from c3diff.datasets import main_types
from c3diff.tl._celltype import DEFAULT_MARKERS, DEFAULT_MIN_SCORE, celltype_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_report  # noqa: E402

THRESHOLDS = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5]
MAPS = {"bicubic": "bicubic", "10 um counts": "truth"}
#: The default of ``celltype_map(log1p=...)``: the threshold is chosen for it.
DEFAULT_LOG1P = inspect.signature(celltype_map).parameters["log1p"].default
VARIANTS = {"log1p": True, "counts": False}


def _section(
    size: float, seed: int
) -> tuple[dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """Per (variant, kind of map): (best type 1..7 or 0 where nothing is expressed, best score); the true class of
    every tissue pixel (1..7 immune, 0 other tissue) and the tissue mask."""
    sdata = c3.datasets.simulate_section(width=size, height=size, seed=seed, spot_layouts=("visium",), progress=False)
    genes = sorted({g for gs in DEFAULT_MARKERS.values() for g in gs})
    c3.tl.super_resolve(
        sdata,
        "hne",
        table_key="visium_table",
        genes=genes,
        scale=10,
        method="bicubic",
        key_added="bicubic",
        progress=False,
    )
    c3.pp.bin_transcripts(sdata, bin_size=10.0, image_key="hne", genes=genes, key_added="truth")
    truth_el, tissue = main_types(sdata, IMMUNE_TYPES, pixel_size=10.0)
    truth = np.asarray(truth_el.data)
    maps = {}
    for variant, log1p in VARIANTS.items():
        for title, key in MAPS.items():
            result = c3.tl.celltype_map(sdata, key, min_score=None, log1p=log1p, inplace=False)
            assert result.types == list(IMMUNE_TYPES)
            assert result.labels.shape == truth.shape, (result.labels.shape, truth.shape)
            best, score = result.labels, np.nan_to_num(result.max_score, nan=0.0)
            maps[variant, title] = best, score
            # the re-thresholding below is what celltype_map does with min_score
            check = c3.tl.celltype_map(sdata, key, min_score=DEFAULT_MIN_SCORE, log1p=log1p, inplace=False).labels
            np.testing.assert_array_equal(check, np.where(score >= DEFAULT_MIN_SCORE, best, 0))
    return maps, truth, tissue


def _scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Macro F1 and balanced accuracy over 0..7, immune accuracy, non-immune tissue left unassigned, precision of the
    calls."""
    recalls = [float((predicted[truth == c] == c).mean()) for c in range(8) if (truth == c).any()]
    f1 = []
    for c in range(8):
        hits = float(((predicted == c) & (truth == c)).sum())
        f1.append(2 * hits / max(float((predicted == c).sum() + (truth == c).sum()), 1.0))
    immune, called = truth > 0, predicted > 0
    return {
        "macro F1": float(np.mean(f1)),
        "balanced accuracy": float(np.mean(recalls)),
        "immune accuracy": float((predicted[immune] == truth[immune]).mean()),
        "non-immune unassigned": float((predicted[~immune] == 0).mean()),
        "precision of calls": float((predicted[called] == truth[called]).mean()) if called.any() else float("nan"),
        "assigned": float(called.mean()),
    }


def _per_type(predicted: np.ndarray, truth: np.ndarray) -> list[dict[str, float]]:
    rows = []
    for c, name in enumerate(["unassigned", *IMMUNE_TYPES]):
        called, true = predicted == c, truth == c
        rows.append(
            {
                "type": name,
                "true pixels": int(true.sum()),
                "called pixels": int(called.sum()),
                "precision": float((truth[called] == c).mean()) if called.any() else float("nan"),
                "recall": float((predicted[true] == c).mean()) if true.any() else float("nan"),
            }
        )
    return rows


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _name(variant: str) -> str:
    return f"`log1p={VARIANTS[variant]}`" + (" (default)" if VARIANTS[variant] == DEFAULT_LOG1P else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=2560.0, help="section edge in um")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    start = time.time()
    pooled: dict[tuple[str, str], tuple[list, list]] = {(v, t): ([], []) for v in VARIANTS for t in MAPS}
    truths = []
    for seed in args.seeds:
        maps, truth, tissue = _section(args.size, seed)
        truths.append(truth[tissue])
        for name, (best, score) in maps.items():
            pooled[name][0].append(best[tissue])
            pooled[name][1].append(score[tissue])
    truth = np.concatenate(truths)
    results: dict[str, dict[str, dict[float, dict[str, float]]]] = {v: {} for v in VARIANTS}
    for (variant, title), (bests, scores) in pooled.items():
        best, score = np.concatenate(bests), np.concatenate(scores)
        results[variant][title] = {
            th: _scores(np.where((score > 0) & (score >= th), best, 0), truth) for th in THRESHOLDS
        }
    mean_f1 = {
        v: {th: float(np.mean([results[v][t][th]["macro F1"] for t in MAPS])) for th in THRESHOLDS} for v in VARIANTS
    }
    chosen = {v: max(THRESHOLDS, key=lambda th, v=v: mean_f1[v][th]) for v in VARIANTS}
    default_variant = next(v for v, log1p in VARIANTS.items() if log1p == DEFAULT_LOG1P)

    sweep_columns = ["min_score", "mean macro F1"] + [
        f"{t}: {m}" for t in MAPS for m in ("macro F1", "immune acc.", "non-immune unassigned", "precision")
    ]
    sweeps = []
    for variant in VARIANTS:
        rows = []
        for th in THRESHOLDS:
            default = th == DEFAULT_MIN_SCORE and variant == default_variant
            row = {"min_score": f"{th:g}" + (" (default)" if default else ""), "mean macro F1": mean_f1[variant][th]}
            for title in MAPS:
                r = results[variant][title][th]
                row[f"{title}: macro F1"] = r["macro F1"]
                row[f"{title}: immune acc."] = r["immune accuracy"]
                row[f"{title}: non-immune unassigned"] = r["non-immune unassigned"]
                row[f"{title}: precision"] = r["precision of calls"]
            rows.append(row)
        sweeps.append(
            f"**{_name(variant)}**: best mean macro F1 {mean_f1[variant][chosen[variant]]:.3f} at "
            f"`min_score={chosen[variant]:g}`\n\n" + _table(rows, sweep_columns)
        )
    summary_rows = [
        {
            "map": title,
            **{f"{_name(v)}: immune acc. (argmax)": results[v][title][0.0]["immune accuracy"] for v in VARIANTS},
            **{f"{_name(v)}: macro F1 at {chosen[v]:g}": results[v][title][chosen[v]]["macro F1"] for v in VARIANTS},
        }
        for title in MAPS
    ]
    summary_columns = list(summary_rows[0])

    per_type = {}
    sections = []
    for title in MAPS:
        best = np.concatenate(pooled[default_variant, title][0])
        score = np.concatenate(pooled[default_variant, title][1])
        for th in (0.0, DEFAULT_MIN_SCORE):
            rows = _per_type(np.where((score > 0) & (score >= th), best, 0), truth)
            per_type[f"{title}, min_score={th:g}"] = rows
            sections.append(
                f"**{title}, `min_score={th:g}`**\n\n"
                + _table(rows, ["type", "true pixels", "called pixels", "precision", "recall"])
            )
    elapsed = time.time() - start
    verdict = (
        "matches"
        if chosen[default_variant] == DEFAULT_MIN_SCORE
        else f"differs from `DEFAULT_MIN_SCORE = {DEFAULT_MIN_SCORE:g}`: update it"
    )
    text = (
        "\n\n".join(
            [
                f"Simulated sections of {args.size:g} x {args.size:g} um, seeds {args.seeds}; {truth.size} "
                "tissue pixels "
                f"(10 um), {int((truth > 0).sum())} of them immune. Truth: each pixel's majority cell type. Machine: "
                f"{machine()}; {elapsed:.0f} s.\n\nCommand: `python benchmarks/celltype_threshold.py --size "
                f"{args.size:g} "
                f"--seeds {' '.join(map(str, args.seeds))}`",
                "Both normalisations (immune acc. (argmax): share of immune pixels given their true type with "
                "`min_score=None`; macro F1 at each variant's best threshold):",
                _table(summary_rows, summary_columns),
                "Threshold sweep (macro F1: mean F1 over the seven types and unassigned; immune acc.: share of "
                "immune pixels "
                "given their true type; non-immune unassigned: share of other tissue left unassigned; "
                "precision: share of "
                "assigned pixels whose type is right):",
                *sweeps,
                f"Best mean macro F1 with the default `log1p={DEFAULT_LOG1P}` at "
                f"`min_score={chosen[default_variant]:g}`; "
                f"this {verdict}.",
                f"Per type with the default `log1p={DEFAULT_LOG1P}` (precision: share of the pixels called that type "
                "that are of it; recall: share of the type's "
                "pixels called it; `unassigned` is non-immune tissue):",
                *sections,
            ]
        )
        + "\n"
    )
    write_report(
        "celltype_threshold",
        text,
        {
            "size": args.size,
            "seeds": args.seeds,
            "thresholds": THRESHOLDS,
            "default_log1p": DEFAULT_LOG1P,
            "chosen": chosen[default_variant],
            "chosen_per_variant": chosen,
            "default": DEFAULT_MIN_SCORE,
            "sweep": {v: {t: {str(k): x for k, x in r.items()} for t, r in results[v].items()} for v in VARIANTS},
            "per_type": per_type,
            "seconds": elapsed,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
