"""Inference of a C3-Diff model: the conditional mean, and DDIM samples; T tiles x G genes x n samples, batched over
genes.

``mode="mean"`` (residual formulation): the conditional-mean stage alone, one deterministic forward pass per tile
and gene batch. ``mode="sample"``: DDIM samples - of the whole map (paper formulation; the result is their average)
or of the residual added to the mean (residual formulation; the result is the exact conditional mean and the
samples give the spread).

The loop follows diffusers' ``DDIMPipeline``/``LDMPipeline`` (a fresh :class:`~diffusers.DDIMScheduler` from the
model's scheduler config; ``scale_model_input``, noise prediction, ``scheduler.step``; decode the latents), with
C3-Diff's conditioning:

- histology features depend only on the tile: they are encoded once per tile and expanded to every gene batch;
- a tile without LR ST imputes its ST features once from the model's memory bank (they depend only on the tile);
- genes of a tile are denoised ``gene_batch_size`` at a time, each with ``n_samples`` samples;
- the initial noise (and, for ``eta > 0``, the DDIM noise) of every (tile, gene, sample) comes from its own
  ``torch.Generator`` seeded by ``(tile seed, gene index, sample index)`` through :class:`numpy.random.SeedSequence`,
  so a result is the same whatever the batching, the gene subset or the number of tiles.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from c3diff.models._conditional_mean import share_map
from c3diff.models._hint_encoders import ModalityFeatures

if TYPE_CHECKING:  # pragma: no cover
    from c3diff.models._c3diff import C3DiffModel

__all__ = ["auto_gene_batch_size", "draw_samples", "noise_generator", "sample"]

#: Items x pixels one model call may hold (an item is one gene of a tile, times ``n_samples`` when sampling), by
#: device kind and mode: all genes of a tile go in as few calls as this allows. CPU values from measurements on the
#: ``tiny`` preset (64 px tiles, 200 genes, one thread): in mean mode 200 genes per call ran 10-20 % faster than 16 at
#: +93 MiB of peak memory; when sampling, 64 items per call (16 genes x 4 samples) were as fast as 200 (the convolutions
#: are then compute-bound) at half the memory. GPU values: the same item counts times 8 (``benchmarks/gpu.py`` reports
#: the peak memory they take).
CALL_PIXELS = {
    "cpu": {"mean": 256 * 64 * 64, "sample": 64 * 64 * 64},
    "cuda": {"mean": 2048 * 64 * 64, "sample": 512 * 64 * 64},
}


def noise_generator(tile_seed: int, gene_index: int, sample_index: int) -> torch.Generator:
    """The CPU generator of one (tile, gene, sample): seeded by mixing the three integers with ``SeedSequence``.

    Examples
    --------
    >>> a = torch.randn(2, generator=noise_generator(0, 3, 0))
    >>> b = torch.randn(2, generator=noise_generator(0, 3, 0))
    >>> c = torch.randn(2, generator=noise_generator(0, 3, 1))
    >>> bool(torch.equal(a, b)), bool(torch.equal(a, c))
    (True, False)
    """
    state = np.random.SeedSequence([int(tile_seed), int(gene_index), int(sample_index)]).generate_state(2)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def auto_gene_batch_size(
    model: C3DiffModel,
    n_genes: int,
    *,
    mode: str = "mean",
    n_samples: int = 1,
    device: str | torch.device | None = None,
) -> int:
    """Genes of one tile per model call: all of them when :data:`CALL_PIXELS` allows, else the fewest equal calls.

    Examples
    --------
    >>> import c3diff
    >>> model = c3diff.models.build_model("tiny", genes=[f"G{i}" for i in range(200)])
    >>> auto_gene_batch_size(model, 200, mode="mean", device="cpu")  # 64 px tiles: one call for all 200 genes
    200
    >>> auto_gene_batch_size(model, 200, mode="sample", n_samples=4, device="cpu")  # 13 calls of <= 16 genes x 4
    16
    """
    if n_genes < 1 or n_samples < 1:
        raise ValueError(f"`n_genes` and `n_samples` must be positive, got {n_genes} and {n_samples}.")
    if mode not in ("mean", "sample"):
        raise ValueError(f"`mode` must be 'mean' or 'sample', got {mode!r}.")
    kind = torch.device(model.device if device is None else device).type
    budget = CALL_PIXELS.get(kind, CALL_PIXELS["cpu"])[mode]
    per_gene = model.config.image_size**2 * (n_samples if mode == "sample" else 1)
    limit = max(1, budget // per_gene)
    calls = -(-n_genes // limit)
    return -(-n_genes // calls)  # the same number of genes in every call (no small last call)


@torch.inference_mode()
def sample(
    model: C3DiffModel,
    histology: torch.Tensor,
    lr: torch.Tensor | None = None,
    *,
    gene_indices: Sequence[int] | None = None,
    lr_available: Sequence[bool] | torch.Tensor | None = None,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    n_samples: int = 1,
    seed: int | Sequence[int] = 0,
    gene_batch_size: int | None = 16,
    scale: int | None = None,
    mode: str | None = None,
    progress: bool = False,
    keep_samples: bool = False,
    scheduler: Any = None,
    texture: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Super-resolve gene maps of ``T`` tiles; the implementation of :meth:`C3DiffModel.predict` (same arguments;
    ``keep_samples`` appends the ``(T, G', n_samples, H, H)`` samples to the result, see :func:`draw_samples`;
    ``gene_batch_size=None`` takes :func:`auto_gene_batch_size`; ``scheduler``: a diffusers scheduler to sample with
    instead of the model's ``noise_scheduler``, the pipeline's scheduler component). Runs under
    :func:`torch.inference_mode`: the results are inference tensors (no autograd history; ``.clone()`` them to use
    them in autograd). ``texture`` ``(T, K, S, S)`` (:func:`c3diff.pp.histology_texture`) is required by models
    whose mean network reads it (:attr:`C3DiffModel.texture_channels`) and ignored otherwise.

    Returns
    -------
    ``(mean, std)``, each ``(T, G', H, H)`` float32 on the CPU; ``std`` (sample standard deviation over the
    ``n_samples`` samples, an uncertainty map) is ``None`` with one sample or ``mode="mean"``. Paper formulation:
    maps in [0, 1]. Residual formulation: non-negative maps in units of the normalised LR map (an LR pixel of value
    ``v`` spreads ``v`` per output pixel on average; see :meth:`C3DiffModel.expected_map`).

    Examples
    --------
    >>> import torch, c3diff
    >>> model = c3diff.models.build_model("tiny", genes=["A", "B", "C"])
    >>> mean, std = sample(model, torch.rand(2, 3, 64, 64), torch.rand(2, 2, 7, 7), gene_indices=[2, 0],
    ...                    num_inference_steps=2, n_samples=2, scale=5, mode="sample")
    >>> tuple(mean.shape), tuple(std.shape)
    ((2, 2, 32, 32), (2, 2, 32, 32))
    """
    config = model.config
    device, dtype = model.device, model.dtype
    s, lr_size = config.image_size, config.lr_size

    if histology.ndim != 4 or histology.shape[1:] != (3, s, s):
        raise ValueError(f"`histology` must be (T, 3, {s}, {s}) in [0, 1], got {tuple(histology.shape)}.")
    n_tiles = len(histology)
    k = model.texture_channels
    if k and (texture is None or tuple(texture.shape) != (n_tiles, k, s, s)):
        found = None if texture is None else tuple(texture.shape)
        raise ValueError(
            f"This model reads the histology texture: pass `texture` ({n_tiles}, {k}, {s}, {s}) from "
            f"c3diff.pp.histology_texture, got {found}."
        )
    genes = _gene_indices(gene_indices, model.num_genes)
    available = _lr_available(lr_available, lr, n_tiles)
    if lr is not None and lr.shape != (n_tiles, len(genes), lr_size, lr_size):
        raise ValueError(
            f"`lr` must be (T, G', L, L) = ({n_tiles}, {len(genes)}, {lr_size}, {lr_size}) (one map per requested "
            f"gene), got {tuple(lr.shape)}."
        )
    scale = config.scale if scale is None else scale
    if scale not in (5, 10):
        raise ValueError(f"`scale` must be 5 or 10, got {scale!r}.")
    if scale == 10 and config.scale == 5:
        raise ValueError("This model was trained for 5x; it cannot predict 10x maps. Use `scale=5` (or None).")
    if n_samples < 1 or (gene_batch_size is not None and gene_batch_size < 1) or num_inference_steps < 1:
        raise ValueError("`n_samples`, `gene_batch_size` and `num_inference_steps` must be positive integers.")
    seeds = _tile_seeds(seed, n_tiles)
    residual = model.mean_net is not None
    mode = ("mean" if residual else "sample") if mode is None else mode
    if mode not in ("mean", "sample"):
        raise ValueError(f"`mode` must be 'mean', 'sample' or None, got {mode!r}.")
    if gene_batch_size is None:
        gene_batch_size = auto_gene_batch_size(model, len(genes), mode=mode, n_samples=n_samples)
    if mode == "mean":
        model._require_mean()
    scheduler = model.noise_scheduler if scheduler is None else model.check_scheduler(scheduler)

    was_training = model.training
    model.eval()
    try:
        encoders = model.hint_encoders
        out_size = model.output_size(scale)
        mean = torch.empty(n_tiles, len(genes), out_size, out_size, dtype=torch.float32)
        std = torch.empty_like(mean) if n_samples > 1 and mode == "sample" else None
        samples = torch.empty(n_tiles, len(genes), n_samples, out_size, out_size) if keep_samples else None
        if keep_samples and mode != "sample":
            raise ValueError("`keep_samples=True` needs mode='sample'.")
        chunks = [list(range(i, min(i + gene_batch_size, len(genes)))) for i in range(0, len(genes), gene_batch_size)]
        bar = tqdm(total=n_tiles * len(chunks), desc="DDIM" if mode == "sample" else "mean", disable=not progress)
        for t in range(n_tiles):
            # histology features (and imputed ST features) depend only on the tile: once per tile, for all genes
            h = encoders.encode_histology(histology[t : t + 1].to(device, dtype))
            h_hint = encoders.histology_hint(h)
            if residual:  # the mean's histology trunk, once per tile
                tile_histology = histology[t : t + 1].to(device, dtype)
                tile_texture = texture[t : t + 1].to(device, dtype) if k else None
                trunk = model.mean_trunk(h_hint, tile_histology, tile_texture)
            if not available[t]:
                c_y, m_y = model.imputer.impute_from_bank(h.content, h.modal)
                st_imputed = encoders.st_hint(ModalityFeatures(content=c_y, modal=m_y))
            for chunk in chunks:
                n = len(chunk)
                to_gene_batch = torch.zeros(n, dtype=torch.long, device=device)
                gene_ids = torch.tensor([genes[j] for j in chunk], device=device)
                if available[t]:
                    lr_maps = lr[t, chunk][:, None].to(device, dtype)
                    st_hint = encoders.st_hint(encoders.encode_st(model.lr_image(lr_maps)))
                else:
                    st_hint = st_imputed.expand(to_gene_batch)
                st_features = st_hint
                if mode == "sample":  # the ControlNet's hint; the mean stage does not use it
                    hint = encoders.assemble(h_hint.expand(to_gene_batch), st_hint, gene_ids, num_genes=model.num_genes)
                if residual:
                    lr_maps = (
                        lr[t, chunk][:, None].to(device, dtype)
                        if available[t]
                        else torch.zeros(n, 1, lr_size, lr_size, device=device, dtype=dtype)
                    )
                    log_shares = model.mean_log_shares(
                        model.mean_head(
                            trunk.expand(n, -1, -1, -1),
                            st_features,
                            lr_maps,
                            gene_ids,
                            tile_histology.expand(n, -1, -1, -1),
                            texture=None if tile_texture is None else tile_texture.expand(n, -1, -1, -1),
                        )
                    )
                    expected = model.expected_map(log_shares, lr_maps)
                    mean[t, chunk] = _to_scale(expected, model, scale).float().cpu()[:, 0]
                    if mode == "mean":
                        bar.update()
                        continue
                    shares = share_map(log_shares, model.output_block())
                    hint = torch.cat([hint, model._mean_hint(shares)], dim=1)
                hint = hint.repeat_interleave(n_samples, dim=0)  # order: gene-major, then sample
                generators = [noise_generator(seeds[t], genes[j], k) for j in chunk for k in range(n_samples)]
                images = _denoise_loop(
                    model,
                    hint,
                    generators,
                    scheduler=scheduler,
                    num_inference_steps=num_inference_steps,
                    eta=eta,
                    raw=residual,
                )
                if residual:  # a sample: the mean's shares plus a sampled residual, never negative
                    images = _fit_output(images, model)
                    images = (shares.repeat_interleave(n_samples, dim=0) + images).clamp_min(0.0)
                    images = model.shares_in_lr_units(images, lr_maps.repeat_interleave(n_samples, dim=0))
                    images = _to_scale(images, model, scale)
                elif scale == 5:
                    images = F.avg_pool2d(images, 2)
                images = images.float().cpu().view(n, n_samples, out_size, out_size)
                if not residual:
                    mean[t, chunk] = images.mean(dim=1)
                if std is not None:
                    std[t, chunk] = images.std(dim=1, correction=1)
                if samples is not None:
                    samples[t, chunk] = images
                bar.update()
        bar.close()
    finally:
        model.train(was_training)
    if keep_samples:
        return mean, std, samples
    return mean, std


