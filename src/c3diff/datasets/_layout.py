"""Tissue layout: tissue mask, niches, vessels, cell positions and types, and the cell-label raster.

The section is first described on a coarse *field grid* (4 um pixels): a tissue mask (the rest is glass), fat lobules,
tumour nests (some in situ, rimmed by myoepithelial cells), stroma, a tumour-border band, lymphoid aggregates (B-cell
follicle inside a T-cell zone) and vessels. Per field pixel, a mixture of cell types gives the expected cell area, hence
a candidate density; candidates are thinned by a hard-core (random sequential adsorption) rule so that cells do not
overlap, which packs tumour nests and lymphoid aggregates densely and leaves stroma sparse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from c3diff.datasets._celltypes import CELL_TYPES, NICHE_INDEX, TYPE_INDEX, TYPE_NAMES
from c3diff.datasets._fields import gaussian_field, lookup, sample

#: Pixel size (um) of the field grid on which niches and type mixtures are defined.
FIELD_SPACING = 4.0
#: Width (um) of the stroma band around tumour nests that is enriched in infiltrating immune cells.
BORDER_WIDTH = 30.0

_T = len(TYPE_NAMES)
_TI = TYPE_INDEX


@dataclass
class LayoutParams:
    """Knobs of the layout (see :func:`c3diff.datasets.simulate_section` for their meaning)."""

    tissue_fraction: float = 0.8
    tumor_fraction: float = 0.3
    fat_fraction: float = 0.15
    insitu_fraction: float = 0.3
    n_lymphoid_aggregates: int | None = None
    vessel_density: float = 30.0
    immune_infiltration: float = 1.0
    cell_density: float = 1.0


@dataclass
class Cells:
    """Per-cell arrays (length ``n``; cell id = index + 1)."""

    x: np.ndarray
    y: np.ndarray
    type: np.ndarray  # int16 index into TYPE_NAMES
    radius: np.ndarray
    niche: np.ndarray  # int8 index into NICHES
    nest: np.ndarray  # int32 tumour-nest id (0 = not in a nest)
    nuc_x: np.ndarray  # nucleus centre
    nuc_y: np.ndarray
    nuc_a: np.ndarray  # nucleus semi-axes
    nuc_b: np.ndarray
    nuc_theta: np.ndarray  # long-axis angle in the (x, y) plane, radians
    nuc_bend: np.ndarray  # bean bend (fraction of the short semi-axis)

    @property
    def n(self) -> int:
        return len(self.x)


@dataclass
class Layout:
    """Everything the expression model and the renderer need to know about the tissue."""

    width: float
    height: float
    spacing: float
    tissue: np.ndarray  # bool field grid
    niche: np.ndarray  # int8 field grid
    nest: np.ndarray  # int32 field grid of tumour-nest ids
    ecm: np.ndarray  # float32 field grid: eosin density of the extracellular matrix
    ecm_h: np.ndarray  # float32 field grid: its haematoxylin density
    fibrous: np.ndarray  # float32 field grid: 0 = amorphous matrix, 1 = collagen fibres
    fibre_c2: np.ndarray  # float32 field grid: cos(2 theta) of the local fibre direction theta
    fibre_s2: np.ndarray  # float32 field grid: sin(2 theta)
    vessels: dict[str, np.ndarray]
    cells: Cells
    n_insitu_nests: int = 0
    n_lymphoid_aggregates: int = 0


# --------------------------------------------------------------------------------------------- niches
def _quantile_threshold(score: np.ndarray, mask: np.ndarray, fraction: float) -> float:
    values = score[mask]
    if values.size == 0 or fraction <= 0:
        return np.inf
    if fraction >= 1:
        return -np.inf
    return float(np.quantile(values, 1.0 - fraction))


def _remove_small(mask: np.ndarray, min_pixels: int) -> tuple[np.ndarray, np.ndarray, int]:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask, lab.astype(np.int32), 0
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    mask = keep[lab]
    lab, n = ndi.label(mask)
    return mask, lab.astype(np.int32), int(n)


def _niches(rng: np.random.Generator, width: float, height: float, p: LayoutParams) -> dict:
    s = FIELD_SPACING
    gh, gw = int(np.ceil(height / s)), int(np.ceil(width / s))
    shape = (gh, gw)
    yy, xx = np.meshgrid((np.arange(gh) + 0.5) * s, (np.arange(gw) + 0.5) * s, indexing="ij")

    # tissue: a large smooth blob pushed towards one side, so that glass sits along part of the border
    big = gaussian_field(rng, shape, s, float(np.clip(0.3 * min(width, height), 150.0, 600.0)))
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * (xx - width / 2) + np.sin(ang) * (yy - height / 2)) / (0.5 * max(width, height))
    tscore = big + 1.5 * ramp.astype(np.float32)
    tissue = tscore > _quantile_threshold(tscore, np.ones(shape, bool), p.tissue_fraction)
    if p.tissue_fraction < 1:
        tissue, _, _ = _remove_small(tissue, int(np.ceil(2500.0 / s**2)))
    n_tissue = int(tissue.sum())

    # fat lobules: large, smooth
    fscore = gaussian_field(rng, shape, s, 200.0) + 0.5 * gaussian_field(rng, shape, s, 50.0)
    fat = tissue & (fscore > _quantile_threshold(fscore, tissue, p.fat_fraction))
    fat, _, _ = _remove_small(fat, int(np.ceil(4000.0 / s**2)))

    # tumour nests: a medium-scale field thresholded into islands and cords, concentrated in a tumour-rich region,
    # kept away from fat by a thin stroma margin
    dist_fat = ndi.distance_transform_edt(~fat) * s if fat.any() else np.full(shape, np.inf, np.float32)
    uscore = (
        gaussian_field(rng, shape, s, 40.0)
        + 0.45 * gaussian_field(rng, shape, s, 12.0)
        + 0.45 * gaussian_field(rng, shape, s, 400.0)
    )
    eligible = tissue & ~fat & (dist_fat > 15.0)
    frac = min(1.0, p.tumor_fraction * n_tissue / max(int(eligible.sum()), 1))
    tumor = eligible & (uscore > _quantile_threshold(uscore, eligible, frac))
    tumor, nest, n_nests = _remove_small(tumor, int(np.ceil(400.0 / s**2)))

    dist_out = (
        (ndi.distance_transform_edt(~tumor) * s).astype(np.float32)
        if tumor.any()
        else np.full(shape, np.inf, np.float32)
    )
    dist_in = (ndi.distance_transform_edt(tumor) * s).astype(np.float32)
    dist_glass = (
        (ndi.distance_transform_edt(tissue) * s).astype(np.float32)
        if not tissue.all()
        else np.full(shape, np.inf, np.float32)
    )

    # in-situ nests (ductal carcinoma in situ): a myoepithelial rim; chosen among the smaller, rounder nests
    insitu = np.zeros(n_nests + 1, bool)
    if n_nests:
        sizes = np.bincount(nest.ravel(), minlength=n_nests + 1)[1:] * s**2
        candidates = np.flatnonzero(sizes < 150_000.0) + 1
        n_insitu = round(p.insitu_fraction * len(candidates))
        if n_insitu:
            insitu[rng.choice(candidates, size=n_insitu, replace=False)] = True

    # lymphoid aggregates: follicle-like ellipses in stroma, near but not inside tumour
    stroma_like = tissue & ~tumor
    n_agg = p.n_lymphoid_aggregates
    if n_agg is None:
        n_agg = int(rng.poisson(1.2 * n_tissue * s**2 / 1e6))
        if int(stroma_like.sum()) * s**2 > 60_000:
            n_agg = max(n_agg, 1)
    rho = np.full(shape, np.inf, np.float32)
    wobble = 1.0 + 0.12 * gaussian_field(rng, shape, s, 25.0)
    placed = 0
    for _ in range(n_agg):
        # radius 55-150 um, smaller in small sections so that an aggregate does not swallow them
        r = float(rng.uniform(55.0, 150.0)) * float(np.sqrt(min(1.0, n_tissue * s**2 / 1.5e6)) * 0.5 + 0.5)
        ok = stroma_like & (dist_out > 0.3 * r) & (dist_glass > 0.6 * r) & ~np.isfinite(rho)
        if not ok.any():
            ok = stroma_like & ~np.isfinite(rho)
        if not ok.any():
            break
        k = rng.choice(np.flatnonzero(ok.ravel()))
        cy, cx = (k // gw + 0.5) * s, (k % gw + 0.5) * s
        asp = float(rng.uniform(1.0, 1.5))
        a, b, th = r * np.sqrt(asp), r / np.sqrt(asp), float(rng.uniform(0, np.pi))
        i0, i1 = max(0, int((cy - 2 * a) / s)), min(gh, int((cy + 2 * a) / s) + 1)
        j0, j1 = max(0, int((cx - 2 * a) / s)), min(gw, int((cx + 2 * a) / s) + 1)
        dy, dx = yy[i0:i1, j0:j1] - cy, xx[i0:i1, j0:j1] - cx
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        rr = np.sqrt((u / a) ** 2 + (v / b) ** 2) * wobble[i0:i1, j0:j1]
        rho[i0:i1, j0:j1] = np.minimum(rho[i0:i1, j0:j1], rr)
        placed += 1

    niche = np.full(shape, NICHE_INDEX["glass"], np.int8)
    niche[tissue] = NICHE_INDEX["stroma"]
    niche[tissue & (dist_out <= BORDER_WIDTH) & ~tumor] = NICHE_INDEX["tumor_border"]
    niche[fat] = NICHE_INDEX["fat"]
    niche[tumor] = NICHE_INDEX["tumor_nest"]
    niche[stroma_like & (rho < 1.0)] = NICHE_INDEX["lymphoid_aggregate"]

    return {
        "shape": shape,
        "yy": yy,
        "xx": xx,
        "tissue": tissue,
        "fat": fat,
        "tumor": tumor,
        "nest": nest,
        "insitu": insitu,
        "dist_out": dist_out,
        "dist_in": dist_in,
        "dist_glass": dist_glass,
        "rho": rho,
        "niche": niche,
        "n_lymphoid": placed,
    }


# --------------------------------------------------------------------------------------------- vessels
def _vessels(rng: np.random.Generator, g: dict, p: LayoutParams) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Vessel ellipses (lumen semi-axes a >= b, angle) and the endothelial / smooth-muscle cells of their walls."""
    s = FIELD_SPACING
    niche = g["niche"]
    host = np.isin(niche, [NICHE_INDEX["stroma"], NICHE_INDEX["tumor_border"], NICHE_INDEX["fat"]])
    area_mm2 = host.sum() * s**2 / 1e6
    n_target = int(rng.poisson(p.vessel_density * area_mm2))
    host_idx = np.flatnonzero(host.ravel())
    gw = niche.shape[1]
    rows: list[tuple] = []
    tries = 0
    while len(rows) < n_target and tries < 6 * n_target and host_idx.size:
        tries += 1
        k = host_idx[rng.integers(host_idx.size)]
        cy, cx = (k // gw + rng.random()) * s, (k % gw + rng.random()) * s
        r = float(np.clip(np.exp(rng.normal(np.log(6.5), 0.55)), 2.5, 40.0))
        asp = float(min(1.0 + rng.exponential(0.35), 2.5))
        a, b = r * np.sqrt(asp), r / np.sqrt(asp)
        layers = 0 if r < 9 else (1 if r < 20 else 2)
        outer = a + 4.0 + 6.0 * layers
        if g["dist_out"][k // gw, k % gw] < outer + 5 or g["dist_glass"][k // gw, k % gw] < outer + 5:
            continue
        if g["rho"][k // gw, k % gw] < 1.3:
            continue
        if any((cy - q[0]) ** 2 + (cx - q[1]) ** 2 < (outer + q[5] + 6.0) ** 2 for q in rows):
            continue
        rows.append((cy, cx, a, b, float(rng.uniform(0, np.pi)), outer, layers, float(rng.uniform(0, 0.8))))
    arr = np.array(rows, dtype=np.float64).reshape(-1, 8)
    vessels = {
        "y": arr[:, 0],
        "x": arr[:, 1],
        "a": arr[:, 2],
        "b": arr[:, 3],
        "theta": arr[:, 4],
        "outer": arr[:, 5],
        "layers": arr[:, 6].astype(np.int64),
        "rbc_fill": arr[:, 7],
    }
    wall_cells: list[dict] = []
    for cy, cx, a, b, th, _outer, layers, _fill in rows:
        rings = [(1.8, "Endothelial", 13.0)] + [(5.5 + 5.5 * i, "Smooth muscle", 10.0) for i in range(int(layers))]
        for off, name, step in rings:
            ea, eb = a + off, b + off
            perim = np.pi * (3 * (ea + eb) - np.sqrt((3 * ea + eb) * (ea + 3 * eb)))
            n = max(2, round(perim / step))
            t = (np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
            u, v = ea * np.cos(t), eb * np.sin(t)
            du, dv = -ea * np.sin(t), eb * np.cos(t)
            c, sn = np.cos(th), np.sin(th)
            wall_cells.append(
                {
                    "x": cx + u * c - v * sn,
                    "y": cy + u * sn + v * c,
                    "theta": np.arctan2(du * sn + dv * c, du * c - dv * sn),
                    "type": _TI[name],
                }
            )
    return vessels, wall_cells


def vessel_mask(
    vessels: dict[str, np.ndarray], shape: tuple[int, int], spacing: float, grow: float = 0.0, use_outer: bool = False
) -> np.ndarray:
    """Boolean raster (pixel centres) of vessel lumens grown by ``grow`` um (or of whole vessels with their walls)."""
    mask = np.zeros(shape, bool)
    for cy, cx, a, b, th, outer in zip(
        vessels["y"], vessels["x"], vessels["a"], vessels["b"], vessels["theta"], vessels["outer"], strict=True
    ):
        ga, gb = (outer, b + (outer - a)) if use_outer else (a + grow, b + grow)
        i0, i1 = max(0, int((cy - ga) / spacing) - 1), min(shape[0], int((cy + ga) / spacing) + 2)
        j0, j1 = max(0, int((cx - ga) / spacing) - 1), min(shape[1], int((cx + ga) / spacing) + 2)
        if i0 >= i1 or j0 >= j1:
            continue
        dy = ((np.arange(i0, i1) + 0.5) * spacing - cy)[:, None]
        dx = ((np.arange(j0, j1) + 0.5) * spacing - cx)[None, :]
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        mask[i0:i1, j0:j1] |= (u / ga) ** 2 + (v / gb) ** 2 <= 1.0
    return mask


# --------------------------------------------------------------------------------------------- type mixtures
def _mix(weights: dict[str, float | np.ndarray]) -> dict[int, np.ndarray | float]:
    total = sum(weights.values())
    return {_TI[k]: v / total for k, v in weights.items()}


def _type_probabilities(rng: np.random.Generator, g: dict, p: LayoutParams) -> tuple[np.ndarray, np.ndarray]:
    """Per field pixel: probabilities of each cell type ``(T, gh, gw)`` and the area to be covered by cells."""
    s = FIELD_SPACING
    shape = g["shape"]
    niche = g["niche"]
    P = np.zeros((_T, *shape), np.float32)
    occ = np.zeros(shape, np.float32)
    infl = gaussian_field(rng, shape, s, 150.0)
    # plasma cells gather in dense patches of inflamed stroma, M2 macrophages in looser ones (heavy-tailed fields)
    plasma = np.clip(np.exp(1.8 * gaussian_field(rng, shape, s, 50.0) - 1.8), 0, 2) / 2
    macro = np.exp(0.8 * gaussian_field(rng, shape, s, 60.0) - 0.3)
    cellular = np.exp(0.35 * gaussian_field(rng, shape, s, 100.0))
    ii = p.immune_infiltration

    def put(mask: np.ndarray, parts: list[tuple[np.ndarray | float, dict[int, np.ndarray | float]]]) -> None:
        for frac, mix in parts:
            frac_m = frac[mask] if isinstance(frac, np.ndarray) else frac
            for t, w in mix.items():
                P[t][mask] += frac_m * (w[mask] if isinstance(w, np.ndarray) else w)

    # stroma, with a lymphoid halo around aggregates
    m = niche == NICHE_INDEX["stroma"]
    halo = np.clip((1.6 - g["rho"]) / 0.6, 0, 1)
    imm = np.clip(0.12 * np.exp(0.7 * infl) * ii + 0.5 * halo + 0.6 * plasma * ii, 0, 0.85)
    stroma_imm = _mix(
        {
            "plasma cell": 0.05 + 1.5 * plasma,
            "T cell CD4": 0.2 + 0.3 * halo,
            "T cell CD8": 0.14 + 0.1 * halo,
            "Macrophages M2": 0.16 * macro,
            "Macrophages M0": 0.05,
            "B cell": 0.05 + 0.1 * halo,
            "Tregs": 0.04 + 0.04 * halo,
            "Mast cell": 0.08,
        }
    )
    put(m, [(1 - imm, {_TI["Fibroblast"]: 1.0}), (imm, stroma_imm)])
    occ[m] = (0.16 * cellular + 0.3 * plasma * ii)[m]

    # tumour-border band: infiltrate of CD8 T cells and macrophages, fading with distance from the nest
    m = niche == NICHE_INDEX["tumor_border"]
    fade = 1.0 - 0.5 * np.clip(g["dist_out"] / BORDER_WIDTH, 0, 1)
    imm = np.clip(0.45 * np.exp(0.4 * infl) * ii * fade, 0, 0.85)
    border_imm = _mix(
        {
            "T cell CD8": 0.3,
            "Macrophages M2": 0.2 * macro,
            "Macrophages M0": 0.14,
            "T cell CD4": 0.14,
            "Tregs": 0.06,
            "plasma cell": 0.02 + 0.2 * plasma,
            "B cell": 0.04,
            "Mast cell": 0.02,
        }
    )
    put(m, [(1 - imm, {_TI["Fibroblast"]: 1.0}), (imm, border_imm)])
    occ[m] = (0.26 * cellular)[m]

    # tumour nests: tumour cells, a few intra-epithelial lymphocytes and macrophages; in-situ nests are rimmed
    m = niche == NICHE_INDEX["tumor_nest"]
    rim = g["insitu"][g["nest"]] & (g["dist_in"] <= 1.5 * s)
    edge = 1.0 + (g["dist_in"] < 20.0)
    imm = np.clip(0.03 * np.exp(0.5 * infl) * ii * edge, 0, 0.5)
    tum_imm = _mix({"T cell CD8": 0.5, "Macrophages M2": 0.25, "Macrophages M0": 0.15, "T cell CD4": 0.1})
    mm = m & ~rim
    put(mm, [(1 - imm, {_TI["Tumor"]: 1.0}), (imm, tum_imm)])
    put(m & rim, [(1.0, {_TI["Myoepithelial"]: 0.9, _TI["Tumor"]: 0.1})])
    occ[m] = 4.0

    # fat
    m = niche == NICHE_INDEX["fat"]
    put(m, [(1.0, _mix({"Adipocyte": 0.93, "Fibroblast": 0.04, "Macrophages M2": 0.015, "Endothelial": 0.015}))])
    occ[m] = 5.0

    # lymphoid aggregates: B-cell follicle inside a T-cell zone
    m = niche == NICHE_INDEX["lymphoid_aggregate"]
    core = np.clip((0.62 - g["rho"]) / 0.12 + 0.5, 0, 1)
    follicle = _mix(
        {
            "B cell": 0.84,
            "T cell CD4": 0.06,
            "Macrophages M0": 0.04,
            "Tregs": 0.02,
            "T cell CD8": 0.02,
            "plasma cell": 0.02,
        }
    )
    tzone = _mix(
        {
            "T cell CD4": 0.42,
            "T cell CD8": 0.2,
            "Tregs": 0.1,
            "B cell": 0.12,
            "Macrophages M0": 0.04,
            "Macrophages M2": 0.03,
            "plasma cell": 0.05,
            "Fibroblast": 0.02,
            "Endothelial": 0.02,
        }
    )
    put(m, [(core, follicle), (1 - core, tzone)])
    occ[m] = 8.0

    occ *= g["tissue"]
    return P, occ


# --------------------------------------------------------------------------------------------- placement
def _hard_core(x: np.ndarray, y: np.ndarray, core: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Greedy maximal set of non-conflicting discs, in decreasing priority (random sequential adsorption)."""
    n = len(x)
    pts = np.column_stack([x, y])
    big = core > 12.0
    pairs = []
    small_idx = np.flatnonzero(~big)
    if small_idx.size > 1:
        tree = cKDTree(pts[small_idx])
        pr = tree.query_pairs(2 * float(core[small_idx].max()), output_type="ndarray")
        pairs.append(small_idx[pr])
    big_idx = np.flatnonzero(big)
    if big_idx.size:
        tree_all = cKDTree(pts)
        tree_big = cKDTree(pts[big_idx])
        dm = tree_big.sparse_distance_matrix(tree_all, float(core[big_idx].max() + core.max()), output_type="ndarray")
        pr = np.column_stack([big_idx[dm["i"]], dm["j"]])
        pairs.append(pr[pr[:, 0] != pr[:, 1]])
    if not pairs:
        return np.ones(n, bool)
    pr = np.concatenate(pairs)
    d2 = (x[pr[:, 0]] - x[pr[:, 1]]) ** 2 + (y[pr[:, 0]] - y[pr[:, 1]]) ** 2
    pr = pr[d2 < (core[pr[:, 0]] + core[pr[:, 1]]) ** 2]
    # symmetric adjacency in CSR form (rows = points with at least one conflict)
    src = np.concatenate([pr[:, 0], pr[:, 1]])
    dst = np.concatenate([pr[:, 1], pr[:, 0]])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    nodes, starts = np.unique(src, return_index=True)
    # local maxima of the priority among the surviving neighbours win, their neighbours lose; this reproduces the
    # sequential greedy choice exactly, in a few vectorised rounds
    keep = np.ones(n, bool)
    keep[nodes] = False
    alive = np.zeros(n, bool)
    alive[nodes] = True
    while alive.any():
        nb_pri = np.where(alive[dst], priority[dst], -np.inf)
        best = np.maximum.reduceat(nb_pri, starts)
        win = np.zeros(n, bool)
        win[nodes] = alive[nodes] & (priority[nodes] > best)
        keep |= win
        lose = np.zeros(n, bool)
        lose[dst[win[src]]] = True
        alive &= ~(win | lose)
    return keep


def _nuclei(rng: np.random.Generator, x, y, types, radius, theta_hint, g: dict) -> dict[str, np.ndarray]:
    """Nucleus centre, semi-axes, orientation and bend of every cell."""
    n = len(x)
    s = FIELD_SPACING
    a = np.array([CELL_TYPES[t].nucleus_a for t in TYPE_NAMES])[types]
    b = np.array([CELL_TYPES[t].nucleus_b for t in TYPE_NAMES])[types]
    size = np.exp(rng.normal(0, 1.0, n) * np.array([CELL_TYPES[t].nucleus_cv for t in TYPE_NAMES])[types])
    aspect = np.exp(rng.normal(0, 0.08, n))
    a, b = a * size * aspect, b * size / aspect
    orient = np.array([CELL_TYPES[t].orientation for t in TYPE_NAMES])[types]
    theta = rng.uniform(0, np.pi, n)
    # fibroblasts follow the collagen fibres
    m = orient == "fibre"
    theta[m] = 0.5 * np.arctan2(sample(g["fibre_s2"], s, y[m], x[m]), sample(g["fibre_c2"], s, y[m], x[m]))
    theta[m] += rng.normal(0, 0.15, m.sum())
    # myoepithelial cells lie along the nest boundary
    gy, gx = np.gradient(g["dist_in"])
    m = (orient == "tangent") & np.isnan(theta_hint)
    theta[m] = np.arctan2(sample(gy, s, y[m], x[m]), sample(gx, s, y[m], x[m])) + np.pi / 2
    m = ~np.isnan(theta_hint)
    theta[m] = theta_hint[m]
    # eccentric nuclei (plasma cells, macrophages) and flattened peripheral nuclei (adipocytes)
    off_frac = np.array([CELL_TYPES[t].nucleus_offset for t in TYPE_NAMES])[types]
    phi = rng.uniform(0, 2 * np.pi, n)
    offset = off_frac * radius
    m = orient == "periphery"
    if m.any():
        # against the membrane shared with the nearest neighbour, which bounds the cell's Voronoi region
        tree = cKDTree(np.column_stack([x, y]))
        dist, idx = tree.query(np.column_stack([x[m], y[m]]), k=2)
        nb = idx[:, 1]
        phi[m] = np.arctan2(y[nb] - y[m], x[nb] - x[m]) + rng.normal(0, 0.5, m.sum())
        offset[m] = np.minimum(offset[m], 0.5 * dist[:, 1] - b[m] - 1.0)
        theta[m] = phi[m] + np.pi / 2
    offset = np.maximum(offset, 0.0)
    bend = np.array([CELL_TYPES[t].nucleus_bend for t in TYPE_NAMES])[types] * rng.uniform(0.6, 1.2, n)
    return {
        "nuc_x": x + offset * np.cos(phi),
        "nuc_y": y + offset * np.sin(phi),
        "nuc_a": a,
        "nuc_b": b,
        "nuc_theta": np.mod(theta, 2 * np.pi),
        "nuc_bend": bend * np.where(rng.random(n) < 0.5, 1.0, -1.0),
    }


def build_layout(rng: np.random.Generator, width: float, height: float, params: LayoutParams) -> Layout:
    """Niches, vessels and cells of one section (deterministic given ``rng``)."""
    s = FIELD_SPACING
    g = _niches(rng, width, height, params)
    shape = g["shape"]

    # stroma fibres: a smooth direction field (doubled-angle representation, as directions are axial)
    theta = (
        rng.uniform(0, np.pi) + 1.1 * gaussian_field(rng, shape, s, 140.0) + 0.3 * gaussian_field(rng, shape, s, 30.0)
    )
    g["fibre_c2"], g["fibre_s2"] = np.cos(2 * theta).astype(np.float32), np.sin(2 * theta).astype(np.float32)

    vessels, wall = _vessels(rng, g, params)
    zone = vessel_mask(vessels, shape, s, use_outer=True)
    g["niche"][zone & g["tissue"]] = NICHE_INDEX["vessel"]

    P, occ = _type_probabilities(rng, g, params)
    area = np.tensordot(np.array([np.pi * CELL_TYPES[t].radius ** 2 for t in TYPE_NAMES], np.float32), P, axes=1)
    lam = np.where(area > 0, occ / np.maximum(area, 1e-6), 0.0) * (s * s) * params.cell_density
    counts = rng.poisson(lam.ravel())
    pix = np.repeat(np.arange(counts.size), counts)
    gw = shape[1]
    cy = (pix // gw + rng.random(pix.size)) * s
    cx = (pix % gw + rng.random(pix.size)) * s
    inside = (cx < width) & (cy < height)
    pix, cy, cx = pix[inside], cy[inside], cx[inside]
    probs = P.reshape(_T, -1)[:, pix]
    cum = np.cumsum(probs, axis=0)
    u = rng.random(pix.size) * cum[-1]
    ctype = np.minimum((cum < u[None, :]).sum(axis=0), _T - 1).astype(np.int16)

    # vessel-wall cells first (highest priority), then every other candidate in random order (adipocytes before the
    # small cells that fill the gaps between them)
    wx = np.concatenate([w["x"] for w in wall]) if wall else np.zeros(0)
    wy = np.concatenate([w["y"] for w in wall]) if wall else np.zeros(0)
    wt = (
        np.concatenate([np.full(len(w["x"]), w["type"]) for w in wall]).astype(np.int16)
        if wall
        else np.zeros(0, np.int16)
    )
    wth = np.concatenate([w["theta"] for w in wall]) if wall else np.zeros(0)
    keep_wall = (wx >= 0) & (wx < width) & (wy >= 0) & (wy < height)
    wx, wy, wt, wth = wx[keep_wall], wy[keep_wall], wt[keep_wall], wth[keep_wall]
    x = np.concatenate([wx, cx])
    y = np.concatenate([wy, cy])
    types = np.concatenate([wt, ctype])
    theta_hint = np.concatenate([wth, np.full(cx.size, np.nan)])
    mean_r = np.array([CELL_TYPES[t].radius for t in TYPE_NAMES])
    cv = np.array([CELL_TYPES[t].radius_cv for t in TYPE_NAMES])
    radius = mean_r[types] * np.exp(rng.normal(0, 1, types.size) * cv[types])
    core_f = np.array([CELL_TYPES[t].core for t in TYPE_NAMES])[types] / np.sqrt(max(params.cell_density, 0.25))
    priority = rng.random(types.size)
    priority[: wx.size] += 2.0
    priority[wx.size :][types[wx.size :] == _TI["Adipocyte"]] += 1.0
    keep = _hard_core(x, y, core_f * radius, priority)

    x, y, types, radius, theta_hint = x[keep], y[keep], types[keep], radius[keep], theta_hint[keep]
    is_wall = np.zeros(keep.size, bool)
    is_wall[: wx.size] = True
    is_wall = is_wall[keep]
    order = np.lexsort((x, y))  # raster order: cell ids increase down the section
    x, y, types, radius, theta_hint, is_wall = (a[order] for a in (x, y, types, radius, theta_hint, is_wall))

    niche = lookup(g["niche"], s, y, x).astype(np.int8)
    niche[is_wall] = NICHE_INDEX["vessel"]
    nest = lookup(g["nest"], s, y, x).astype(np.int32)
    nest[types != _TI["Tumor"]] = 0
    nuc = _nuclei(rng, x, y, types, radius, theta_hint, g)
    cells = Cells(x=x, y=y, type=types, radius=radius, niche=niche, nest=nest, **nuc)

    # extracellular matrix: dense pink collagen in stroma (denser in desmoplastic areas near tumour), loose around
    # lymphocytes, a thin amorphous matrix between epithelial cells
    density = 0.33 * np.exp(0.3 * gaussian_field(rng, shape, s, 120.0))
    density = density * (1.0 + 0.25 * np.exp(-np.minimum(g["dist_out"], 1e6) / 60.0))
    ecm = np.zeros(shape, np.float32)
    fibrous = np.zeros(shape, np.float32)
    for name, e, f in (
        ("stroma", 1.0, 1.0),
        ("tumor_border", 1.05, 1.0),
        ("vessel", 0.9, 0.8),
        ("fat", 0.8, 0.8),
        ("lymphoid_aggregate", 0.3, 0.1),
        ("tumor_nest", 0.55, 0.0),
    ):
        m = g["niche"] == NICHE_INDEX[name]
        ecm[m] = (e * density)[m] if name != "tumor_nest" else 0.22
        fibrous[m] = f
    # the thin matrix between tumour cells is close to their (amphophilic) cytoplasm
    ecm_h = np.where(
        np.isin(g["niche"], [NICHE_INDEX["tumor_nest"], NICHE_INDEX["lymphoid_aggregate"]]), 0.06, 0.04 * ecm
    ).astype(np.float32)
    # soften the 4 um grid so that niche borders and the tissue edge render as smooth curves
    ecm, ecm_h, fibrous = (ndi.gaussian_filter(a, 1.2) for a in (ecm, ecm_h, fibrous))
    return Layout(
        width=width,
        height=height,
        spacing=s,
        tissue=g["tissue"],
        niche=g["niche"],
        nest=g["nest"],
        ecm=ecm,
        ecm_h=ecm_h,
        fibrous=fibrous,
        fibre_c2=g["fibre_c2"],
        fibre_s2=g["fibre_s2"],
        vessels=vessels,
        cells=cells,
        n_insitu_nests=int(g["insitu"].sum()),
        n_lymphoid_aggregates=int(g["n_lymphoid"]),
    )


# --------------------------------------------------------------------------------------------- labels
def rasterise_labels(layout: Layout, pixel_size: float) -> tuple[np.ndarray, int]:
    """Cell-id raster: each pixel goes to the nearest cell centre (Voronoi) if within that cell's radius.

    Vessel lumens are left empty. Returns the raster and the number of cells that got no pixel (two centres in one
    pixel when ``pixel_size`` is coarse).
    """
    c = layout.cells
    h, w = int(np.ceil(layout.height / pixel_size)), int(np.ceil(layout.width / pixel_size))
    seeds = np.zeros((h, w), np.int32)
    si = np.clip((c.y / pixel_size).astype(np.int64), 0, h - 1)
    sj = np.clip((c.x / pixel_size).astype(np.int64), 0, w - 1)
    seeds[si, sj] = np.arange(1, c.n + 1, dtype=np.int32)
    if c.n == 0:
        return seeds, 0
    ind = ndi.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    lab = seeds[ind[0], ind[1]]
    del ind
    ys = ((np.arange(h) + 0.5) * pixel_size).astype(np.float32)[:, None]
    xs = ((np.arange(w) + 0.5) * pixel_size).astype(np.float32)[None, :]
    cx = np.concatenate([[0.0], c.x]).astype(np.float32)
    cy = np.concatenate([[0.0], c.y]).astype(np.float32)
    r2 = np.concatenate([[0.0], c.radius**2]).astype(np.float32)
    d2 = (xs - cx[lab]) ** 2
    d2 += (ys - cy[lab]) ** 2
    lab[d2 > r2[lab]] = 0
    lab[vessel_mask(layout.vessels, (h, w), pixel_size)] = 0
    lost = c.n - int(np.count_nonzero(seeds))
    return lab, int(lost)
