"""Parameter counts and CPU timings of the C3-Diff model presets.

Prints, per preset, the parameters of every component (frozen / trained) and:
- ``paper``: one forward + backward of the training loss at batch 1;
- ``tiny``: one training step (loss, backward, AdamW) at batch 16, and 50-step DDIM sampling of 1 tile x 8 genes.

Usage::

    python benchmarks/model_cost.py                 # both presets
    python benchmarks/model_cost.py --preset tiny   # only the tiny one
    python benchmarks/model_cost.py --threads 2     # pin torch's CPU threads
"""

from __future__ import annotations

import argparse
import time

import torch

import c3diff
from c3diff.models._controlnet import DECODER_MODULES, ENCODER_MODULES


def _count(modules) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def parameter_table(model) -> list[tuple[str, int, str]]:
    """(component, parameters, frozen/trained) rows."""
    unet = model.unet
    rows = [
        ("autoencoder (VQModel)", _count([model.vqvae]), "frozen"),
        (
            "UNet encoder (conv_in, time emb., down, mid)",
            _count(getattr(unet, n) for n in ENCODER_MODULES),
            "frozen (trained in the backbone stage only)",
        ),
        ("UNet decoder (up blocks, out norm/conv)", _count(getattr(unet, n) for n in DECODER_MODULES), "trained"),
        ("ControlNet", _count([model.controlnet]), "trained"),
        ("hint encoders (4)", _count([model.hint_encoders]), "trained"),
        ("imputation alpha, beta", 2, "trained"),
    ]
    return rows


def _batch(model, batch_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s, lr, h = model.config.image_size, model.config.lr_size, model.output_size()
    return {
        "histology": torch.rand(batch_size, 3, s, s, generator=g),
        "lr": torch.rand(batch_size, 1, lr, lr, generator=g),
        "hr": torch.rand(batch_size, 1, h, h, generator=g) * 2 - 1,
        "gene_index": torch.randint(model.num_genes, (batch_size,), generator=g),
        "lr_missing": torch.rand(batch_size, generator=g) < 0.05,
    }


def time_train_step(model, batch_size: int, *, optimizer_step: bool, repeats: int) -> float:
    """Median seconds of loss + backward (+ AdamW step)."""
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5) if optimizer_step else None
    batch = _batch(model, batch_size)
    times = []
    for i in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        loss = model.compute_losses(batch, generator=torch.Generator().manual_seed(i)).total
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_sampling(model, n_genes: int, steps: int) -> float:
    s, lr = model.config.image_size, model.config.lr_size
    histology, lr_maps = torch.rand(1, 3, s, s), torch.rand(1, n_genes, lr, lr)
    start = time.perf_counter()
    model.predict(
        histology, lr_maps, gene_indices=list(range(n_genes)), num_inference_steps=steps, gene_batch_size=n_genes
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["paper", "tiny", "all"], default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"c3diff {c3diff.__version__}, torch {torch.__version__}, CPU threads: {torch.get_num_threads()}\n")
    presets = ["tiny", "paper"] if args.preset == "all" else [args.preset]
    for preset in presets:
        genes = [f"G{i}" for i in range(8)] if preset == "tiny" else None
        model = c3diff.models.build_model(preset, genes=genes)
        rows = parameter_table(model)
        print(
            f"## preset `{preset}` ({model.num_genes} genes, {model.config.image_size} px tiles, "
            f"{'pixel space' if model.vqvae is None else 'VQ latent'} {model.latent_size} px)\n"
        )
        print("| component | parameters | |\n|---|---:|---|")
        for name, n, state in rows:
            print(f"| {name} | {n:,} | {state} |")
        trained = sum(p.numel() for p in model.trainable_parameters())
        print(f"| **total** | {sum(p.numel() for p in model.parameters()):,} | {trained:,} trained |\n")
        print("| measurement | seconds |\n|---|---:|")
        if preset == "paper":
            t = time_train_step(model, 1, optimizer_step=False, repeats=max(1, args.repeats - 2))
            print(f"| forward + backward, batch 1 | {t:.2f} |")
        else:
            t = time_train_step(model, 16, optimizer_step=True, repeats=args.repeats)
            print(f"| train step (loss + backward + AdamW), batch 16 | {t:.3f} |")
            time_sampling(model, 8, 2)  # warm-up
            print(f"| DDIM 50 steps, 1 tile x 8 genes | {time_sampling(model, 8, 50):.2f} |")
        print()
        del model


if __name__ == "__main__":
    main()
