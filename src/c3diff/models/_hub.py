"""Saving, loading and sharing C3-Diff models (all Hugging Face Hub access of c3diff lives here).

Layout of a saved model (a local folder or a Hub model repository)::

    config.json         C3DiffModel constructor arguments: architecture and geometry (+ _class_name, _module,
                        _c3diff_version)
    model.safetensors   every weight and buffer (ControlNet, UNet, autoencoder, hint encoders, alpha/beta,
                        imputation memory bank, which training stages are fitted)
    scheduler_config.json  the sampling scheduler (any diffusers scheduler; DDIM unless swapped)
    training_config.json   the training recipe (c3.tl.train writes it; provenance, optional)
    README.md           model card: YAML metadata (genes in order, scale, normalisation, pixel sizes, training data,
                        c3diff version) and a human-readable page

Local folders are read directly; repo ids go through one :func:`huggingface_hub.snapshot_download` (cached, so
later loads work offline). As in scvi-tools' hub models, loading a repo without a pinned commit warns, because the
repository may change under the same name. Weights load strictly: a missing, unexpected or mis-shaped tensor is an
error, never silently re-initialised.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel, VQModel
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from c3diff._version import __version__
from c3diff.models._autoencoder import downsampling_factor
from c3diff.models._c3diff import C3DiffModel, config_kwargs
from c3diff.models._model_card import make_model_card
from c3diff.models._presets import preset_config
from c3diff.models._training_config import TRAINING_CONFIG_NAME, TrainingConfig

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "from_ldm", "from_pretrained", "push_to_hub", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: The sampling scheduler, a component saved beside the network (diffusers' ``SchedulerMixin.save_pretrained``).
SCHEDULER_NAME = "scheduler_config.json"
_PICKLE_WEIGHTS_NAME = "model.bin"
CARD_NAME = "README.md"
#: The public package that exports the model classes: what :func:`save_pretrained` records as ``_module`` in
#: config.json (never the private module that defines a class, which may move; saved models depend on it).
_PUBLIC_MODULE = "c3diff.models"
#: The model classes a config.json may name (its ``_class_name``, written by diffusers' ``ConfigMixin`` as the bare
#: class name): the only classes :func:`from_pretrained` instantiates. A name not here is refused; no class or module
#: is ever imported because a file names it.
MODEL_CLASSES: dict[str, type] = {"C3DiffModel": C3DiffModel}
#: The ``_module`` values a config.json may record, each with the module that holds its classes now: the public
#: package (what c3diff writes) and the public module paths the models' modules had before they became private
#: (``c3diff.models.c3diff`` is now ``c3diff.models._c3diff``). A folder naming one of these loads when the class is
#: exported by the package or defined in the module now at that path; any other value is refused.
MODEL_MODULES: dict[str, str] = {
    _PUBLIC_MODULE: _PUBLIC_MODULE,
    **{
        f"c3diff.models.{name}": f"c3diff.models._{name}"
        for name in (
            "autoencoder",
            "bundled",
            "c3diff",
            "conditional_mean",
            "controlnet",
            "hint_encoders",
            "hub",
            "imputation",
            "losses",
            "model_card",
            "presets",
            "sampling",
            "training_config",
        )
    },
}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def save_pretrained(
    model: C3DiffModel,
    save_directory: str | Path,
    *,
    training_data: str | None = None,
    repo_id: str | None = None,
    safe_serialization: bool = True,
    variant: str | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``scheduler_config.json`` (the sampling scheduler) and
    ``README.md`` (model card) into ``save_directory``.

    Parameters
    ----------
    model
        The model to save.
    save_directory
        Folder to write (created if needed; existing files of the same names are replaced).
    training_data
        Description of the training data; recorded in the config and the model card (kept when ``None``).
    repo_id
        Hub repository the folder is meant for (only used in the card's usage snippet).
    safe_serialization
        safetensors (default) or, with ``False``, a pickled ``model.bin`` (as diffusers' ``ModelMixin``).
    variant
        Save the weights as ``model.<variant>.safetensors`` (e.g. ``"fp16"`` after ``model.half()``).

    Returns
    -------
    The folder.

    Examples
    --------
    >>> import tempfile, c3diff
    >>> model = c3diff.models.build_model("tiny", genes=["A", "B"])
    >>> folder = save_pretrained(model, tempfile.mkdtemp(), training_data="simulated sections")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'config.json', 'model.safetensors', 'scheduler_config.json']
    """
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"`save_directory` {str(folder)!r} is a file; pass a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(model.to_json_string())
    if training_data is not None:  # recorded in the saved files; the caller's model keeps its config
        config["training_data"] = training_data = str(training_data)
    config["_module"] = _PUBLIC_MODULE
    config["_c3diff_version"] = __version__
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if safe_serialization:
        save_file(
            state,
            str(folder / _weights_name(WEIGHTS_NAME, variant)),
            metadata={"format": "pt", "c3diff_version": __version__},
        )
    else:
        torch.save(state, folder / _weights_name(_PICKLE_WEIGHTS_NAME, variant))
    model.noise_scheduler.save_pretrained(str(folder))
    recipe = getattr(model, "training_config", None)
    if recipe is not None:
        recipe.save_pretrained(folder)
    make_model_card(model, repo_id=repo_id, training_data=training_data).save(folder / CARD_NAME)
    return folder


