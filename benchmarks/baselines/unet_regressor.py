"""The paper's "U-Net" baseline: a deterministic U-Net regressor given exactly C3-Diff's inputs, trained with MSE.

Inputs per sample (one gene per sample, as C3-Diff): the histology patch ``(3, S, S)`` in [0, 1], the gene's LR map
upsampled x10 bicubic and cropped to ``S`` with ``models.hint_encoders.lr_condition_image`` (the geometry C3-Diff uses:
LR pixel ``(0, 0)`` and histology pixel ``(0, 0)`` share the top-left corner; overshoot clipped to [0, 1]), both
mapped to [-1, 1], and the gene's identity as a learned embedding (diffusers' ``UNet2DModel`` class embedding, added
to its time embedding; the time input is fixed to 0). The network predicts the HR map in [0, 1] at ``S x S``; at 5x
that prediction is 2 x 2 mean-pooled to ``S/2`` (the 20 um HR grid), in training and at inference, so both scales
share one architecture. By default (``lr_skip``) the output is ``U-Net(x) + gain[gene] * upsampled LR`` with the
U-Net's last convolution initialised to zero, so training starts from scaled bicubic upsampling and a CPU budget
goes into learning the histology-driven correction (a plain U-Net, ``lr_skip=False``, needs far more steps to
reach even bicubic quality). Loss: MSE to the per (patch, gene) min-max normalised HR map. Training: AdamW, cosine
learning-rate decay over a wall-clock budget, random flips/rotations of whole samples (histology, LR and HR
together), (patch, gene) pairs with a constant HR map left out; with ``val`` the weights of the best validation MSE
are kept.

Benchmark-only code: not part of the c3diff library (nothing in ``src/`` imports it).
"""

from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

from c3diff._validation import check_genes
from c3diff.models._hint_encoders import lr_condition_image

if TYPE_CHECKING:  # pragma: no cover
    from c3diff.pp import PatchSet

__all__ = ["UNetRegressor", "bicubic_predict", "fit_unet_regressor", "predict_unet_regressor"]


