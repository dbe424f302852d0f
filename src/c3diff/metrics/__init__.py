"""Scores of super-resolved gene maps (:doc:`/method`, *Metrics and protocols*).

Map scores, per (item, gene) on [0, 1]-normalised maps: :func:`rmse` (divided by the ground-truth range),
:func:`pcc` (``|Pearson r|``) and :func:`ssim` (Gaussian, sigma 1.5); :func:`score_maps` gives all three as a
table and :func:`summarize_scores` averages it (the paper's protocol). Without a high-resolution truth,
:func:`lr_consistency` compares a prediction with the measured spots at the spots only.

Examples
--------
>>> import numpy as np
>>> import c3diff as c3
>>> truth = np.random.default_rng(0).random((2, 3, 32, 32))
>>> c3.metrics.summarize_scores(c3.metrics.score_maps(truth, truth, genes=["A", "B", "C"]))["pcc"].item()
1.0
"""

from c3diff.metrics._maps import pcc, rmse, score_maps, ssim, summarize_scores
from c3diff.metrics._spots import aggregate_to_spots, compare_spots, lr_consistency, spot_footprint, sum_over_spots

__all__ = [
    "aggregate_to_spots",
    "compare_spots",
    "lr_consistency",
    "pcc",
    "rmse",
    "score_maps",
    "spot_footprint",
    "ssim",
    "sum_over_spots",
    "summarize_scores",
]
