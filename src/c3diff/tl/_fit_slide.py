"""c3.tl.fit_slide: fit a model's conditional-mean stage on the user's own slide, supervised by its spots.

Real tissue has no 10 um truth, but its spots are a truth one level down: neighbouring spots are pooled into
pseudo-spots, the pseudo-spots are rasterised to the 100 um LR grid as :func:`super_resolve` rasterises spots, and
the model's expected 10 um map ``mu_p = Y_L pi_p`` is summed over each original spot's disc footprint,
``lambda_s = sum_p w_sp mu_p`` (``w_sp`` the exact fraction of pixel ``p`` inside the disc), and compared with the
spot's counts by a Poisson likelihood (iStar and XFuse supervise the same way).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import ATTRS_KEY, COORDINATE_SYSTEM
from c3diff._validation import check_genes, get_element, raster_geometry
from c3diff.pp import TEXTURE_FEATURES, ModelGeometry, ModelInputs

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: Fewest pseudo-spots (pooled blocks with at least two members) a slide must give to be fitted on.
MIN_PSEUDO_SPOTS = 8
#: Genes selected by default (top variable genes of the table, :func:`c3diff.pp.select_genes`).
DEFAULT_N_GENES = 48


@dataclass(frozen=True)
class SlideSpots:
    """The spots of a table in micrometres: centres ``(n, 2)`` as (y, x), raw counts ``(n, genes)``, library
    ``(n,)`` (all genes), array coordinates ``(n, 2)`` (row, column; ``None`` when the table has none), diameter,
    pitch and whether the array is hexagonal (Visium: columns count half pitches)."""

    centres: np.ndarray
    counts: np.ndarray
    library: np.ndarray
    array: np.ndarray | None
    diameter: float
    pitch: float
    hexagonal: bool


@dataclass(frozen=True)
class PooledSpots:
    """Pseudo-spots: ``counts`` and ``library`` summed over the members of each block, ``centres`` (y, x) their
    mean position, ``members`` the number of spots pooled, ``blocks`` the block key of each pseudo-spot, and
    ``block_of_spot`` the pseudo-spot of each original spot (-1 when its block was dropped)."""

    centres: np.ndarray
    counts: np.ndarray
    library: np.ndarray
    members: np.ndarray
    blocks: np.ndarray
    block_of_spot: np.ndarray


def _spot_layout(sdata: SpatialData, table_key: str) -> dict[str, Any]:
    table = get_element(sdata, table_key, "tables", arg="table_key")
    return dict(table.uns.get(ATTRS_KEY, {}).get("spots", {}) or {})


def _spot_diameter(sdata: SpatialData, table_key: str, *, coordinate_system: str) -> float:
    """The spot diameter in um: ``uns["c3diff"]["spots"]["diameter_um"]``, else twice the circles' radius."""
    from c3diff._validation import transform_matrix

    layout = _spot_layout(sdata, table_key)
    diameter = layout.get("diameter_um")
    if diameter is not None and np.isfinite(float(diameter)) and float(diameter) > 0:
        return float(diameter)
    table = sdata.tables[table_key]
    region = table.uns.get("spatialdata_attrs", {}).get("region")
    region = region[0] if isinstance(region, list) and len(region) == 1 else region
    shapes = sdata.shapes.get(region) if isinstance(region, str) else None
    if shapes is None or "radius" not in shapes.columns:
        raise ValueError(
            f"fit_slide needs the spot diameter of `table_key={table_key!r}`: its "
            f"uns['{ATTRS_KEY}']['spots'] has no 'diameter_um' and the table annotates no circles with a radius "
            f"(region {region!r}). Read the data with c3.io.read_visium / read_legacy_st / spots_from_arrays, or set "
            f"`sdata.tables[{table_key!r}].uns['{ATTRS_KEY}'] = {{'spots': {{'diameter_um': 55.0}}}}` (Visium; "
            "legacy ST: 100.0)."
        )
    m = transform_matrix(shapes, coordinate_system=coordinate_system, arg=f"shapes {region!r}")
    radius = float(np.median(shapes["radius"].to_numpy()))
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(
            f"The circles {region!r} of `table_key={table_key!r}` have no positive radius (spot "
            f"diameter), got {radius!r}."
        )
    return 2.0 * radius * math.sqrt(abs(np.linalg.det(m[:2, :2])))


