"""c3.tl.super_resolve: whole-slide super-resolution of gene maps, tile by tile on dask, written as a raster layer."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from c3diff._constants import (
    ATTRS_KEY,
    COORDINATE_SYSTEM,
    HISTOLOGY_PIXEL_SIZE,
    LR_PIXEL_SIZE,
    MASK_MEASURED,
    MASK_OUTSIDE,
)
from c3diff._geometry import RasterGeometry, points_feature_key, points_genes, raster_geometry
from c3diff._provenance import record
from c3diff._validation import check_genes, check_key_added, get_element
from c3diff.pp import bin_transcripts, detect_tissue, histology_raster, minmax_normalize, spots_to_grid
from c3diff.tl._execution import active_client, chunked, run_tasks
from c3diff.tl._footprints import bin_footprints, match_footprints, spot_footprints
from c3diff.tl._memory import bytes_per_gene, check_memory
from c3diff.tl._predictors import (
    BicubicPredictor,
    ModelPayload,
    ModelPredictor,
    TileBatch,
    resolve_device,
    run_predictor,
)
from c3diff.tl._tiling import BlendAccumulator, blend_window, plan_tiles
from c3diff.tl._tissue import layer_tissue_mask, zero_off_tissue

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: What the values of a super-resolved layer mean (also recorded with each layer).
UNITS = (
    "expected transcript counts per output pixel: the expected count of that square as if all tissue had been "
    "measured, so summed over each measured spot's disc (or 100 um transcript bin) the layer gives that spot's count "
    "(to the tolerance recorded with the layer), and 0 off the tissue mask. Tiles are first calibrated to the LR "
    "counts: with "
    "calibration='lr_pixel' the "
    "prediction summed over each measured (or gap-filled) 100 um LR pixel equals its count; with calibration='tile' "
    "one factor per tile and gene makes the sum over the tile's measured LR pixels equal theirs"
)

#: Calibrations of a [0, 1] prediction to counts (see :func:`super_resolve`).
CALIBRATIONS = ("lr_pixel", "tile")

#: ``steps``, ``n_samples`` (sample mode) and ``batch_size`` of :func:`super_resolve` when not given, by device kind.
#: GPU: the paper's 50 DDIM steps. CPU: 2 steps, to keep sampling affordable (what steps and samples do to the scores
#: of the shipped model: :doc:`/benchmarks`); the layer written is the exact conditional mean in either case.
DEVICE_DEFAULTS = {
    "cpu": {"steps": 2, "n_samples": 4, "batch_size": 4},
    "cuda": {"steps": 50, "n_samples": 4, "batch_size": 16},
}
#: Paper-formulation models (no conditional mean: the samples are the map) keep the previous defaults on any device.
PAPER_FORMULATION_DEFAULTS = {"steps": 50, "n_samples": 1}
_ANNOUNCED: set[tuple] = set()


def _device_defaults(device: str) -> tuple[str, dict[str, int]]:
    kind = resolve_device(device).split(":")[0]
    return kind, DEVICE_DEFAULTS.get(kind, DEVICE_DEFAULTS["cpu"])


def _announce(choice: dict[str, Any], *, show: bool) -> None:
    """Say once per process which defaults were taken for the device (logged at INFO; printed when ``show``)."""
    import logging

    text = "super_resolve on {device}: " + ", ".join(f"{k}={{{k}}}" for k in choice if k != "device")
    text = text.format(**choice) + " (defaults for this device; pass them to choose)"
    logging.getLogger("c3diff").info(text)
    key = tuple(sorted(choice.items()))
    if show and key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(text, flush=True)


def _torch_threads_as_dask_threads(client_pid: int, dask_worker: Any = None) -> int:
    """Run by ``client.run`` on each dask worker: torch's intra-op threads = the worker's dask threads. distributed's
    nanny starts workers with ``OMP_NUM_THREADS=1``, and one model call runs at a time per process, so without this a
    worker given several threads runs the model on one; in the client's own process (``processes=False``) nothing
    changes."""
    import os

    import torch

    if os.getpid() != client_pid and dask_worker is not None:
        torch.set_num_threads(max(1, int(dask_worker.state.nthreads)))
    return torch.get_num_threads()


def _spot_tables(sdata: SpatialData) -> list[str]:
    keys = []
    for key, table in sdata.tables.items():
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        region = region[0] if isinstance(region, list) and len(region) == 1 else region
        if isinstance(region, str) and region in sdata.shapes and "radius" in sdata.shapes[region].columns:
            keys.append(key)
    return keys


def _choose_lr_source(sdata: SpatialData, table_key: str | None, points_key: str | None) -> tuple[str, str]:
    if table_key is not None and points_key is not None:
        raise ValueError("Pass one LR source: `table_key` (spot counts) or `points_key` (transcripts), not both.")
    if table_key is not None:
        get_element(sdata, table_key, "tables", arg="table_key")
        return "table", table_key
    if points_key is not None:
        get_element(sdata, points_key, "points", arg="points_key")
        return "points", points_key
    candidates = _spot_tables(sdata)
    if len(candidates) == 1:
        return "table", candidates[0]
    if not candidates and len(sdata.points) == 1:
        return "points", next(iter(sdata.points))
    raise ValueError(
        "Say which low-resolution counts to super-resolve: pass `table_key` (one of the spot tables "
        f"{candidates}) or `points_key` (one of the points elements {sorted(sdata.points)})."
    )


def _load_model(model: Any, revision: str | None):
    if model is None:
        from c3diff.models.bundled import MODEL_CHOICES

        raise ValueError(
            f"`model` is required with method='c3diff', got None. Pass {MODEL_CHOICES}; or use "
            "method='bicubic', which needs no model."
        )
    if isinstance(model, str | Path):
        from c3diff.models import from_pretrained

        return from_pretrained(str(model), revision=revision), str(model)
    if not hasattr(model, "predict") or not hasattr(model, "config"):
        raise TypeError(f"`model` must be a c3diff model, a local folder or a Hub repo id, got {type(model).__name__}.")
    from c3diff.models.hub import warn_ignored_revision

    warn_ignored_revision(revision, what="a model object")
    return model, None


def _model_geometry(model) -> dict[str, Any]:
    config = model.config
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    geometry = {
        "image_size": int(get("image_size")),
        "genes": list(get("genes")),
        "scale": int(get("scale", 10)),
        "histology_pixel_size": float(get("histology_pixel_size", HISTOLOGY_PIXEL_SIZE)),
        "lr_pixel_size": float(get("lr_pixel_size", LR_PIXEL_SIZE)),
    }
    if geometry["histology_pixel_size"] != HISTOLOGY_PIXEL_SIZE or geometry["lr_pixel_size"] != LR_PIXEL_SIZE:
        raise ValueError(
            f"This model expects histology at {geometry['histology_pixel_size']:g} um/px and LR maps at "
            f"{geometry['lr_pixel_size']:g} um/px; c3diff's super_resolve builds {HISTOLOGY_PIXEL_SIZE:g} and "
            f"{LR_PIXEL_SIZE:g} um/px inputs."
        )
    return geometry


def _transformations_like(image: Any, grid: RasterGeometry, coordinate_system: str) -> dict[str, Any]:
    """The output grid in ``coordinate_system`` and, through the image, in every other system the image is in."""
    from spatialdata.transformations import Sequence, get_transformation

    own = grid.transformation()
    transformations = {coordinate_system: own}
    image_transforms = get_transformation(image, get_all=True)
    to_cs = image_transforms[coordinate_system]
    for name, transform in image_transforms.items():
        if name != coordinate_system:
            transformations[name] = Sequence([own, to_cs.inverse(), transform])
    return transformations


def _to_counts(
    pred: np.ndarray,
    std: np.ndarray | None,
    lr_counts: np.ndarray,
    lr_mask: np.ndarray,
    per_lr: int,
    calibration: str = "lr_pixel",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Map a [0, 1] tile prediction ``(G, h, w)`` to counts per output pixel (see :data:`UNITS`).

    ``"tile"``: each gene is scaled so that the prediction summed over the tile's measured LR pixels equals their LR
    counts; a gene predicted flat zero where the LR has counts (e.g. a constant LR map, which min-max maps to 0) gets
    the LR density spread evenly instead.

    ``"lr_pixel"``: the prediction keeps its pattern inside each LR pixel but is scaled so that its sum over the LR
    pixel equals the LR count (for an LR pixel cut by the tile's edge, the count times the fraction inside): the
    output honours every measurement at the resolution it was made, as a data-consistency projection. LR pixels
    where the prediction is zero but the count is not get the count spread evenly; LR pixels outside the measured
    area (no spot coverage) keep the tile calibration.
    """
    counts, factors = _tile_calibration(pred, lr_counts, lr_mask, per_lr)
    if calibration == "lr_pixel":
        counts, factors = _lr_pixel_calibration(pred, counts, factors, lr_counts, lr_mask, per_lr)
    if std is None:
        return counts, None
    return counts, std * factors


