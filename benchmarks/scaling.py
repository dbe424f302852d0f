"""How super_resolve scales with the slide: wall time and peak memory for sections of 1x, 4x and 16x area.

Each section is simulated and written to zarr first; then a fresh Python process reads it back (lazily), runs
``c3.tl.super_resolve`` with the tiny preset (random weights: speed does not depend on training) streaming the
output to a zarr store, and reports its wall time and the peak resident memory above the level reached before the
call. Time should grow linearly with the tissue area and peak memory stay flat (bounded by the tile batch).

Run:  python benchmarks/scaling.py [--base 1280] [--steps 10] [--genes 32]
Prints a markdown table and writes docs/benchmarks/scaling.md and benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_report  # noqa: E402

_WORKER = r"""
import json, sys, threading, time
import psutil, spatialdata as sd
import c3diff as c3

zarr_path, model_path, store, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sdata = sd.read_zarr(zarr_path)
process = psutil.Process()
baseline = process.memory_info().rss
peak = [baseline]
done = threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.05)

threading.Thread(target=watch, daemon=True).start()
start = time.perf_counter()
c3.tl.super_resolve(sdata, "hne", points_key="transcripts", model=model_path, steps=steps, store=store,
                    progress=False, batch_size=4)
elapsed = time.perf_counter() - start
done.set()
entry = sdata.attrs["c3diff"]["hne_c3diff_x10"]["params"]
print(json.dumps({"seconds": elapsed, "peak_mb": (max(peak[0], process.memory_info().rss) - baseline) / 2**20,
                  "tiles": entry["n_tiles"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=float, default=1280.0, help="edge of the 1x section in um")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per tile (sample mode only; the tiny preset writes its conditional mean)")
    parser.add_argument("--genes", type=int, default=32, help="genes predicted")
    parser.add_argument("--out", default=None, help="markdown output (default docs/benchmarks/scaling.md)")
    args = parser.parse_args()

    import c3diff as c3

    work = Path(tempfile.mkdtemp(prefix="c3diff_scaling_"))
    genes = c3.datasets.simulate_section(width=400, height=400, seed=0, progress=False).tables["cell_table"].var_names
    model = c3.models.build_model("tiny", genes=list(genes[: args.genes]))
    model.save_pretrained(str(work / "model"))
    rows = []
    for factor in (1, 4, 16):
        edge = args.base * factor**0.5
        sdata = c3.datasets.simulate_section(width=edge, height=edge, seed=factor, progress=False)
        zarr_path = work / f"section_{factor}.zarr"
        sdata.write(zarr_path)
        tissue_mm2 = float(sdata.attrs["c3diff"]["simulation"]["tissue_fraction_realised"]) * (edge / 1000) ** 2
        del sdata
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _WORKER,
                str(zarr_path),
                str(work / "model"),
                str(work / f"out_{factor}.zarr"),
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"area": f"{factor}x", "edge_mm": edge / 1000, "tissue_mm2": tissue_mm2, **result})
        print(rows[-1], flush=True)

    per_tile = [r["seconds"] / r["tiles"] for r in rows]
    lines = [
        "### Whole-slide scaling (`benchmarks/scaling.py`)",
        "",
        f"`c3.tl.super_resolve` with the tiny preset ({args.genes} genes, its conditional mean (one forward pass per "
        "tile and gene batch), 64 px tiles, "
        "output streamed to zarr), each size in a fresh process reading the section lazily from zarr.",
        "",
        "| area | section (mm) | tissue (mm^2) | tiles | time (s) | s / tile | peak memory above start (MiB) |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['area']} | {r['edge_mm']:.2f} x {r['edge_mm']:.2f} | {r['tissue_mm2']:.1f} | {r['tiles']} | "
            f"{r['seconds']:.1f} | {t:.2f} | {r['peak_mb']:.0f} |"
            for r, t in zip(rows, per_tile, strict=True)
        ],
        "",
        f"Machine: {machine()}.",
    ]
    write_report("scaling", "\n".join(lines) + "\n", rows, out=args.out)


if __name__ == "__main__":
    main()
