"""Models shipped inside the c3diff package (loaded with the same ``from_pretrained`` code as Hub models)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from c3diff.models.c3diff import C3DiffModel

#: Folder (inside the installed package) of the demo model written by ``scripts/train_demo_model.py``.
DEMO_MODEL = "demo_model"


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

    Examples
    --------
    >>> import c3diff as c3
    >>> model = c3.models.load_demo_model()  # doctest: +SKIP
    >>> model.config.image_size  # doctest: +SKIP
    64
    """
    from c3diff.models.hub import from_pretrained

    return from_pretrained(str(demo_model_path()))
