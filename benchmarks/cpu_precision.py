"""float32 against a bfloat16 model on the CPU: one tile of a residual model, the mean and mean + samples.

A model cast to bfloat16 (``from_pretrained(..., torch_dtype=torch.bfloat16)`` or ``model.to(torch.bfloat16)``)
runs ``predict`` / ``super_resolve`` in bfloat16. On a CPU with AVX-512 BF16 (or AMX) units that is faster; without
them it is much slower (see ``benchmarks/gpu.py``), so the script says first whether this CPU has them. The model is
the ``tiny`` preset with random weights for ``--genes`` genes (the cost does not depend on training); the maps of
the two precisions are compared too.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/cpu_precision.py            # 200 genes, 4 samples of 2 DDIM steps
    python benchmarks/cpu_precision.py --genes 48 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

import c3diff


def _timed(model, histology, lr, *, repeats: int, **kwargs):
    model.predict(histology, lr, **kwargs)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = model.predict(histology, lr, seed=1, **kwargs)
    return (time.perf_counter() - start) / repeats, out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps per sample (super_resolve's CPU default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"bf16 units on this CPU: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; torch threads "
        f"{torch.get_num_threads()}"
    )
    torch.manual_seed(0)
    model = c3diff.models.build_model("tiny", genes=[f"g{i}" for i in range(args.genes)])
    model.mark_fitted("mean")
    size, lr_size = model.config.image_size, model.config.lr_size
    histology, lr = torch.rand(1, 3, size, size), torch.rand(1, args.genes, lr_size, lr_size)
    runs = {"mean": {"mode": "mean"}, "sample": {"mode": "sample", "n_samples": args.samples}}
    rows, maps = [], {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = model.to(dtype)
        for run, kwargs in runs.items():
            seconds, (mean, std) = _timed(
                model, histology, lr, repeats=args.repeats, num_inference_steps=args.steps, **kwargs
            )
            maps[precision, run] = (mean, std)
            rows.append({"precision": precision, "run": run, "seconds": seconds})
    print(f"\n| precision | run | s / tile ({args.genes} genes) | vs fp32 |\n|---|---|---|---|")
    base = {r["run"]: r["seconds"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        print(f"| {r['precision']} | {r['run']} | {r['seconds']:.2f} | {base[r['run']] / r['seconds']:.2f}x |")
    mean32, mean16 = maps["fp32", "mean"][0], maps["bf16", "mean"][0]
    std32, std16 = maps["fp32", "sample"][1], maps["bf16", "sample"][1]
    print(
        f"\nbf16 vs fp32: mean map |difference| / mean {float((mean16 - mean32).abs().mean() / mean32.mean()):.4f}, "
        f"uncertainty maps r {float(torch.corrcoef(torch.stack([std16.flatten(), std32.flatten()]))[0, 1]):.4f}"
    )
    return rows


if __name__ == "__main__":
    main()
