"""Catalogue of the simulated cell types: size, nuclear morphology, staining and library size.

One row per type. The same numbers drive the layout (cell radii, packing), the H&E rendering (nucleus shape, chromatin,
cytoplasm) and the expression model (library size). Morphology carries information about the type, but not all of it:
the four T-cell-like types share one morphology, the two macrophage states differ only slightly.
"""

from __future__ import annotations

from dataclasses import dataclass

from c3diff._constants import IMMUNE_TYPES


@dataclass(frozen=True)
class CellType:
    """Morphology and staining of one cell type (lengths in micrometres, stain amounts in optical density units).

    Attributes
    ----------
    radius, radius_cv
        Mean cell radius and its coefficient of variation.
    core
        Hard-core factor: two cells ``i, j`` are at least ``core_i * r_i + core_j * r_j`` apart.
    nucleus_a, nucleus_b, nucleus_cv
        Nuclear semi-axes (long, short) and the coefficient of variation of nuclear size (pleomorphism).
    nucleus_offset
        Distance of the nucleus centre from the cell centre, as a fraction of the radius (eccentric nuclei).
    nucleus_bend
        Bend of the long axis (kidney/bean-shaped nuclei), as a fraction of the short semi-axis.
    orientation
        How the long axis is oriented: ``"random"``, ``"fibre"`` (along the stroma fibres), ``"tangent"``
        (along a vessel wall or a duct rim, set by the layout) or ``"periphery"`` (flattened against the membrane).
    nucleus_od, rim_od, nucleoli, chromatin, coarse
        Haematoxylin density of the nucleoplasm and of the nuclear membrane, mean number of nucleoli, amplitude of the
        chromatin texture and whether that texture is coarse (clumped) rather than fine.
    cyto_e, cyto_h, cyto_texture, membrane_e
        Eosin and haematoxylin density of the cytoplasm, its granularity and the eosin of the cell border.
    ecm_through
        Whether the stroma fibres show through the (thin) cytoplasm.
    vacuole
        Whether the cell interior is an empty lipid vacuole (adipocytes).
    library
        Library-size factor of the expression model (transcripts per unit area relative to a fibroblast).
    """

    radius: float
    radius_cv: float
    core: float
    nucleus_a: float
    nucleus_b: float
    nucleus_cv: float = 0.12
    nucleus_offset: float = 0.0
    nucleus_bend: float = 0.0
    orientation: str = "random"
    nucleus_od: float = 0.9
    rim_od: float = 0.0
    nucleoli: float = 0.0
    chromatin: float = 0.3
    coarse: bool = False
    cyto_e: float = 0.25
    cyto_h: float = 0.03
    cyto_texture: float = 0.2
    membrane_e: float = 0.1
    ecm_through: bool = False
    vacuole: bool = False
    library: float = 1.0


_LYMPHOCYTE = {
    "radius": 4.2,
    "radius_cv": 0.08,
    "core": 0.8,
    "nucleus_a": 3.0,
    "nucleus_b": 2.8,
    "nucleus_od": 1.25,
    "chromatin": 0.35,
    "coarse": True,
    "cyto_e": 0.16,
    "cyto_h": 0.07,
    "membrane_e": 0.05,
    "library": 1.0,
}
_MACROPHAGE = {
    "radius": 7.5,
    "radius_cv": 0.15,
    "core": 0.8,
    "nucleus_a": 4.2,
    "nucleus_b": 2.7,
    "nucleus_offset": 0.2,
    "nucleus_bend": 0.35,
    "nucleus_od": 0.75,
    "rim_od": 0.25,
    "chromatin": 0.25,
    "cyto_e": 0.3,
    "cyto_h": 0.06,
    "cyto_texture": 0.55,
    "membrane_e": 0.08,
    "library": 1.1,
}