def draw_samples(
    model: C3DiffModel,
    histology: torch.Tensor,
    lr: torch.Tensor | None = None,
    *,
    n_samples: int = 1,
    **kwargs,
) -> torch.Tensor:
    """The individual samples, ``(T, G', n_samples, H, H)``: whole maps (paper formulation) or mean + residual
    (residual formulation), in the units of :func:`sample`, which takes the same keyword arguments.

    Examples
    --------
    >>> import torch, c3diff
    >>> model = c3diff.models.build_model("tiny", genes=["A", "B"])
    >>> draws = draw_samples(model, torch.rand(1, 3, 64, 64), torch.rand(1, 2, 7, 7), n_samples=3,
    ...                      num_inference_steps=2)
    >>> tuple(draws.shape)
    (1, 2, 3, 64, 64)
    """
    return sample(model, histology, lr, n_samples=n_samples, mode="sample", keep_samples=True, **kwargs)[2]


def _to_scale(maps: torch.Tensor, model: C3DiffModel, scale: int) -> torch.Tensor:
    """Maps at the model's output scale -> ``scale`` (a 10x model's 5x output is the 2 x 2 mean)."""
    return F.avg_pool2d(maps, 2) if scale == 5 and model.config.scale == 10 else maps


def _fit_output(images: torch.Tensor, model: C3DiffModel) -> torch.Tensor:
    """Decoded ``(N, 1, S, S)`` residuals -> the model's output grid (a 5x model's targets were upsampled)."""
    size = model.output_size()
    return images if images.shape[-1] == size else F.avg_pool2d(images, images.shape[-1] // size)


def _denoise_loop(
    model: C3DiffModel,
    hint: torch.Tensor,
    generators: list[torch.Generator],
    *,
    scheduler: Any,
    num_inference_steps: int,
    eta: float,
    raw: bool = False,
) -> torch.Tensor:
    """DDIM from per-item noise to decoded ``(N, 1, S, S)`` maps: in [0, 1], or in their own units with ``raw``."""
    # a fresh copy of the scheduler component (the model's, DDIM unless swapped, or the one `sample` was given)
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=model.device)
    accepts = inspect.signature(scheduler.step).parameters
    step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generators)) if k in accepts}
    shape = (len(hint), model.unet.config.in_channels, model.latent_size, model.latent_size)
    latents = randn_tensor(shape, generator=generators, device=model.device, dtype=model.dtype)
    latents = latents * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        model_output = model.denoise(model_input, timestep, hint)  # noise or velocity, as the scheduler expects
        latents = scheduler.step(model_output, timestep, latents, **step_kwargs).prev_sample
    return model.decode_raw(latents) if raw else model.decode_latents(latents)