def _tile_calibration(
    pred: np.ndarray, lr_counts: np.ndarray, lr_mask: np.ndarray, per_lr: int
) -> tuple[np.ndarray, np.ndarray]:
    n = pred.shape[-1] // per_lr
    pooled = pred[:, : n * per_lr, : n * per_lr].reshape(pred.shape[0], n, per_lr, n, per_lr).sum(axis=(2, 4))
    measured = lr_mask[:n, :n] == MASK_MEASURED
    if not measured.any():
        measured = lr_mask[:n, :n] != MASK_OUTSIDE
    numerator = lr_counts[:, :n, :n][:, measured].sum(axis=1)
    denominator = pooled[:, measured].sum(axis=1)
    factors = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)
    factors = np.broadcast_to(factors[:, None, None], pred.shape).astype(np.float32)
    counts = pred * factors
    flat = (denominator <= 0) & (numerator > 0)
    if flat.any():
        counts[flat] = (numerator[flat] / (max(int(measured.sum()), 1) * per_lr**2))[:, None, None]
    return counts, factors


def _lr_pixel_calibration(
    pred: np.ndarray,
    counts: np.ndarray,
    factors: np.ndarray,
    lr_counts: np.ndarray,
    lr_mask: np.ndarray,
    per_lr: int,
) -> tuple[np.ndarray, np.ndarray]:
    n_genes, height, width = pred.shape
    ny, nx = -(-height // per_lr), -(-width // per_lr)  # LR pixels touched by the tile, the last ones maybe cut
    ny, nx = min(ny, lr_counts.shape[-2]), min(nx, lr_counts.shape[-1])
    h, w = min(height, ny * per_lr), min(width, nx * per_lr)
    padded = np.zeros((n_genes, ny * per_lr, nx * per_lr), dtype=np.float64)
    padded[:, :h, :w] = pred[:, :h, :w]
    pooled = padded.reshape(n_genes, ny, per_lr, nx, per_lr).sum(axis=(2, 4))
    inside = np.zeros((ny * per_lr, nx * per_lr))
    inside[:h, :w] = 1.0
    n_inside = inside.reshape(ny, per_lr, nx, per_lr).sum(axis=(1, 3))  # output pixels of each LR pixel in the tile
    expected = lr_counts[:, :ny, :nx].astype(np.float64) * (n_inside / per_lr**2)
    covered = (lr_mask[:ny, :nx] != MASK_OUTSIDE) & (n_inside > 0)
    block = np.where(pooled > 0, expected / np.where(pooled > 0, pooled, 1.0), 0.0)
    even = np.where((pooled <= 0) & (expected > 0), expected / np.maximum(n_inside, 1), 0.0)

    def up(a: np.ndarray) -> np.ndarray:  # LR grid -> output pixels of the tile
        return np.repeat(np.repeat(a, per_lr, axis=-2), per_lr, axis=-1)[..., :h, :w]

    use = up(np.broadcast_to(covered, block.shape))
    counts, factors = counts.copy(), factors.copy()
    counts[:, :h, :w] = np.where(use, pred[:, :h, :w] * up(block) + up(even), counts[:, :h, :w])
    factors[:, :h, :w] = np.where(use, up(block), factors[:, :h, :w])
    return counts.astype(np.float32), factors.astype(np.float32)


def _parse_layer(values: Any, genes: list[str], transformations: dict[str, Any]):
    from spatialdata.models import Image2DModel

    height, width = values.shape[-2:]
    levels = max(1, min(5, int(math.floor(math.log2(max(min(height, width), 1) / 64)))))
    levels = levels if min(height, width) >= 2 else 0
    return Image2DModel.parse(
        values,
        dims=("c", "y", "x"),
        c_coords=genes,
        transformations=transformations,
        scale_factors=[2] * levels if levels else None,
        chunks=(1, min(256, height), min(256, width)),
    )


def _temporary_store(store: str | Path, sdata: SpatialData, key: str, *, overwrite: bool) -> Path:
    """The hidden folder beside ``store`` that receives the tiles until the layer is complete (see ``store`` in
    :func:`super_resolve`), after refusing a store that already exists and removing what killed or failed calls
    left; nothing is created yet."""
    import os
    import shutil

    final = Path(store).expanduser().absolute()
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        layers = sdata.attrs.get(ATTRS_KEY, {})
        owner = [
            k
            for k, v in layers.items()
            if isinstance(v, dict) and v.get("params", {}).get("store") in (str(final), str(final.resolve()))
        ]
        if not (overwrite and owner == [key]):
            held = f" and holds the layer {owner[0]!r}" if owner else ""
            raise ValueError(
                f"`store={str(store)!r}` already exists{held}. A store holds one layer: writing another into it would "
                "change the layer it holds. Pass a new path for `store`"
                + (
                    ", or overwrite=True with that layer's `key_added` to replace it."
                    if owner
                    else ", or delete the folder if no layer uses it."
                )
            )
    if not final.parent.is_dir():
        raise FileNotFoundError(
            f"`store={str(store)!r}`: the folder {str(final.parent)!r} does not exist; create it "
            "or choose another path."
        )
    for stale in final.parent.glob(f".{final.name}.c3diff-tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue  # another process is writing it
        shutil.rmtree(stale, ignore_errors=True)
    return final.parent / f".{final.name}.c3diff-tmp-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish_store(tmp: Path, final: Path, n_arrays: int) -> list[Any]:
    """Rename the complete ``tmp`` store to ``final`` (replacing the store of the layer being overwritten) and
    return its arrays (``mean``, then ``std``) read from there."""
    import shutil

    import dask.array as da

    final = final.expanduser().absolute()
    old = None
    if final.exists():
        old = final.parent / f"{tmp.name}-replaced"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return [da.from_zarr(str(final / name)) for name in ("mean", "std")[:n_arrays]]


def super_resolve(
    sdata: SpatialData,
    image_key: str,
    *,
    table_key: str | None = None,
    points_key: str | None = None,
    genes: list[str] | None = None,
    scale: Literal[5, 10] = 10,
    model: Any = None,
    method: Literal["c3diff", "bicubic"] = "c3diff",
    mode: Literal["mean", "sample"] | None = None,
    steps: int | None = None,
    eta: float = 0.0,
    n_samples: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    overlap: int | None = None,
    tile_size: int | None = None,
    calibration: Literal["lr_pixel", "tile"] | None = None,
    drop_missing_genes: bool = False,
    revision: str | None = None,
    store: str | Path | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
    progress: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> dict[str, Any] | None:
    """Super-resolve low-resolution gene counts with the H&E, over the whole slide, tile by tile.

    The spot counts (``table_key``) or transcripts (``points_key``) are turned into the model's inputs with
    :mod:`c3diff.pp`: an LR map at 100 um/px (:func:`~c3diff.pp.spots_to_grid` / :func:`~c3diff.pp.bin_transcripts`)
    and the histology at 10 um/px, both anchored at the H&E's corner. The tissue (detected in the H&E) is covered
    with overlapping tiles of the model's size (2.56 mm for the paper preset); each tile's LR maps are min-max
    normalised, the model predicts the HR maps, the predictions are mapped to expression units (:data:`UNITS`) and
    overlapping tiles are cross-faded (no seams). A pixel value is the expected count of that 10 um (20 um at
    ``scale=5``) square as if all tissue had been measured: the finished layer is 0 off the tissue (the H&E's tissue
    where the counts have data, one mask for every method) and a smooth correction makes its sum over each spot's
    disc (or 100 um transcript bin) equal that spot's count (``sdata.attrs["c3diff"][key_added]["params"]
    ["footprints"]`` records how closely). Before allocating, the memory the run needs is estimated; more genes than
    fit raise a MemoryError saying how many fit. Tiles run as dask tasks on the active scheduler - a
    ``dask.distributed.Client`` included (a model given by path or repo id is loaded once per worker; a model object
    is scattered once to each worker) - and results are blended as they arrive, so memory is bounded by the tile
    batch (plus the output, unless ``store`` streams it to disk). Nothing is written unless everything succeeded.

    Parameters
    ----------
    sdata
        The section.
    image_key
        The H&E image (RGB) in ``sdata.images``.
    table_key
        A spot table (Visium / legacy ST) to super-resolve.
    points_key
        Transcripts to super-resolve (binned at 100 um for the LR input). Default: the only spot table, else the only
        points element.
    genes
        Genes to predict. Default: the model's genes (c3diff) or every gene of the LR source (bicubic).
    scale
        10 (10 um output pixels) or 5 (20 um). A model trained at 10x predicts 5x by 2x2 averaging.
    model
        A c3diff model object, a local folder written by ``save_pretrained``, or a Hugging Face Hub repo id.
    method
        ``"c3diff"`` (the model) or ``"bicubic"`` (bicubic upsampling of the LR map through the same path: the
        baseline).
    mode
        What a model with a conditional-mean stage (``formulation="residual"``, e.g. the bundled demo model)
        computes. ``"mean"`` (the default for such models): the expected map, one deterministic forward pass per
        tile and gene batch - the best pixel-wise estimate (PCC, RMSE) at a fraction of a sampling step's cost;
        ``steps``, ``eta`` and ``n_samples`` are unused. ``"sample"``: additionally draws ``n_samples`` maps (mean +
        a residual sampled by ``steps`` DDIM steps) and writes their standard deviation as ``f"{key_added}_std"``,
        an uncertainty map, at about ``steps x n_samples`` times the cost; the layer itself stays the exact mean.
        Paper-formulation models only sample (``None`` or ``"sample"``).
    steps, eta
        DDIM sampling steps and eta. Default steps: :data:`DEVICE_DEFAULTS` for the device (50 on a GPU, 2 on the
        CPU; the choice is printed once); paper-formulation models: 50 (:data:`PAPER_FORMULATION_DEFAULTS`).
    n_samples
        Samples per tile (default: :data:`DEVICE_DEFAULTS` in sample mode, 4; 1 in mean mode and for
        paper-formulation models); with more than one
        a ``f"{key_added}_std"`` layer holds their standard deviation (an
        uncertainty map). Paper-formulation models write the mean of the samples: one sample is one plausible map,
        with cell-level detail that may sit in the wrong place; the mean of several is closer to the expected map
        and scores higher on pixel-wise metrics such as PCC.
    batch_size
        Tiles per dask task (and model call); default :data:`DEVICE_DEFAULTS` (4 on the CPU, 16 on a GPU). A tile's
        genes go through the model in as few calls as memory allows
        (:func:`~c3diff.models.sampling.auto_gene_batch_size`).
    device
        ``"auto"`` (a GPU when visible), ``"cpu"``, ``"cuda"``, ...
    seed
        Base seed; tile ``i`` of the tile plan uses ``seed + i``, so results do not depend on the scheduler.
    overlap
        Overlap of neighbouring tiles in histology pixels (10 um). Default: a quarter of the tile; the stride is
        rounded down to whole LR pixels.
    tile_size
        Tile size in histology pixels for ``method="bicubic"`` (default 256); c3diff uses the model's.
    calibration
        How a tile's [0, 1] prediction becomes counts (:data:`UNITS`). ``"lr_pixel"`` (the default for c3diff):
        scaled inside every measured or gap-filled 100 um LR pixel so that it sums to that pixel's count - the output
        honours each measurement, and the model decides where inside the LR pixel the counts go. ``"tile"`` (the
        default for bicubic, whose smooth interpolation already follows the LR map and would turn blocky): one factor
        per tile and gene, the pattern across LR pixels kept as predicted.
    drop_missing_genes
        Predict only the requested genes present in the data (warning which are dropped) instead of raising.
    revision
        Hub revision (tag, branch or commit) when ``model`` is a repo id; pin it for reproducible results.
    store
        Path of a zarr store that receives the output tile by tile (memory stays flat for whole slides); by default
        the output is held in memory. The tiles go to a hidden folder beside it (``.NAME.c3diff-tmp-PID``), renamed
        to ``store`` only when the layer is complete, so a killed or failed call never leaves a partial layer there
        (the next call cleans the hidden folder up). A store holds one layer: a path that already exists is refused,
        except with ``overwrite=True`` for the store of the layer being replaced.
    key_added
        Name of the new image. Default ``f"{image_key}_{method}_x{scale}"``, e.g. ``"hne_c3diff_x10"``.
    overwrite
        Replace an existing element named ``key_added`` (and ``f"{key_added}_std"``) instead of raising. The input
        H&E and the counts are never replaced.
    inplace
        Write into ``sdata`` (return ``None``); otherwise return ``{"mean": ..., "std": ...}``.
    progress
        Show a progress bar of tiles done.
    coordinate_system
        The micrometre coordinate system shared by the image and the counts.

    Returns
    -------
    ``None``; or with ``inplace=False`` a dict with the ``"mean"`` layer and the ``"std"`` layer (or ``None``).
    The layer is an Image2DModel (multiscale, chunked per gene) with ``c`` = genes whose transformations place it
    exactly on the H&E in every coordinate system the H&E has. Parameters, model and version are recorded in
    ``sdata.attrs["c3diff"][key_added]``.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> c3.tl.super_resolve(sdata, "hne", table_key="visium_table", model="org/c3diff-breast",
    ...                     revision="v1")  # doctest: +SKIP
    >>> c3.tl.super_resolve(sdata, "hne", table_key="visium_table", method="bicubic")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if method not in ("c3diff", "bicubic"):
        raise ValueError(f"`method` must be 'c3diff' or 'bicubic', got {method!r}.")
    if scale not in (5, 10):
        raise ValueError(f"`scale` must be 5 or 10, got {scale!r}.")
    if calibration is None:
        calibration = "lr_pixel" if method == "c3diff" else "tile"
    if calibration not in CALIBRATIONS:
        raise ValueError(f"`calibration` must be one of {CALIBRATIONS}, got {calibration!r}.")
    device_kind, defaults = _device_defaults(device)
    chosen = {k: defaults[k] for k, v in (("steps", steps), ("batch_size", batch_size)) if v is None}
    steps = defaults["steps"] if steps is None else steps
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    for name, value, low in (
        ("steps", steps, 1),
        ("n_samples", 1 if n_samples is None else n_samples, 1),
        ("batch_size", batch_size, 1),
    ):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"`eta` must be in [0, 1], got {eta!r}.")
    if mode not in (None, "mean", "sample"):
        raise ValueError(f"`mode` must be 'mean', 'sample' or None, got {mode!r}.")
    image = get_element(sdata, image_key, "images", arg="image_key")
    raster_geometry(image, coordinate_system=coordinate_system, arg="image_key")  # fail early: axis-aligned, in um
    source_kind, source_key = _choose_lr_source(sdata, table_key, points_key)

    # --- what to predict, and with what ------------------------------------------------------------------------
    if source_kind == "table":
        available = [str(g) for g in sdata.tables[source_key].var_names]
    else:
        points = sdata.points[source_key]
        available = points_genes(points, points_feature_key(points, arg="points_key"))
    model_obj = model_id = None
    if method == "c3diff":
        model_obj, model_id = _load_model(model, revision)
        from c3diff.models.bundled import warn_demo_on_real_data

        warn_demo_on_real_data(model_obj, sdata)  # once: the demo model knows simulated tissue only
        geometry = _model_geometry(model_obj)
        has_mean = getattr(model_obj, "mean_net", None) is not None
        if mode == "mean" and not has_mean:
            raise ValueError(
                "`mode='mean'` needs a model with a conditional-mean stage (formulation='residual'); "
                "this model only samples: pass mode='sample' or None."
            )
        mode = mode or ("mean" if has_mean else "sample")
        if scale > geometry["scale"]:
            raise ValueError(f"This model was trained for {geometry['scale']}x; it cannot predict {scale}x.")
        size = geometry["image_size"]
        model_genes = geometry["genes"]
        genes = model_genes if genes is None else check_genes(genes, model_genes, arg="genes (of the model)")
    else:
        size = 256 if tile_size is None else int(tile_size)
        genes = available if genes is None else check_genes(genes, available)
    if method == "c3diff" and getattr(model_obj, "mean_net", None) is None:
        defaults = {**defaults, **PAPER_FORMULATION_DEFAULTS}
        if "steps" in chosen:
            steps = chosen["steps"] = defaults["steps"]
    if n_samples is None:
        n_samples = defaults["n_samples"] if method == "c3diff" and mode == "sample" else 1
        if n_samples > 1:
            chosen["n_samples"] = n_samples
    if method != "c3diff" or mode != "sample":
        chosen.pop("steps", None)
    if chosen:
        _announce({"device": device_kind, **chosen}, show=progress)
    missing = [g for g in genes if g not in set(available)]
    if missing:
        shown = f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        where = f"`{source_kind}_key={source_key!r}`"
        if len(missing) == len(genes):
            raise KeyError(
                f"None of the {len(genes)} gene(s) to predict is in {where} (e.g. {shown}; the data has "
                f"{list(available)[:5]}{' ...' if len(available) > 5 else ''}): the model and the data share no gene, "
                "so nothing can be predicted, with or without `drop_missing_genes`. Use a model trained on this "
                "panel, or check the gene naming (symbols vs Ensembl ids, human vs mouse case)."
            )
        if not drop_missing_genes:
            raise KeyError(
                f"{len(missing)} of the {len(genes)} gene(s) to predict are not in {where}: {shown}. Pass `genes` to "
                "choose a subset, or `drop_missing_genes=True` to skip them."
            )
        warnings.warn(
            f"super_resolve: dropping {len(missing)} gene(s) absent from the data: {missing}.",
            UserWarning,
            stacklevel=2,
        )
        genes = [g for g in genes if g not in set(missing)]

    key = key_added or f"{image_key}_{method}_x{scale}"
    if inplace:
        writes_std = n_samples > 1 and method == "c3diff" and mode == "sample"
        check_key_added(
            sdata, [key, *([f"{key}_std"] if writes_std else [])], overwrite=overwrite, inputs=(image_key, source_key)
        )
    store_tmp = None if store is None else _temporary_store(store, sdata, key, overwrite=overwrite and inplace)

    hist_px = HISTOLOGY_PIXEL_SIZE
    lr_factor = round(LR_PIXEL_SIZE / hist_px)
    out_factor = 10 // scale  # histology pixels per output pixel
    if size % out_factor or size < lr_factor:
        raise ValueError(f"The tile size must be a multiple of {out_factor} and at least {lr_factor}, got {size}.")
    overlap = size // 4 if overlap is None else int(overlap)
    stride = ((size - overlap) // lr_factor) * lr_factor
    if stride <= 0:
        raise ValueError(f"`overlap={overlap}` leaves no stride for tiles of {size} px; use a smaller overlap.")
    lr_size = math.ceil(size / lr_factor)

    # --- inputs on the H&E-anchored grids -------------------------------------------------------------------
    rgb, hist_grid = histology_raster(sdata, image_key, pixel_size=hist_px, coordinate_system=coordinate_system)
    sizes = dict(  # the memory is checked before the LR rasters and the output are allocated
        out_shape=(math.ceil(hist_grid.height / out_factor), math.ceil(hist_grid.width / out_factor)),
        lr_shape=(math.ceil(hist_grid.height / lr_factor), math.ceil(hist_grid.width / lr_factor)),
        n_tiles=len(plan_tiles(hist_grid.height, hist_grid.width, size=size, stride=stride)),
        lr_tile=lr_size,
        out_tile=size // out_factor,
        n_layers=2 if n_samples > 1 and method == "c3diff" else 1,
        spots=source_kind == "table",
    )
    check_memory(
        len(genes),
        bytes_per_gene(**sizes, streamed=store is not None),
        streamed=store is not None,
        streamed_per_gene=bytes_per_gene(**sizes, streamed=True),
    )
    if source_kind == "table":
        raster, mask = spots_to_grid(
            sdata,
            table_key=source_key,
            genes=genes,
            image_key=image_key,
            inplace=False,
            coordinate_system=coordinate_system,
        )
        lr_full, lr_mask = np.asarray(raster.data, dtype=np.float32), np.asarray(mask.data, dtype=np.uint8)
    else:
        raster = bin_transcripts(
            sdata,
            points_key=source_key,
            bin_size=LR_PIXEL_SIZE,
            genes=genes,
            image_key=image_key,
            inplace=False,
            coordinate_system=coordinate_system,
        )
        lr_full = np.asarray(raster.data, dtype=np.float32)
        lr_mask = np.full(lr_full.shape[-2:], MASK_MEASURED, dtype=np.uint8)
    tissue = detect_tissue(rgb, pixel_size=hist_px)
    coverage = np.kron(lr_mask != MASK_OUTSIDE, np.ones((lr_factor, lr_factor), dtype=bool))
    coverage = coverage[: tissue.shape[0], : tissue.shape[1]]
    tissue[: coverage.shape[0], : coverage.shape[1]] &= coverage
    if not tissue.any():
        raise ValueError(
            f"No tissue with counts: the H&E `image_key={image_key!r}` shows no tissue where "
            f"`{source_kind}_key={source_key!r}` has data."
        )
    plan = plan_tiles(hist_grid.height, hist_grid.width, size=size, stride=stride, keep=tissue)

    out_grid = RasterGeometry(
        y0=hist_grid.y0,
        x0=hist_grid.x0,
        sy=hist_px * out_factor,
        sx=hist_px * out_factor,
        height=math.ceil(hist_grid.height / out_factor),
        width=math.ceil(hist_grid.width / out_factor),
    )
    out_size = size // out_factor
    per_lr = lr_factor // out_factor  # output pixels per LR pixel

    def window(array: np.ndarray, row: int, col: int, n: int, fill: float | None) -> np.ndarray:
        """``array[..., row:row+n, col:col+n]``; past the edge: ``fill``, or the edge values when ``fill`` is None."""
        h, w = array.shape[-2:]
        part = array[..., row : row + n, col : col + n]
        pad = [(0, 0)] * (array.ndim - 2) + [(0, n - part.shape[-2]), (0, n - part.shape[-1])]
        if fill is None:
            return np.pad(part, pad, mode="edge")
        return np.pad(part, pad, mode="constant", constant_values=fill)

    def lr_window(tile) -> tuple[np.ndarray, np.ndarray]:
        # LR past the slide's edge repeats the edge (a neutral context for the model); the mask marks it outside
        r, c = tile.row // lr_factor, tile.col // lr_factor
        return window(lr_full, r, c, lr_size, None), window(lr_mask, r, c, lr_size, MASK_OUTSIDE)

    groups = chunked(plan.tiles, batch_size)
    batches = []
    for group in groups:
        lr = np.stack([lr_window(t)[0] for t in group])
        batches.append(
            TileBatch(
                histology=np.stack([window(rgb, t.row, t.col, size, 255) for t in group]),
                lr=minmax_normalize(lr)[0],
                seeds=tuple(int(seed) + t.index for t in group),
            )
        )

    # --- run -------------------------------------------------------------------------------------------------
    if method == "c3diff":
        from c3diff.models.sampling import auto_gene_batch_size

        model_genes = _model_geometry(model_obj)["genes"]
        predictor = ModelPredictor(
            revision=revision,
            gene_indices=tuple(model_genes.index(g) for g in genes),
            scale=scale,
            steps=steps,
            eta=float(eta),
            n_samples=n_samples if mode == "sample" else 1,
            device=device,
            mode=mode,
            gene_batch_size=auto_gene_batch_size(
                model_obj,
                len(genes),
                mode=mode,
                device=resolve_device(device),
                n_samples=n_samples if mode == "sample" else 1,
            ),
        )
        client = active_client()
        if client is not None:
            import os

            client.run(_torch_threads_as_dask_threads, os.getpid())  # no oversubscription, no idle threads
            # one model per worker: by path (each worker loads and caches it) or scattered once as an object
            model_arg = model_id if model_id is not None else client.scatter(ModelPayload(model_obj), broadcast=True)
        else:
            model_arg = model_obj.to(resolve_device(device))
    else:
        predictor, model_arg = BicubicPredictor(factor=per_lr, out_size=out_size), None

    weight = blend_window(out_size, (size - stride) // out_factor)
    corners = [(t.row // out_factor, t.col // out_factor) for t in plan.tiles]  # each store chunk written once
    layout = dict(height=out_grid.height, width=out_grid.width, chunk=256, tiles=corners, tile_size=out_size)
    mean_acc = BlendAccumulator(len(genes), **layout, store=None if store is None else store_tmp / "mean")
    std_acc = None
    if n_samples > 1 and method == "c3diff" and mode == "sample":
        std_acc = BlendAccumulator(len(genes), **layout, store=None if store is None else store_tmp / "std")
    bar = tqdm(total=len(plan), desc=f"super_resolve ({method})", unit="tile", disable=not progress)
    for b, (mean, std) in run_tasks(run_predictor, batches, extra_args=(predictor, model_arg)):
        group = groups[b]
        for k, tile in enumerate(group):
            lr_counts, mask = lr_window(tile)
            counts, spread = _to_counts(mean[k], None if std is None else std[k], lr_counts, mask, per_lr, calibration)
            row, col = tile.row // out_factor, tile.col // out_factor
            mean_acc.add(row, col, counts, weight)
            if std_acc is not None and spread is not None:
                std_acc.add(row, col, spread, weight)
        bar.update(len(group))
    bar.close()

    transformations = _transformations_like(image, out_grid, coordinate_system)
    results = [acc.result() for acc in (mean_acc, std_acc) if acc is not None]
    arrays = tuple(
        acc.values if acc.store is not None else r  # in place: the store, or the in-memory result
        for acc, r in zip((mean_acc, std_acc), results, strict=False)
    )
    on_tissue = layer_tissue_mask(tissue, out_factor, (out_grid.height, out_grid.width))  # one mask, every method
    zero_off_tissue(arrays, on_tissue)
    footprints = (
        spot_footprints(sdata, source_key, genes, out_grid, coordinate_system=coordinate_system)
        if source_kind == "table"
        else bin_footprints(lr_full, LR_PIXEL_SIZE, out_grid)
    )
    footprint_fit = match_footprints(arrays[0], out_grid, footprints, on_tissue, others=arrays[1:])
    if store is not None:  # complete: only now does the layer appear at `store`
        results = _publish_store(store_tmp, Path(store), len(results))
    layers = {"mean": _parse_layer(results[0], genes, transformations), "std": None}
    if std_acc is not None:
        layers["std"] = _parse_layer(results[1], genes, transformations)
    if not inplace:
        return layers

    replaced_std = sdata.attrs.get(ATTRS_KEY, {}).get(key, {}).get("params", {}).get("std_key")
    sdata.images[key] = layers["mean"]
    if layers["std"] is not None:
        sdata.images[f"{key}_std"] = layers["std"]
    elif replaced_std is not None and replaced_std in sdata.images:
        del sdata.images[replaced_std]  # the replaced layer's uncertainty, which would no longer match its layer
    record(
        sdata,
        key,
        "super_resolve",
        image_key=image_key,
        source=f"{source_kind}:{source_key}",
        method=method,
        model=model_id if model_id is not None else (type(model_obj).__name__ if model_obj is not None else None),
        revision=revision,
        scale=scale,
        mode=mode,
        steps=steps,
        eta=eta,
        n_samples=n_samples,
        seed=seed,
        tile_size=size,
        overlap=size - stride,
        n_tiles=len(plan),
        genes=genes,
        units=UNITS,
        calibration=calibration,
        pixel_size_um=out_grid.sy,
        footprints=footprint_fit,
        std_key=f"{key}_std" if layers["std"] is not None else None,
        store=None if store is None else str(Path(store).resolve()),
    )
    return None
