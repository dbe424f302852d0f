"""The model card (``README.md`` of a saved model): YAML metadata that tools read, and a page that people read.

The metadata records what a user needs to feed the model correctly: the genes in gene-index order, the scale,
the normalisation, the pixel sizes (histology, HR, LR), the tile geometry, the training data and the c3diff
version that wrote it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

from c3diff._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from c3diff.models._c3diff import C3DiffModel

__all__ = ["card_metadata", "make_model_card"]


def card_metadata(model: C3DiffModel, *, training_data: str | None = None) -> dict:
    """The ``c3diff`` block of the card's YAML metadata (``training_data``: instead of the model's).

    Examples
    --------
    >>> import c3diff
    >>> meta = card_metadata(c3diff.models.build_model("tiny", genes=["A", "B"], scale=5))
    >>> meta["genes"], meta["scale"], meta["histology_pixel_size_um"]
    (['A', 'B'], 5, 10.0)
    """
    config = model.config
    return {
        "genes": list(config.genes),
        "scale": int(config.scale),
        "normalization": "minmax",  # the only one: each patch and gene scaled to [0, 1] (c3diff.pp.make_patches)
        "histology_pixel_size_um": float(config.histology_pixel_size),
        "hr_pixel_size_um": float(config.hr_pixel_size),
        "lr_pixel_size_um": float(config.lr_pixel_size),
        "output_pixel_size_um": float(config.hr_pixel_size) * (10 // int(config.scale)),
        "image_size": int(config.image_size),
        "lr_size": int(config.lr_size),
        "latent_space": "pixel" if model.vqvae is None else "vq",
        "training_data": config.training_data if training_data is None else training_data,
        "c3diff_version": __version__,
    }


def make_model_card(
    model: C3DiffModel, *, repo_id: str | None = None, license: str | None = None, training_data: str | None = None
) -> ModelCard:
    """Build the model card of ``model``.

    Parameters
    ----------
    model
        The model to describe.
    repo_id
        The Hub repository (used in the usage snippet); default: a local folder.
    license
        SPDX identifier for the metadata.
    training_data
        Description of the training data, instead of the model's ``config.training_data``.

    Returns
    -------
    A ``huggingface_hub.ModelCard`` whose ``data`` holds ``library_name: c3diff``, tags and the ``c3diff`` block of
    :func:`card_metadata`.

    Examples
    --------
    >>> import c3diff
    >>> card = make_model_card(c3diff.models.build_model("tiny", genes=["A", "B"]))
    >>> card.data.to_dict()["c3diff"]["genes"]
    ['A', 'B']
    """
    meta = card_metadata(model, training_data=training_data)
    data = ModelCardData(
        library_name="c3diff",
        license=license,
        tags=["spatial-transcriptomics", "super-resolution", "diffusion", "controlnet", "histology", "c3diff"],
        pipeline_tag="image-to-image",
        c3diff=meta,
    )
    source = repo_id or "path/to/this/folder"
    n_params = sum(p.numel() for p in model.parameters())
    gene_list = ", ".join(meta["genes"][:20]) + (
        f", ... ({len(meta['genes'])} in all)" if len(meta["genes"]) > 20 else ""
    )
    out_px, size = meta["output_pixel_size_um"], meta["image_size"]
    body = f"""
# C3-Diff model for {meta["scale"]}x spatial transcriptomics super-resolution

A c3diff model: a ControlNet-conditioned {"latent " if model.vqvae is not None else ""}diffusion
model (C3-Diff) that super-resolves low-resolution spatial transcriptomics (ST) gene maps by {meta["scale"]}x using
the paired H&E image. {n_params:,} parameters.

## Inputs and outputs
| item | value |
|---|---|
| histology tile | 3 x {size} x {size} px at {meta["histology_pixel_size_um"]} um/px (RGB / 255) |
| LR ST map | 1 x {meta["lr_size"]} x {meta["lr_size"]} px per gene at {meta["lr_pixel_size_um"]} um/px |
| output | {model.output_size()} x {model.output_size()} px per gene at {out_px} um/px, in [0, 1] |
| normalisation | {meta["normalization"]} (per patch and gene, to [0, 1]) |
| genes ({len(meta["genes"])}, in gene-index order) | {gene_list} |

## Training data
{meta["training_data"] or "Not recorded."}

## Usage
```python
import c3diff
model = c3diff.models.from_pretrained("{source}"{", revision='<commit sha>'" if repo_id else ""})
mean, std = model.predict(histology, lr, n_samples=4)  # (T, G, H, H) in [0, 1]
```

Written by c3diff {meta["c3diff_version"]}.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