def _array_coordinates(obs, n: int) -> tuple[np.ndarray | None, bool]:
    """``(row, column)`` array coordinates of the spots (Visium ``array_row/array_col``, legacy ST
    ``array_y/array_x``) and whether the array is hexagonal (Visium: row + column always even)."""
    for row_key, col_key in (("array_row", "array_col"), ("array_y", "array_x")):
        if row_key in obs and col_key in obs:
            rows = np.asarray(obs[row_key].to_numpy(), dtype=np.int64)
            cols = np.asarray(obs[col_key].to_numpy(), dtype=np.int64)
            hexagonal = bool(
                row_key == "array_row" and n > 1 and np.all((rows + cols) % 2 == 0) and len(np.unique(rows % 2)) > 1
            )
            return np.stack([rows, cols], axis=1), hexagonal
    return None, False


def slide_spots(
    sdata: SpatialData, table_key: str, genes: list[str], *, coordinate_system: str = COORDINATE_SYSTEM
) -> SlideSpots:
    """The spots of ``table_key`` under tissue with counts (see :class:`SlideSpots`)."""
    from c3diff.pp import spots_from_table

    spots = spots_from_table(sdata, table_key, genes=genes, coordinate_system=coordinate_system)
    table = sdata.tables[table_key]
    rows = table.obs_names.get_indexer(spots.spot_ids)
    library = np.asarray(spots.library if spots.library is not None else spots.counts.sum(axis=1), dtype=np.float64)
    keep = library > 0
    array, hexagonal = _array_coordinates(table.obs.iloc[rows], len(rows))
    diameter = _spot_diameter(sdata, table_key, coordinate_system=coordinate_system)
    layout = _spot_layout(sdata, table_key)
    pitch = float(layout.get("pitch_um") or spots.pitch)
    return SlideSpots(
        centres=spots.centres[keep],
        counts=np.asarray(spots.counts, dtype=np.float64)[keep],
        library=library[keep],
        array=None if array is None else array[keep],
        diameter=diameter,
        pitch=pitch,
        hexagonal=hexagonal,
    )


