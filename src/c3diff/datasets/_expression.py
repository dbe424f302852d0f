"""Expression model: cell-type programmes over the gene panel, per-cell counts and transcript positions.

Genes come in three kinds:

``type_linked``
    Expression depends on the cell type (from the panel's ``group`` column, the immune markers of :doc:`/method`,
    *Cell-type map*, and known biology), so histology predicts them partly. A few tumour genes also vary between nests
    (clones) and the proliferation genes switch on in cycling tumour cells (whose nuclei are drawn darker).
``spatial_field``
    The same in every cell type, modulated by smooth random fields that have nothing to do with the tissue structure:
    histology cannot predict them; only the low-resolution counts can.
``housekeeping``
    The same in every cell type; they follow library size (cell size and density) only.

Counts are gamma-Poisson (negative binomial) per cell and gene around ``library x programme``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from c3diff._constants import IMMUNE_TYPES
from c3diff.datasets._celltypes import CELL_TYPES, TYPE_INDEX, TYPE_NAMES
from c3diff.datasets._fields import gaussian_field, sample

_T = len(TYPE_NAMES)

#: Which simulated types express the genes of each panel group (relative weights).
GROUP_TYPES: dict[str, dict[str, float]] = {
    "Breast cancer": {"Tumor": 1.0},
    "Breast glandular cells": {"Tumor": 0.8, "Myoepithelial": 0.2},
    "Epithelial cells": {"Tumor": 1.0, "Myoepithelial": 0.5},
    "Breast myoepithelial cells": {"Myoepithelial": 1.0, "Tumor": 0.04},
    "Smooth muscle cells": {"Smooth muscle": 1.0, "Myoepithelial": 0.3, "Fibroblast": 0.08},
    "Fibroblasts": {"Fibroblast": 1.0, "Smooth muscle": 0.1},
    "Endothelial cells": {"Endothelial": 1.0},
    "Adipocytes": {"Adipocyte": 1.0, "Endothelial": 0.3},
    "Macrophages": {"Macrophages M0": 0.8, "Macrophages M2": 0.8},
    "Monocytes": {"Macrophages M0": 0.6, "Macrophages M2": 0.3},
    "Dendritic cells": {"Macrophages M0": 0.3, "B cell": 0.15},
    "T cells": {"T cell CD4": 0.7, "T cell CD8": 0.7, "Tregs": 0.7},
    "NK cells": {"T cell CD8": 0.6},
    "B cells": {"B cell": 0.8, "plasma cell": 0.3},
    "Mast cells": {"Mast cell": 1.0},
    "Immune cells": {**{t: 1.0 for t in IMMUNE_TYPES}, "Mast cell": 0.5},
}

_T_CELL = {"T cell CD4": 1.0, "T cell CD8": 1.0, "Tregs": 1.0}
#: Explicit programmes (override the group): the immune markers (:doc:`/method`, *Cell-type map*), specific enough that
#: a marker-average argmax recovers the immune types, plus genes whose panel group is empty but whose biology is known.
GENE_TYPES: dict[str, dict[str, float]] = {
    # B cell
    **{g: {"B cell": 1.0} for g in ("MS4A1", "CD19", "BANK1", "TCL1A")},
    "CD79A": {"B cell": 1.0, "plasma cell": 0.15},
    "CD79B": {"B cell": 1.0, "plasma cell": 0.08},
    # T cells (shared), CD4 and CD8 specific
    **{g: _T_CELL for g in ("CD3E", "CD3G", "TRAC")},
    "CD4": {"T cell CD4": 1.0, "Tregs": 0.6, "Macrophages M0": 0.15, "Macrophages M2": 0.15},
    **{g: {"T cell CD4": 1.0, "T cell CD8": 0.25, "Tregs": 0.12} for g in ("IL7R", "CCR7", "TCF7")},
    "LTB": {"T cell CD4": 1.0, "T cell CD8": 0.3, "Tregs": 0.15, "B cell": 0.15},
    "CD8A": {"T cell CD8": 1.0},
    **{g: {"T cell CD8": 1.0, "T cell CD4": 0.06} for g in ("GZMA", "GZMK", "PRF1", "NKG7")},
    "CCL5": {"T cell CD8": 1.0, "T cell CD4": 0.12},
    # Tregs
    **{g: {"Tregs": 1.0, "T cell CD4": 0.05} for g in ("FOXP3", "IL2RA", "CTLA4")},
    "TIGIT": {"Tregs": 1.0, "T cell CD8": 0.12, "T cell CD4": 0.05},
    # macrophages: shared lineage genes high in M0; M2 genes specific
    "CD68": {"Macrophages M0": 1.0, "Macrophages M2": 0.5},
    "AIF1": {"Macrophages M0": 1.0, "Macrophages M2": 0.5},
    "LYZ": {"Macrophages M0": 1.0, "Macrophages M2": 0.25},
    "IGSF6": {"Macrophages M0": 1.0, "Macrophages M2": 0.2},
    "CXCL5": {"Macrophages M0": 1.0, "Macrophages M2": 0.08},
    "APOC1": {"Macrophages M0": 1.0, "Macrophages M2": 0.3},
    **{g: {"Macrophages M2": 1.0, "Macrophages M0": 0.1} for g in ("CD163", "MRC1", "C1QA", "C1QC")},
    # plasma cells
    "MZB1": {"plasma cell": 1.0, "B cell": 0.1},
    "TNFRSF17": {"plasma cell": 1.0},
    "CD27": {"plasma cell": 1.0, "B cell": 0.15, "T cell CD4": 0.1},
    "SLAMF7": {"plasma cell": 1.0, "T cell CD8": 0.08},
    "PRDM1": {"plasma cell": 1.0, "T cell CD8": 0.05},
    # genes without a panel group
    "KIT": {"Mast cell": 1.0},
    "KRT14": {"Myoepithelial": 1.0, "Tumor": 0.05},
    "SFRP1": {"Myoepithelial": 1.0},
    "EGFR": {"Myoepithelial": 0.6, "Tumor": 0.15},
    "AQP3": {"Tumor": 0.8, "Myoepithelial": 0.2},
    "PGR": {"Tumor": 1.0},
    "TFAP2A": {"Tumor": 0.8, "Myoepithelial": 0.4},
    "MUC6": {"Tumor": 0.5},
    "SCGB2A1": {"Tumor": 0.6},
    "OPRPN": {"Tumor": 0.3},
    "C6orf132": {"Tumor": 0.7},
    "LRRC15": {"Fibroblast": 1.0},
    "CXCL12": {"Fibroblast": 1.0, "Endothelial": 0.3},
    "PTGDS": {"Fibroblast": 0.8, "Smooth muscle": 0.3},
    "S100A4": {"Fibroblast": 0.8, "Macrophages M0": 0.5, "Macrophages M2": 0.5, "T cell CD4": 0.4, "T cell CD8": 0.4},
    "ZEB1": {"Fibroblast": 0.8, "Smooth muscle": 0.3},
    "ZEB2": {"Fibroblast": 0.6, "Macrophages M2": 0.5, "Macrophages M0": 0.5},
    "CAV1": {"Endothelial": 0.8, "Adipocyte": 0.8, "Myoepithelial": 0.5, "Fibroblast": 0.3},
    "NOSTRIN": {"Endothelial": 1.0},
    "TCF4": {"Endothelial": 0.6, "Fibroblast": 0.3},
    "ITGAM": {"Macrophages M0": 0.8, "Macrophages M2": 0.5},
    "RORC": {"T cell CD4": 0.4},
}

#: Genes driven by smooth spatial random fields, independent of cell type (no panel group, not in GENE_TYPES).
SPATIAL_GENES: tuple[str, ...] = (
    "STC1",
    "TCIM",
    "LDHB",
    "CXCL16",
    "MAP3K8",
    "PDE4A",
    "SVIL",
    "TIFA",
    "TRAF4",
    "CCPG1",
)
#: Tumour genes whose level differs between nests (clonal heterogeneity).
CLONAL_GENES: tuple[str, ...] = ("ESR1", "PGR", "ERBB2", "FOXA1", "GATA3", "AR", "KRT7", "CEACAM6", "TACSTD2", "CCND1")
#: Proliferation genes, high in cycling tumour cells.
CYCLING_GENES: tuple[str, ...] = ("MKI67", "TOP2A", "CENPF", "PCLAF")
#: The immune markers (:doc:`/method`, *Cell-type map*) get a higher base level so they are well sampled.
_MARKER_BOOST = 3.0
_LEAK = 0.01  # every gene is detected at a low level in every type (ambient RNA, mis-assignment)
N_SPATIAL_FIELDS = 3


@dataclass
class Programmes:
    """Type x gene expression programme over the full panel."""

    genes: list[str]
    weights: np.ndarray  # (T, G) fractions of a cell's library, rows sum to 1 (before spatial/cell modulation)
    kinds: np.ndarray  # (G,) "type_linked" | "spatial_field" | "housekeeping"
    dispersion: np.ndarray  # (G,) negative-binomial size parameter
    field_index: np.ndarray  # (G,) which spatial field drives the gene (-1: none)
    field_sign: np.ndarray  # (G,) +1 / -1


def build_programmes(rng: np.random.Generator, panel: pd.DataFrame) -> Programmes:
    """Programmes for every gene of ``panel`` (columns ``gene``, ``group``)."""
    genes = panel["gene"].tolist()
    groups = panel["group"].fillna("").tolist()
    n = len(genes)
    level = np.exp(rng.normal(0.0, 0.7, n))
    W = np.zeros((_T, n))
    kinds = np.empty(n, dtype=object)
    marker_genes = {g for g, m in GENE_TYPES.items() if any(t in IMMUNE_TYPES for t in m)}
    for k, (gene, group) in enumerate(zip(genes, groups, strict=True)):
        mix = GENE_TYPES.get(gene) or GROUP_TYPES.get(group)
        if gene in SPATIAL_GENES:
            kinds[k] = "spatial_field"
            W[:, k] = 0.6 * level[k]
        elif mix:
            kinds[k] = "type_linked"
            boost = _MARKER_BOOST * max(level[k], 1.0) / level[k] if gene in marker_genes else 1.0
            jitter = np.exp(rng.normal(0.0, 0.25, _T))
            for t, w in mix.items():
                W[TYPE_INDEX[t], k] = w * level[k] * boost * jitter[TYPE_INDEX[t]]
            W[:, k] += _LEAK * level[k]
        else:
            kinds[k] = "housekeeping"
            W[:, k] = 0.3 * level[k]
    W /= W.sum(axis=1, keepdims=True)
    field_index = np.full(n, -1)
    spatial = np.flatnonzero(kinds == "spatial_field")
    field_index[spatial] = np.arange(spatial.size) % N_SPATIAL_FIELDS
    field_sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return Programmes(
        genes=genes,
        weights=W,
        kinds=kinds.astype(str),
        dispersion=rng.uniform(1.5, 6.0, n),
        field_index=field_index,
        field_sign=field_sign,
    )


def simulate_counts(
    rng: np.random.Generator,
    prog: Programmes,
    cells,
    *,
    width: float,
    height: float,
    transcripts_per_cell: float,
    spatial_field_scale: float,
    spatial_field_strength: float = 0.9,
    cycling_fraction: float = 0.2,
) -> tuple[sparse.csr_matrix, dict[str, np.ndarray]]:
    """Gamma-Poisson counts ``(n_cells, n_genes)`` (CSR, int32) and per-cell extras.

    The extras are ``library`` (per cell), ``cycling`` (per cell) and ``mu``, the expected counts ``(n_cells,
    n_genes)`` given the cells (library, type programme, spatial fields, clones, cycling): the mean of the gamma-Poisson
    draw. Returning it draws no random numbers, so the counts do not depend on whether it is used.
    """
    n = cells.n
    types = cells.type.astype(np.int64)
    # library: transcripts per cell grow with cell area (sub-linearly), times a per-type factor and cell noise
    ref_area = np.pi * 6.0**2
    lib_type = np.array([CELL_TYPES[t].library for t in TYPE_NAMES])
    library = (
        transcripts_per_cell
        * lib_type[types]
        * (np.pi * cells.radius**2 / ref_area) ** 0.6
        * np.exp(rng.normal(0.0, 0.3, n))
    )
    mu = prog.weights[types] * library[:, None]  # (n, G)

    # smooth spatial fields, sampled at the cell centres, for the spatial-field genes
    s = max(spatial_field_scale / 6.0, 4.0)
    shape = (int(np.ceil(height / s)) + 1, int(np.ceil(width / s)) + 1)
    fields = np.stack(
        [
            sample(gaussian_field(rng, shape, s, spatial_field_scale), s, cells.y, cells.x)
            for _ in range(N_SPATIAL_FIELDS)
        ]
    )  # (F, n)
    sp = np.flatnonzero(prog.field_index >= 0)
    a = spatial_field_strength
    mu[:, sp] *= np.exp(a * prog.field_sign[sp][None, :] * fields[prog.field_index[sp]].T - a * a / 2)

    # clonal heterogeneity between tumour nests
    gidx = {g: i for i, g in enumerate(prog.genes)}
    clonal = [gidx[g] for g in CLONAL_GENES if g in gidx]
    n_nests = int(cells.nest.max()) if n else 0
    if clonal and n_nests:
        factors = np.exp(rng.normal(0.0, 0.6, (n_nests + 1, len(clonal))))
        factors[0] = 1.0
        mu[:, clonal] *= factors[cells.nest]
    # cycling tumour cells
    cycling = (types == TYPE_INDEX["Tumor"]) & (rng.random(n) < cycling_fraction)
    cyc = [gidx[g] for g in CYCLING_GENES if g in gidx]
    if cyc:
        mu[:, cyc] *= np.where(cycling, 5.0, 0.25)[:, None]

    theta = prog.dispersion[None, :]
    lam = rng.gamma(theta, 1.0, size=mu.shape) * (mu / theta)
    counts = rng.poisson(lam).astype(np.int32)
    return sparse.csr_matrix(counts), {"library": library, "cycling": cycling, "mu": mu}


#: Transcripts of the nucleus share fall uniformly in the nucleus ellipse shrunk by this factor.
NUCLEUS_FILL = 0.95
#: Vacuolated cells (adipocytes) keep their cytoplasmic transcripts outside this fraction of their radius.
VACUOLE_INNER = 0.8
#: Draws of a cytoplasmic position inside the cell's label pixels before the transcript goes to the nucleus.
CYTOPLASM_TRIES = 4


def nucleus_share(radius: np.ndarray, nuc_a: np.ndarray, nuc_b: np.ndarray) -> np.ndarray:
    """Share of a cell's transcripts drawn in its nucleus: larger for cells that are mostly nucleus."""
    nuc_area = np.pi * nuc_a * nuc_b
    return np.clip(1.2 * nuc_area / (np.pi * radius**2) + 0.15, 0.15, 0.9)


