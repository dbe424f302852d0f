"""c3diff.tl: tools that run on a SpatialData.

- :func:`super_resolve`: super-resolve spot counts or transcripts with the H&E over the whole slide (tiled, on dask).
- :func:`fit_slide`: fit a model's conditional-mean stage on the user's own slide, supervised by its spots (no
  high-resolution truth needed).
- :func:`train`: train a C3-Diff model with the paper's recipe (accelerate; validation; resumable checkpoints).
- :func:`evaluate`: score a super-resolved layer against a high-resolution truth (per tile and gene) or against
  the measured spots.
- :func:`sample_at_spots`: read a gene raster back at spot positions (summed over each spot's disc), as counts or
  normalised values.
- :func:`celltype_map`: call immune cell types per pixel from super-resolved marker genes
  (:data:`DEFAULT_MARKERS`).
"""

from c3diff.tl._celltype import DEFAULT_MARKERS, CelltypeMap, celltype_map
from c3diff.tl._evaluate import evaluate, sample_at_spots
from c3diff.tl._fit_slide import fit_slide
from c3diff.tl._super_resolve import UNITS, super_resolve
from c3diff.tl._train import PAPER_RECIPE, TrainingResult, make_optimizer, train, validation_scores

__all__ = [
    "DEFAULT_MARKERS",
    "PAPER_RECIPE",
    "UNITS",
    "CelltypeMap",
    "TrainingResult",
    "celltype_map",
    "evaluate",
    "fit_slide",
    "make_optimizer",
    "sample_at_spots",
    "super_resolve",
    "train",
    "validation_scores",
]
