"""c3diff.pl: matplotlib figures of super-resolved layers.

- :func:`super_resolved`: genes side by side with the H&E, the low-resolution input, the truth and the std.
- :func:`celltype_map`: a cell-type label map with its legend, beside the H&E and a truth map.

Every function returns the :class:`~matplotlib.figure.Figure` without showing it.
"""

from c3diff.pl._celltype import celltype_map
from c3diff.pl._super_resolved import super_resolved

__all__ = ["celltype_map", "super_resolved"]
