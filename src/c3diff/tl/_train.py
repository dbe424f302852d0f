"""c3.tl.train: the paper's training recipe on accelerate (CPU, one GPU or several), with validation and resumable
checkpoints."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from c3diff._atomic import recover_all, remove_folder, write_folder
from c3diff._constants import ATTRS_KEY
from c3diff.models import TrainingConfig
from c3diff.pp import ModelGeometry, PatchSet, make_patches, split_samples

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from spatialdata import SpatialData

    from c3diff.models import C3DiffModel

#: The supplementary's Table 1 (and section 3.2) recipe.
PAPER_RECIPE = {
    "learning_rate": 1e-5,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-5,
    "batch_size": 16,
    "epochs": 50,
    "lr_missing_fraction": 0.05,
}

_STATE_FILE = "trainer_state.json"
_RNG_FILE = "rng_state.pt"
_BEST_AT_STOP = "best_at_stop"  # a stopped run's best/ before its validation at the stop (in its last checkpoint)
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


@dataclass
class TrainingResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model
        The best model by validation PCC (the last one without validation).
    history
        One row per validation: each epoch of a conditional stage (loss components and RMSE/PCC of sampled maps), and
        the end of the backbone stage (its diffusion loss ``val_mse`` on validation maps).
    output_dir
        Folder with ``checkpoints/``, ``best/`` (``save_pretrained`` folder) and ``log.jsonl``.
    best_checkpoint
        The ``best/`` folder, or ``None`` without validation.
    """

    model: C3DiffModel
    history: pd.DataFrame
    output_dir: Path
    best_checkpoint: Path | None


class PatchBatchSampler:
    """Batches of items from distinct patches, drawn anew for each ``(seed, epoch)``: reproducible and resumable.

    An item is one gene of one patch; two genes of the same patch share their histology, so in the contrastive
    losses they would be negatives of each other that no encoder can tell apart. The paper's negatives are the other
    *patches* of the batch, so each batch takes one item from each of ``batch_size`` different patches (chosen in
    proportion to the items they have left). Items left when fewer than ``batch_size`` patches still have some are
    dropped for that epoch (they come back in the next). With fewer patches than ``batch_size``, batches fall back to
    a plain shuffle.

    With ``genes_per_patch = k > 1`` a batch holds up to ``k`` items (genes) of each of ``batch_size`` distinct
    patches (up to ``batch_size * k`` items): the conditional-mean stage encodes each patch's histology once for its
    genes.
    """

    def __init__(self, patch_of_item: np.ndarray, *, batch_size: int, seed: int, genes_per_patch: int = 1) -> None:
        self.patch_of_item = np.asarray(patch_of_item)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.genes_per_patch = int(genes_per_patch)
        if self.genes_per_patch < 1:
            raise ValueError(f"`genes_per_patch` must be a positive integer, got {genes_per_patch!r}.")
        self.distinct = len(np.unique(self.patch_of_item)) >= self.batch_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.patch_of_item))
        k = self.genes_per_patch
        if not self.distinct:
            size = self.batch_size * k
            n = len(order) // size * size
            self._batches = order[:n].reshape(-1, size).tolist()
            return
        patches, inverse = np.unique(self.patch_of_item[order], return_inverse=True)
        queues = [list(order[inverse == j]) for j in range(len(patches))]
        remaining = np.array([len(q) for q in queues], dtype=float)
        batches = []
        while (remaining > 0).sum() >= self.batch_size:
            chosen = rng.choice(len(queues), size=self.batch_size, replace=False, p=remaining / remaining.sum())
            take = np.minimum(remaining[chosen], k).astype(int)  # a patch with fewer genes left gives what it has
            batches.append([int(queues[j].pop()) for j, n in zip(chosen, take, strict=True) for _ in range(n)])
            remaining[chosen] -= take
        self._batches = batches

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        return iter([list(b) for b in self._batches])


# -------------------------------------------------------------------------------------------------- inputs
def _as_list(data: Any) -> list[Any]:
    if data is None:
        return []
    return list(data) if isinstance(data, list | tuple) else [data]


def _patches_from(
    data: Any,
    *,
    genes: list[str],
    scale: int,
    patch_size: int,
    patch_kwargs: Mapping[str, Any],
    arg: str,
) -> PatchSet | None:
    items = _as_list(data)
    if not items:
        return None
    patchsets, seen = [], {}
    for i, item in enumerate(items):
        if isinstance(item, PatchSet):
            patches = item
        elif hasattr(item, "images") and hasattr(item, "tables"):
            patches = make_patches(item, genes=genes, scale=scale, patch_size=patch_size, **patch_kwargs)
        elif isinstance(item, str | Path):
            patches = PatchSet.load(item)
        else:
            raise TypeError(
                f"`{arg}[{i}]` must be a SpatialData, a PatchSet or a patch file, got {type(item).__name__}."
            )
        for sample in patches.samples:  # distinct sections must not share a sample id (splits are by sample)
            if sample in seen and seen[sample] != i:
                patches.sample_id = np.where(patches.sample_id == sample, f"{sample}#{i}", patches.sample_id)
        seen.update({s: i for s in patches.samples})
        patchsets.append(patches)
    if any(p.params.get("patch_size") != patch_size for p in patchsets):
        sizes = sorted({p.params.get("patch_size") for p in patchsets})
        raise ValueError(f"`{arg}`: patches of {sizes} px do not match the model's {patch_size} px tiles.")
    if any(p.scale != scale for p in patchsets):
        raise ValueError(f"`{arg}`: patches at scales {sorted({p.scale for p in patchsets})}x, the model is {scale}x.")
    geometry = patch_kwargs.get("geometry")
    sizes = {(p.params.get("histology_pixel_size"), p.params.get("lr_pixel_size")) for p in patchsets}
    if geometry is not None and sizes != {(geometry.histology_pixel_size, geometry.lr_pixel_size)}:
        raise ValueError(
            f"`{arg}`: patches at (histology, LR) pixel sizes {sorted(sizes)} um, the model's are "
            f"({geometry.histology_pixel_size:g}, {geometry.lr_pixel_size:g}) um. Make them with "
            "`c3diff.pp.make_patches(..., geometry=c3diff.pp.ModelGeometry.of_model(model.config))`."
        )
    out = PatchSet.concat(patchsets)
    if patch_kwargs.get("texture") and out.texture is None:
        raise ValueError(
            f"`{arg}` has no histology texture, which this model's mean network reads; make the patches with "
            "`c3diff.pp.make_patches(..., texture=True)` (or pass the SpatialData itself)."
        )
    if out.hr is None:
        raise ValueError(f"`{arg}` has no HR ground truth to learn from (make the patches with `points_key`/`hr_key`).")
    missing = [g for g in genes if g not in set(out.genes)]
    if missing:
        raise ValueError(
            f"`{arg}` lacks {len(missing)} of the model's genes: {missing[:10]}{' ...' if len(missing) > 10 else ''}. "
            "Make the patches with the model's genes (`model.genes`)."
        )
    return out


