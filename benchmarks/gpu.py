"""Model throughput on a GPU: the paper preset and the bundled demo model, fp32 against bf16 autocast.

Each row times ``model.predict`` (the code ``c3.tl.super_resolve`` runs per tile batch) on synthetic tiles - random
H&E and LR maps: the time of a forward pass does not depend on the values - after one warm-up call, with random
weights for the presets (speed does not depend on training). Reported: tiles/s, genes x tiles/s, peak GPU memory
(``torch.cuda.max_memory_allocated``; on the CPU, with ``--quick``, the peak resident memory above the start), and
the projected time of a 6.5 x 6.5 mm Visium section at 10x (the number of tiles ``super_resolve`` plans for a
fully covered section of that size, divided by the measured tiles/s; tissue covering less of the slide takes less).

Rows:

- ``paper``: the paper's formulation and sizes (256 px tiles, 200 genes), DDIM sampling at ``--steps`` (50, the
  paper's and ``super_resolve``'s GPU default), one sample per (tile, gene);
- ``residual``: the paper's sizes in the residual formulation, its conditional mean (``mode="mean"``, the default
  for such models) and mean + ``--samples`` residual samples;
- ``demo``: the bundled demo model (``tiny`` preset, 64 px tiles, its 48 genes), mean and mean + samples.

Run on a machine with a GPU:  python benchmarks/gpu.py
It writes docs/benchmarks/gpu.md and benchmarks/results/gpu.json. Without a GPU it stops, unless ``--quick``: tiny
sizes (the ``tiny-paper``/``tiny`` presets for ``paper``/``residual``, 8 genes, 2 steps, 1 tile) on whatever device
there is, fp32 only on a CPU (bf16 autocast there is 20-40x slower without bf16 units), printed (and written to
``--out`` if given) - a check that the script runs, not a benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_report  # noqa: E402

#: Edge (um) of the section the "Visium slide" column projects to, and the tile overlap super_resolve uses (1/4).
VISIUM_EDGE_UM = 6500.0


def visium_tiles(image_size: int, edge_um: float = VISIUM_EDGE_UM) -> int:
    """Tiles ``super_resolve`` plans on a fully covered ``edge_um`` square at 10 um/px (quarter overlap, stride in
    whole 100 um LR pixels)."""
    from c3diff.tl._tiling import plan_tiles

    pixels = math.ceil(edge_um / 10.0)
    stride = ((image_size - image_size // 4) // 10) * 10  # super_resolve's default overlap and stride
    return len(plan_tiles(pixels, pixels, size=image_size, stride=stride))


class _Peak:
    """Peak memory of a block: CUDA's allocator counter, or the process's resident memory sampled on a thread."""

    def __init__(self, device) -> None:
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            self._process = psutil.Process()
            self.start = self.peak = self._process.memory_info().rss
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._done.set()
            self._thread.join()
            self.mib = (max(self.peak, self._process.memory_info().rss) - self.start) / 2**20


def _models(args) -> list[tuple[str, object]]:
    import c3diff as c3
    from c3diff._panels import paper_genes

    genes = list(paper_genes())[: args.genes]
    out = []
    for name in args.models:
        if name == "paper":
            out.append(("paper", c3.models.build_model("tiny-paper" if args.quick else "paper", genes=genes)))
        elif name == "residual":
            out.append(("residual", c3.models.build_model("tiny" if args.quick else "residual", genes=genes)))
        elif name == "demo":
            out.append(("demo", c3.models.load_demo_model()))
        else:
            raise ValueError(f"unknown model {name!r}; choose from paper, residual, demo")
    return out


def _runs(name: str, model, args) -> list[dict]:
    """The (mode, steps, n_samples) rows of one model."""
    if model.mean_net is None:
        return [{"mode": "sample", "steps": args.steps, "n_samples": 1}]
    return [
        {"mode": "mean", "steps": None, "n_samples": 1},
        {"mode": "sample", "steps": args.steps, "n_samples": args.samples},
    ]


def _time(model, run: dict, *, genes: int, tiles: int, repeats: int, precision: str, device) -> dict:
    import torch

    from c3diff.models._sampling import auto_gene_batch_size

    s, lr_size, n_genes = model.config.image_size, model.config.lr_size, min(genes, model.num_genes)
    generator = torch.Generator().manual_seed(0)
    histology = torch.rand(tiles, 3, s, s, generator=generator)
    lr = torch.rand(tiles, n_genes, lr_size, lr_size, generator=generator)
    k = model.texture_channels
    texture = torch.randn(tiles, k, s, s, generator=generator) if k else None
    gene_batch = auto_gene_batch_size(model, n_genes, mode=run["mode"], n_samples=run["n_samples"], device=device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    def call() -> None:
        with autocast:
            model.predict(
                histology,
                lr,
                gene_indices=list(range(n_genes)),
                mode=run["mode"],
                num_inference_steps=run["steps"] or 1,
                n_samples=run["n_samples"],
                gene_batch_size=gene_batch,
                texture=texture,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()  # warm-up: kernels, allocator, cuDNN autotuning
    with _Peak(device) as peak:
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        seconds = (time.perf_counter() - start) / repeats
    tiles_per_s = tiles / seconds
    return {
        **run,
        "precision": precision,
        "tiles": tiles,
        "genes": n_genes,
        "gene_batch": gene_batch,
        "seconds_per_call": seconds,
        "tiles_per_s": tiles_per_s,
        "gene_tiles_per_s": tiles_per_s * n_genes,
        "peak_mib": peak.mib,
        "visium_tiles": visium_tiles(s),
        "visium_s": visium_tiles(s) / tiles_per_s,
    }


def run(args) -> dict:
    import torch

    device = torch.device(
        "cuda"
        if torch.cuda.is_available() and args.device in ("auto", "cuda")
        else args.device
        if args.device != "auto"
        else "cpu"
    )
    if device.type != "cuda" and not args.quick:
        raise SystemExit(
            "benchmarks/gpu.py: no GPU visible (torch.cuda.is_available() is False). Run it on a machine "
            "with a GPU, or pass --quick for a tiny check of the script on this device."
        )
    if args.quick:
        args.genes, args.steps, args.samples = min(args.genes, 8), min(args.steps, 2), min(args.samples, 2)
        args.tiles, args.repeats = 1, 1
        if args.precisions is None:  # bf16 autocast on a CPU without bf16 units is 20-40x slower: fp32 only
            args.precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    args.precisions = args.precisions or ["fp32", "bf16"]
    info = {"device": str(device), "torch": torch.__version__, "quick": args.quick, "machine": machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30, "cuda": torch.version.cuda}
    rows = []
    for name, model in _models(args):
        model = model.to(device).eval()
        for spec in _runs(name, model, args):
            for precision in args.precisions:
                row = {
                    "model": name,
                    "image_size": model.config.image_size,
                    **_time(
                        model,
                        spec,
                        genes=args.genes,
                        tiles=args.tiles,
                        repeats=args.repeats,
                        precision=precision,
                        device=device,
                    ),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"info": info, "rows": rows, "args": {k: v for k, v in vars(args).items() if k != "out"}}


def markdown(result: dict) -> str:
    info, rows = result["info"], result["rows"]
    where = (
        f"{info['gpu']} ({info['gpu_memory_gib']:.0f} GiB), CUDA {info['cuda']}, torch {info['torch']}"
        if "gpu" in info
        else f"{info['device']}, torch {info['torch']}"
    )
    memory = "peak GPU memory (MiB)" if "gpu" in info else "peak RSS above start (MiB)"
    lines = [
        "### GPU throughput (`benchmarks/gpu.py`)" + (" - quick check, not a benchmark" if info["quick"] else ""),
        "",
        "`model.predict` on synthetic tiles (random weights and inputs: the time does not depend on them), after a "
        "warm-up call. Visium slide: the tiles `super_resolve` plans on a fully covered 6.5 x 6.5 mm section at 10x "
        "divided by the measured tiles/s.",
        "",
        f"| model | tile (px) | mode | steps | samples | precision | genes | tiles / s | genes x tiles / s | {memory} "
        "| Visium slide: tiles | Visium slide: s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['model']} | {r['image_size']} | {r['mode']} | {r['steps'] or '-'} | {r['n_samples']} | "
            f"{r['precision']} | {r['genes']} | {r['tiles_per_s']:.3g} | {r['gene_tiles_per_s']:.3g} | "
            f"{r['peak_mib']:.0f} | {r['visium_tiles']} | {r['visium_s']:.3g} |"
            for r in rows
        ],
        "",
        f"Device: {where}. Machine: {info['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["paper", "residual", "demo"])
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        choices=["fp32", "bf16"],
        help="fp32 and bf16 autocast by default (--quick on a CPU: fp32)",
    )
    parser.add_argument(
        "--genes",
        type=int,
        default=200,
        help="genes predicted: the paper's first N for the presets, at most all of the demo model's",
    )
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the sample rows")
    parser.add_argument("--samples", type=int, default=4, help="residual samples per (tile, gene) of the sample rows")
    parser.add_argument("--tiles", type=int, default=4, help="tiles per predict call")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row (after one warm-up call)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on any device: checks the script runs")
    parser.add_argument("--out", default=None, help="markdown output (default docs/benchmarks/gpu.md; --quick: none)")
    args = parser.parse_args(argv)
    result = run(args)
    text = markdown(result)
    if args.quick:
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    else:
        write_report("gpu", text, result, out=args.out)
    return result


if __name__ == "__main__":
    main()