class UNetRegressor(ModelMixin, ConfigMixin):
    """U-Net mapping (histology, upsampled LR map, gene) to the gene's HR map.

    Parameters
    ----------
    genes
        The genes it predicts (the class-embedding vocabulary), in order.
    scale
        10 (HR at the histology's 10 um grid) or 5 (HR at 20 um: the S x S output is 2 x 2 mean-pooled).
    upsample_factor
        LR pixel size / histology pixel size (10 for 100 um LR and 10 um histology).
    block_out_channels, layers_per_block, norm_num_groups
        ``UNet2DModel``'s width, depth and GroupNorm groups (plain ``DownBlock2D``/``UpBlock2D``, no attention).
    lr_skip
        Add ``gain[gene] * upsampled LR`` to the U-Net's output, the U-Net's last convolution starting at zero:
        training starts from (scaled) bicubic upsampling and the U-Net learns the correction from the histology.
        ``False``: a plain U-Net, which needs far more steps than a CPU budget allows to beat bicubic.

    Examples
    --------
    >>> import torch
    >>> model = UNetRegressor(genes=["A", "B"], scale=5)
    >>> model(torch.rand(2, 3, 64, 64), torch.rand(2, 1, 7, 7), torch.tensor([0, 1])).shape
    torch.Size([2, 1, 32, 32])
    """

    @register_to_config
    def __init__(
        self,
        genes: list[str],
        scale: int = 10,
        upsample_factor: int = 10,
        block_out_channels: tuple[int, ...] = (16, 32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        lr_skip: bool = True,
        texture_channels: int = 0,
    ) -> None:
        super().__init__()
        if scale not in (5, 10):
            raise ValueError(f"`scale` must be 5 or 10, got {scale!r}.")
        n = len(block_out_channels)
        self.unet = UNet2DModel(
            in_channels=4 + texture_channels,  # RGB histology (+ its texture, when the patches have it) + the LR map
            out_channels=1,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            norm_num_groups=norm_num_groups,
            num_class_embeds=len(genes),
        )
        if lr_skip:
            # the HR maps' mean is ~0.1 of the LR maps' on [0, 1] (sparse 10 um counts vs 100 um sums)
            self.lr_gain = torch.nn.Parameter(torch.full((len(genes),), 0.1))
            torch.nn.init.zeros_(self.unet.conv_out.weight)
            torch.nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, histology: torch.Tensor, lr: torch.Tensor, gene_index: torch.Tensor) -> torch.Tensor:
        """``histology`` ``(B, 3, S, S)`` and ``lr`` ``(B, 1, L, L)`` in [0, 1], ``gene_index`` ``(B,)`` -> HR maps
        ``(B, 1, H, H)`` (H = S at 10x, S/2 at 5x), unclipped."""
        return self.predict_full(self.inputs(histology, lr), gene_index)

    def inputs(self, histology: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """The network's input image ``(B, 4, S, S)`` in [-1, 1]."""
        up = lr_condition_image(
            lr, image_size=histology.shape[-1], upsample_factor=self.config.upsample_factor, channels=1
        )
        return torch.cat([histology, up], dim=1) * 2.0 - 1.0

    def predict_full(self, x: torch.Tensor, gene_index: torch.Tensor) -> torch.Tensor:
        """Run the U-Net on prepared inputs (``x`` from :meth:`inputs`, possibly augmented)."""
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        out = self.unet(x, t, class_labels=gene_index).sample
        if self.config.lr_skip:
            out = out + self.lr_gain[gene_index][:, None, None, None] * (x[:, 3:4] + 1.0) / 2.0
        return F.avg_pool2d(out, 2) if self.config.scale == 5 else out


def _dihedral(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip/rotation of each sample's input and target (the 8 symmetries of the square)."""
    codes = torch.randint(0, 8, (x.shape[0],), generator=generator)
    x, y = x.clone(), y.clone()
    for code in codes.unique().tolist():
        idx = codes == code
        k, flip = code % 4, code >= 4
        xs, ys = torch.rot90(x[idx], k, dims=(-2, -1)), torch.rot90(y[idx], k, dims=(-2, -1))
        if flip:
            xs, ys = xs.flip(-1), ys.flip(-1)
        x[idx], y[idx] = xs, ys
    return x, y


def _check_geometry(patches: PatchSet, *, scale: int, arg: str) -> int:
    if patches.hr is None and arg != "patches":
        raise ValueError(f"`{arg}` has no HR ground truth; make it with `points_key` or `hr_key`.")
    if patches.scale != scale:
        raise ValueError(
            f"`{arg}` was made at scale {patches.scale}x but the model is {scale}x; make patches with `scale={scale}`."
        )
    factor = patches.params["lr_pixel_size"] / patches.params["histology_pixel_size"]
    if abs(factor - round(factor)) > 1e-6:
        raise ValueError(f"`{arg}`: LR/histology pixel-size ratio {factor:g} is not a whole number.")
    return round(factor)


def _batches_of_items(patches: PatchSet, channels: np.ndarray, items: np.ndarray):
    """Tensors of a batch of (patch, gene) items: histology, LR map and HR target (``None`` without truth)."""
    p, g = items[:, 0], items[:, 1]
    histology = torch.from_numpy(patches.histology[p].astype(np.float32) / 255.0)
    if patches.texture is not None:  # the same inputs as a C3-Diff model that reads the texture
        histology = torch.cat([histology, torch.from_numpy(patches.texture[p].astype(np.float32))], dim=1)
    lr = torch.from_numpy(np.ascontiguousarray(patches.lr[p, channels[g]][:, None]))
    hr = None if patches.hr is None else torch.from_numpy(np.ascontiguousarray(patches.hr[p, channels[g]][:, None]))
    return histology, lr, hr


def _evaluate(model: UNetRegressor, patches: PatchSet, items: np.ndarray, batch_size: int, device: str) -> float:
    channels = np.arange(len(patches.genes))
    gene_ids = torch.tensor([model.config.genes.index(g) for g in patches.genes])
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            histology, lr, hr = _batches_of_items(patches, channels, chunk)
            pred = model(histology.to(device), lr.to(device), gene_ids[chunk[:, 1]].to(device)).clamp(0, 1)
            total += float(((pred - hr.to(device)) ** 2).mean(dim=(1, 2, 3)).sum())
            n += len(chunk)
    model.train()
    return total / max(n, 1)


def _varying_items(patches: PatchSet) -> np.ndarray:
    """(patch, gene) pairs whose HR map is not constant: nothing to learn or score in the others."""
    varying = (patches.hr_high - patches.hr_low) > 0
    return np.argwhere(varying)


def fit_unet_regressor(
    train: PatchSet,
    *,
    val: PatchSet | None = None,
    scale: int,
    time_budget: float = 300.0,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    block_out_channels: tuple[int, ...] = (16, 32, 64),
    layers_per_block: int = 1,
    lr_skip: bool = True,
    augment: bool = True,
    val_every: float | None = None,
    max_val_items: int = 96,
    device: str = "cpu",
    num_threads: int | None = 1,
) -> UNetRegressor:
    """Train the U-Net baseline for a wall-clock budget.

    Parameters
    ----------
    train
        Training patches with HR ground truth (:func:`c3diff.pp.make_patches`).
    val
        Validation patches (same genes and geometry): the weights with the lowest validation MSE are kept.
    scale
        5 or 10; must be the patches' scale.
    time_budget
        Training wall-clock seconds (validation included; the final validation may run a little past it).
    batch_size, learning_rate
        AdamW batch size and peak learning rate (cosine decay over the budget after a 10-step warm-up).
    seed
        Seed of the initialisation, shuffling and augmentation.
    progress
        Show a tqdm bar (seconds of the budget).
    block_out_channels, layers_per_block, lr_skip
        Network size and the LR skip connection (see :class:`UNetRegressor`).
    augment
        Random flips/rotations of whole samples.
    val_every
        Seconds between validations (default: a fifth of the budget; validation time counts against the budget).
    max_val_items
        Validate on at most this many (patch, gene) pairs (a fixed random subset).
    device
        Torch device.
    num_threads
        Torch CPU threads while training (restored afterwards); ``None`` keeps the current setting. One thread is
        the default because on a shared 2-core machine two threads were ~10x slower per step (OpenMP threads
        waiting on each other); on an idle machine two are ~1.7x faster.

    Returns
    -------
    The trained :class:`UNetRegressor`, with ``model.training_log`` (steps, seconds, steps per second, losses,
    validation MSEs, the kept step and the parameter count).

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=1280, height=1280, seed=0)  # doctest: +SKIP
    >>> patches = c3.pp.make_patches(sdata, genes=["ERBB2"], points_key="transcripts", patch_size=64)  # doctest: +SKIP
    >>> model = fit_unet_regressor(patches, scale=10, time_budget=30)  # doctest: +SKIP
    >>> predict_unet_regressor(model, patches).shape[1:]  # doctest: +SKIP
    (1, 64, 64)
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _fit(
            train,
            val=val,
            scale=scale,
            time_budget=time_budget,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            progress=progress,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            lr_skip=lr_skip,
            augment=augment,
            val_every=val_every,
            max_val_items=max_val_items,
            device=device,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    train,
    *,
    val,
    scale,
    time_budget,
    batch_size,
    learning_rate,
    seed,
    progress,
    block_out_channels,
    layers_per_block,
    lr_skip,
    augment,
    val_every,
    max_val_items,
    device,
) -> UNetRegressor:
    from tqdm.auto import tqdm

    factor = _check_geometry(train, scale=scale, arg="train")
    if val is not None:
        _check_geometry(val, scale=scale, arg="val")
        if list(val.genes) != list(train.genes):
            raise ValueError("`val` must have the same genes, in the same order, as `train`.")
        if val.histology.shape[-1] != train.histology.shape[-1]:
            raise ValueError(
                f"`val` patches are {val.histology.shape[-1]} px but `train` patches {train.histology.shape[-1]} px."
            )
    if time_budget <= 0:
        raise ValueError(f"`time_budget` must be positive (seconds), got {time_budget!r}.")
    items = _varying_items(train)
    if len(items) == 0:
        raise ValueError("`train` has no (patch, gene) pair with a non-constant HR map: nothing to learn.")

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    model = UNetRegressor(
        genes=list(train.genes),
        scale=scale,
        upsample_factor=factor,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        lr_skip=lr_skip,
        texture_channels=0 if train.texture is None else int(train.texture.shape[1]),
    ).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    val_items = None
    if val is not None:
        val_items = _varying_items(val)
        if len(val_items) > max_val_items:
            val_items = val_items[np.sort(rng.choice(len(val_items), max_val_items, replace=False))]
    val_every = time_budget / 5 if val_every is None else float(val_every)

    channels = np.arange(len(train.genes))
    log: dict[str, Any] = {"train_loss": [], "val_mse": [], "best_step": None, "best_val_mse": None}
    best_state, best_mse = None, math.inf
    order, cursor = rng.permutation(len(items)), 0
    step, start, last_val = 0, time.perf_counter(), 0.0
    bar = tqdm(total=round(time_budget), unit="s", desc="U-Net regressor", disable=not progress)
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= time_budget:
            break
        if cursor + batch_size > len(order):  # next epoch
            order, cursor = rng.permutation(len(items)), 0
        chunk = items[order[cursor : cursor + batch_size]]
        cursor += batch_size
        histology, lr, hr = _batches_of_items(train, channels, chunk)
        x = model.inputs(histology.to(device), lr.to(device))
        y = hr.to(device)
        if augment:
            x, y = _dihedral(x, y, generator)
        warmup = min(1.0, (step + 1) / 10)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * warmup * 0.5 * (1 + math.cos(math.pi * min(elapsed / time_budget, 1.0)))
        loss = F.mse_loss(model.predict_full(x, torch.from_numpy(chunk[:, 1]).to(device)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log["train_loss"].append(loss.detach().item())
        step += 1
        now = time.perf_counter() - start
        bar.update(min(round(now), round(time_budget)) - bar.n)
        bar.set_postfix(step=step, loss=f"{log['train_loss'][-1]:.4f}")
        if val_items is not None and now - last_val >= val_every:
            last_val = now
            mse = _evaluate(model, val, val_items, batch_size * 2, device)
            log["val_mse"].append((step, mse))
            if mse < best_mse:
                best_mse, best_state, log["best_step"] = mse, copy.deepcopy(model.state_dict()), step
    train_seconds = time.perf_counter() - start
    bar.close()
    if val_items is not None:
        mse = _evaluate(model, val, val_items, batch_size * 2, device)
        log["val_mse"].append((step, mse))
        if mse < best_mse:
            best_mse, best_state, log["best_step"] = mse, None, step
        if best_state is not None:
            model.load_state_dict(best_state)
        log["best_val_mse"] = best_mse
    log.update(
        steps=step,
        seconds=train_seconds,
        steps_per_second=step / train_seconds,
        batch_size=batch_size,
        samples_seen=step * batch_size,
        n_items=len(items),
        epochs=step * batch_size / len(items),
        n_parameters=sum(p.numel() for p in model.parameters()),
        seed=seed,
        learning_rate=learning_rate,
        time_budget=time_budget,
        augment=augment,
    )
    model.training_log = log
    model.eval()
    return model


def predict_unet_regressor(
    model: UNetRegressor,
    patches: PatchSet,
    *,
    batch_size: int = 32,
    progress: bool = False,
    num_threads: int | None = 1,
) -> np.ndarray:
    """The U-Net's HR maps for every (patch, gene): float32 ``(N, G, H, H)`` in [0, 1], ``patches.genes`` order.

    Every gene of ``patches`` must be one the model was trained on. ``num_threads`` as in
    :func:`fit_unet_regressor`.

    Examples
    --------
    >>> pred = predict_unet_regressor(model, test_patches)  # doctest: +SKIP
    >>> pred.shape == test_patches.hr.shape  # doctest: +SKIP
    True
    """
    from tqdm.auto import tqdm

    factor = _check_geometry(patches, scale=model.config.scale, arg="patches")
    if factor != model.config.upsample_factor:
        raise ValueError(
            f"`patches` have an LR/histology pixel ratio of {factor}, the model {model.config.upsample_factor}."
        )
    check_genes(patches.genes, model.config.genes, arg="patches.genes (genes the model was trained on)")
    gene_ids = torch.tensor([model.config.genes.index(g) for g in patches.genes])
    n, g = len(patches), len(patches.genes)
    size = patches.histology.shape[-1] // (2 if model.config.scale == 5 else 1)
    out = np.empty((n, g, size, size), dtype=np.float32)
    items = np.argwhere(np.ones((n, g), dtype=bool))
    channels = np.arange(g)
    device = model.device
    model.eval()
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(items), batch_size), desc="U-Net predict", disable=not progress):
                chunk = items[start : start + batch_size]
                histology, lr, _ = _batches_of_items(patches, channels, chunk)
                pred = model(histology.to(device), lr.to(device), gene_ids[chunk[:, 1]].to(device)).clamp(0, 1)
                out[chunk[:, 0], chunk[:, 1]] = pred[:, 0].cpu().numpy()
    finally:
        torch.set_num_threads(previous_threads)
    return out


def bicubic_predict(patches: PatchSet) -> np.ndarray:
    """The bicubic baseline on patches: each LR map upsampled x10 bicubic with C3-Diff's geometry
    (``models.hint_encoders.lr_condition_image``), 2 x 2 mean-pooled at 5x. float32 ``(N, G, H, H)`` in [0, 1]."""
    factor = _check_geometry(patches, scale=patches.scale, arg="patches")
    lr = torch.from_numpy(np.ascontiguousarray(patches.lr.reshape(-1, 1, *patches.lr.shape[-2:])))
    up = lr_condition_image(lr, image_size=patches.histology.shape[-1], upsample_factor=factor, channels=1)
    if patches.scale == 5:
        up = F.avg_pool2d(up, 2)
    return up.reshape(len(patches), len(patches.genes), *up.shape[-2:]).numpy().astype(np.float32)


def _smoke() -> None:
    """Train on two small simulated sections (20 s at 10x, 10 s at 5x), score on a third against bicubic."""
    import warnings

    import c3diff as c3

    sections = [c3.datasets.simulate_section(width=1280, height=1280, seed=s, progress=False) for s in (0, 1, 2)]
    genes = c3.pp.select_genes(sections[0], table_key="cell_table", n_top_genes=6, inplace=False)
    for scale, budget in ((10, 20.0), (5, 10.0)):
        patches = [
            c3.pp.make_patches(sd, genes=genes, points_key="transcripts", scale=scale, patch_size=64, stride=20)
            for sd in sections
        ]
        train, test = c3.pp.PatchSet.concat(patches[:2]), patches[2]
        model = fit_unet_regressor(train, scale=scale, time_budget=budget, progress=False)
        log = model.training_log
        pred = predict_unet_regressor(model, test)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = {
                name: c3.metrics.summarize_scores(c3.metrics.score_maps(p, test.hr, genes=genes))
                for name, p in (("unet", pred), ("bicubic", bicubic_predict(test)))
            }
        print(
            f"scale {scale}x: train {len(train)} patches x {len(genes)} genes, test {len(test)}; "
            f"{log['n_parameters']:,} parameters, {log['steps']} steps in {log['seconds']:.1f} s "
            f"({log['steps_per_second']:.2f} steps/s, batch {log['batch_size']}), "
            f"final loss {np.mean(log['train_loss'][-10:]):.4f}"
        )
        for name, frame in rows.items():
            print(
                f"  {name:>8}: rmse {frame['rmse'].item():.3f}  pcc {frame['pcc'].item():.3f}  "
                f"ssim {frame['ssim'].item():.3f}"
            )


if __name__ == "__main__":
    _smoke()
