"""The training recipe of a C3-Diff model, kept apart from the network's config.

A :class:`~c3diff.models.C3DiffModel`'s ``config.json`` holds what the network *is* (architecture, geometry, the
noise schedule it was trained with); :class:`TrainingConfig` holds how it was *trained*: the loss weights, the
contrastive temperature, the feature augmentation, min-SNR weighting, the optimiser, and the budgets of the stages
:func:`c3diff.tl.train` runs (first stage, backbone, conditional mean, diffusion or residual). ``c3.tl.train`` builds
one from its arguments, passes it to the model's loss methods and writes it as ``training_config.json`` beside every
model it saves (provenance); :meth:`TrainingConfig.from_pretrained` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from c3diff.models._losses import LossWeights

__all__ = ["LEGACY_RECIPE_KEYS", "MEAN_LOSSES", "TRAINING_CONFIG_NAME", "TrainingConfig"]

#: File name of a saved training recipe (beside ``config.json``).
TRAINING_CONFIG_NAME = "training_config.json"

#: Keys that models saved by c3diff <= 0.1 kept in ``config.json`` and that are training recipe; loading maps them
#: to a :class:`TrainingConfig` (see :meth:`TrainingConfig.from_model_config`).
LEGACY_RECIPE_KEYS = (
    "lambda_mse",
    "lambda_modal",
    "lambda_content",
    "lambda_inter_sphere",
    "st_noise_sigma",
    "min_snr_gamma",
    "latent_scaling",
)

#: Count likelihoods of the conditional-mean stage (see :mod:`c3diff.models._conditional_mean`).
MEAN_LOSSES = ("multinomial", "poisson")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How :func:`c3diff.tl.train` trains a model: losses, optimiser and stage budgets.

    Defaults are the paper's recipe (supplementary Table 1 and section 3.2) where the paper gives one.

    Attributes
    ----------
    lambda_mse, lambda_modal, lambda_content, lambda_inter_sphere
        Loss weights (2, 1, 1, 1; 0 turns a loss off).
    temperature
        ``tau`` of the three contrastive losses (0.07). (The imputation's softmax temperature is part of the network:
        ``C3DiffModel``'s ``temperature``, used at inference too.)
    st_noise_sigma
        On-sphere noise augmentation of the ST features of complete samples during training (0.03).
    min_snr_gamma
        Weight ``L_mse`` per sample by ``min(SNR, gamma) / SNR`` (``/ (SNR + 1)`` for v-prediction), see
        :func:`c3diff.models._losses.min_snr_weights`; ``None``: the paper's plain mean.
    latent_scaling
        Pixel-space first stage: ``"std"`` (the latents get unit variance over the training maps) or ``"range"``
        (scale 1: the maps keep their [-1, 1] range). See ``C3DiffModel``'s ``latent_scale``.
    mean_loss
        Count likelihood of the conditional-mean stage: ``"multinomial"`` or ``"poisson"``.
    learning_rate, betas, eps, weight_decay
        AdamW of the main stages (1e-5, (0.9, 0.999), 1e-8, 1e-5).
    batch_size, epochs
        16 and 50.
    lr_missing_fraction
        Fraction of samples whose LR ST is withheld each epoch (0.05).
    lr_schedule
        ``"constant"`` (the paper) or ``"cosine"`` over each stage's budget.
    autoencoder_steps
        VQ first stage: autoencoder training steps (a pixel-space first stage is two statistics, no steps).
    backbone_steps, backbone_learning_rate
        Unconditional pretraining of the denoiser when the model has no trained backbone.
    mean_time_fraction, mean_max_steps, mean_genes_per_patch
        Residual formulation: the mean stage's share of ``max_time``, its step cap, and genes per patch in a batch.
    max_steps, max_time
        Budget of the whole run (optimisation steps, seconds).
    seed
        Seeds initialisation, data order, noise and timesteps.

    Examples
    --------
    >>> from c3diff.models import TrainingConfig
    >>> recipe = TrainingConfig(lambda_modal=0.0, min_snr_gamma=5.0)
    >>> recipe.loss_weights()
    LossWeights(mse=2.0, modal=0.0, content=1.0, inter_sphere=1.0)
    >>> TrainingConfig.from_dict(recipe.to_dict()) == recipe
    True
    """

    lambda_mse: float = 2.0
    lambda_modal: float = 1.0
    lambda_content: float = 1.0
    lambda_inter_sphere: float = 1.0
    temperature: float = 0.07
    st_noise_sigma: float = 0.03
    min_snr_gamma: float | None = None
    latent_scaling: str = "std"
    mean_loss: str = "multinomial"
    learning_rate: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    batch_size: int = 16
    epochs: int = 50
    lr_missing_fraction: float = 0.05
    lr_schedule: str = "constant"
    autoencoder_steps: int = 2000
    backbone_steps: int = 1000
    backbone_learning_rate: float = 1e-3
    mean_time_fraction: float = 0.5
    mean_max_steps: int | None = None
    mean_genes_per_patch: int = 8
    max_steps: int | None = None
    max_time: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("lambda_mse", "lambda_modal", "lambda_content", "lambda_inter_sphere", "st_noise_sigma"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature!r}.")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"`min_snr_gamma` must be a positive number or None, got {self.min_snr_gamma!r}.")
        if self.latent_scaling not in ("std", "range"):
            raise ValueError(f"`latent_scaling` must be 'std' or 'range', got {self.latent_scaling!r}.")
        if self.mean_loss not in MEAN_LOSSES:
            raise ValueError(f"`mean_loss` must be one of {MEAN_LOSSES}, got {self.mean_loss!r}.")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"`lr_schedule` must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
        for name in ("batch_size", "epochs", "mean_genes_per_patch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate!r}.")
        if not 0.0 < self.mean_time_fraction < 1.0:
            raise ValueError(f"`mean_time_fraction` must be in (0, 1), got {self.mean_time_fraction!r}.")
        if not 0.0 <= self.lr_missing_fraction <= 1.0:
            raise ValueError(f"`lr_missing_fraction` must be in [0, 1], got {self.lr_missing_fraction!r}.")

    def loss_weights(self) -> LossWeights:
        """The four loss weights as :class:`~c3diff.models.LossWeights`."""
        return LossWeights(
            mse=self.lambda_mse,
            modal=self.lambda_modal,
            content=self.lambda_content,
            inter_sphere=self.lambda_inter_sphere,
        )

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """Build from :meth:`to_dict`'s output; unknown keys are an error that names them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields - {"_c3diff_version"})
        if unknown:
            raise ValueError(f"Unknown training-config entries {unknown}; valid entries are {sorted(fields)}.")
        return cls(**{k: v for k, v in values.items() if k in fields})

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> TrainingConfig:
        """The recipe recorded in a ``config.json`` of c3diff <= 0.1 (loss weights, ``st_noise_sigma``,
        ``min_snr_gamma``, ``latent_scaling``; the contrastive ``temperature`` was the model's), defaults
        elsewhere."""
        values = {k: config[k] for k in LEGACY_RECIPE_KEYS if k in config}
        if "temperature" in config:
            values["temperature"] = config["temperature"]
        return cls(**values)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``training_config.json`` into ``save_directory`` (created if needed); returns the file."""
        from c3diff._version import __version__

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / TRAINING_CONFIG_NAME
        path.write_text(json.dumps({**self.to_dict(), "_c3diff_version": __version__}, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> TrainingConfig | None:
        """The recipe saved in ``folder`` (``training_config.json``), or ``None`` when the folder has none."""
        path = Path(folder) / TRAINING_CONFIG_NAME
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); save the model again.") from err
        return cls.from_dict(values)
