"""Pool and recover on real legacy-ST sections: predict the measured spots from pooled pseudo-spots and the H&E.

Real tissue has no high-resolution truth, but its spots are a truth one level down: neighbouring spots are pooled
into pseudo-spots, every method sees only the pseudo-spots and the H&E, and its predictions at the original spots
are scored against their measured values. The protocol (issue 12, the same in every project that runs it):

- spots under tissue with counts; each spot normalised to ``log1p(counts / library * 1e4)``, library = all genes;
- genes scored: the top 50 highly variable genes (scanpy ``seurat_v3`` on the raw spot counts, among genes detected
  in >= 20 % of the spots), and for breast sections the fixed panel ERBB2 GATA3 KRT19 CD74 COL1A1 MGP FN1 IGKC
  PTPRC CD8A (the panel genes the section has; sections without them, such as the mouse olfactory bulb, are scored
  on their top 50 only);
- pooling: ``f x f`` blocks of the array grid (block = ``(x // f, y // f)``); a pseudo-spot's counts are the sum of
  its members' raw counts, its position the mean of their positions; blocks with fewer than 2 members are dropped
  (their spots are still predicted and scored); f = 2 and f = 3;
- scores, per gene over spots: Pearson r, and within-block r (truth and prediction each minus their block mean, over
  the spots of kept blocks), averaged over genes, then over sections.

Methods (a registry: name -> function(pseudo-spots, H&E, target spots) -> predictions): ``nearest`` (the nearest
pseudo-spot's value), ``cubic`` (Clough-Tocher cubic interpolation of the pseudo-spot values, nearest outside their
hull), ``rbf`` (thin-plate RBF of the pseudo-spot values), ``tesla`` (TESLA's own ``imputation`` with its defaults
on a 20 um superpixel lattice, averaged over each spot's disc), ``he_ridge`` (``rbf`` plus within-block detail from
a ridge regression of 12 H&E colour and texture features fitted to the pseudo-spot values) and ``c3diff_bicubic``
(the pseudo-spots as a SpatialData from :func:`c3diff.io.spots_from_arrays`, per member spot, with a total-counts
channel; :func:`c3diff.tl.super_resolve` with ``method="bicubic"`` and ``calibration="lr_pixel"`` at 10 um, read
back at the spots by :func:`c3diff.tl.sample_at_spots` and normalised by the read-back total counts).
``c3diff_fitted``: :func:`c3diff.tl.fit_slide` on those pseudo-spots (each a disc ``f`` times the spot diameter,
the area of its ``f x f`` member discs) and the H&E (it pools the pseudo-spots 2 x 2 again for its own inputs and
learns to predict the pseudo-spots; it never sees the original spots) for
``--fit-seconds`` (default 180), then ``super_resolve`` of the pseudo-spots with the fitted model (its expected
map, ``mode="mean"``, ``calibration="lr_pixel"``), read back and normalised as ``c3diff_bicubic``.
``c3diff_fitted_calibrated``: the same counts at the spots, scaled per pseudo-spot and gene (and library) so that
the spots pooled into a pseudo-spot sum to its measured counts. Each row's runtime is its method's mean seconds per
section and pool factor (one prediction of all spots of a section; the shared fit counts in both fitted rows).

Run:  OMP_NUM_THREADS=1 python benchmarks/real_pool_recover.py [--data DIR] [--sections B4 C2 ...] [--json PATH]
[--pools 2 3] [--fit-seconds 180] [--methods ...]
``--data`` holds sections in the her2st layout (``<S>/<S>.tsv.gz``, ``<S>/<S>_selection.tsv`` or
``<S>/alignment_table_<S>.tsv``, one H&E ``.jpg`` in ``<S>/``), found at any depth; default ``../shared/data``
next to the repository (the legacy-ST sections there: her2st B4 and C2, mouse olfactory bulb MOB1-MOB4). Writes
``docs/benchmarks/real_pool_recover.md`` and ``benchmarks/results/real_pool_recover.json``; ``--json`` also writes
one record per (section, pool, method, gene set).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine, write_report  # noqa: E402

BREAST_PANEL = ["ERBB2", "GATA3", "KRT19", "CD74", "COL1A1", "MGP", "FN1", "IGKC", "PTPRC", "CD8A"]
N_HVG = 50
MIN_DETECTED = 0.2
TARGET_SUM = 1e4
POOLS = (2, 3)
#: Pixel size (um) of the H&E every method gets.
HNE_PIXEL_SIZE = 2.0
#: Channel of total counts given to c3diff next to the genes.
LIBRARY = "__total_counts__"


@dataclass
class PseudoSpots:
    """Pooled spots: ``centres`` ``(n, 2)`` (x, y) um, raw ``counts`` of the scored genes, ``library`` (all genes),
    ``members`` per pseudo-spot, ``values`` = log1p(counts / library * 1e4); ``pitch`` and ``spot_diameter`` of the
    original spots (um) and the pool factor."""

    centres: np.ndarray
    counts: np.ndarray
    library: np.ndarray
    members: np.ndarray
    values: np.ndarray
    genes: list[str]
    spot_pitch: float
    spot_diameter: float
    pool: int
    block_index: np.ndarray  # (n, 2) block (x // f, y // f)


@dataclass
class Histology:
    """The H&E as ``(h, w, 3)`` uint8 at ``pixel_size`` um/px; pixel ``(i, j)`` is centred at (x, y) =
    ``(j * pixel_size, i * pixel_size)`` um."""

    rgb: np.ndarray
    pixel_size: float


@dataclass
class Targets:
    """The spots to predict: ``centres`` ``(m, 2)`` (x, y) um and their ``diameter`` (um); ``pseudo_index`` ``(m,)``:
    the pseudo-spot each spot was pooled into (-1 where its block was dropped), the measurement model of the
    pseudo-spots (a pseudo-spot's counts are the sum of its members'), not their values."""

    centres: np.ndarray
    diameter: float
    pseudo_index: np.ndarray | None = None


# --- methods ------------------------------------------------------------------------------------------------------


def _nearest_index(pseudo: PseudoSpots, points: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    return cKDTree(pseudo.centres).query(points)[1]


def _rbf(centres: np.ndarray, values: np.ndarray, points: np.ndarray) -> np.ndarray:
    from scipy.interpolate import RBFInterpolator

    shift, scale = centres.mean(axis=0), centres.std()
    return RBFInterpolator((centres - shift) / scale, values, kernel="thin_plate_spline")((points - shift) / scale)


def predict_nearest(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> np.ndarray:
    return pseudo.values[_nearest_index(pseudo, targets.centres)]


def predict_cubic(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> np.ndarray:
    from scipy.interpolate import CloughTocher2DInterpolator

    out = CloughTocher2DInterpolator(pseudo.centres, pseudo.values)(targets.centres)
    outside = np.isnan(out).any(axis=1)
    out[outside] = predict_nearest(pseudo, hne, targets)[outside]
    return out


def predict_rbf(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> np.ndarray:
    return _rbf(pseudo.centres, pseudo.values, targets.centres)


def _disc_means(maps: np.ndarray, cell: float, centres_xy: np.ndarray, diameter: float) -> np.ndarray:
    """Mean of ``maps`` ``(k, h, w)`` (cells of ``cell`` um from (0, 0)) over each disc, area-weighted."""
    from c3diff._validation import RasterGeometry
    from c3diff.metrics import sum_over_spots

    grid = RasterGeometry(y0=0.0, x0=0.0, sy=cell, sx=cell, height=maps.shape[1], width=maps.shape[2])
    sums, covered = sum_over_spots(maps, grid, centres_xy[:, ::-1], diameter)
    disc_cells = math.pi * (diameter / 2) ** 2 / cell**2
    return sums / np.maximum(covered * disc_cells, 1e-9)[:, None]


def histology_features(hne: Histology, centres_xy: np.ndarray, diameter: float) -> np.ndarray:
    """12 colour and texture features of the H&E averaged over each disc: mean R, G, B; haematoxylin and eosin
    (colour deconvolution) mean and standard deviation; grey standard deviation; fraction of dark (nuclei) and of
    bright (glass, fat) pixels; mean gradient magnitude; mean absolute Laplacian."""
    from scipy import ndimage
    from skimage.color import rgb2hed

    rgb = hne.rgb.astype(np.float64) / 255.0
    grey = rgb.mean(axis=2)
    hed = rgb2hed(rgb)
    block = max(1, round(10.0 / hne.pixel_size))  # 10 um cells
    h, w = (grey.shape[0] // block) * block, (grey.shape[1] // block) * block

    def cells(a: np.ndarray) -> np.ndarray:
        return a[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))

    def cell_std(a: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(cells(a**2) - cells(a) ** 2, 0.0))

    maps = np.stack(
        [
            cells(rgb[..., 0]),
            cells(rgb[..., 1]),
            cells(rgb[..., 2]),
            cells(hed[..., 0]),
            cell_std(hed[..., 0]),
            cells(hed[..., 1]),
            cell_std(hed[..., 1]),
            cell_std(grey),
            cells((grey < 0.45).astype(float)),
            cells((grey > 0.85).astype(float)),
            cells(np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))),
            cells(np.abs(ndimage.laplace(grey))),
        ]
    )
    # cell (i, j) covers [i * block * px, ...) measured from the first pixel's edge at -px / 2
    shifted = centres_xy + hne.pixel_size / 2
    return _disc_means(maps, block * hne.pixel_size, shifted, diameter)


def predict_he_ridge(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> np.ndarray:
    return histology_ridge(pseudo, targets, histology_features(hne, targets.centres, targets.diameter))


def histology_ridge(pseudo: PseudoSpots, targets: Targets, features: np.ndarray) -> np.ndarray:
    """``rbf`` of the pseudo-spot values plus within-block detail: a ridge regression (alpha by leave-one-out) of the
    pseudo-spot values on ``features`` ``(m, k)`` of the target spots averaged per pseudo-spot, applied at each
    spot minus its own RBF-smoothed version (so that only the detail inside blocks is added)."""
    from sklearn.linear_model import RidgeCV

    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-9
    features = (features - mean) / std
    owner = _nearest_index(pseudo, targets.centres)
    pseudo_features = np.stack(
        [
            features[owner == k].mean(axis=0) if (owner == k).any() else np.zeros(features.shape[1])
            for k in range(len(pseudo.centres))
        ]
    )
    ridge = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(pseudo_features, pseudo.values)
    smooth = _rbf(pseudo.centres, pseudo.values, targets.centres)
    detail = ridge.predict(features) - _rbf(pseudo.centres, ridge.predict(pseudo_features), targets.centres)
    return smooth + detail


def predict_tesla(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> np.ndarray:
    """TESLA.imputation (its defaults: s=1, k=2, num_nbs=10) of the pseudo-spot values on a 20 um superpixel lattice
    of the H&E; each spot gets the mean of the superpixels in its disc (the nearest one outside TESLA's contour)."""
    import contextlib
    import importlib
    import io
    from unittest import mock

    import pandas as pd
    from anndata import AnnData
    from baselines.tesla import _import_tesla, _LegacyAnnData
    from scipy.spatial import cKDTree

    tesla, _ = _import_tesla()
    res = round(20.0 / hne.pixel_size)
    rows, cols = pseudo.centres[:, 1] / hne.pixel_size, pseudo.centres[:, 0] / hne.pixel_size
    obs = pd.DataFrame(
        {
            "array_x": pseudo.block_index[:, 1],
            "array_y": pseudo.block_index[:, 0],
            "pixel_x": np.round(rows).astype(int),
            "pixel_y": np.round(cols).astype(int),
        },
        index=[f"pseudo{i}" for i in range(len(rows))],
    )
    genes = list(pseudo.genes)
    raw = AnnData(pseudo.values.astype(np.float64), obs=obs, var=pd.DataFrame(index=genes))
    cnt = tesla.scan_contour(obs, scan_x=True, shape="square")
    module = importlib.import_module("TESLA.imputation")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mock.patch.object(module, "AnnData", _LegacyAnnData):
            sudo = module.imputation(img=hne.rgb, raw=raw, cnt=cnt, genes=genes, shape="None", res=res)
    order = [list(sudo.var.index).index(g) for g in genes]
    values = np.asarray(sudo.X, dtype=np.float64)[:, order]
    xy = np.column_stack([sudo.obs["y"].to_numpy(), sudo.obs["x"].to_numpy()]).astype(float) * hne.pixel_size
    tree = cKDTree(xy)
    out = np.empty((len(targets.centres), len(genes)))
    for i, members in enumerate(tree.query_ball_point(targets.centres, r=targets.diameter / 2)):
        out[i] = values[members].mean(axis=0) if members else values[tree.query(targets.centres[i])[1]]
    return out


def predict_c3diff_bicubic(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> np.ndarray:
    """c3diff's bicubic baseline on the pseudo-spots, read back at the spots and normalised by its own library."""
    import c3diff as c3

    sdata, genes = _pseudo_sdata(pseudo, hne)
    c3.tl.super_resolve(
        sdata,
        "hne",
        table_key="table",
        genes=genes,
        method="bicubic",
        calibration="lr_pixel",
        progress=False,
        key_added="super_resolved",
    )
    return _normalised(_read_at_targets(sdata.images["super_resolved"], pseudo, targets, genes))


def _read_at_targets(layer, pseudo: PseudoSpots, targets: Targets, genes: list[str]) -> np.ndarray:
    """Counts ``(m, genes)`` of a super-resolved layer summed over each target spot's disc
    (:func:`c3diff.tl.sample_at_spots`)."""
    import c3diff as c3

    target = c3.io.spots_from_arrays(
        np.zeros((len(targets.centres), 1)),
        targets.centres,
        genes=["none"],
        spot_diameter=targets.diameter,
        pitch=pseudo.spot_pitch,
    )
    target.images["layer"] = layer
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lie partly off.*")
        read = c3.tl.sample_at_spots(target, "layer", table_key="table", genes=genes)
    return np.asarray(read.layers["counts"], dtype=np.float64)


#: Seconds of spot-supervised fitting per section and pool factor for the ``c3diff_fitted`` rows (``--fit-seconds``).
FIT_SECONDS = FIT_SECONDS_DEFAULT = 180.0
#: The fit of the current pseudo-spots, shared by the two ``c3diff_fitted`` rows: [pseudo-spots, counts, seconds].
_FITTED: list = [None, None, 0.0]
#: Seconds of shared work a method reused in its last call (added to its runtime by :func:`run_section`).
_REUSED_SECONDS: list[float] = [0.0]


def _pseudo_sdata(pseudo: PseudoSpots, hne: Histology, *, block_disc: bool = False):
    """The pseudo-spots as spot data with the H&E and a total-counts channel, array coordinates = the block index.

    Each pseudo-spot keeps its members' density (counts per um^2 of spot): by default as counts per member spot on
    the member spots' disc; with ``block_disc`` as a disc ``pool`` times wider (the area of the ``pool x pool``
    member discs) holding ``pool**2`` members' worth, so that a footprint at the pseudo-spot's centre (which lies
    between its members) overlaps the members instead of the gap between them."""
    import c3diff as c3

    genes = list(pseudo.genes) + [LIBRARY]
    widen = pseudo.pool if block_disc else 1
    per_member = np.column_stack([pseudo.counts, pseudo.library]) / pseudo.members[:, None] * widen**2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not whole numbers.*")
        return c3.io.spots_from_arrays(
            per_member,
            pseudo.centres,
            genes=genes,
            spot_diameter=pseudo.spot_diameter * widen,
            pitch=pseudo.spot_pitch * pseudo.pool,
            image=hne.rgb,
            pixel_size=hne.pixel_size,
            obs={
                "total_counts": per_member[:, -1],
                "array_x": pseudo.block_index[:, 0],
                "array_y": pseudo.block_index[:, 1],
            },
        ), genes


def _fitted_counts(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> tuple[np.ndarray, float]:
    """c3diff fitted on the pseudo-spots (:func:`c3diff.tl.fit_slide`, which pools them again for its inputs; each
    pseudo-spot a disc of the area of its block's member discs, see :func:`_pseudo_sdata`), then
    :func:`c3diff.tl.super_resolve` of the pseudo-spots with it (mode "mean", calibration "lr_pixel": the fitted
    expected map), read back at the spots as counts ``(m, genes + library)``; cached per section and pool factor so
    that both rows share one fit (its seconds are counted in each row)."""
    import c3diff as c3

    if _FITTED[0] is pseudo:
        _REUSED_SECONDS[0] = _FITTED[2]
        return _FITTED[1], _FITTED[2]
    start = time.perf_counter()
    sdata, genes = _pseudo_sdata(pseudo, hne, block_disc=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not whole numbers.*")
        model = c3.tl.fit_slide(
            sdata, "hne", table_key="table", genes=genes, pool=2, steps=100_000, max_time=FIT_SECONDS, progress=False
        )
        c3.tl.super_resolve(sdata, "hne", table_key="table", model=model, progress=False, key_added="fitted")
    counts = _read_at_targets(sdata.images["fitted"], pseudo, targets, genes)
    _FITTED[:] = [pseudo, counts, time.perf_counter() - start]
    return _FITTED[1], _FITTED[2]


def _normalised(counts: np.ndarray) -> np.ndarray:
    """``log1p(genes / library * 1e4)`` of ``(m, genes + library)`` counts."""
    library = np.maximum(counts[:, -1:], 1e-9)
    return np.log1p(np.maximum(counts[:, :-1], 0.0) / library * TARGET_SUM)


def predict_c3diff_fitted(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> np.ndarray:
    """c3diff fitted on the slide's pseudo-spots: its expected map read back at the spots, normalised by its own
    predicted library."""
    counts, _ = _fitted_counts(pseudo, hne, targets)
    return _normalised(counts)


def predict_c3diff_fitted_calibrated(pseudo: PseudoSpots, hne: Histology, targets: Targets) -> np.ndarray:
    """``c3diff_fitted`` calibrated to the pseudo-spots: the predicted counts of the spots pooled into a pseudo-spot
    are scaled, per gene and library, so that they sum to the pseudo-spot's measured counts (a data-consistency
    projection at the pseudo-spot, as ``calibration="lr_pixel"`` is at the LR pixel); spots of dropped blocks keep
    their prediction."""
    counts, _ = _fitted_counts(pseudo, hne, targets)
    counts = counts.copy()
    if targets.pseudo_index is None:
        raise ValueError("c3diff_fitted_calibrated needs `targets.pseudo_index` (which pseudo-spot each spot is in).")
    owner = targets.pseudo_index
    pooled = owner >= 0
    measured = np.column_stack([pseudo.counts, pseudo.library])
    sums = np.zeros_like(measured)
    np.add.at(sums, owner[pooled], counts[pooled])
    factor = np.where(sums > 0, measured / np.where(sums > 0, sums, 1.0), 1.0)
    counts[pooled] *= factor[owner[pooled]]
    return _normalised(counts)


#: name -> function(pseudo-spots, H&E, target spots) -> (n_targets, n_genes) predicted log1p(CP10k) values.
METHODS: dict[str, Callable[[PseudoSpots, Histology, Targets], np.ndarray]] = {
    "nearest": predict_nearest,
    "cubic": predict_cubic,
    "rbf": predict_rbf,
    "tesla": predict_tesla,
    "he_ridge": predict_he_ridge,
    "c3diff_bicubic": predict_c3diff_bicubic,
    "c3diff_fitted": predict_c3diff_fitted,
    "c3diff_fitted_calibrated": predict_c3diff_fitted_calibrated,
}


# --- data and protocol -------------------------------------------------------------------------------------------


def find_sections(data: Path, names: list[str] | None) -> dict[str, Path]:
    """Section folders under ``data`` (any depth): a folder ``S`` holding ``S.tsv.gz`` or ``S.tsv``."""
    found = {}
    for counts in sorted(data.rglob("*.tsv*")):
        folder = counts.parent
        if counts.name in (f"{folder.name}.tsv.gz", f"{folder.name}.tsv"):
            found[folder.name] = folder
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise SystemExit(f"Sections {missing} not found under {data} (found: {sorted(found)}).")
        found = {n: found[n] for n in names}
    if not found:
        raise SystemExit(f"No section (a folder S with S.tsv.gz and a spot file) under {data}.")
    return found


def load_section(folder: Path):
    import c3diff as c3

    name = folder.name
    counts = folder / f"{name}.tsv.gz" if (folder / f"{name}.tsv.gz").exists() else folder / f"{name}.tsv"
    spots = next(
        (p for p in (folder / f"{name}_selection.tsv", folder / f"alignment_table_{name}.tsv") if p.exists()), None
    )
    images = sorted(folder.glob("*.jpg"))
    if spots is None or len(images) != 1:
        raise SystemExit(
            f"{folder}: expected a spot file ({name}_selection.tsv) and one .jpg, found "
            f"{sorted(p.name for p in folder.iterdir())}."
        )
    return c3.io.read_legacy_st(counts, spots, images[0])


def _histology(sdata, pixel_size: float = HNE_PIXEL_SIZE) -> Histology:
    from c3diff._validation import RasterGeometry, raster_geometry
    from c3diff.pp import histology_raster

    ymin, xmin, ymax, xmax = raster_geometry(sdata["hne"], arg="hne").extent
    p = pixel_size
    grid = RasterGeometry(
        y0=-p / 2, x0=-p / 2, sy=p, sx=p, height=math.ceil((ymax + p / 2) / p), width=math.ceil((xmax + p / 2) / p)
    )
    rgb, _ = histology_raster(sdata, "hne", grid=grid)
    return Histology(rgb=np.ascontiguousarray(rgb.transpose(1, 2, 0)), pixel_size=p)


def select_genes(adata) -> dict[str, list[str]]:
    """``{"hvg": top 50 seurat_v3 among genes detected in >= 20 % of spots, "panel": breast panel genes present}``."""
    import scanpy as sc
    from scipy import sparse

    x = adata.X
    detected = np.asarray((x > 0).mean(axis=0)).ravel() if sparse.issparse(x) else (x > 0).mean(axis=0)
    sub = adata[:, detected >= MIN_DETECTED].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=min(N_HVG, sub.n_vars))
    ranked = sub.var.sort_values("highly_variable_rank")
    sets = {"hvg": list(ranked.index[ranked["highly_variable"]][:N_HVG])}
    present = set(adata.var_names[np.asarray(x.sum(axis=0)).ravel() > 0])
    panel = [g for g in BREAST_PANEL if g in present]
    if panel:
        sets["panel"] = panel
    return sets


def pool(
    adata, centres_xy: np.ndarray, library: np.ndarray, genes: list[str], f: int, *, pitch: float, diameter: float
) -> tuple[PseudoSpots, np.ndarray, np.ndarray]:
    """Pool ``f x f`` array blocks; returns the pseudo-spots, each spot's block id and whether its block is kept."""
    from scipy import sparse

    blocks = np.stack([adata.obs["array_x"].to_numpy() // f, adata.obs["array_y"].to_numpy() // f], axis=1)
    keys, block_id, sizes = np.unique(blocks, axis=0, return_inverse=True, return_counts=True)
    block_id = block_id.ravel()
    kept = sizes >= 2
    x = adata[:, genes].X
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    onehot = sparse.csr_matrix(
        (np.ones(len(block_id)), (block_id, np.arange(len(block_id)))), shape=(len(keys), len(block_id))
    )
    counts = np.asarray(onehot @ x)[kept]
    lib = np.asarray(onehot @ library).ravel()[kept]
    members = sizes[kept].astype(float)
    centres = np.asarray(onehot @ centres_xy)[kept] / members[:, None]
    values = np.log1p(counts / lib[:, None] * TARGET_SUM)
    pseudo = PseudoSpots(
        centres=centres,
        counts=counts,
        library=lib,
        members=members,
        values=values,
        genes=genes,
        spot_pitch=pitch,
        spot_diameter=diameter,
        pool=f,
        block_index=keys[kept],
    )
    return pseudo, block_id, kept[block_id]


def _pearson(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-column Pearson r of ``(n, G)`` arrays: NaN where the truth is constant (the gene is not scored), 0 where
    only the prediction is (it carries no information, e.g. ``nearest`` within a block)."""
    a, b = truth - truth.mean(axis=0), pred - pred.mean(axis=0)
    sa, sb = np.sqrt((a**2).sum(axis=0)), np.sqrt((b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / (sa * sb)
    r = np.where(sb > 1e-12, r, 0.0)
    return np.where(sa > 1e-12, r, np.nan)


def score(truth: np.ndarray, pred: np.ndarray, block_id: np.ndarray, in_kept: np.ndarray) -> tuple[float, float]:
    """Mean over genes of Pearson r over all spots and of within-block r over the spots of kept blocks."""

    def demean(values: np.ndarray) -> np.ndarray:
        ids = block_id[in_kept]
        sums = np.zeros((ids.max() + 1, values.shape[1]))
        np.add.at(sums, ids, values[in_kept])
        n = np.bincount(ids, minlength=len(sums))[:, None]
        return values[in_kept] - sums[ids] / np.maximum(n[ids], 1)

    return float(np.nanmean(_pearson(truth, pred))), float(np.nanmean(_pearson(demean(truth), demean(pred))))


@dataclass
class Section:
    """A section ready for the protocol: its SpatialData, the scored spots (``adata``, positions, library), the
    H&E every method gets, the gene sets, the union of their genes and the spots' normalised ``truth``."""

    sdata: object
    adata: object
    centres: np.ndarray
    library: np.ndarray
    pitch: float
    diameter: float
    hne: Histology
    gene_sets: dict[str, list[str]]
    genes: list[str]
    truth: np.ndarray


def prepare_section(name: str, folder: Path) -> Section:
    """Read a section and keep its spots under tissue with counts (the protocol's first steps)."""
    from scipy import sparse

    t0 = time.perf_counter()
    sdata = load_section(folder)
    table = sdata["table"]
    library = np.asarray(table.X.sum(axis=1)).ravel()
    keep = table.obs["in_tissue"].to_numpy(bool) & (library > 0)
    adata = table[keep].copy()
    library = library[keep]
    layout = table.uns["c3diff"]["spots"]
    gene_sets = select_genes(adata)
    genes = list(dict.fromkeys(g for s in gene_sets.values() for g in s))
    x = adata[:, genes].X
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    section = Section(
        sdata=sdata,
        adata=adata,
        centres=np.asarray(adata.obsm["spatial"], dtype=float),
        library=library,
        pitch=float(layout["pitch_um"]),
        diameter=float(layout["diameter_um"]),
        hne=_histology(sdata),
        gene_sets=gene_sets,
        genes=genes,
        truth=np.log1p(x / library[:, None] * TARGET_SUM),
    )
    print(f"{name}: {adata.n_obs} spots, {len(genes)} genes, loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    return section


def pool_section(section: Section, f: int, targets: Targets) -> tuple[PseudoSpots, np.ndarray, np.ndarray]:
    """:func:`pool` of the section's spots; sets ``targets.pseudo_index`` (each spot's pseudo-spot, -1 if dropped)."""
    pseudo, block_id, in_kept = pool(
        section.adata,
        section.centres,
        section.library,
        section.genes,
        f,
        pitch=section.pitch,
        diameter=section.diameter,
    )
    kept_blocks = np.flatnonzero(np.bincount(block_id) >= 2)
    new_index = np.full(block_id.max() + 1, -1)
    new_index[kept_blocks] = np.arange(len(kept_blocks))
    targets.pseudo_index = new_index[block_id]
    return pseudo, block_id, in_kept


def run_section(name: str, folder: Path, methods: list[str], pools: tuple[int, ...] = POOLS) -> list[dict]:
    section = prepare_section(name, folder)
    hne, gene_sets, genes, truth = section.hne, section.gene_sets, section.genes, section.truth
    targets = Targets(centres=section.centres, diameter=section.diameter)
    records = []
    for f in pools:
        pseudo, block_id, in_kept = pool_section(section, f, targets)
        for method in methods:
            start = time.perf_counter()
            _REUSED_SECONDS[0] = 0.0
            try:
                pred = METHODS[method](pseudo, hne, targets)
                error = None
            except Exception as err:  # noqa: BLE001 - a method that cannot run is recorded, not fatal
                pred, error = None, f"{type(err).__name__}: {err}"
            seconds = time.perf_counter() - start + _REUSED_SECONDS[0]  # a shared fit counts in each row
            for gene_set, names in gene_sets.items():
                columns = [genes.index(g) for g in names]
                if pred is None:
                    pearson = within = float("nan")
                else:
                    pearson, within = score(truth[:, columns], pred[:, columns], block_id, in_kept)
                record = {
                    "section": name,
                    "pool": f,
                    "method": method,
                    "genes": gene_set,
                    "pearson": pearson,
                    "within_block": within,
                    "seconds": seconds,
                }
                if error:
                    record["error"] = error
                records.append(record)
            status = f"failed ({error})" if error else f"r {records[-len(gene_sets)]['pearson']:.3f}"
            print(f"  f={f} {method}: {status}, {seconds:.1f} s", flush=True)
    return records


def report(records: list[dict], sections: list[str], command: str) -> str:
    import pandas as pd

    frame = pd.DataFrame(records)
    pools = sorted(set(frame["pool"]))
    lines = [
        "Pool and recover on real legacy-ST sections (issue 12 protocol): Pearson r and within-block r of each "
        "method's predictions at the original spots, mean over genes then over sections "
        f"({', '.join(sections)}); seconds = mean per section and pool factor.",
        "",
        f"Command: `{command}`. Machine: {machine()}.",
        "",
    ]
    errors = frame.dropna(subset=["error"]) if "error" in frame else frame.iloc[:0]
    for gene_set in [g for g in ("hvg", "panel") if g in set(frame["genes"])]:
        part = frame[frame["genes"] == gene_set]
        n_sections = part["section"].nunique()
        title = "top 50 variable genes" if gene_set == "hvg" else f"breast panel ({n_sections} section(s))"
        lines += [
            f"**{title}**",
            "",
            "| method | " + " | ".join(f"f={f} Pearson r | f={f} within-block r" for f in pools) + " | seconds |",
            "|---|" + "---|---|" * len(pools) + "---|",
        ]
        for method in dict.fromkeys(part["method"]):
            rows = part[part["method"] == method]
            cells = []
            for f in pools:
                per_section = rows[rows["pool"] == f].groupby("section")[["pearson", "within_block"]].mean()
                cells += [f"{per_section['pearson'].mean():.3f}", f"{per_section['within_block'].mean():.3f}"]
            seconds = rows.groupby(["section", "pool"])["seconds"].first().mean()
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.1f} |")
        lines.append("")
    per_section = frame[frame["genes"] == "hvg"].pivot_table(
        index=["section", "pool"], columns="method", values="pearson", sort=False
    )
    lines += ["Per section (top 50 variable genes, Pearson r):", "", per_section.round(3).to_markdown(), ""]
    if len(errors):
        lines += [
            "Methods that could not run: "
            + "; ".join(sorted({f"{r.method} ({r.error})" for r in errors.itertuples()})),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    global FIT_SECONDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--sections", nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pools", nargs="*", type=int, default=list(POOLS), help="pool factors (default 2 3)")
    parser.add_argument(
        "--fit-seconds",
        type=float,
        default=FIT_SECONDS,
        help="seconds of fit_slide per section and pool factor for the c3diff_fitted rows",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="markdown output (default docs/benchmarks/...)")
    args = parser.parse_args()
    FIT_SECONDS = args.fit_seconds
    sections = find_sections(args.data, args.sections)
    records = []
    for name, folder in sections.items():
        records += run_section(name, folder, args.methods, tuple(args.pools))
    command = (
        "OMP_NUM_THREADS=1 python benchmarks/real_pool_recover.py"
        + (f" --sections {' '.join(args.sections)}" if args.sections else "")
        + (f" --pools {' '.join(map(str, args.pools))}" if tuple(args.pools) != POOLS else "")
        + (f" --fit-seconds {args.fit_seconds:g}" if args.fit_seconds != FIT_SECONDS_DEFAULT else "")
    )
    text = report(records, list(sections), command)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    write_report("real_pool_recover", text, records, out=args.out)


if __name__ == "__main__":
    main()