def from_pretrained(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    device: str | torch.device = "cpu",
    model_class: type | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> C3DiffModel:
    """Load a C3-Diff model from a local folder or a Hugging Face Hub repository.

    Parameters
    ----------
    path_or_repo_id
        A folder written by :func:`save_pretrained`, or a Hub repo id (``"user/name"``).
    revision
        Hub commit sha, branch or tag. Pin a commit sha for reproducible results (a warning says so otherwise).
    local_files_only
        Use only the local Hub cache (no network).
    cache_dir
        Hub cache folder (default: the huggingface_hub cache).
    token
        Hub token for private repositories.
    device
        Where to put the model.
    model_class
        The class to instantiate (default: the class ``config.json`` names, one of c3diff's model classes; see
        ``MODEL_CLASSES``).
    torch_dtype
        Cast the floating-point weights to this dtype (e.g. ``torch.bfloat16`` on a GPU).
    variant
        Load ``model.<variant>.safetensors`` instead of ``model.safetensors``.

    Returns
    -------
    The model in eval mode, with the sampling scheduler of ``scheduler_config.json`` when the folder has one (any
    diffusers scheduler; older folders: the DDIM scheduler of the config) and ``model.training_config``, the
    :class:`~c3diff.models.TrainingConfig` it was trained with (``training_config.json``), or
    ``None`` when not recorded.

    Folders written by c3diff <= 0.1 kept the training recipe (loss weights, ``st_noise_sigma``,
    ``min_snr_gamma``, ``latent_scaling``) and the fitted-stage flags in ``config.json``; they load as they are: the
    recipe becomes ``model.training_config`` and the flags the fitted-stage state (:meth:`C3DiffModel.is_fitted`).

    Examples
    --------
    >>> import tempfile, c3diff
    >>> folder = save_pretrained(c3diff.models.build_model("tiny", genes=["A", "B"]), tempfile.mkdtemp())
    >>> from_pretrained(folder).genes
    ['A', 'B']
    >>> model = from_pretrained("user/c3diff-breast-10x", revision="<commit sha>")  # doctest: +SKIP
    """
    folder = _resolve_folder(
        path_or_repo_id,
        revision=revision,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
        token=token,
        allow_patterns=[
            CONFIG_NAME,
            _weights_name(WEIGHTS_NAME, variant),
            _weights_name(_PICKLE_WEIGHTS_NAME, variant),
            SCHEDULER_NAME,
            TRAINING_CONFIG_NAME,
            CARD_NAME,
        ],
        what="C3-Diff model",
    )
    weights = folder / _weights_name(WEIGHTS_NAME, variant)
    if not weights.is_file() and (folder / _weights_name(_PICKLE_WEIGHTS_NAME, variant)).is_file():
        weights = folder / _weights_name(_PICKLE_WEIGHTS_NAME, variant)
    for name in (CONFIG_NAME, weights.name):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{str(path_or_repo_id)!r} has no {name}: not a c3diff model folder (expected {CONFIG_NAME}, "
                f"{WEIGHTS_NAME}, {CARD_NAME}, as written by `model.save_pretrained`)."
            )
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{folder / CONFIG_NAME} is not valid JSON ({err}); re-download or re-save the model."
        ) from err
    cls = model_class or _model_class(config)
    config, legacy = split_legacy_config(config, path=folder / CONFIG_NAME)
    check_config(config, cls, path=folder / CONFIG_NAME)
    model = cls.from_config(config)
    load_weights(model, weights, fitted_stages=legacy.get("fitted_stages"))
    if (folder / SCHEDULER_NAME).is_file():
        model.noise_scheduler = load_scheduler(folder / SCHEDULER_NAME)
    try:
        recipe = TrainingConfig.from_pretrained(folder)
    except ValueError as err:  # provenance only: the model loads without it
        warnings.warn(
            f"{folder / TRAINING_CONFIG_NAME} cannot be read by this c3diff version ({err}); the model loads with "
            "`training_config=None`.",
            UserWarning,
            stacklevel=2,
        )
        recipe = None
    if recipe is None and legacy.get("recipe"):
        recipe = TrainingConfig.from_model_config(legacy["recipe"])
    model.training_config = recipe
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.to(device).eval()


