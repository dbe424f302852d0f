"""Preprocessing: gene selection, rasters from transcripts and spots, and the paper's training patches."""

from c3diff.pp._binning import bin_transcripts
from c3diff.pp._dataset import PatchDataset
from c3diff.pp._genes import select_genes
from c3diff.pp._histology import detect_tissue, histology_raster
from c3diff.pp._normalize import minmax_denormalize, minmax_normalize
from c3diff.pp._patches import PatchSet, make_patches
from c3diff.pp._spots import Spots, spots_from_table, spots_to_grid
from c3diff.pp._splits import split_samples

__all__ = [
    "PatchDataset",
    "PatchSet",
    "Spots",
    "bin_transcripts",
    "detect_tissue",
    "histology_raster",
    "make_patches",
    "minmax_denormalize",
    "minmax_normalize",
    "select_genes",
    "spots_from_table",
    "spots_to_grid",
    "split_samples",
]