def _gene_indices(gene_indices: Sequence[int] | None, num_genes: int) -> list[int]:
    if gene_indices is None:
        return list(range(num_genes))
    genes = [int(g) for g in np.asarray(gene_indices).ravel()]
    if not genes:
        raise ValueError("`gene_indices` is empty; pass at least one gene index (or None for all genes).")
    bad = [g for g in genes if not 0 <= g < num_genes]
    if bad:
        raise ValueError(f"`gene_indices` must lie in [0, {num_genes}) (the model's genes), got {bad[:5]}.")
    if len(set(genes)) != len(genes):
        raise ValueError("`gene_indices` lists a gene more than once.")
    return genes


def _lr_available(lr_available, lr: torch.Tensor | None, n_tiles: int) -> list[bool]:
    if lr_available is None:
        return [lr is not None] * n_tiles
    available = [bool(a) for a in torch.as_tensor(lr_available).ravel().tolist()]
    if len(available) != n_tiles:
        raise ValueError(f"`lr_available` must hold one bool per tile ({n_tiles}), got {len(available)}.")
    if lr is None and any(available):
        raise ValueError("`lr_available` marks tiles as having LR ST but `lr` is None; pass `lr` or all False.")
    return available


def _tile_seeds(seed: int | Sequence[int], n_tiles: int) -> list[int]:
    if isinstance(seed, int | np.integer):
        seeds = [int(seed) + t for t in range(n_tiles)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != n_tiles:
            raise ValueError(f"`seed` must be an int or one int per tile ({n_tiles}), got {len(seeds)} seeds.")
    if any(s < 0 for s in seeds):
        raise ValueError("Seeds must be non-negative integers.")
    return seeds