def place_transcripts(
    rng: np.random.Generator,
    counts: sparse.csr_matrix,
    cells,
    labels: np.ndarray,
    label_pixel_size: float,
    *,
    width: float,
    height: float,
    diffusion: float = 0.6,
) -> dict[str, np.ndarray]:
    """Positions of every counted transcript, inside its cell.

    A share of each cell's transcripts (larger for cells that are mostly nucleus) falls in the nucleus ellipse; the
    rest spreads over the cytoplasm, i.e. the part of the cell's disc that the label raster gives to the cell (a rim
    for adipocytes); then a little diffusion.
    """
    counts = counts.tocsr()
    row_of_entry = np.repeat(np.arange(cells.n), np.diff(counts.indptr))
    cell = np.repeat(row_of_entry, counts.data)  # grouped by cell, genes in panel order within a cell
    gene = np.repeat(counts.indices, counts.data).astype(np.int32)
    m = cell.size
    radius = cells.radius[cell]
    p_nuc = nucleus_share(cells.radius, cells.nuc_a, cells.nuc_b)
    in_nuc = rng.random(m) < p_nuc[cell]
    x = np.empty(m)
    y = np.empty(m)

    def nucleus(idx: np.ndarray) -> None:
        c = cell[idx]
        r = NUCLEUS_FILL * np.sqrt(rng.random(idx.size))
        phi = rng.uniform(0, 2 * np.pi, idx.size)
        u, v = cells.nuc_a[c] * r * np.cos(phi), cells.nuc_b[c] * r * np.sin(phi)
        th = cells.nuc_theta[c]
        x[idx] = cells.nuc_x[c] + u * np.cos(th) - v * np.sin(th)
        y[idx] = cells.nuc_y[c] + u * np.sin(th) + v * np.cos(th)

    nucleus(np.flatnonzero(in_nuc))
    todo = np.flatnonzero(~in_nuc)
    vac = np.array([CELL_TYPES[t].vacuole for t in TYPE_NAMES])[cells.type]
    h, w = labels.shape
    for _ in range(CYTOPLASM_TRIES):
        if todo.size == 0:
            break
        c = cell[todo]
        inner = np.where(vac[c], VACUOLE_INNER, 0.0)
        r = radius[todo] * np.sqrt(rng.uniform(inner**2, 1.0))
        phi = rng.uniform(0, 2 * np.pi, todo.size)
        xx = cells.x[c] + r * np.cos(phi)
        yy = cells.y[c] + r * np.sin(phi)
        i = np.clip((yy / label_pixel_size).astype(np.int64), 0, h - 1)
        j = np.clip((xx / label_pixel_size).astype(np.int64), 0, w - 1)
        ok = labels[i, j] == c + 1
        x[todo[ok]], y[todo[ok]] = xx[ok], yy[ok]
        todo = todo[~ok]
    if todo.size:  # cells squeezed to (almost) their nucleus keep these transcripts there
        in_nuc[todo] = True
        nucleus(todo)
    x += rng.normal(0.0, diffusion, m)
    y += rng.normal(0.0, diffusion, m)
    return {
        "x": np.clip(x, 0.0, width * (1 - 1e-7)),
        "y": np.clip(y, 0.0, height * (1 - 1e-7)),
        "gene": gene,
        "cell_id": (cell + 1).astype(np.int32),
        "overlaps_nucleus": in_nuc,
    }


def background_transcripts(
    rng: np.random.Generator,
    tissue: np.ndarray,
    spacing: float,
    profile: np.ndarray,
    *,
    width: float,
    height: float,
    rate_tissue: float,
    rate_glass: float,
) -> dict[str, np.ndarray]:
    """Unassigned transcripts (ambient RNA, off-target signal): uniform over tissue and, rarer, over glass."""
    rate = np.where(tissue, rate_tissue, rate_glass).astype(np.float64) * spacing**2
    counts = rng.poisson(rate.ravel())
    pix = np.repeat(np.arange(counts.size), counts)
    gw = tissue.shape[1]
    y = (pix // gw + rng.random(pix.size)) * spacing
    x = (pix % gw + rng.random(pix.size)) * spacing
    keep = (x < width) & (y < height)
    x, y = x[keep], y[keep]
    p = profile / profile.sum()
    gene = rng.choice(p.size, size=x.size, p=p).astype(np.int32)
    return {
        "x": x,
        "y": y,
        "gene": gene,
        "cell_id": np.zeros(x.size, np.int32),
        "overlaps_nucleus": np.zeros(x.size, bool),
    }