def _resolve_model(model: Any, *, genes: list[str] | None, scale: int, overrides: Mapping[str, Any]) -> C3DiffModel:
    from c3diff import models

    if isinstance(model, str) and model in models.PRESETS:
        if not genes:
            raise ValueError(f"`genes` is required to build a new model from the preset {model!r}.")
        return models.build_model(model, genes=list(genes), scale=scale, **dict(overrides))
    if isinstance(model, str | Path):
        return models.from_pretrained(str(model))
    if isinstance(model, models.C3DiffModel):
        return model
    raise TypeError(
        f"`model` must be a preset name {sorted(models.PRESETS)}, a model folder/Hub id or a C3DiffModel, got "
        f"{type(model).__name__}."
    )


def make_optimizer(
    model: C3DiffModel,
    *,
    learning_rate: float = PAPER_RECIPE["learning_rate"],
    betas: tuple[float, float] = PAPER_RECIPE["betas"],
    eps: float = PAPER_RECIPE["eps"],
    weight_decay: float = PAPER_RECIPE["weight_decay"],
    stage: str = "diffusion",
) -> torch.optim.AdamW:
    """AdamW over the parameters a training stage updates (see
    :meth:`~c3diff.models.C3DiffModel.trainable_parameters`) with the paper's hyper-parameters (Table 1) as
    defaults."""
    return torch.optim.AdamW(
        model.trainable_parameters(stage), lr=learning_rate, betas=tuple(betas), eps=eps, weight_decay=weight_decay
    )


def _check_output_dir(output_dir: str | Path) -> Path:
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".c3diff_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"`output_dir={str(path)!r}` is not writable ({err.strerror}); choose another folder."
        ) from err
    return path


