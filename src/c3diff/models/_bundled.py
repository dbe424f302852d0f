"""Models shipped inside the c3diff package (loaded with the same ``from_pretrained`` code as Hub models), and what
every user can get a model from."""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from c3diff.models._c3diff import C3DiffModel

#: Folder (inside the installed package) of the demo model written by ``scripts/train_demo_model.py``.
DEMO_MODEL = "demo_model"

#: How the demo model's config (``training_data``) begins: it was trained on simulated tissue only.
DEMO_TRAINING_MARK = "DEMO MODEL FOR SIMULATED TISSUE"

#: The models a user can run c3diff with (named by the "model is required" error and the README).
MODEL_CHOICES = (
    "c3.models.load_demo_model() (the bundled demo model: 48 immune genes, trained on simulated tissue only), "
    "c3.tl.fit_slide(sdata, image_key, table_key=...) (a model fitted on your own slide, supervised by its spots; "
    "CPU minutes), a model you trained with c3.tl.train, or the folder or Hub repo id of a saved model. No model "
    "trained on real tissue is published on the Hub yet"
)

_warned_demo_on_real_data = False


def demo_model_path() -> Path:
    """Path of the bundled demo model: a ``tiny`` C3-Diff trained on simulated tissue (see its model card)."""
    path = Path(str(resources.files("c3diff.data").joinpath(DEMO_MODEL)))
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"The demo model is missing from this installation ({path}); rebuild it with "
            "`python scripts/train_demo_model.py` from a clone of the repository."
        )
    return path


def load_demo_model() -> C3DiffModel:
    """The bundled demo model: for simulated tissue only, not for real data.

    A ``tiny`` C3-Diff (conditional-mean stage, 64 px tiles at 10 um) for 48 immune genes, trained on sections of
    :func:`c3diff.datasets.simulate_section`. :func:`c3diff.tl.super_resolve` warns (once) when it is used on data
    that was not simulated; for real tissue fit a model on the slide with :func:`c3diff.tl.fit_slide`.

    Examples
    --------
    >>> import c3diff as c3
    >>> model = c3.models.load_demo_model()  # doctest: +SKIP
    >>> model.config.image_size  # doctest: +SKIP
    64
    """
    from c3diff.models._hub import from_pretrained

    return from_pretrained(str(demo_model_path()))


def is_demo_model(model: Any) -> bool:
    """Whether ``model`` is the bundled demo model (its config records that it was trained on simulated tissue)."""
    config = getattr(model, "config", None)
    data = config.get("training_data") if isinstance(config, dict) else getattr(config, "training_data", None)
    return isinstance(data, str) and data.startswith(DEMO_TRAINING_MARK)


def is_simulated(sdata: Any) -> bool:
    """Whether ``sdata`` was made by :func:`c3diff.datasets.simulate_section` (``sdata.attrs["c3diff"]["simulation"]``;
    readers record ``"reader"`` there instead)."""
    provenance = getattr(sdata, "attrs", {}).get("c3diff")
    return isinstance(provenance, dict) and isinstance(provenance.get("simulation"), dict)


def warn_demo_on_real_data(model: Any, sdata: Any, *, stacklevel: int = 3) -> bool:
    """Warn once per session when the demo model is used on data that was not simulated; return whether it warned."""
    global _warned_demo_on_real_data
    if _warned_demo_on_real_data or not is_demo_model(model) or is_simulated(sdata):
        return False
    _warned_demo_on_real_data = True
    warnings.warn(
        "The bundled demo model was trained on simulated tissue only and this data was not simulated: its maps are "
        "a demonstration, not a measurement. For real tissue fit a model on the slide: "
        "model = c3.tl.fit_slide(sdata, image_key, table_key=...).",
        UserWarning,
        stacklevel=stacklevel,
    )
    return True