#: Every simulated cell type, in the order of ``cell_table.obs["cell_type"].cat.categories``.
CELL_TYPES: dict[str, CellType] = {
    "Tumor": CellType(
        radius=9.0,
        radius_cv=0.14,
        core=0.68,
        nucleus_a=5.8,
        nucleus_b=4.8,
        nucleus_cv=0.2,
        nucleus_od=0.42,
        rim_od=0.3,
        nucleoli=1.6,
        chromatin=0.3,
        cyto_e=0.26,
        cyto_h=0.1,
        cyto_texture=0.25,
        membrane_e=0.12,
        library=1.2,
    ),
    "Myoepithelial": CellType(
        radius=5.5,
        radius_cv=0.1,
        core=0.8,
        nucleus_a=4.8,
        nucleus_b=1.8,
        orientation="tangent",
        nucleus_od=0.95,
        chromatin=0.25,
        cyto_e=0.18,
        cyto_h=0.03,
        cyto_texture=0.1,
        membrane_e=0.1,
        library=1.0,
    ),
    "Fibroblast": CellType(
        radius=6.0,
        radius_cv=0.15,
        core=0.85,
        nucleus_a=6.5,
        nucleus_b=1.25,
        orientation="fibre",
        nucleus_od=0.8,
        chromatin=0.2,
        cyto_e=0.08,
        cyto_h=0.02,
        cyto_texture=0.1,
        membrane_e=0.0,
        ecm_through=True,
        library=0.9,
    ),
    "Endothelial": CellType(
        radius=5.0,
        radius_cv=0.1,
        core=0.5,
        nucleus_a=5.2,
        nucleus_b=1.3,
        orientation="tangent",
        nucleus_od=0.95,
        chromatin=0.2,
        cyto_e=0.1,
        cyto_h=0.02,
        cyto_texture=0.1,
        membrane_e=0.05,
        ecm_through=True,
        library=0.8,
    ),
    "Smooth muscle": CellType(
        radius=5.5,
        radius_cv=0.1,
        core=0.5,
        nucleus_a=7.0,
        nucleus_b=1.5,
        orientation="tangent",
        nucleus_od=0.8,
        chromatin=0.15,
        cyto_e=0.3,
        cyto_h=0.02,
        cyto_texture=0.1,
        membrane_e=0.0,
        ecm_through=True,
        library=0.9,
    ),
    "Adipocyte": CellType(
        radius=42.0,
        radius_cv=0.2,
        core=0.56,
        nucleus_a=5.5,
        nucleus_b=1.3,
        nucleus_offset=0.9,
        orientation="periphery",
        nucleus_od=0.85,
        chromatin=0.15,
        cyto_e=0.0,
        cyto_h=0.0,
        cyto_texture=0.0,
        membrane_e=0.5,
        vacuole=True,
        library=0.12,
    ),
    "Mast cell": CellType(
        radius=5.5,
        radius_cv=0.1,
        core=0.85,
        nucleus_a=2.9,
        nucleus_b=2.6,
        nucleus_od=1.0,
        chromatin=0.2,
        cyto_e=0.22,
        cyto_h=0.28,
        cyto_texture=0.7,
        membrane_e=0.05,
        library=0.8,
    ),
    "B cell": CellType(**{**_LYMPHOCYTE, "radius": 4.4, "nucleus_a": 3.2, "nucleus_b": 3.0, "nucleus_od": 1.15}),
    "T cell CD4": CellType(**_LYMPHOCYTE),
    "T cell CD8": CellType(**_LYMPHOCYTE),
    "Tregs": CellType(**_LYMPHOCYTE),
    "Macrophages M0": CellType(**_MACROPHAGE),
    "Macrophages M2": CellType(**{**_MACROPHAGE, "radius": 8.0, "cyto_e": 0.34, "cyto_texture": 0.65}),
    "plasma cell": CellType(
        radius=5.2,
        radius_cv=0.1,
        core=0.85,
        nucleus_a=2.9,
        nucleus_b=2.7,
        nucleus_offset=0.42,
        nucleus_od=1.05,
        rim_od=0.35,
        chromatin=0.5,
        coarse=True,
        cyto_e=0.26,
        cyto_h=0.22,
        cyto_texture=0.15,
        membrane_e=0.05,
        library=1.3,
    ),
}

TYPE_NAMES: tuple[str, ...] = tuple(CELL_TYPES)
TYPE_INDEX: dict[str, int] = {name: i for i, name in enumerate(TYPE_NAMES)}
assert all(t in CELL_TYPES for t in IMMUNE_TYPES)

#: Niches of the layout (``cell_table.obs["niche"]``), by code.
NICHES: tuple[str, ...] = ("glass", "tumor_nest", "stroma", "tumor_border", "fat", "lymphoid_aggregate", "vessel")
NICHE_INDEX: dict[str, int] = {name: i for i, name in enumerate(NICHES)}