def _weights_name(name: str, variant: str | None) -> str:
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def load_scheduler(path: str | Path):
    """The diffusers scheduler described by a ``scheduler_config.json`` (its ``_class_name`` names the class)."""
    import diffusers

    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the model.") from err
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(
            f"{path} names the scheduler class {name!r}, which is not a diffusers scheduler in "
            f"diffusers {diffusers.__version__}; install a diffusers version that has it."
        )
    return cls.from_config(config)


def load_weights(model: torch.nn.Module, path: str | Path, *, fitted_stages: list[bool] | None = None) -> None:
    """Load a safetensors (or pickled ``.bin``) file into ``model`` strictly (errors list missing, unexpected and
    mis-shaped tensors).

    Weights saved by c3diff <= 0.1 lack the ``fitted_stages`` buffer (the flags were in ``config.json``); it is
    filled from ``fitted_stages`` (see :func:`split_legacy_config`)."""
    try:
        if str(path).endswith(".bin"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise OSError(
            f"Cannot read the weights {str(path)!r} ({err}). The file is corrupted or incomplete: download it again "
            "(`huggingface_hub.snapshot_download(..., force_download=True)`) or save the model again."
        ) from err
    expected = model.state_dict()
    if "fitted_stages" in expected and "fitted_stages" not in state:
        state["fitted_stages"] = torch.tensor(fitted_stages or [False] * len(expected["fitted_stages"]))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:

        def show(keys):
            return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"

        raise ValueError(
            f"The weights in {str(path)!r} do not match the model built from its config.json: missing {show(missing)}, "
            f"unexpected {show(unexpected)}, wrong shape {show(mismatched)}. The folder mixes files of different "
            "models or versions; re-save the model with the c3diff version that trained it."
        )
    not_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise ValueError(
            f"The weights in {str(path)!r} hold NaN or infinite values in {len(not_finite)} tensor(s) "
            f"({not_finite[:3]}{' ...' if len(not_finite) > 3 else ''}): the file is damaged or the training run "
            "diverged. Download or save the model again, or use an earlier checkpoint."
        )
    model.load_state_dict(state, strict=True)


#: ``config.json`` keys of c3diff <= 0.1 that are no network options any more: the training recipe (mapped to a
#: :class:`~c3diff.models.TrainingConfig`), the fitted-stage flags (mapped to the ``fitted_stages``
#: buffer) and options nothing used.
_LEGACY_FLAGS = ("first_stage_fitted", "backbone_fitted", "mean_fitted")


def split_legacy_config(config: dict, *, path: str | Path) -> tuple[dict, dict]:
    """Split a ``config.json`` into the network's config and what older versions kept there.

    Returns ``(config, legacy)``; ``legacy`` may hold ``"recipe"`` (the training-recipe entries) and
    ``"fitted_stages"`` (the flags, in :data:`~c3diff.models._c3diff.FITTED_STAGES` order). A legacy entry whose
    value the current version cannot honour is an error that says so.

    Examples
    --------
    >>> net, legacy = split_legacy_config({"genes": ["A"], "lambda_mse": 1.0, "mean_fitted": True}, path="x")
    >>> net, legacy["recipe"], legacy["fitted_stages"]
    ({'genes': ['A']}, {'lambda_mse': 1.0}, [False, False, True])
    """
    from c3diff.models._training_config import LEGACY_RECIPE_KEYS

    config = dict(config)
    legacy: dict[str, Any] = {}
    recipe = {k: config.pop(k) for k in LEGACY_RECIPE_KEYS if k in config}
    if recipe:
        legacy["recipe"] = recipe
    if any(k in config for k in _LEGACY_FLAGS):
        legacy["fitted_stages"] = [bool(config.pop(k, False)) for k in _LEGACY_FLAGS]
    normalization = config.pop("normalization", "minmax")
    if normalization != "minmax":
        raise ValueError(
            f"{str(path)!r} records `normalization={normalization!r}`; c3diff models take maps normalised per patch "
            "and gene to [0, 1] ('minmax') only. This model cannot be used with this c3diff version."
        )
    config.pop("train_unet_encoder", None)  # training only; the weights load as they are
    return config, legacy


def warn_ignored_revision(revision: str | None, *, what: str) -> None:
    """Warn that ``revision`` has no effect on ``what`` (a local folder or a model object): revisions select Hub
    commits."""
    if revision is not None:
        warnings.warn(
            f"`revision={revision!r}` is ignored: {what} is not a Hugging Face Hub repository (revisions select "
            "commits of Hub repos). Drop `revision`, or pass the repo id to load that revision.",
            UserWarning,
            stacklevel=4,
        )


#: Python types accepted for annotation names in model constructor signatures (``float`` also takes ints).
_ANNOTATION_TYPES = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "None": (type(None),),
    "Sequence": (list, tuple),
    "list": (list, tuple),
    "tuple": (list, tuple),
    "Mapping": (dict,),
    "dict": (dict,),
}


