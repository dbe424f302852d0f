"""c3diff.datasets: a simulated breast-cancer section (H&E, cells, transcripts, spots) and its ground truth.

Examples
--------
>>> import c3diff as c3
>>> sdata = c3.datasets.simulate_section(width=640, height=640, seed=0)  # doctest: +SKIP
>>> c3.datasets.true_cell_types(sdata, pixel_size=10.0)  # doctest: +SKIP
>>> expected = c3.datasets.expected_counts(sdata, pixel_size=10.0)  # doctest: +SKIP
"""

from c3diff.datasets._celltypes import CELL_TYPES, NICHES
from c3diff.datasets._expected import expected_counts
from c3diff.datasets._simulate import simulate_section
from c3diff.datasets._spots import SPOT_LAYOUTS
from c3diff.datasets._truth import main_types, true_cell_types

__all__ = [
    "CELL_TYPES",
    "NICHES",
    "SPOT_LAYOUTS",
    "expected_counts",
    "main_types",
    "simulate_section",
    "true_cell_types",
]