def _latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (``checkpoints/step-N`` with its state file), after cleaning up after a
    killed run (see :func:`_clean_checkpoints`)."""
    _clean_checkpoints(output_dir / "checkpoints")
    steps = [
        (int(m.group(1)), p)
        for p in (output_dir / "checkpoints").glob("step-*")
        if (m := _CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir()
    ]
    incomplete = [p.name for _, p in steps if not (p / _STATE_FILE).exists()]
    if incomplete:
        warnings.warn(
            f"`resume='latest'`: ignoring incomplete checkpoint folder(s) {sorted(incomplete)} under "
            f"{str(output_dir / 'checkpoints')!r} (no {_STATE_FILE}; written by a run that was killed); "
            "delete them to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
    complete = sorted((n, p) for n, p in steps if (p / _STATE_FILE).exists())
    return complete[-1][1] if complete else None


def _write_folder_atomically(final: Path, write) -> None:
    """Write a folder with ``write(folder)`` so that a killed process leaves either the old folder or the new one,
    never a half-written one (:func:`c3diff._atomic.write_folder`: ``.NAME.c3diff-tmp-PID`` renamed when complete, an
    existing folder moved aside to ``.NAME.c3diff-old-PID`` meanwhile; :func:`_clean_checkpoints` puts it back if
    the process died in between)."""
    write_folder(final, write)


def _clean_checkpoints(folder: Path) -> None:
    """Undo what a killed :func:`_write_folder_atomically` left in ``folder``: temporary folders of dead processes
    are deleted, a folder moved aside whose replacement never arrived is put back (:func:`c3diff._atomic.recover`)."""
    recover_all(folder)


def _trim_log(log_path: Path, step: int) -> None:
    """Keep the rows of ``log.jsonl`` up to ``step`` (the checkpoint a run resumes from): rows a killed or stopped
    run wrote after it, the validation row of a run's stop (marked ``"stopped"``) and a row cut short by a kill are
    dropped, so the log reads as one run."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step and not row.get("stopped"):
            kept.append(line + "\n")
    tmp = log_path.with_name(f".{log_path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, log_path)


def _mixed_precision(value: str) -> str:
    if value == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if value not in ("no", "fp16", "bf16"):
        raise ValueError(f"`mixed_precision` must be 'auto', 'no', 'fp16' or 'bf16', got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------- validation
def _validation_losses(
    model, loader, *, seed: int, max_batches: int, stage: str = "diffusion", recipe: TrainingConfig | None = None
) -> dict[str, float]:
    generator = torch.Generator(device=model.device).manual_seed(seed)
    sums: dict[str, float] = {}
    n = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b, batch in enumerate(loader):
            if b >= max_batches:
                break
            if stage == "mean":
                losses = model.compute_mean_losses(batch, recipe=recipe, generator=generator).as_dict()
            else:
                losses = model.compute_losses(batch, recipe=recipe, generator=generator).as_dict()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
    model.train(was_training)
    return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}


def validation_scores(
    model: C3DiffModel,
    patches: PatchSet,
    *,
    steps: int = 10,
    max_patches: int = 8,
    max_genes: int = 16,
    n_samples: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """RMSE / PCC (:doc:`/method`, *Metrics and protocols*) of the model's maps, on up to ``max_patches`` patches and
    ``max_genes`` genes (the most variable in the validation truth), in the model's scale: the conditional mean of a
    residual model, or the mean of ``n_samples`` maps sampled with ``steps`` DDIM steps (paper formulation).

    One sample of sparse counts correlates little with the truth even for a perfect model (two Poisson draws of the
    same intensity); the mean of a few samples tracks the intensity, which is what the score should select on.
    """
    from c3diff.metrics import score_maps, summarize_scores

    index = np.arange(min(len(patches), max_patches))
    channels = [patches.genes.index(g) for g in model.genes]
    spread = (patches.hr_high - patches.hr_low)[index][:, channels].mean(axis=0)
    order = np.argsort(-spread, kind="stable")[:max_genes]
    order = order[spread[order] > 0]
    if len(order) == 0:
        return {"val_rmse": float("nan"), "val_pcc": float("nan")}
    picked = [channels[i] for i in order]
    was_training = model.training
    model.eval()
    mean, _ = model.predict(
        torch.from_numpy(patches.histology[index].astype(np.float32) / 255.0),
        torch.from_numpy(patches.lr[index][:, picked]),
        gene_indices=[int(i) for i in order],
        num_inference_steps=steps,
        n_samples=n_samples,
        seed=seed,
        texture=None if not model.texture_channels else torch.from_numpy(patches.texture[index].astype(np.float32)),
    )
    model.train(was_training)
    truth = patches.hr[index][:, picked]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant truth maps are skipped and counted by score_maps
        scores = summarize_scores(score_maps(mean.numpy(), truth, genes=[model.genes[i] for i in order]))
    return {"val_rmse": float(scores["rmse"].iloc[0]), "val_pcc": float(scores["pcc"].iloc[0])}


# ------------------------------------------------------------------------------------------------ checkpoints
def _global_rng_state() -> dict[str, Any]:
    """The process-wide random streams (torch CPU and CUDA, numpy, python), to be saved with a checkpoint."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    path: Path, *, model, optimizer, generator, state: dict[str, Any], best_dir: Path | None = None
) -> None:
    """Write a checkpoint folder atomically (see :func:`_write_folder_atomically`): the model, the optimizer (if
    any), the training noise generator and the process-wide random streams, then the progress state (written last).

    With ``best_dir`` (a run stopped by its budget, before the validation at the stop), a copy of ``best_dir`` as it
    stands goes into the checkpoint too and the state is marked ``"stopped"``: a run resumed from it puts ``best/``
    back as the regular validations left it (see :func:`_undo_stop_validation`)."""

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        model.save_pretrained(str(folder / "model"))
        if optimizer is not None:  # (none at a map stage's end: the next stage starts with a fresh optimizer)
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(generator.get_state(), folder / "generator.pt")
        torch.save(_global_rng_state(), folder / _RNG_FILE)
        saved = state
        if best_dir is not None:
            saved = {**state, "stopped": True}
            if (best_dir / "config.json").exists():
                shutil.copytree(best_dir, folder / _BEST_AT_STOP)
        (folder / _STATE_FILE).write_text(json.dumps(saved, indent=1))

    _write_folder_atomically(path, write)


def _undo_stop_validation(checkpoint: Path, best_dir: Path) -> None:
    """Before resuming from a checkpoint written where a run stopped (marked ``"stopped"``), put ``best/`` back as
    it was before the validation at the stop: an uninterrupted run never validates there, so the resumed run's
    ``best/`` (and returned model) must not remember it. Without a ``best/`` at the stop, the folder is removed."""
    saved = checkpoint / _BEST_AT_STOP
    if saved.is_dir():
        _write_folder_atomically(best_dir, lambda folder: shutil.copytree(saved, folder))
    else:
        remove_folder(best_dir)


def _load_checkpoint(path: Path) -> tuple[C3DiffModel, dict, Any, dict[str, Any] | None, dict[str, Any]]:
    from c3diff.models import from_pretrained

    if not path.is_dir():
        raise FileNotFoundError(
            f"`resume`: no checkpoint folder at {str(path)!r}; pass 'latest' or a "
            "`checkpoints/step-N` folder of the run's `output_dir`."
        )
    if not (path / _STATE_FILE).exists():
        raise FileNotFoundError(
            f"`resume`: {str(path)!r} is not a c3diff checkpoint (no {_STATE_FILE}); it may have "
            "been cut short by a killed run. Pass resume='latest' to take the newest complete one."
        )
    model = from_pretrained(str(path / "model"))
    optimizer_state = (
        torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if (path / "optimizer.pt").exists()
        else None
    )  # (none at a map stage's end)
    generator_state = torch.load(path / "generator.pt", map_location="cpu", weights_only=True)
    rng_state = (
        torch.load(path / _RNG_FILE, map_location="cpu", weights_only=True) if (path / _RNG_FILE).exists() else None
    )  # (checkpoints of c3diff <= 0.1 have no global streams)
    return model, optimizer_state, generator_state, rng_state, json.loads((path / _STATE_FILE).read_text())


class _LossModule(torch.nn.Module):
    """A stage's loss as ``forward``, so that accelerate (autocast, DDP gradient sync) wraps the training step."""

    def __init__(self, model: C3DiffModel, *, stage: str, recipe: TrainingConfig) -> None:
        super().__init__()
        self.model = model
        self.stage, self.recipe = stage, recipe

    def forward(self, batch: Any, generator: torch.Generator):
        if self.stage == "mean":
            return self.model.compute_mean_losses(batch, recipe=self.recipe, generator=generator)
        if self.stage == "backbone":
            return self.model.compute_backbone_losses(batch, generator=generator)
        if self.stage == "first_stage":  # a VQ autoencoder learning to reconstruct the maps
            from c3diff.models import autoencoder_loss

            return autoencoder_loss(self.model.vqvae, self.model.target_image(batch))
        return self.model.compute_losses(batch, recipe=self.recipe, generator=generator)


#: Recipe entries that train reads as local names (see ``training_config``).
_OPTIMISATION = ("epochs", "batch_size", "learning_rate", "betas", "eps", "weight_decay")
_RUN = ("lr_missing_fraction", "lr_schedule", "seed", "max_steps", "max_time")
_MEAN_STAGE = ("mean_time_fraction", "mean_max_steps", "mean_genes_per_patch")

#: The stages of one training run, by formulation: (the mean first, then) the first stage and the backbone fitted to
#: the maps the diffusion generates (the HR maps, or the mean's residuals), then the conditional diffusion. Stages a
#: model has done (:meth:`~c3diff.models.C3DiffModel.is_fitted`) are skipped.
STAGES = {
    "paper": ("first_stage", "backbone", "diffusion"),
    "residual": ("mean", "first_stage", "backbone", "residual"),
}
#: Stages fitted to (up to 4096 of) the training maps, without hint. Their steps are logged and numbered with the
#: run's other steps (outside ``max_steps``: they have their own budgets), the backbone is validated by its diffusion
#: loss on validation maps, and each ends with a checkpoint, from which a resumed run goes on with the next stage.
MAP_STAGES = ("first_stage", "backbone")


def _stages_to_run(net: C3DiffModel, recipe: TrainingConfig) -> tuple[str, ...]:
    """The stages of ``net``'s formulation that it has not done yet (a zero backbone budget skips the backbone)."""
    formulation = net.config.get("formulation", "paper")
    done = {s for s in ("first_stage", "backbone", "mean") if net.is_fitted(s)}
    if recipe.backbone_steps == 0:
        done.add("backbone")
    return tuple(s for s in STAGES[formulation] if s not in done)


def _train_step(accelerator: Any, loss_module: _LossModule, optimizer: Any, batch: Any, generator: Any) -> Any:
    """One optimisation step of any stage on the accelerator (autocast, gradient accumulation and sync): the loss
    components of ``batch``."""
    with accelerator.accumulate(loss_module):
        losses = loss_module(batch, generator)
        accelerator.backward(losses.total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def _fit_map_stage(
    stage: str,
    net: C3DiffModel,
    maps: torch.Tensor,
    *,
    recipe: TrainingConfig,
    accelerator: Any,
    max_seconds: float | None,
    show: bool,
    on_step: Callable[[Any], None] | None = None,
) -> C3DiffModel:
    """Run a map stage on ``maps`` ``(N, 1, H, H)`` in [-1, 1] and return the model with the stage fitted (a new
    model when the stage estimated config entries: see :meth:`~c3diff.models.C3DiffModel.with_config`).

    ``"first_stage"``: pixel space, the latent shift/scale of the maps (``recipe.latent_scaling``); a VQ
    autoencoder, ``recipe.autoencoder_steps`` steps of reconstruction (AdamW, lr 1e-4), then its latent scaling
    factor. ``"backbone"``: ``recipe.backbone_steps`` steps of unconditional diffusion of the maps by the whole UNet
    (AdamW, ``recipe.backbone_learning_rate``; at most ``max_seconds``), then its encoder is copied into the
    ControlNet and frozen. Each step is the step of every stage (:func:`_train_step`) on the run's accelerator;
    ``on_step`` is called with its loss components (:func:`train` counts and logs it).
    """
    from torch.utils.data import DataLoader, RandomSampler
    from tqdm.auto import tqdm

    from c3diff.models import config_kwargs

    if stage == "first_stage" and net.vqvae is None:
        fitted = net.with_config(
            **net.first_stage_statistics(maps.to(net.device), latent_scaling=recipe.latent_scaling)
        )
        fitted.mark_fitted("first_stage")
        return fitted
    module = net.vqvae if stage == "first_stage" else net.unet
    steps = recipe.autoencoder_steps if stage == "first_stage" else recipe.backbone_steps
    learning_rate = 1e-4 if stage == "first_stage" else recipe.backbone_learning_rate
    sampler = RandomSampler(
        range(len(maps)),
        replacement=True,
        num_samples=steps * recipe.batch_size,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    loader = DataLoader(maps, batch_size=recipe.batch_size, sampler=sampler)
    module.requires_grad_(True)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate)
    loss_module, optimizer, loader = accelerator.prepare(
        _LossModule(net, stage=stage, recipe=recipe), optimizer, loader
    )
    generator = torch.Generator(device=accelerator.device).manual_seed(recipe.seed + accelerator.process_index)
    start = time.perf_counter()
    try:
        for batch in tqdm(loader, total=steps, desc=stage.replace("_", " "), disable=not show, leave=False):
            losses = _train_step(accelerator, loss_module, optimizer, batch, generator)
            if on_step is not None:
                on_step(losses)
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                break
    finally:
        module.requires_grad_(False)
        module.eval()
    if stage == "backbone":
        net.finish_backbone()
        return net
    from c3diff.models import estimate_scaling_factor

    size = recipe.batch_size
    images = (net.target_image(maps[i : i + size]) for i in range(0, min(len(maps), 16 * size), size))
    factor = estimate_scaling_factor(net.vqvae, images)
    fitted = net.with_config(autoencoder_config={**config_kwargs(net.vqvae.config), "scaling_factor": factor})
    fitted.mark_fitted("first_stage")
    return fitted


def _stage_maps(net: C3DiffModel, patches: PatchSet, *, genes: list[str], seed: int, limit: int = 4096) -> torch.Tensor:
    """Up to ``limit`` training maps of non-constant (patch, gene) pairs in what the diffusion generates: the
    normalised HR maps in [-1, 1] (paper), or the residuals of the fitted mean (residual formulation)."""
    channels = [patches.genes.index(g) for g in genes]
    pairs = np.argwhere((patches.hr_high - patches.hr_low)[:, channels] > 0)
    pairs = pairs[np.random.default_rng(seed).permutation(len(pairs))[:limit]]
    if len(pairs) == 0:  # (every map constant)
        return torch.empty(0, 1, *patches.hr.shape[-2:])
    if net.mean_net is None:
        return torch.from_numpy(np.stack([patches.hr[p, channels[g]] for p, g in pairs])[:, None]) * 2.0 - 1.0
    dataset = patches.dataset(genes=genes)
    index = {tuple(pair): i for i, pair in enumerate(dataset.pairs.tolist())}
    maps = []
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), 64):
            items = [dataset[index[(int(p), int(g))]] for p, g in pairs[start : start + 64]]
            batch = torch.utils.data.default_collate(items)
            histology, lr, gene_index, missing = net._check_batch(batch)
            texture = net._batch_texture(batch)
            _, _, log_shares = net._hint(
                histology, lr, gene_index, missing, contrastive=False, with_mean=True, texture=texture
            )
            maps.append(net.residual_target(log_shares, batch["hr_counts"].to(net.device, net.dtype)).cpu())
    net.train(was_training)
    return torch.cat(maps)


def _loss_values(losses: Any) -> dict[str, float]:
    """A step's loss components (any stage's loss dataclass) as floats for the log."""
    return {f.name: float(v.detach()) for f in fields(losses) if (v := getattr(losses, f.name)) is not None}


def _backbone_validation(
    net: C3DiffModel, patches: PatchSet, *, genes: list[str], seed: int, batch_size: int, max_batches: int
) -> dict[str, float]:
    """The backbone stage's validation: its diffusion loss (``val_mse``, :meth:`~c3diff.models.C3DiffModel.
    compute_backbone_losses`) on up to ``max_batches`` batches of the validation maps it models (the HR maps, or the
    residuals of the fitted mean), with noise and timesteps drawn from ``seed``. The training mode of every module
    and the process-wide random streams are left as they were, so that the run's numerics do not see it."""
    modes = {module: module.training for module in net.modules()}
    streams = _global_rng_state()
    try:
        maps = _stage_maps(net, patches, genes=genes, seed=seed, limit=batch_size * max_batches)
        generator = torch.Generator(device=net.device).manual_seed(seed)
        net.eval()
        with torch.no_grad():
            losses = [
                float(net.compute_backbone_losses(maps[i : i + batch_size], generator=generator).mse)
                for i in range(0, len(maps), batch_size)
            ]
    finally:
        for module, mode in modes.items():
            module.training = mode
        _set_global_rng_state(streams)
    return {"val_mse": float(np.mean(losses)) if losses else float("nan")}


# ------------------------------------------------------------------------------------------------- train
def train(
    data: SpatialData | PatchSet | Sequence[SpatialData | PatchSet],
    *,
    output_dir: str | Path,
    model: str | C3DiffModel = "residual",
    genes: list[str] | None = None,
    scale: int = 10,
    val_data: SpatialData | PatchSet | Sequence[SpatialData | PatchSet] | None = None,
    val_fraction: float = 0.2,
    image_key: str = "hne",
    points_key: str | None = None,
    hr_key: str | None = None,
    lr_key: str | None = None,
    table_key: str | None = None,
    min_tissue: float = 0.5,
    epochs: int = PAPER_RECIPE["epochs"],
    batch_size: int = PAPER_RECIPE["batch_size"],
    learning_rate: float = PAPER_RECIPE["learning_rate"],
    betas: tuple[float, float] = PAPER_RECIPE["betas"],
    eps: float = PAPER_RECIPE["eps"],
    weight_decay: float = PAPER_RECIPE["weight_decay"],
    loss_weights: Mapping[str, float] | None = None,
    lr_missing_fraction: float = PAPER_RECIPE["lr_missing_fraction"],
    skip_constant: bool = True,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str = "auto",
    device: str = "auto",
    seed: int = 0,
    max_steps: int | None = None,
    max_time: float | None = None,
    val_steps: int = 10,
    val_max_patches: int = 8,
    val_max_genes: int = 16,
    val_max_batches: int = 8,
    val_samples: int = 4,
    autoencoder_steps: int = 2000,
    backbone_steps: int = 1000,
    backbone_learning_rate: float = 1e-3,
    checkpoint_every: int = 1,
    resume: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
    log_every: int = 10,
    model_overrides: Mapping[str, Any] | None = None,
    mean_loss: str = "multinomial",
    mean_time_fraction: float = 0.5,
    mean_max_steps: int | None = None,
    mean_genes_per_patch: int = 8,
    lr_schedule: str = "constant",
    temperature: float = 0.07,
    st_noise_sigma: float = 0.03,
    min_snr_gamma: float | None = None,
    latent_scaling: str = "std",
    training_config: TrainingConfig | Mapping[str, Any] | None = None,
) -> TrainingResult:
    """Train a C3-Diff model with the paper's recipe (supplementary Table 1), every value overridable.

    AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, weight decay 1e-5), batch 16, 50 epochs, loss weights
    ``mse 2, modal 1, content 1, inter_sphere 1``, 5% of samples trained as modality-incomplete (no LR ST). Runs on
    accelerate: the same call works on the CPU, one GPU or several (``accelerate launch``), with mixed precision on
    GPUs and gradient accumulation. Each epoch is validated (loss components, and RMSE/PCC of maps sampled with
    ``val_steps`` DDIM steps) on a patient-level split; the best model by validation PCC is kept in ``best/``.
    Checkpoints (``save_pretrained`` model + optimizer + RNG + progress) let ``resume`` continue exactly.

    Training runs in stages (:data:`STAGES`) on one accelerator. A paper-formulation model
    (``formulation="paper"``): ``"first_stage"`` and ``"backbone"`` fit the first stage and pretrain the denoiser on
    the HR maps, then ``"diffusion"`` trains the ControlNet with the contrastive losses. A residual model (the
    ``tiny`` preset; see :class:`~c3diff.models.C3DiffModel`): ``"mean"`` trains the hint encoders and the
    conditional-mean network with a count likelihood (``mean_loss``) and the contrastive losses, validated by the
    PCC of the mean, the best kept; then ``"first_stage"`` and ``"backbone"`` on the residuals of that mean, and
    ``"residual"`` trains the ControlNet on them, with the encoders and the mean frozen. Stages the model has done
    (:meth:`~c3diff.models.C3DiffModel.is_fitted`; e.g. a pretrained backbone) are skipped.

    Every stage is a stage of the same run: its steps are numbered in one step count (``global_step``; the
    ``checkpoints/step-N`` names) and logged in ``log.jsonl`` (``{"type": "step", "stage": ..., "step": ..., "total":
    ...}``), and each ends with a checkpoint, so that ``resume`` never repeats a finished stage. The conditional stages
    (``"mean"``, ``"residual"``, ``"diffusion"``) run in epochs, each validated and checkpointed, and decide what
    ``best/`` keeps; the map stages (``"first_stage"``, ``"backbone"``: fitted to the training maps for a fixed number
    of steps, ``autoencoder_steps`` / ``backbone_steps``) are checkpointed at their end, and the backbone is validated
    there by its diffusion loss on validation maps (a ``{"type": "validation", "stage": "backbone", "val_mse": ...}``
    row, also in the history).

    The recipe (every argument below that says how to train, not what on or where) is collected in a
    :class:`~c3diff.models.TrainingConfig`, handed to the model's loss methods and saved as
    ``training_config.json`` beside every model the run writes; the model's ``config.json`` holds the network only.

    Parameters
    ----------
    data
        Training sections (SpatialData with an H&E and transcripts/HR rasters), ``PatchSet`` objects or patch files
        written by ``PatchSet.save``; patches are made with :func:`~c3diff.pp.make_patches` at the model's tile size.
    output_dir
        Folder for checkpoints, the best model and the run log (``log.jsonl``); created, must be writable.
    model
        A preset name (``"residual"``, the default: paper sizes, conditional mean + residual diffusion; ``"paper"``: the
        paper's formulation; ``"tiny"``, ``"tiny-paper"``: CPU sizes), a model folder / Hub id, or a model object to
        continue training.
    genes
        Genes of a new model (default: the model's; required with a preset when ``data`` has no single gene list).
    scale
        10 or 5 (for a new model; an existing model keeps its own).
    val_data
        Validation sections/patches. Default: ``val_fraction`` of the training samples, split by sample.
    val_fraction
        Fraction of samples held out when ``val_data`` is not given (no validation with a single sample).
    image_key, points_key, hr_key, lr_key, table_key, min_tissue
        Passed to :func:`~c3diff.pp.make_patches` for SpatialData inputs.
    epochs, batch_size, learning_rate, betas, eps, weight_decay
        The optimisation recipe (Table 1 defaults).
    loss_weights
        Overrides of ``{"mse": 2, "modal": 1, "content": 1, "inter_sphere": 1}`` (0 turns a loss off).
    lr_missing_fraction
        Fraction of samples whose LR ST is withheld each epoch (trained through imputation; :doc:`/method`, *Patches
        without low-resolution ST*).
    skip_constant
        Skip (patch, gene) pairs whose HR map is constant.
    gradient_accumulation_steps, mixed_precision, device
        accelerate settings (``mixed_precision="auto"``: bf16/fp16 on GPUs, none on CPU; ``device="cpu"`` forces CPU).
    seed
        Seeds model initialisation, data order, noise and timesteps.
    max_steps, max_time
        Stop after this many optimisation steps of the conditional stages (the mean and the residual / diffusion stage
        together; the map stages' steps, numbered in the same count, are budgeted by ``autoencoder_steps`` and
        ``backbone_steps``) / after this many seconds of the whole run (a checkpoint is written when stopping).
    val_steps, val_max_patches, val_max_genes, val_max_batches, val_samples
        Validation cost: DDIM steps, patches and genes sampled; batches for the validation losses; samples
        averaged per map for the scores.
    autoencoder_steps
        Steps of first-stage training when the model's first stage is not fitted yet (VQ autoencoder: trained,
        then frozen; pixel space: only its latent shift/scale are estimated from the training maps).
    backbone_steps, backbone_learning_rate
        The ``"backbone"`` stage: unconditional pretraining of the whole denoiser when the model has no trained
        backbone (``model.is_fitted("backbone")`` is False, e.g. a preset built offline; see
        :meth:`~c3diff.models.C3DiffModel.compute_backbone_losses`), before its encoder is copied into the
        ControlNet and frozen. With ``max_time`` the stage takes at most a quarter of the time left. 0 skips it.
    checkpoint_every
        Write a checkpoint every this many epochs (and one at the end of each map stage).
    resume
        ``"latest"`` or a checkpoint folder (``output_dir/checkpoints/step-N``): continue that run exactly - the same
        weights as the uninterrupted run, bit for bit on the CPU with one torch thread (data order and position in
        the epoch, step counter, noise generator and process-wide random streams are restored; ``data``,
        ``batch_size``, ``seed`` and ``mean_genes_per_patch`` must be the run's, else ``ValueError``; on several
        threads the CPU kernels may sum in another order, so that two uninterrupted runs can differ in the last
        bits too). Checkpoints are written to a temporary folder and renamed when complete, so ``"latest"`` is the
        newest complete one, also after a kill; what a killed run left is cleaned up, and ``log.jsonl`` is trimmed
        to the checkpoint's step.
    num_workers
        DataLoader workers.
    progress
        Progress bars with the loss components.
    log_every
        Write a step row to the log every this many steps (of the run's step count, in every stage).
    model_overrides
        Config overrides for a new model from a preset (e.g. ``{"unet_config": {...}}``).
    mean_loss
        Residual formulation: the count likelihood of the conditional-mean stage, ``"multinomial"`` (counts inside
        each LR pixel given its total) or ``"poisson"`` (see :meth:`~c3diff.models.C3DiffModel.compute_mean_losses`).
    mean_time_fraction
        Residual formulation with ``max_time``: the share of the budget the mean stage gets; the residual stage
        (its first stage, backbone and ControlNet) gets the rest.
    mean_max_steps
        Residual formulation: at most this many steps in the mean stage (``max_steps`` counts the steps of the mean
        and residual stages together).
    mean_genes_per_patch
        Residual formulation: a mean-stage batch holds this many genes of each of ``batch_size`` distinct patches
        (the histology trunk runs once per patch; the contrastive losses compare the patches).
    lr_schedule
        ``"constant"`` (the paper) or ``"cosine"``: each stage's learning rate decays to 0 along a half cosine over
        the stage's budget (its share of ``max_time``, else of ``max_steps`` / ``mean_max_steps``, else of its epochs),
        which gets more out of a short budget.
    temperature
        ``tau`` of the contrastive losses (0.07).
    st_noise_sigma
        On-sphere noise augmentation of the ST features during training (0.03).
    min_snr_gamma
        Min-SNR-gamma weighting of the diffusion loss (``None``: the paper's plain mean; see
        :func:`c3diff.models._losses.min_snr_weights`).
    latent_scaling
        Pixel-space first stage: ``"std"`` (unit-variance latents) or ``"range"`` (the maps' [-1, 1] range).
    training_config
        The whole recipe at once, a :class:`~c3diff.models.TrainingConfig` (or its dict), e.g. the
        ``training_config.json`` of an earlier run (``TrainingConfig.from_pretrained("runs/x/best")``) to train
        again the same way. The recipe arguments above must then keep their defaults (``ValueError`` otherwise).

    Returns
    -------
    A :class:`TrainingResult`.

    Examples
    --------
    >>> import c3diff as c3
    >>> sections = [c3.datasets.simulate_section(seed=s, width=1280, height=1280) for s in range(4)]  # doctest: +SKIP
    >>> result = c3.tl.train(sections, model="tiny", genes=["GATA3", "CD8A"], points_key="transcripts",
    ...                      output_dir="runs/tiny", epochs=2)  # doctest: +SKIP
    >>> result.history[["epoch", "val_pcc"]]  # doctest: +SKIP
    """
    import pandas as pd
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    # ---- validate everything before any work ------------------------------------------------------------------
    for name, value in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("checkpoint_every", checkpoint_every),
    ):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if not isinstance(mean_genes_per_patch, int | np.integer) or mean_genes_per_patch < 1:
        raise ValueError(f"`mean_genes_per_patch` must be a positive integer, got {mean_genes_per_patch!r}.")
    unknown = sorted(set(loss_weights or {}) - {"mse", "modal", "content", "inter_sphere"})
    if unknown:
        raise ValueError(f"`loss_weights` has unknown entries {unknown}; use mse, modal, content, inter_sphere.")
    recipe = TrainingConfig(
        **{f"lambda_{k}": float(v) for k, v in (loss_weights or {}).items()},
        temperature=temperature,
        st_noise_sigma=st_noise_sigma,
        min_snr_gamma=min_snr_gamma,
        latent_scaling=latent_scaling,
        mean_loss=mean_loss,
        learning_rate=learning_rate,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        batch_size=int(batch_size),
        epochs=int(epochs),
        lr_missing_fraction=lr_missing_fraction,
        lr_schedule=lr_schedule,
        autoencoder_steps=autoencoder_steps,
        backbone_steps=backbone_steps,
        backbone_learning_rate=backbone_learning_rate,
        mean_time_fraction=mean_time_fraction,
        mean_max_steps=mean_max_steps,
        mean_genes_per_patch=int(mean_genes_per_patch),
        max_steps=max_steps,
        max_time=max_time,
        seed=seed,
    )  # validates the recipe (errors name the argument)
    if training_config is not None:
        if isinstance(training_config, Mapping):
            training_config = TrainingConfig.from_dict(training_config)
        if not isinstance(training_config, TrainingConfig):
            found = type(training_config).__name__
            raise TypeError(f"`training_config` must be a TrainingConfig or a dict of its entries, got {found}.")
        default = TrainingConfig()
        both = sorted(k for k in recipe.to_dict() if getattr(recipe, k) != getattr(default, k))
        if both:
            raise ValueError(
                f"`training_config` is the whole recipe, but {both} were passed as well; pass them inside it "
                "(`training_config.replace(...)`) or drop `training_config`."
            )
        recipe = training_config
        # the names the rest of the run reads, from the recipe
        epochs, batch_size, learning_rate, betas, eps, weight_decay = (getattr(recipe, k) for k in _OPTIMISATION)
        lr_missing_fraction, lr_schedule, seed, max_steps, max_time = (getattr(recipe, k) for k in _RUN)
        mean_time_fraction, mean_max_steps, mean_genes_per_patch = (getattr(recipe, k) for k in _MEAN_STAGE)
    if not _as_list(data):
        raise ValueError("`data` is empty: pass at least one SpatialData or PatchSet to train on.")
    output_dir = _check_output_dir(output_dir)

    set_seed(seed)
    resume_state = rng_state = None
    if resume is not None:
        checkpoint = _latest_checkpoint(output_dir) if str(resume) == "latest" else Path(resume)
        if checkpoint is None:
            raise FileNotFoundError(f"`resume='latest'`: no checkpoint under {str(output_dir / 'checkpoints')!r}.")
        net, optimizer_state, generator_state, rng_state, resume_state = _load_checkpoint(checkpoint)
    else:
        first = next(iter(_as_list(data)))
        if genes is None and isinstance(first, PatchSet) and isinstance(model, str) and model in _preset_names():
            genes = list(first.genes)
        net = _resolve_model(model, genes=genes, scale=scale, overrides=model_overrides or {})
    net.training_config = recipe  # saved as training_config.json beside every model the run writes
    genes_model = net.genes
    scale_model = int(net.config.scale)
    patch_size = int(net.config.image_size)
    patch_kwargs = {
        "image_key": image_key,
        "points_key": points_key,
        "hr_key": hr_key,
        "lr_key": lr_key,
        "table_key": table_key,
        "min_tissue": min_tissue,
        "geometry": ModelGeometry.of_model(net.config),  # the model's pixel sizes, as super_resolve uses them
        "texture": net.texture_channels > 0,
    }
    train_patches = _patches_from(
        data, genes=genes_model, scale=scale_model, patch_size=patch_size, patch_kwargs=patch_kwargs, arg="data"
    )
    val_patches = _patches_from(
        val_data, genes=genes_model, scale=scale_model, patch_size=patch_size, patch_kwargs=patch_kwargs, arg="val_data"
    )
    if val_patches is None and len(train_patches.samples) > 1 and val_fraction > 0:
        splits = split_samples(train_patches.samples, val_fraction=val_fraction, test_fraction=0.0, seed=seed)
        val_patches = train_patches.subset(samples=splits["val"])
        train_patches = train_patches.subset(samples=splits["train"])
    if val_patches is None:
        warnings.warn(
            "train: no validation data (no `val_data`, and `val_fraction=0` or a single sample); keeping the last "
            "model.",
            UserWarning,
            stacklevel=2,
        )
    dataset = train_patches.dataset(
        genes=genes_model, lr_missing_fraction=lr_missing_fraction, skip_constant=skip_constant, seed=seed
    )
    if len(dataset) < batch_size:
        raise ValueError(
            f"The training set has {len(dataset)} (patch, gene) samples, fewer than `batch_size={batch_size}`."
        )

    cpu = device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(mixed_precision) if not cpu else "no",
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )

    stages = _stages_to_run(net, recipe)  # e.g. a fitted mean is kept: only its residual trains
    conditional = [s for s in stages if s not in MAP_STAGES]
    show = progress and accelerator.is_main_process
    net.to(accelerator.device)
    val_loader = None
    if val_patches is not None:
        val_set = val_patches.dataset(genes=genes_model, skip_constant=skip_constant, seed=seed)
        val_loader = DataLoader(
            val_set, batch_sampler=PatchBatchSampler(val_set.pairs[:, 0], batch_size=batch_size, seed=seed)
        )
    generator = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    state: dict[str, Any] = {
        "stage": conditional[0],
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,  # the steps of every stage
        "map_steps": 0,  # of which in the map stages (outside max_steps)
        "stage_step": 0,
        "best_pcc": -math.inf,
        "best_loss": math.inf,
        "elapsed": 0.0,
        "history": [],
    }
    data_order = {
        "items": len(dataset),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "mean_genes_per_patch": int(mean_genes_per_patch),
    }
    log_path = output_dir / "log.jsonl"
    if resume_state is not None:
        saved_order = resume_state.get("data_order", data_order)
        changed = {k: (saved_order[k], v) for k, v in data_order.items() if saved_order.get(k, v) != v}
        if changed:
            found = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"`resume`: the checkpoint {str(checkpoint)!r} was trained with a different data order ({found}); "
                "an exact resume needs the same `data`, `batch_size`, `seed` and `mean_genes_per_patch`. Pass the "
                "values of the interrupted run, or start a new run in another `output_dir`."
            )
        generator.set_state(generator_state)
        state.update(resume_state)
        if accelerator.is_main_process:
            _trim_log(log_path, int(state["global_step"]))
            if state.pop("stopped", False):
                _undo_stop_validation(checkpoint, output_dir / "best")
    state.pop("stopped", None)
    state["data_order"] = data_order
    best_dir = output_dir / "best"
    start_time = time.perf_counter() - float(state["elapsed"])

    def log(row: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with log_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def save_checkpoint(net: C3DiffModel, optimizer: Any, *, stopped: bool = False) -> None:
        state["elapsed"] = time.perf_counter() - start_time
        if accelerator.is_main_process:
            _save_checkpoint(
                output_dir / "checkpoints" / f"step-{state['global_step']}",
                model=net,
                optimizer=optimizer,
                generator=generator,
                state=state,
                best_dir=best_dir if stopped else None,
            )

    def budget_steps() -> int:
        """The steps ``max_steps`` counts: those of the conditional stages."""
        return state["global_step"] - state["map_steps"]

    def map_stage(stage: str, net: C3DiffModel, maps: torch.Tensor) -> C3DiffModel:
        """A map stage (:func:`_fit_map_stage`) as a stage of the run: its steps numbered and logged, the backbone
        validated, and a checkpoint at its end (without optimizer: the next stage starts afresh from it)."""
        state.update(stage=stage, epoch=0, step_in_epoch=0, stage_step=0)

        def count(losses: Any) -> None:
            state["global_step"] += 1
            state["map_steps"] += 1
            state["stage_step"] += 1
            if state["global_step"] % log_every == 0:
                log({"type": "step", "stage": stage, "step": state["global_step"], **_loss_values(losses)})

        remaining = None if max_time is None else max(0.0, max_time - (time.perf_counter() - start_time))
        net = _fit_map_stage(
            stage,
            net,
            maps,
            recipe=recipe,
            accelerator=accelerator,
            max_seconds=None if remaining is None or stage != "backbone" else remaining / 4,
            show=show,
            on_step=count,
        )
        if stage == "backbone" and val_patches is not None and accelerator.is_main_process:
            row = {"type": "validation", "stage": stage, "step": state["global_step"]}
            row.update(time=time.perf_counter() - start_time)
            row.update(
                _backbone_validation(
                    net, val_patches, genes=genes_model, seed=seed, batch_size=batch_size, max_batches=val_max_batches
                )
            )
            state["history"].append(row)
            log(row)
        save_checkpoint(net, None)
        return net

    def stage_deadline(stage: str) -> float | None:
        if max_time is None:
            return None
        return max_time * mean_time_fraction if stage == "mean" else max_time

    first_stage = stages.index(state["stage"]) if resume_state is not None and state["stage"] in stages else 0
    # Resumed from a map stage's end (the model has that stage; the next one starts afresh): the process-wide random
    # streams as they were there, restored where the next stage starts.
    streams_at_start = rng_state if resume_state is not None and resume_state.get("stage") in MAP_STAGES else None
    maps = None
    for stage in stages[first_stage:]:
        if stage in MAP_STAGES and maps is None:  # the maps the diffusion generates, once
            maps = _stage_maps(net, train_patches, genes=genes_model, seed=seed)
        if streams_at_start is not None:  # (after the maps, which a resumed run makes anew)
            _set_global_rng_state(streams_at_start)
            streams_at_start = None
        if stage in MAP_STAGES:  # (the stage's state is saved with the weights)
            net = map_stage(stage, net, maps)
            resume_state = None
            continue
        if state["stage"] != stage:  # a new stage: fresh progress counters, the step count runs on
            state.update(stage=stage, epoch=0, step_in_epoch=0, stage_step=0)
        fresh = resume_state is None or resume_state.get("stage") != stage

        sampler = PatchBatchSampler(
            dataset.pairs[:, 0],
            batch_size=batch_size,
            seed=seed,
            genes_per_patch=mean_genes_per_patch if stage == "mean" else 1,
        )
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)
        optimizer = make_optimizer(
            net,
            learning_rate=learning_rate,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            stage="mean" if stage == "mean" else "diffusion",
        )
        loss_module = _LossModule(net, stage=stage, recipe=recipe)
        loss_module, optimizer, loader = accelerator.prepare(loss_module, optimizer, loader)
        if not fresh:
            optimizer.load_state_dict(optimizer_state)

        # (the closures bind this stage's optimizer and model: a map stage may have rebuilt the model before it)
        def checkpoint(optimizer: Any = optimizer, *, stopped: bool = False, net: Any = net) -> None:
            save_checkpoint(net, optimizer, stopped=stopped)

        def validate(epoch: int, stage: str = stage, *, stopped: bool = False, net: Any = net) -> None:
            row: dict[str, Any] = {
                "type": "epoch",
                "stage": stage,
                "epoch": epoch,
                "step": state["global_step"],
                "time": time.perf_counter() - start_time,
            }
            if stopped:  # validated where the run's budget stopped it, not at an epoch's end
                row["stopped"] = True
            if val_patches is not None and accelerator.is_main_process:
                row.update(
                    _validation_losses(
                        net, val_loader, seed=seed, max_batches=val_max_batches, stage=stage, recipe=recipe
                    )
                )
                if stage == "residual":  # the mean (and its PCC) is fixed: keep the best residual by its loss
                    better = row["val_mse"] < state["best_loss"]
                    if better:
                        state["best_loss"] = row["val_mse"]
                else:
                    row.update(
                        validation_scores(
                            net,
                            val_patches,
                            steps=val_steps,
                            max_patches=val_max_patches,
                            max_genes=val_max_genes,
                            n_samples=val_samples,
                            seed=seed,
                        )
                    )
                    better = row["val_pcc"] > state["best_pcc"]
                    if better:
                        state["best_pcc"] = row["val_pcc"]
                if better:
                    _write_folder_atomically(
                        best_dir,
                        lambda folder: net.save_pretrained(str(folder), training_data=_describe(train_patches)),
                    )
                    row["best"] = True
            state["history"].append(row)
            log(row)

        stop = False
        net.train()
        if rng_state is not None and not fresh:  # the process-wide streams as they were at the checkpoint
            _set_global_rng_state(rng_state)
        deadline = stage_deadline(stage)
        stage_start = time.perf_counter()
        step_budget = mean_max_steps if stage == "mean" and mean_max_steps is not None else max_steps

        def stage_progress(
            deadline: float | None = deadline,
            stage_start: float = stage_start,
            step_budget: int | None = step_budget,
            sampler: Any = sampler,
        ) -> float:
            """How far the stage is through its budget, in [0, 1] (for the cosine learning rate)."""
            if deadline is not None:
                elapsed = time.perf_counter() - stage_start
                return min(1.0, elapsed / max(deadline - (stage_start - start_time), 1e-9))
            if step_budget is not None:
                return min(1.0, state["stage_step"] / step_budget)
            return min(1.0, (state["epoch"] * len(sampler) + state["step_in_epoch"]) / max(epochs * len(sampler), 1))

        while state["epoch"] < epochs and not stop:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            if hasattr(loader, "set_epoch"):  # accelerate's loader re-seeds the sampler with its own epoch count
                loader.set_epoch(epoch)  # (from 0 in a resumed run), and a skipping loader inherits it
            epoch_loader = (
                accelerator.skip_first_batches(loader, state["step_in_epoch"]) if state["step_in_epoch"] else loader
            )
            bar = tqdm(
                epoch_loader,
                total=len(sampler) - state["step_in_epoch"],
                desc=f"{stage} epoch {epoch + 1}/{epochs}",
                disable=not show,
                leave=False,
            )
            for batch in bar:
                if lr_schedule == "cosine":
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate * 0.5 * (1.0 + math.cos(math.pi * stage_progress()))
                losses = _train_step(accelerator, loss_module, optimizer, batch, generator)
                state["global_step"] += 1
                state["stage_step"] += 1
                state["step_in_epoch"] += 1
                values = {k: float(v) for k, v in losses.as_dict().items()}
                bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
                if state["global_step"] % log_every == 0:
                    log({"type": "step", "stage": stage, "epoch": epoch, "step": state["global_step"], **values})
                over_steps = (max_steps is not None and budget_steps() >= max_steps) or (
                    stage == "mean" and mean_max_steps is not None and state["stage_step"] >= mean_max_steps
                )
                if over_steps or (deadline is not None and time.perf_counter() - start_time >= deadline):
                    stop = True
                    break
            bar.close()
            if not stop:
                state["epoch"] += 1
                state["step_in_epoch"] = 0
                validate(epoch)
                if state["epoch"] % checkpoint_every == 0 or state["epoch"] == epochs:
                    checkpoint()
        last_stage = stage == stages[-1]
        finished = (max_steps is not None and budget_steps() >= max_steps) or (
            max_time is not None and time.perf_counter() - start_time >= max_time
        )
        # A run its budget stops mid-epoch is validated there too, so that best/ can hold its last weights; the
        # checkpoint it resumes from is written before that validation and holds best/ as it was, so a resumed run
        # forgets the validation at the stop, as an uninterrupted run never made it.
        stopped_here = (
            stop
            and (last_stage or finished)
            and (not state["history"] or state["history"][-1]["step"] != state["global_step"])
        )
        if stopped_here:
            checkpoint(stopped=True)
            validate(state["epoch"], stopped=True)
        elif stop and (not state["history"] or state["history"][-1]["step"] != state["global_step"]):
            validate(state["epoch"])
        if stage == "mean" and not finished:  # (stopped by the run's budget, the mean stage continues on resume)
            if (best_dir / "config.json").exists():
                _restore_weights(net, best_dir)  # the residual stage refines the best mean, not the last
            net.mark_fitted("mean")
        if not last_stage and not finished:
            state.update(stage=stages[stages.index(stage) + 1], epoch=0, step_in_epoch=0, stage_step=0)
            resume_state = None
        else:
            if not stopped_here:
                checkpoint()
            break

    accelerator.wait_for_everyone()
    final = net
    best = best_dir if (best_dir / "config.json").exists() else None
    if best is not None:
        from c3diff.models import from_pretrained

        final = from_pretrained(str(best))
    final = final.with_config(training_data=_describe(train_patches))  # (carries the recipe and fitted stages)
    final.training_config = recipe
    return TrainingResult(
        model=final, history=pd.DataFrame(state["history"]), output_dir=output_dir, best_checkpoint=best
    )


def _restore_weights(net: C3DiffModel, folder: Path) -> None:
    """Load the weights (and fitted-state flags) saved in ``folder`` into ``net`` in place."""
    from c3diff.models import from_pretrained

    saved = from_pretrained(str(folder))
    net.load_state_dict(saved.state_dict())


def _preset_names() -> list[str]:
    from c3diff.models import PRESETS

    return list(PRESETS)


def _describe(patches: PatchSet) -> str:
    samples = patches.samples
    shown = ", ".join(samples[:5]) + (f" and {len(samples) - 5} more" if len(samples) > 5 else "")
    return (
        f"{len(patches)} patches from {len(samples)} sample(s) ({shown}); {ATTRS_KEY} PatchSet, scale {patches.scale}x"
    )
