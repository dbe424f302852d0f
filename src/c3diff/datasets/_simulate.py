"""``simulate_section``: a breast-cancer tissue section with H&E, single-cell transcripts and spot measurements."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM, RGB_CHANNELS, Key
from c3diff._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: Smallest section side (um): room for a few tissue structures and one legacy-ST spot.
MIN_SIZE = 200.0
#: Largest H&E or label raster (pixels) simulated in one piece (the H&E needs about 12 bytes per pixel while it is
#: rendered, the labels about 16).
MAX_HNE_PIXELS = 150_000_000


def _check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hint: str = "") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.") from None
    if not np.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ValueError(f"`{name}` must be in {bound}, got {value!r}.{(' ' + hint) if hint else ''}")
    return v


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value <= 1000:
        raise ValueError(f"`{name}` must be an integer between 0 and 1000 (or None), got {value!r}.")
    return int(value)


def simulate_section(
    *,
    width: float = 2560.0,
    height: float = 2560.0,
    pixel_size: float = 0.5,
    cell_density: float = 1.0,
    transcripts_per_cell: float = 120.0,
    genes: Sequence[str] | None = None,
    spot_layouts: Sequence[str] | str = ("visium", "legacy_st"),
    label_pixel_size: float = 1.0,
    tissue_fraction: float = 0.8,
    tumor_fraction: float = 0.3,
    fat_fraction: float = 0.15,
    insitu_fraction: float = 0.3,
    n_lymphoid_aggregates: int | None = None,
    immune_infiltration: float = 1.0,
    vessel_density: float = 30.0,
    spatial_field_scale: float = 250.0,
    background_rate: float = 0.002,
    stain_variation: float = 1.0,
    hne_levels: int | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> SpatialData:
    """Simulate a breast-cancer section: H&E, cells, single-molecule transcripts and spot-based ST measurements.

    The tissue (everything in micrometres, coordinate system ``"global"``) has tumour nests (some in situ, rimmed by
    myoepithelial cells), fibrous stroma, fat lobules, vessels (endothelium, smooth muscle, red blood cells), lymphoid
    aggregates (a B-cell follicle in a T-cell zone with Tregs) and immune infiltrates (CD8 T cells and macrophages at
    tumour borders, plasma cells and M2 macrophages in stroma), on glass. The H&E is rendered from the cells with a
    Beer-Lambert stain model, so nuclear shape, size, chromatin and cytoplasm depend on the cell type, though not
    uniquely (the T-cell subtypes look identical, M0 and M2 macrophages nearly so). Transcripts of the 280-gene Xenium
    breast panel are drawn per cell (gamma-Poisson around type programmes; some genes follow smooth spatial fields
    independent of the tissue, see ``sdata.attrs["c3diff"]["simulation"]["gene_kinds"]``) and placed in their cell;
    spot tables count exactly the transcripts inside each spot disc.

    Parameters
    ----------
    width, height
        Section size in um (at least 200). The default, 2.56 mm, is one paper-sized patch (256 px at 10 um).
    pixel_size
        H&E pixel size in um (default 0.5, a 20x scan).
    cell_density
        Crowding factor: scales the density of candidate cells and shortens the minimum distance between cells
        (1 = realistic: about 2300-2500 cells per mm^2 of tissue overall, ~3800 in tumour nests, ~1500 in stroma,
        ~11000 in lymphoid aggregates, ~230 adipocytes per mm^2 of fat).
    transcripts_per_cell
        Mean transcripts of a 6 um radius cell of library factor 1 (fibroblast-sized); each cell's library grows with
        its area (power 0.6), by type, with log-normal noise. The default gives about 100-150 per cell, as in Xenium.
    genes
        Genes to measure (subset of :func:`c3diff._panels.xenium_breast_panel`, in the order given); ``None``: the
        whole 280-gene panel. Expression is simulated for the whole panel either way.
    spot_layouts
        Spot arrays to measure: ``"visium"`` (55 um spots, 100 um hexagonal pitch: ``visium_spots`` +
        ``visium_table``) and/or ``"legacy_st"`` (100 um spots, 200 um square pitch: ``st_spots`` + ``st_table``).
        Only spots whose disc lies entirely in the section are kept.
    label_pixel_size
        Pixel size of the ``cell_labels`` raster in um (default 1).
    tissue_fraction, tumor_fraction, fat_fraction
        Fraction of the section covered by tissue (the rest is glass), and of the tissue by tumour nests and fat.
    insitu_fraction
        Fraction of the smaller nests that are in situ (rimmed by myoepithelial cells).
    n_lymphoid_aggregates
        Number of lymphoid aggregates; ``None``: Poisson with 1.2 per mm^2 of tissue (at least one when the stroma
        has room).
    immune_infiltration
        Multiplier of the immune fraction in stroma, at tumour borders and inside nests.
    vessel_density
        Vessels per mm^2 of stroma and fat.
    spatial_field_scale
        Correlation length (um) of the smooth random fields that drive the ``spatial_field`` genes.
    background_rate
        Unassigned (background) transcripts per um^2 of tissue; glass gets a tenth of it.
    stain_variation
        Strength of the per-section and regional stain variation and illumination gradient (0 = none).
    hne_levels
        Number of 2x-downsampled levels of the H&E pyramid; ``None``: as many as keep the coarsest level at least
        128 px, at most 3.
    seed
        Random seed; the same seed gives identical data (``None``: fresh entropy, recorded in the attrs).
    progress
        Show a progress bar over the simulation stages.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with images ``hne`` (RGB uint8, multiscale, ``Scale(pixel_size)``), labels
    ``cell_labels`` (int32 cell ids), points ``transcripts`` (``x``, ``y``, ``gene``, ``cell_id`` with 0 for background,
    ``overlaps_nucleus``), shapes ``cells`` (circles, index = cell id) and the spot circles, tables ``cell_table``
    (cells x genes counts, ``obs["cell_type"]``, ``obs["niche"]``; ``layers["expected"]``, each cell's expected counts
    before the gamma-Poisson draw; ``obsm["cell_geometry"]``, ``var["background_share"]`` and
    ``uns["c3diff"]["simulation"]`` with the tissue mask and background rates, for :func:`expected_counts`) and the
    spot tables, and
    ``attrs["c3diff"]["simulation"]`` with every parameter, the seed, the c3diff version and the gene kinds.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=640, height=640, seed=0)
    >>> sorted(sdata.tables)
    ['cell_table', 'st_table', 'visium_table']
    >>> sdata.tables["cell_table"].obs["cell_type"].cat.categories[:3].tolist()
    ['Tumor', 'Myoepithelial', 'Fibroblast']
    """
    from tqdm.auto import tqdm

    from c3diff._panels import xenium_breast_panel
    from c3diff._validation import check_genes
    from c3diff.datasets._layout import LayoutParams
    from c3diff.datasets._spots import SPOT_LAYOUTS

    # ---------------------------------------------------------------- validation
    width = _check_number("width", width, MIN_SIZE, 1e6, hint="The simulator needs at least 200 um per side.")
    height = _check_number("height", height, MIN_SIZE, 1e6, hint="The simulator needs at least 200 um per side.")
    pixel_size = _check_number("pixel_size", pixel_size, 0.2, 4.0, hint="H&E pixel sizes are 0.2-4 um/px.")
    label_pixel_size = _check_number(
        "label_pixel_size", label_pixel_size, 0.25, 4.0, hint="Cells are 7-70 um wide; use 0.25-4 um/px."
    )
    for what, arg, size in (
        ("H&E", "pixel_size", pixel_size),
        ("cell-label raster", "label_pixel_size", label_pixel_size),
    ):
        n_pix = np.ceil(width / size) * np.ceil(height / size)
        if n_pix > MAX_HNE_PIXELS:
            raise ValueError(
                f"The {what} would have {n_pix:.3g} pixels (more than {MAX_HNE_PIXELS:.3g}); use a larger `{arg}`, "
                "a smaller `width`/`height`, or simulate several sections with different seeds."
            )
    params = LayoutParams(
        tissue_fraction=_check_number("tissue_fraction", tissue_fraction, 0.0, 1.0, lo_open=True),
        tumor_fraction=_check_number("tumor_fraction", tumor_fraction, 0.0, 1.0),
        fat_fraction=_check_number("fat_fraction", fat_fraction, 0.0, 1.0),
        insitu_fraction=_check_number("insitu_fraction", insitu_fraction, 0.0, 1.0),
        n_lymphoid_aggregates=None
        if n_lymphoid_aggregates is None
        else _check_count("n_lymphoid_aggregates", n_lymphoid_aggregates),
        vessel_density=_check_number("vessel_density", vessel_density, 0.0, 500.0),
        immune_infiltration=_check_number("immune_infiltration", immune_infiltration, 0.0, 5.0),
        cell_density=_check_number("cell_density", cell_density, 0.25, 4.0, hint="1 is realistic tissue."),
    )
    if tumor_fraction + fat_fraction > 1.0:
        raise ValueError(f"`tumor_fraction + fat_fraction` must be at most 1, got {tumor_fraction + fat_fraction}.")
    transcripts_per_cell = _check_number("transcripts_per_cell", transcripts_per_cell, 0.0, 10_000.0, lo_open=True)
    spatial_field_scale = _check_number("spatial_field_scale", spatial_field_scale, 10.0, 1e5)
    background_rate = _check_number("background_rate", background_rate, 0.0, 1.0)
    stain_variation = _check_number("stain_variation", stain_variation, 0.0, 5.0)
    layouts = [spot_layouts] if isinstance(spot_layouts, str) else list(spot_layouts)
    unknown = [s for s in layouts if s not in SPOT_LAYOUTS]
    if unknown:
        raise ValueError(
            f"`spot_layouts`: unknown layout(s) {unknown}; choose from {sorted(SPOT_LAYOUTS)} (or pass () for none)."
        )
    if len(set(layouts)) != len(layouts):
        raise ValueError(f"`spot_layouts` lists a layout more than once: {layouts}.")
    panel = xenium_breast_panel()
    genes = panel["gene"].tolist() if genes is None else check_genes(genes, panel["gene"].tolist())
    if hne_levels is not None:
        hne_levels = _check_count("hne_levels", hne_levels)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise TypeError(f"`seed` must be a non-negative integer, got {seed!r}.")

    stages = ["layout", "cell labels", "expression", "transcripts", "spots", "H&E", "SpatialData"]
    bar = tqdm(total=len(stages), desc="simulate_section", disable=not progress, leave=False)
    try:
        sdata, summary = _simulate(
            width=width,
            height=height,
            pixel_size=pixel_size,
            label_pixel_size=label_pixel_size,
            params=params,
            transcripts_per_cell=transcripts_per_cell,
            genes=genes,
            panel=panel,
            layouts=layouts,
            spatial_field_scale=spatial_field_scale,
            background_rate=background_rate,
            stain_variation=stain_variation,
            hne_levels=hne_levels,
            seed=int(seed),
            bar=bar,
            stages=stages,
        )
    finally:
        bar.close()

    from c3diff._provenance import _plain, record

    entry = record(
        sdata,
        "simulation",
        "c3diff.datasets.simulate_section",
        width=width,
        height=height,
        pixel_size=pixel_size,
        cell_density=params.cell_density,
        transcripts_per_cell=transcripts_per_cell,
        genes=genes,
        spot_layouts=layouts,
        label_pixel_size=label_pixel_size,
        tissue_fraction=params.tissue_fraction,
        tumor_fraction=params.tumor_fraction,
        fat_fraction=params.fat_fraction,
        insitu_fraction=params.insitu_fraction,
        n_lymphoid_aggregates=n_lymphoid_aggregates,
        immune_infiltration=params.immune_infiltration,
        vessel_density=params.vessel_density,
        spatial_field_scale=spatial_field_scale,
        background_rate=background_rate,
        stain_variation=stain_variation,
        hne_levels=hne_levels,
        seed=int(seed),
    )
    entry.update(_plain({"seed": int(seed), "version": __version__, **summary}))
    return sdata


def _simulate(
    *,
    width,
    height,
    pixel_size,
    label_pixel_size,
    params,
    transcripts_per_cell,
    genes,
    panel,
    layouts,
    spatial_field_scale,
    background_rate,
    stain_variation,
    hne_levels,
    seed,
    bar,
    stages,
):
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, Labels2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    from c3diff.datasets._celltypes import NICHES, TYPE_NAMES
    from c3diff.datasets._expression import (
        background_transcripts,
        build_programmes,
        place_transcripts,
        simulate_counts,
    )
    from c3diff.datasets._hne import render_hne
    from c3diff.datasets._layout import build_layout, rasterise_labels
    from c3diff.datasets._spots import SPOT_LAYOUTS, assign_to_spots, count_spots, disc_coverage, spot_grid

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    ident = {COORDINATE_SYSTEM: Identity()}

    step("layout")
    layout = build_layout(rngs[0], width, height, params)
    cells = layout.cells
    bar.update()

    step("cell labels")
    labels, lost = rasterise_labels(layout, label_pixel_size)
    if lost:
        warnings.warn(
            f"{lost} cell(s) share a label pixel with another cell at `label_pixel_size={label_pixel_size}`"
            " and got no pixel in `cell_labels`; use a smaller `label_pixel_size`.",
            UserWarning,
            stacklevel=3,
        )
    bar.update()

    step("expression")
    prog = build_programmes(rngs[1], panel)
    full_counts, extra = simulate_counts(
        rngs[1],
        prog,
        cells,
        width=width,
        height=height,
        transcripts_per_cell=transcripts_per_cell,
        spatial_field_scale=spatial_field_scale,
    )
    index = {g: i for i, g in enumerate(prog.genes)}
    sel = np.array([index[g] for g in genes], dtype=np.int64)
    counts = full_counts[:, sel].tocsr()
    bar.update()

    step("transcripts")
    tx = place_transcripts(rngs[2], counts, cells, labels, label_pixel_size, width=width, height=height)
    type_share = np.bincount(cells.type, minlength=len(TYPE_NAMES)).astype(float)
    profile = (type_share[:, None] * prog.weights).sum(axis=0)[sel] + 1e-12
    bg = background_transcripts(
        rngs[3],
        layout.tissue,
        layout.spacing,
        profile,
        width=width,
        height=height,
        rate_tissue=background_rate,
        rate_glass=background_rate / 10.0,
    )
    # float32 like Xenium; clipped in float32 so that no point lands on the far edge of the section
    x_max, y_max = np.nextafter(np.float32(width), np.float32(0)), np.nextafter(np.float32(height), np.float32(0))
    frame = pd.DataFrame(
        {
            "x": np.clip(np.concatenate([tx["x"], bg["x"]]).astype(np.float32), np.float32(0), x_max),
            "y": np.clip(np.concatenate([tx["y"], bg["y"]]).astype(np.float32), np.float32(0), y_max),
            "gene": pd.Categorical.from_codes(np.concatenate([tx["gene"], bg["gene"]]), categories=list(genes)),
            "cell_id": np.concatenate([tx["cell_id"], bg["cell_id"]]).astype(np.int32),
            "overlaps_nucleus": np.concatenate([tx["overlaps_nucleus"], bg["overlaps_nucleus"]]),
        }
    )
    bar.update()

    step("spots")
    spot_elements: dict[str, tuple] = {}
    gene_codes = frame["gene"].cat.codes.to_numpy().astype(np.int64)
    xs, ys = frame["x"].to_numpy(np.float64), frame["y"].to_numpy(np.float64)
    for name in layouts:
        lay = SPOT_LAYOUTS[name]
        grid = spot_grid(lay, width, height)
        n_spots = grid["x"].size
        if n_spots == 0:
            raise ValueError(
                f"No {name!r} spot ({lay.diameter} um) fits entirely in a {width} x {height} um section; "
                f"enlarge the section or drop {name!r} from `spot_layouts`."
            )
        which = assign_to_spots(lay, grid, xs, ys)
        X = count_spots(which, gene_codes, n_spots, len(genes))
        ids = np.arange(1, n_spots + 1)
        cover = disc_coverage(layout.tissue, layout.spacing, grid["x"], grid["y"], lay.diameter / 2)
        obs = pd.DataFrame(
            {
                "spot_id": ids,
                "region": pd.Categorical([lay.shapes_key] * n_spots),
                "in_tissue": cover >= 0.5,
                "array_row": grid["array_row"],
                "array_col": grid["array_col"],
            },
            index=[f"{name}_{i}" for i in ids],
        )
        table = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)))
        table.obsm["spatial"] = np.column_stack([grid["x"], grid["y"]])
        table.uns["c3diff"] = {"spots": {"layout": name, "diameter_um": lay.diameter, "pitch_um": lay.pitch}}
        table = TableModel.parse(table, region=lay.shapes_key, region_key="region", instance_key="spot_id")
        shapes = ShapesModel.parse(
            np.column_stack([grid["x"], grid["y"]]),
            geometry=0,
            radius=np.full(n_spots, lay.diameter / 2),
            index=ids,
            transformations=ident,
        )
        spot_elements[name] = (lay, shapes, table)
    del xs, ys, gene_codes
    bar.update()

    step("H&E")
    rgb = render_hne(
        rngs[4], layout, labels, label_pixel_size, pixel_size, extra["cycling"], stain_variation=stain_variation
    )
    bar.update()

    step("SpatialData")
    if hne_levels is None:
        hne_levels = 0
        while hne_levels < 3 and min(rgb.shape[1:]) / 2 ** (hne_levels + 1) >= 128:
            hne_levels += 1
    hne = Image2DModel.parse(
        rgb,
        dims=("c", "y", "x"),
        c_coords=list(RGB_CHANNELS),
        transformations={COORDINATE_SYSTEM: Scale([pixel_size, pixel_size], axes=("y", "x"))},
        scale_factors=[2] * hne_levels if hne_levels else None,
        chunks=(3, 2048, 2048),
    )
    cell_labels = Labels2DModel.parse(
        labels,
        dims=("y", "x"),
        transformations={COORDINATE_SYSTEM: Scale([label_pixel_size, label_pixel_size], axes=("y", "x"))},
        chunks=(2048, 2048),
    )
    cell_ids = np.arange(1, cells.n + 1)
    cell_shapes = ShapesModel.parse(
        np.column_stack([cells.x, cells.y]), geometry=0, radius=cells.radius, index=cell_ids, transformations=ident
    )
    obs = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "cell_type": pd.Categorical.from_codes(cells.type, categories=list(TYPE_NAMES)),
            "niche": pd.Categorical.from_codes(cells.niche, categories=list(NICHES)),
            "region": pd.Categorical([Key.CELLS.value] * cells.n),
        },
        index=cell_ids.astype(str),
    )
    var = panel.set_index("gene").loc[list(genes), ["group"]]
    var["kind"] = pd.Categorical(prog.kinds[sel], categories=["type_linked", "spatial_field", "housekeeping"])
    var.index.name = None
    p_background = profile / profile.sum()
    var["background_share"] = p_background.astype(np.float64)
    cell_table = ad.AnnData(
        X=counts.astype(np.float32), obs=obs, var=var, layers={"expected": extra["mu"][:, sel].astype(np.float32)}
    )
    cell_table.obsm["spatial"] = np.column_stack([cells.x, cells.y])
    # what c3diff.datasets.expected_counts needs to place the expected transcripts: cell discs and nucleus ellipses
    # (um, radians), the tissue mask of the background and its rates
    cell_table.obsm["cell_geometry"] = pd.DataFrame(
        {
            "radius": cells.radius,
            "nucleus_x": cells.nuc_x,
            "nucleus_y": cells.nuc_y,
            "nucleus_a": cells.nuc_a,
            "nucleus_b": cells.nuc_b,
            "nucleus_theta": cells.nuc_theta,
        },
        index=obs.index,
    ).astype(np.float64)
    cell_table.uns["c3diff"] = {
        "simulation": {
            "tissue_mask": np.asarray(layout.tissue, dtype=bool),
            "tissue_mask_spacing": float(layout.spacing),
            "background_rate_tissue": float(background_rate),
            "background_rate_glass": float(background_rate / 10.0),
            "width": float(width),
            "height": float(height),
        }
    }
    cell_table = TableModel.parse(cell_table, region=Key.CELLS.value, region_key="region", instance_key="cell_id")
    # partitions of ~1M transcripts: readers and binning then stream a whole slide in bounded memory
    points = PointsModel.parse(
        frame,
        coordinates={"x": "x", "y": "y"},
        feature_key="gene",
        instance_key="cell_id",
        transformations=ident,
        npartitions=max(1, -(-len(frame) // 1_000_000)),
    )

    shapes = {Key.CELLS.value: cell_shapes}
    tables = {Key.CELL_TABLE.value: cell_table}
    for lay, spot_shapes, table in spot_elements.values():
        shapes[lay.shapes_key] = spot_shapes
        tables[lay.table_key] = table
    sdata = SpatialData(
        images={Key.HNE.value: hne},
        labels={Key.CELL_LABELS.value: cell_labels},
        points={Key.TRANSCRIPTS.value: points},
        shapes=shapes,
        tables=tables,
    )
    kinds = prog.kinds[sel]
    summary = {
        "gene_kinds": {
            k: [g for g, kk in zip(genes, kinds, strict=True) if kk == k]
            for k in ("type_linked", "spatial_field", "housekeeping")
        },
        "cell_types": list(TYPE_NAMES),
        "niches": list(NICHES),
        "n_cells": int(cells.n),
        "n_transcripts": len(frame),
        "n_background_transcripts": int(bg["x"].size),
        "n_lymphoid_aggregates_placed": layout.n_lymphoid_aggregates,
        "n_insitu_nests": int(layout.n_insitu_nests),
        "n_vessels": int(layout.vessels["x"].size),
        "tissue_fraction_realised": float(layout.tissue.mean()),
    }
    bar.update()
    return sdata, summary