def pool_spots(spots: SlideSpots, pool: int) -> PooledSpots:
    """Pool ``pool x pool`` blocks of the array grid (block = ``(row // pool, column // pool)``; a hexagonal array's
    columns count half pitches, so its blocks are ``column // (2 pool)``); without array coordinates, squares of
    ``pool`` pitches. Counts and library are summed, positions averaged; blocks of fewer than 2 spots are dropped."""
    if spots.array is not None:
        col_step = 2 * pool if spots.hexagonal else pool
        blocks = np.stack([spots.array[:, 0] // pool, spots.array[:, 1] // col_step], axis=1)
    else:
        blocks = np.floor(spots.centres / (pool * spots.pitch)).astype(np.int64)
    keys, block_id, sizes = np.unique(blocks, axis=0, return_inverse=True, return_counts=True)
    block_id = block_id.ravel()
    kept = sizes >= 2
    n_blocks = len(keys)

    def summed(values: np.ndarray) -> np.ndarray:
        out = np.zeros((n_blocks, *values.shape[1:]))
        np.add.at(out, block_id, values)
        return out[kept]

    members = sizes[kept].astype(np.float64)
    new_index = np.full(n_blocks, -1, dtype=np.int64)
    new_index[kept] = np.arange(int(kept.sum()))
    return PooledSpots(
        centres=summed(spots.centres) / members[:, None],
        counts=summed(spots.counts),
        library=summed(spots.library),
        members=members,
        blocks=keys[kept],
        block_of_spot=new_index[block_id],
    )


def pooled_sdata(pooled: PooledSpots, spots: SlideSpots, genes: list[str], *, pool: int) -> SpatialData:
    """The pseudo-spots as spot data (:func:`c3diff.io.spots_from_arrays`, no image): each pseudo-spot's counts per
    member spot on the members' disc, so that its density (counts per um^2 of spot) is the pooled spots' own; the
    library goes to ``obs["total_counts"]``."""
    from c3diff.io import spots_from_arrays

    per_member = pooled.counts / pooled.members[:, None]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not whole numbers.*")
        return spots_from_arrays(
            per_member,
            pooled.centres[:, ::-1],
            genes=genes,
            spot_diameter=spots.diameter,
            pitch=spots.pitch * pool,
            obs={"total_counts": pooled.library / pooled.members},
            layout=f"pooled {pool}x{pool}",
        )


def _model_inputs(
    sdata: SpatialData,
    image_key: str,
    pseudo: SpatialData,
    genes: list[str],
    *,
    geometry: ModelGeometry,
    texture: bool,
    coordinate_system: str,
) -> ModelInputs:
    """The model's inputs (:class:`c3diff.pp.ModelInputs`, as :func:`~c3diff.pp.make_patches` and
    :func:`super_resolve` build them): the H&E at the model's histology pixel size and its tissue, the pseudo-spots
    rasterised to the model's LR grid anchored at the H&E (:func:`~c3diff.pp.spots_to_grid`, as
    :func:`super_resolve` rasterises spots) and, with ``texture``, the H&E's texture."""
    from spatialdata.transformations import Identity, get_transformation, set_transformation

    inputs = ModelInputs.from_histology(sdata, image_key, geometry=geometry, coordinate_system=coordinate_system)
    # the pseudo-spots' circles are in micrometres of `coordinate_system` (spots_from_arrays calls it "global"); the
    # H&E joins them (under a key of its own) to anchor their grid
    for element in pseudo.shapes.values():
        if coordinate_system not in get_transformation(element, get_all=True):
            set_transformation(element, Identity(), to_coordinate_system=coordinate_system)
    taken = {*pseudo.images, *pseudo.labels, *pseudo.points, *pseudo.shapes, *pseudo.tables}
    anchor = image_key if image_key not in taken else f"{image_key}_anchor"
    pseudo.images[anchor] = sdata.images[image_key]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not whole numbers.*")
        inputs.add_lr(pseudo, genes=list(genes), image_key=anchor, table_key="table")
    if texture:  # what the H&E shows inside each histology pixel, for mean networks that read it
        inputs.add_texture(sdata, image_key=image_key)
    return inputs


def spot_windows(
    grid: Any, centres: np.ndarray, diameter: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each spot's disc footprint on ``grid`` as a dense window: ``rows``, ``cols`` ``(n, k)`` (absolute pixel
    indices) and ``weights`` ``(n, k)`` (the exact fraction of each pixel inside the disc; 0 in padding), plus the
    disc's area in pixels ``(n,)`` for reference. ``lambda_s = sum_k weights[s, k] * mu[rows[s, k], cols[s, k]]``."""
    from c3diff.metrics import spot_footprint

    matrix = spot_footprint(grid, centres, diameter / 2).tocsr()
    n = matrix.shape[0]
    k = int(np.diff(matrix.indptr).max()) if n else 0
    rows = np.zeros((n, max(k, 1)), dtype=np.int64)
    cols = np.zeros_like(rows)
    weights = np.zeros(rows.shape, dtype=np.float64)
    for s in range(n):
        lo, hi = matrix.indptr[s], matrix.indptr[s + 1]
        flat = matrix.indices[lo:hi]
        rows[s, : hi - lo], cols[s, : hi - lo] = np.divmod(flat, grid.width)
        weights[s, : hi - lo] = matrix.data[lo:hi]
    area = np.full(n, math.pi * (diameter / 2) ** 2 / (grid.sy * grid.sx))
    return rows, cols, weights, area


def footprint_sums(mu: Any, rows: Any, cols: Any, weights: Any, row0: int, col0: int) -> Any:
    """``lambda = sum_p w_sp mu_p`` of spots over a tile: ``mu`` ``(B, h, w)`` (torch or numpy) whose pixel
    ``(0, 0)`` is grid pixel ``(row0, col0)``; ``rows``, ``cols``, ``weights`` ``(n, k)`` from :func:`spot_windows`
    (every window pixel with a weight must lie in the tile). Returns ``(B, n)``."""
    h, w = mu.shape[-2:]
    local = (rows - row0) * w + (cols - col0)
    local = local.clip(0, h * w - 1)
    flat = mu.reshape(mu.shape[0], -1)
    return (flat[:, local] * weights[None]).sum(-1)


def _start_model(model: Any, genes: list[str], texture: bool = False):
    """A residual model for ``genes``: the ``tiny`` preset (a preset name), or a copy of ``model`` (object or folder)
    with every shape-compatible weight, the gene-specific parts fresh when its genes differ (a paper-formulation
    model gives its geometry and hint encoders; its mean stage starts fresh)."""
    import torch

    from c3diff.models import PRESETS, C3DiffModel, build_model, config_kwargs, from_pretrained

    if isinstance(model, str) and model in PRESETS:
        mean_config = PRESETS[model].get("mean_net_config")
        overrides = {}
        if mean_config is not None:  # the texture channels as asked (or as the H&E allows)
            k = len(TEXTURE_FEATURES) if texture else 0
            overrides["mean_net_config"] = {**mean_config, "texture_channels": k}
        fresh = build_model(model, genes=genes, **overrides)
        if fresh.mean_net is None:
            raise ValueError(
                f"`model={model!r}` has no conditional-mean stage; fit_slide needs a residual preset "
                "('tiny' or 'residual')."
            )
        return fresh, f"preset {model!r}"
    if isinstance(model, str | Path):
        source, name = from_pretrained(str(model)), str(model)
    elif isinstance(model, C3DiffModel):
        source, name = model, type(model).__name__
    else:
        raise TypeError(
            f"`model` must be a preset name ({sorted(PRESETS)}), a model folder or a C3DiffModel, got "
            f"{type(model).__name__}."
        )
    config = config_kwargs(source.config)
    if int(config.get("scale", 10)) != 10:  # its footprint sums are taken on the 10 um grid of a 10x model's output
        raise ValueError(
            f"`model` ({name}) predicts {config['scale']}x maps; fit_slide fits 10x models (the spot footprints are "
            "summed on their 10 um output). Start from a 10x model or a preset name; a 10x model also gives 5x maps "
            "(`super_resolve(scale=5)`)."
        )
    config.update(genes=list(genes), training_data=None)
    if source.mean_net is None:  # a paper-formulation model: its geometry and hint encoders, a fresh mean stage
        config.update(formulation="residual", mean_net_config=None)
    fresh = C3DiffModel(**config)
    same_genes = list(source.genes) == list(genes)
    own = fresh.state_dict()
    copied = {}
    for key, value in source.state_dict().items():
        if key in own and own[key].shape == value.shape and (same_genes or "gene_film" not in key):
            copied[key] = value
    with torch.no_grad():
        fresh.load_state_dict(copied, strict=False)
    fresh.mark_fitted("mean", False)  # (the fitted-stage state came with the weights)
    fresh.noise_scheduler = type(source.noise_scheduler).from_config(source.noise_scheduler.config)
    return fresh, name


def fit_slide(
    sdata: SpatialData,
    image_key: str,
    *,
    table_key: str,
    genes: list[str] | None = None,
    pool: int = 2,
    model: Any = "tiny",
    steps: int = 400,
    max_time: float | None = None,
    batch_size: int = 4,
    genes_per_tile: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
    texture: bool = False,
    progress: bool = True,
    output_dir: str | Path | None = None,
    coordinate_system: str = COORDINATE_SYSTEM,
):
    """Fit a model's conditional-mean stage on the slide itself, supervised by its spots (no 10 um truth needed).

    Neighbouring spots of the array are pooled (``pool x pool`` blocks: counts summed, positions averaged) into
    pseudo-spots, which are rasterised to the 100 um LR grid with :func:`c3diff.pp.spots_to_grid` exactly as
    :func:`super_resolve` rasterises spots: the tiles are cut from :class:`c3diff.pp.ModelInputs` at the model's
    stored geometry (:class:`c3diff.pp.ModelGeometry`), as training and :func:`super_resolve` cut theirs, with the
    same padding past the slide's edge. The slide is cut into the model's tiles (64 px at 10 um for the ``tiny``
    preset, at whole LR pixels), each tile's LR window is min-max normalised per gene as the model expects, and the
    model predicts its expected 10 um counts ``mu_p = Y_L pi_p`` (``Y_L`` the pseudo-spot raster's count of the LR
    pixel, ``pi_p`` the predicted share of pixel ``p``). Each original spot fully inside the tile gets
    ``lambda_s = sum_p w_sp mu_p``, with ``w_sp`` the exact fraction of pixel ``p`` inside the spot's disc (its
    diameter from the data), and the loss is the Poisson negative log-likelihood of the spot's counts ``y_s``. The
    hint encoders and the mean network (``model.trainable_parameters("mean")``) train with AdamW. The model learns
    where inside each LR pixel the H&E puts the counts, on the slide it will super-resolve.

    The result goes straight into :func:`super_resolve` (``mode="mean"``, the default for these models; with the
    default ``calibration="lr_pixel"`` the layer is exactly ``mu``). See ``docs/usage.md``, "Real tissue: fit on the
    slide".

    Parameters
    ----------
    sdata
        The section: the H&E and a spot table (Visium or legacy ST) with its circles.
    image_key
        The H&E image (RGB) in ``sdata.images``.
    table_key
        The spot table (raw counts). Its spot diameter is read from ``uns["c3diff"]["spots"]["diameter_um"]``
        (written by the readers and :func:`c3diff.io.spots_from_arrays`), else from the circles' radius; array
        coordinates from ``obs`` (``array_row``/``array_col`` or ``array_y``/``array_x``), else from the positions.
    genes
        Genes to fit (and later predict). Default: the table's top :data:`DEFAULT_N_GENES` variable genes
        (:func:`c3diff.pp.select_genes`).
    pool
        Spots per side of a pooled block (2: four Visium or legacy-ST spots per pseudo-spot).
    model
        Where to start: a preset name (``"tiny"``, the default, randomly initialised), a residual
        :class:`~c3diff.models.C3DiffModel` (e.g. :func:`c3diff.models.load_demo_model`) or a model folder. Its
        shape-compatible weights are copied (the hint encoders, the mean trunk and head); gene-specific parts start
        fresh when its genes differ, and a paper-formulation model (no mean stage) gets a fresh one. The given model
        is not modified.
    steps
        Optimisation steps (each: ``batch_size`` tiles x ``genes_per_tile`` genes).
    max_time
        Stop after this many seconds (whichever of ``steps`` and ``max_time`` comes first).
    batch_size, genes_per_tile
        Tiles per step and genes drawn per tile.
    learning_rate
        AdamW learning rate.
    seed
        Seeds the tiles, genes and initialisation drawn.
    texture
        Whether a preset's mean network reads the H&E's texture (:func:`c3diff.pp.histology_texture`: what each
        10 um pixel holds at ~1 um/px; the H&E must be 2.5 um/px or finer). Off by default: on a real legacy-ST
        section (her2st B4, 283 spots) a 180 s fit with texture scored below one without (the benchmarks page,
        real-tissue pool-and-recover): a few hundred spots do not pin down a per-gene weight for each feature. A
        given model keeps its own choice.
    progress
        Show a progress bar.
    output_dir
        Also save the fitted model there (``save_pretrained``, with a model card saying what it was fitted on).
    coordinate_system
        The micrometre coordinate system shared by the image and the spots.

    Returns
    -------
    The fitted :class:`~c3diff.models.C3DiffModel` (residual formulation, eval mode, ``is_fitted("mean")``,
    ``config.training_data`` describing the slide), with ``model.fit_history`` the loss of every step.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=960, height=960, seed=0)  # doctest: +SKIP
    >>> model = c3.tl.fit_slide(sdata, "hne", table_key="visium_table", steps=100)  # doctest: +SKIP
    >>> c3.tl.super_resolve(sdata, "hne", table_key="visium_table", model=model)  # doctest: +SKIP
    """
    import torch
    from tqdm.auto import tqdm

    from c3diff.pp import minmax_normalize

    # --- checks, before any work ---------------------------------------------------------------------------------
    image = get_element(sdata, image_key, "images", arg="image_key")
    raster_geometry(image, coordinate_system=coordinate_system, arg="image_key")
    table = get_element(sdata, table_key, "tables", arg="table_key")
    if isinstance(pool, bool) or not isinstance(pool, int | np.integer) or pool < 2:
        raise ValueError(f"`pool` must be an integer >= 2 (spots per side of a pooled block), got {pool!r}.")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("genes_per_tile", genes_per_tile)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if max_time is not None and not (isinstance(max_time, int | float) and max_time > 0):
        raise ValueError(f"`max_time` must be a positive number of seconds or None, got {max_time!r}.")
    if not (isinstance(learning_rate, int | float) and learning_rate > 0):
        raise ValueError(f"`learning_rate` must be a positive number, got {learning_rate!r}.")
    available = [str(g) for g in table.var_names]
    if genes is not None:
        genes = check_genes(genes, available, arg="genes")
    diameter = _spot_diameter(sdata, table_key, coordinate_system=coordinate_system)
    if genes is None:
        from c3diff.pp import select_genes

        genes = select_genes(table, n_top_genes=min(DEFAULT_N_GENES, table.n_vars), inplace=False)
    spots = slide_spots(sdata, table_key, list(genes), coordinate_system=coordinate_system)
    pooled = pool_spots(spots, int(pool))
    if len(pooled.counts) < MIN_PSEUDO_SPOTS:
        raise ValueError(
            f"Too few spots to pool: {len(spots.counts)} spot(s) with counts under tissue in `table_key={table_key!r}` "
            f"give {len(pooled.counts)} pseudo-spot(s) of {pool}x{pool} blocks with >= 2 spots; fit_slide needs at "
            f"least {MIN_PSEUDO_SPOTS}. Use a smaller `pool` or a larger section."
        )
    torch.manual_seed(seed)  # a fresh preset's initialisation
    start_model, start_name = _start_model(model, list(genes), bool(texture))

    # --- inputs: the model's (c3diff.pp.ModelInputs, as training and super_resolve build them) --------------------
    geometry = ModelGeometry.of_model(start_model.config)
    hist_px, lr_factor = geometry.histology_pixel_size, geometry.lr_factor
    size = int(start_model.config.image_size)
    pseudo = pooled_sdata(pooled, spots, list(genes), pool=int(pool))
    inputs = _model_inputs(
        sdata,
        image_key,
        pseudo,
        list(genes),
        geometry=geometry,
        texture=bool(start_model.texture_channels),
        coordinate_system=coordinate_system,
    )
    hist_grid = inputs.grid

    # --- tiles: every LR-aligned tile that holds spots fully inside it ----------------------------------------------
    rows, cols, weights, _ = spot_windows(hist_grid, spots.centres, diameter)
    radius = diameter / 2
    sy = (spots.centres[:, 0] - hist_grid.y0) / hist_px  # spot centres in histology pixels
    sx = (spots.centres[:, 1] - hist_grid.x0) / hist_px
    r_px = radius / hist_px
    phase_y, phase_x = inputs.phase
    origins = []
    for r in range(phase_y, max(hist_grid.height - size, 0) + lr_factor, lr_factor):
        for c in range(phase_x, max(hist_grid.width - size, 0) + lr_factor, lr_factor):
            inside = (sy - r_px >= r) & (sy + r_px <= r + size) & (sx - r_px >= c) & (sx + r_px <= c + size)
            inside &= (sy + r_px <= hist_grid.height) & (sx + r_px <= hist_grid.width)
            if inside.any() and inputs.tissue_window(r, c, size).any():
                origins.append((r, c, np.flatnonzero(inside)))
    if not origins:
        raise ValueError(
            f"No {size * hist_px:g} um tile of `image_key={image_key!r}` holds a whole spot of "
            f"`table_key={table_key!r}` ({diameter:g} um) on tissue: check that the spots and the H&E are registered."
        )

    # --- optimisation ---------------------------------------------------------------------------------------------
    rng = np.random.default_rng(seed)
    fitted = start_model
    fitted.train()
    device = fitted.device
    params = fitted.trainable_parameters("mean")
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    counts_t = torch.as_tensor(spots.counts, dtype=torch.float32)
    block = fitted.output_block()
    from c3diff.models import block_pixel_counts

    visible = (block_pixel_counts(size, size, block) / block**2).to(device)  # cut LR pixels: their visible share
    n_genes = len(genes)
    history: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="fit_slide", unit="step", disable=not progress)
    generator = torch.Generator().manual_seed(seed)
    try:
        for _ in range(steps):
            picks = rng.choice(len(origins), size=min(batch_size, len(origins)), replace=False)
            k = min(genes_per_tile, n_genes)
            histology, lr_norm, lr_counts, gene_index, patch_index, textures = [], [], [], [], [], []
            for t, pick in enumerate(picks):
                r, c, _ = origins[pick]
                chosen = rng.choice(n_genes, size=k, replace=False)
                hist = inputs.histology_window(r, c, size).astype(np.float32) / 255.0
                lr = inputs.lr_window(r, c, size)[0][chosen]
                histology.append(np.broadcast_to(hist, (k, *hist.shape)))
                if inputs.texture is not None:
                    textures.append(inputs.texture_window(r, c, size))
                lr_norm.append(minmax_normalize(lr)[0])
                lr_counts.append(lr)
                gene_index.append(chosen)
                patch_index.append(np.full(k, t))
            histology_t = torch.as_tensor(np.concatenate(histology), device=device)
            lr_t = torch.as_tensor(np.concatenate(lr_norm)[:, None], device=device)
            counts_lr = torch.as_tensor(np.concatenate(lr_counts)[:, None], device=device)
            genes_t = torch.as_tensor(np.concatenate(gene_index), device=device)
            missing = torch.zeros(len(genes_t), dtype=torch.bool, device=device)
            h_hint, st_hint, inverse, _, first = fitted._features(
                histology_t,
                lr_t,
                genes_t,
                missing,
                patch_index=torch.as_tensor(np.concatenate(patch_index)),
                generator=generator,
                contrastive=False,
            )
            texture_t = torch.as_tensor(np.stack(textures), device=device) if textures else None
            logits = fitted.mean_logits(h_hint, histology_t[first], st_hint, lr_t, genes_t, inverse, texture=texture_t)
            shares = fitted.mean_log_shares(logits).exp()[:, 0]
            y_lr = counts_lr.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[:, 0, :size, :size]
            mu = y_lr * shares * visible  # expected counts per 10 um pixel
            nll, total = mu.new_zeros(()), 0.0
            for t, pick in enumerate(picks):
                r, c, inside = origins[pick]
                items = slice(t * k, (t + 1) * k)
                lam = footprint_sums(
                    mu[items],
                    torch.as_tensor(rows[inside], device=device),
                    torch.as_tensor(cols[inside], device=device),
                    torch.as_tensor(weights[inside], dtype=mu.dtype, device=device),
                    r,
                    c,
                )
                y = counts_t[inside][:, torch.as_tensor(gene_index[t])].T.to(device)  # (k, n_spots)
                lam = lam.clamp_min(1e-6)
                nll = nll + (lam - y * torch.log(lam)).sum()
                total += float(y.sum())
            loss = nll / max(total, 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if max_time is not None and time.perf_counter() - start >= max_time:
                break
    finally:
        bar.close()
    fitted.eval()
    description = (
        f"fitted on one slide by c3.tl.fit_slide: image {image_key!r}, spot table {table_key!r} ({len(spots.counts)} "
        f"spots of {diameter:g} um, pitch {spots.pitch:g} um, pooled {pool}x{pool} into {len(pooled.counts)} "
        f"pseudo-spots), {len(genes)} genes, {len(history)} steps of spot-footprint Poisson likelihood, started "
        f"from {start_name}"
    )
    fitted = fitted.with_config(training_data=description)  # a config is set at construction only
    fitted.mark_fitted("mean")
    fitted.fit_history = history
    if output_dir is not None:
        fitted.save_pretrained(str(output_dir), training_data=description)
    return fitted
