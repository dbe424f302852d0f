"""Preprocessing: gene selection, rasters from transcripts and spots, and the paper's training patches."""

from typing import TYPE_CHECKING

from c3diff.pp._binning import bin_transcripts
from c3diff.pp._genes import select_genes
from c3diff.pp._histology import detect_tissue, histology_raster
from c3diff.pp._model_inputs import ModelGeometry, ModelInputs, model_inputs
from c3diff.pp._normalize import minmax_denormalize, minmax_normalize
from c3diff.pp._patches import PatchSet, make_patches
from c3diff.pp._splits import split_samples
from c3diff.pp._spots import Spots, spots_from_table, spots_to_grid
from c3diff.pp._texture import TEXTURE_FEATURES, TEXTURE_MAX_PIXEL_SIZE, histology_texture

if TYPE_CHECKING:  # pragma: no cover
    from c3diff.pp._dataset import PatchDataset


def __getattr__(name: str):
    # PatchDataset subclasses torch's Dataset: load torch only when it is asked for, so `import c3diff.pp` stays fast.
    if name == "PatchDataset":
        from c3diff.pp._dataset import PatchDataset

        globals()[name] = PatchDataset
        return PatchDataset
    raise AttributeError(f"module 'c3diff.pp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ModelGeometry",
    "ModelInputs",
    "PatchDataset",
    "PatchSet",
    "Spots",
    "TEXTURE_FEATURES",
    "TEXTURE_MAX_PIXEL_SIZE",
    "bin_transcripts",
    "detect_tissue",
    "histology_raster",
    "histology_texture",
    "make_patches",
    "minmax_denormalize",
    "minmax_normalize",
    "model_inputs",
    "select_genes",
    "spots_from_table",
    "spots_to_grid",
    "split_samples",
]