def _accepted_types(annotation: Any) -> tuple[type, ...] | None:
    """Types a ``config.json`` value may have for a constructor annotation (``None`` when it cannot tell)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    accepted: tuple[type, ...] = ()
    for part in text.split("|"):
        base = part.strip().split("[")[0].split(".")[-1]
        if base not in _ANNOTATION_TYPES:
            return None
        accepted += _ANNOTATION_TYPES[base]
    return accepted


def check_config(config: dict, cls: type, *, path: str | Path) -> None:
    """Refuse a ``config.json`` whose values have the wrong type for ``cls``'s constructor (e.g. ``image_size``
    given as a string), naming the file, the key, the expected and the found type."""
    import inspect

    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    problems = []
    for key, value in config.items():
        if key.startswith("_") or key not in parameters:
            continue
        accepted = _accepted_types(parameters[key].annotation)
        if accepted is None:
            continue
        wrong = not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted)
        if not wrong and isinstance(value, float) and not math.isfinite(value):
            wrong = True
        if wrong:
            expected = " or ".join(sorted({t.__name__ for t in accepted} - {"NoneType"})) or "null"
            if type(None) in accepted:
                expected += " or null"
            problems.append(f"`{key}` should be {expected}, found {value!r} ({type(value).__name__})")
    if problems:
        raise ValueError(
            f"{str(path)!r} is not a valid {cls.__name__} config: {'; '.join(problems)}. Fix the value(s) in the file, "
            "or save the model again with `save_pretrained`."
        )


def push_to_hub(
    model: C3DiffModel,
    repo_id: str,
    *,
    commit_message: str = "Upload C3-Diff model",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    training_data: str | None = None,
):
    """Upload ``model`` (config, weights, model card) to a Hub model repository, creating it if needed.

    Parameters
    ----------
    model
        The model.
    repo_id
        ``"user/name"``.
    commit_message
        Message of the upload commit.
    private
        Visibility when the repository is created.
    token
        Hub token with write access (default: the logged-in user's).
    revision
        Branch to push to.
    create_pr
        Open a pull request instead of committing.
    training_data
        Recorded in the config and the card (see :func:`save_pretrained`).

    Returns
    -------
    The ``huggingface_hub.CommitInfo`` of the upload (its ``oid`` is the commit to pin when loading).

    Examples
    --------
    >>> model.push_to_hub("user/c3diff-breast-10x", training_data="Xenium breast, 99 sections")  # doctest: +SKIP
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, training_data=training_data, repo_id=repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )


def from_ldm(
    path_or_repo_id: str | Path,
    *,
    genes: list[str],
    scale: int = 10,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    **overrides: Any,
) -> C3DiffModel:
    """Build a C3-Diff model on a pretrained LDM backbone (diffusers layout, as CompVis/ldm-celebahq-256).

    The folder (or Hub repo) must hold ``vqvae/`` (a ``VQModel``) and ``unet/`` (a ``UNet2DModel``). The tile size is
    the UNet's sample size times the autoencoder's factor; every other option comes from the ``paper`` preset
    unless overridden. The UNet's encoder is copied into the ControlNet, whose zero convs make the new model start
    as the pretrained backbone.

    Parameters
    ----------
    path_or_repo_id
        Local folder or Hub repo id.
    genes
        Gene names in model order.
    scale
        10 or 5.
    revision, local_files_only, cache_dir, token
        As for :func:`from_pretrained`.
    **overrides
        Further :class:`~c3diff.models.C3DiffModel` options (not ``unet_config`` / ``autoencoder_config``).

    Returns
    -------
    The model (train mode, frozen parts set).

    Examples
    --------
    >>> model = from_ldm("CompVis/ldm-celebahq-256", genes=c3diff._panels.paper_genes(),
    ...                  revision="<commit sha>")  # doctest: +SKIP
    """
    for key in ("unet_config", "autoencoder_config", "image_size"):
        if key in overrides:
            raise TypeError(f"`{key}` comes from the LDM backbone and cannot be overridden in `from_ldm`.")
    folder = _resolve_folder(
        path_or_repo_id,
        revision=revision,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
        token=token,
        allow_patterns=["vqvae/*", "unet/*"],
        what="LDM backbone",
    )
    for sub in ("vqvae", "unet"):
        if not (folder / sub / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{str(path_or_repo_id)!r} has no {sub}/{CONFIG_NAME}: an LDM backbone folder needs `vqvae/` (a "
                "diffusers VQModel) and `unet/` (a UNet2DModel), as in CompVis/ldm-celebahq-256."
            )
    vqvae = VQModel.from_pretrained(folder, subfolder="vqvae")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    config = preset_config("paper", genes=genes, scale=scale, **overrides)
    config["unet_config"] = config_kwargs(unet.config)
    config["autoencoder_config"] = config_kwargs(vqvae.config)
    config["image_size"] = int(unet.config.sample_size) * downsampling_factor(vqvae)
    model = C3DiffModel(**config)
    model.mark_fitted("first_stage")  # a pretrained autoencoder ...
    model.mark_fitted("backbone")  # ... and a pretrained unconditional UNet
    model.vqvae.load_state_dict(vqvae.state_dict(), strict=True)
    model.unet.load_state_dict(unet.state_dict(), strict=True)
    model.controlnet.copy_encoder_from(model.unet)
    return model


def _resolve_folder(
    path_or_repo_id: str | Path,
    *,
    revision: str | None,
    local_files_only: bool,
    cache_dir: str | Path | None,
    token: str | bool | None,
    allow_patterns: list[str],
    what: str,
) -> Path:
    """A local folder as is, or the snapshot folder of a Hub repo (one ``snapshot_download``)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        warn_ignored_revision(revision, what=f"{str(path_or_repo_id)!r}, a local folder,")
        return path
    if path.exists():
        raise NotADirectoryError(f"{str(path_or_repo_id)!r} is a file; pass the folder that holds the {what}.")
    repo_id = str(path_or_repo_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub repo id ('user/name'): {err}"
        ) from err
    if revision is None or not _COMMIT.match(revision):
        where = "the default branch" if revision is None else repr(revision)
        warnings.warn(
            f"Loading {repo_id!r} from the Hugging Face Hub at {where}, which can change. Pin the commit for "
            "reproducible results: `revision='<40-character commit sha>'`.",
            UserWarning,
            stacklevel=3,
        )
    pinned = revision is not None and _COMMIT.match(revision) is not None
    download = {
        "repo_id": repo_id,
        "revision": revision,
        "cache_dir": cache_dir,
        "token": token,
        "allow_patterns": allow_patterns,
        "library_name": "c3diff",
        "library_version": __version__,
    }
    if pinned and not local_files_only and not _snapshot_cached(repo_id, revision, cache_dir):
        _check_hub_reachable(repo_id, revision, token=token, what=what)
    try:
        folder = snapshot_download(**download, local_files_only=local_files_only)
    except LocalEntryNotFoundError as err:
        raise OSError(_offline_message(what, repo_id, revision, None)) from err
    except (RevisionNotFoundError, RepositoryNotFoundError) as err:
        raise _not_found(err, repo_id, revision) from err
    return Path(folder)


def _snapshot_cached(repo_id: str, revision: str, cache_dir: str | Path | None) -> bool:
    """Whether the cache holds a snapshot of the commit ``revision`` (a look at the cache folder, no network)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    return (root / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / revision).is_dir()


def _check_hub_reachable(repo_id: str, revision: str, *, token: str | bool | None, what: str) -> None:
    """One look-up of a pinned commit that is not cached, so that an unreachable Hub fails at once:
    ``snapshot_download`` skips its first request for a commit and lists the commit's files with ~25 s of retries
    before giving up."""
    try:
        HfApi(token=token, library_name="c3diff", library_version=__version__).repo_info(
            repo_id, revision=revision, timeout=10
        )
    except (RevisionNotFoundError, RepositoryNotFoundError) as err:
        raise _not_found(err, repo_id, revision) from err
    except HfHubHTTPError:
        pass  # the Hub answered: the download reports what it has to
    except Exception as err:  # connection refused, DNS, timeout, proxy, HF_HUB_OFFLINE=1
        raise OSError(_offline_message(what, repo_id, revision, f"{type(err).__name__}: {err}")) from err


def _not_found(err: Exception, repo_id: str, revision: str | None) -> OSError:
    """The error for a Hub repository or revision that does not exist."""
    if isinstance(err, RevisionNotFoundError):
        return OSError(f"Revision {revision!r} does not exist in the Hub repository {repo_id!r}.")
    return OSError(f"The Hub repository {repo_id!r} does not exist or is private/gated (pass `token=` with access).")


def _offline_message(what: str, repo_id: str, revision: str | None, reason: str | None) -> str:
    """The error for a Hub model that is neither cached nor reachable; the download commands name the revision."""
    cli_revision = f" --revision {revision}" if revision else ""
    py_revision = f", revision={revision!r}" if revision else ""
    return (
        f"The {what} {repo_id!r} (revision {revision or 'default'}) is not in the local Hugging Face cache and "
        f"the Hub cannot be reached ({reason or 'offline, HF_HUB_OFFLINE=1 or local_files_only=True'}). On a "
        f"machine with internet, download it first: `huggingface-cli download {repo_id}{cli_revision}` or "
        f"`huggingface_hub.snapshot_download({repo_id!r}{py_revision})` (with the same cache_dir / HF_HOME), or copy "
        "its files to a folder and pass that folder instead."
    )


def _model_class(config: dict) -> type:
    """The model class a config names (``_module`` and ``_class_name``), looked up in :data:`MODEL_CLASSES` and
    :data:`MODEL_MODULES`; nothing is imported.

    Examples
    --------
    >>> _model_class({"_class_name": "C3DiffModel", "_module": "c3diff.models.c3diff"}).__name__  # old path
    'C3DiffModel'
    >>> _model_class({"_class_name": "Popen", "_module": "subprocess"})
    Traceback (most recent call last):
    ...
    ValueError: config.json names the class subprocess.Popen, which is not part of c3diff; ...
    """
    name, module = str(config.get("_class_name", "C3DiffModel")), str(config.get("_module", _PUBLIC_MODULE))
    known = ", ".join(f"{_PUBLIC_MODULE}.{known}" for known in MODEL_CLASSES)
    if not (module == "c3diff" or module.startswith("c3diff.")):
        raise ValueError(
            f"config.json names the class {module}.{name}, which is not part of c3diff; c3diff loads only its own "
            f"model classes ({known}). Load the folder with the library that wrote it."
        )
    cls = MODEL_CLASSES.get(name)
    where = MODEL_MODULES.get(module)
    if cls is None or where is None or where not in (_PUBLIC_MODULE, cls.__module__):
        raise ValueError(
            f"config.json names the class {module}.{name}, which this c3diff version ({__version__}) does not have as "
            f"a model class (it was written by c3diff {config.get('_c3diff_version', 'unknown')}); the model classes "
            f"are {known}. Pass `model_class=` if the folder holds one of them."
        )
    return cls
