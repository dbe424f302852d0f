"""Names and physical constants shared by the simulator, the readers and the tools.

Every SpatialData that c3diff makes or reads follows these conventions (see ``docs/conventions.md``):
all elements carry a transformation to the coordinate system :data:`COORDINATE_SYSTEM`, whose unit is
the micrometre. Pixel sizes are always derived from those transformations.
"""

from __future__ import annotations

from enum import Enum

#: The coordinate system every c3diff element is registered to; its unit is 1 um.
COORDINATE_SYSTEM = "global"
#: Channel names of an RGB H&E image.
RGB_CHANNELS = ("r", "g", "b")


class Key(str, Enum):
    """Default element names in a c3diff SpatialData (simulated or read)."""

    HNE = "hne"  # H&E image, RGB uint8, Scale(um/px) to COORDINATE_SYSTEM
    MORPHOLOGY = "morphology"  # Xenium DAPI/morphology image (readers)
    TRANSCRIPTS = "transcripts"  # points: x, y (um), gene, cell_id
    CELLS = "cells"  # circle shapes, one per cell
    CELL_LABELS = "cell_labels"  # labels raster of cell ids (0 = background)
    CELL_TABLE = "cell_table"  # cells x genes counts, obs["cell_type"], annotates CELLS
    SPOTS = "spots"  # circle shapes of measured spots (readers)
    SPOT_TABLE = "table"  # spots x genes counts, annotates SPOTS (readers)
    VISIUM_SPOTS = "visium_spots"  # simulator: Visium-like spots (55 um on a 100 um hex pitch)
    VISIUM_TABLE = "visium_table"
    ST_SPOTS = "st_spots"  # simulator: legacy-ST-like spots (100 um on a 200 um square pitch)
    ST_TABLE = "st_table"


#: Key of ``sdata.attrs`` / ``adata.uns`` under which c3diff records parameters and provenance.
ATTRS_KEY = "c3diff"

#: Paper geometry (:doc:`/method`, *Geometry*), in micrometres.
LR_PIXEL_SIZE = 100.0
HISTOLOGY_PIXEL_SIZE = 10.0
#: Output scales: LR pixel / HR pixel (100 um -> 10 um or 20 um).
SCALES = (5, 10)

VISIUM_SPOT_DIAMETER = 55.0
VISIUM_PITCH = 100.0
LEGACY_ST_SPOT_DIAMETER = 100.0
LEGACY_ST_PITCH = 200.0

#: Values of the coverage mask written next to an LR grid (``{lr_key}_mask``): outside every spot, under a measured
#: spot, filled from neighbouring spots (:func:`c3diff.pp.spots_to_grid`).
MASK_OUTSIDE, MASK_MEASURED, MASK_FILLED = 0, 1, 2

#: Immune cell types of the cell-type map (:doc:`/method`, *Cell-type map*), in the paper's order.
IMMUNE_TYPES = (
    "B cell",
    "T cell CD4",
    "T cell CD8",
    "Tregs",
    "Macrophages M0",
    "Macrophages M2",
    "plasma cell",
)

#: Marker genes of the seven immune types (:doc:`/method`, *Cell-type map*), human gene symbols (upper case), from the
#: Xenium breast panel; the default of :func:`c3diff.tl.celltype_map` (``markers="human"``).
IMMUNE_MARKERS_HUMAN: dict[str, tuple[str, ...]] = {
    "B cell": ("MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "TCL1A"),
    "T cell CD4": ("CD4", "CD3E", "CD3G", "TRAC", "IL7R", "CCR7", "LTB", "TCF7"),
    "T cell CD8": ("CD8A", "CD3E", "CD3G", "TRAC", "GZMA", "GZMK", "PRF1", "NKG7", "CCL5"),
    "Tregs": ("FOXP3", "IL2RA", "CTLA4", "TIGIT"),
    "Macrophages M0": ("CD68", "AIF1", "LYZ", "IGSF6", "CXCL5", "APOC1"),
    "Macrophages M2": ("CD163", "MRC1", "C1QA", "C1QC"),
    "plasma cell": ("MZB1", "TNFRSF17", "CD27", "SLAMF7", "PRDM1"),
}

#: The same seven types with mouse gene symbols (capitalised; ``markers="mouse"``): the one-to-one orthologues of
#: the human markers, except ``TCL1A`` -> ``Tcl1`` and ``LYZ`` -> ``Lyz2`` (the macrophage lysozyme of the mouse).
IMMUNE_MARKERS_MOUSE: dict[str, tuple[str, ...]] = {
    "B cell": ("Ms4a1", "Cd79a", "Cd79b", "Cd19", "Bank1", "Tcl1"),
    "T cell CD4": ("Cd4", "Cd3e", "Cd3g", "Trac", "Il7r", "Ccr7", "Ltb", "Tcf7"),
    "T cell CD8": ("Cd8a", "Cd3e", "Cd3g", "Trac", "Gzma", "Gzmk", "Prf1", "Nkg7", "Ccl5"),
    "Tregs": ("Foxp3", "Il2ra", "Ctla4", "Tigit"),
    "Macrophages M0": ("Cd68", "Aif1", "Lyz2", "Igsf6", "Cxcl5", "Apoc1"),
    "Macrophages M2": ("Cd163", "Mrc1", "C1qa", "C1qc"),
    "plasma cell": ("Mzb1", "Tnfrsf17", "Cd27", "Slamf7", "Prdm1"),
}

#: Name of the cell-type map's class for pixels left without a type (label 0).
UNASSIGNED = "unassigned"
