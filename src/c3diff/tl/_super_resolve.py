"""c3.tl.super_resolve: whole-slide super-resolution of gene maps, tile by tile on dask, written as a raster layer.

The call reads as validate -> inputs -> plan tiles -> predict -> calibrate -> write: :func:`_validate` resolves every
argument (model, genes, device defaults, tile layout) into a :class:`_Call`; :func:`_inputs` builds the model's
inputs with :class:`c3diff.pp.ModelInputs` (as training does); :func:`_plan` lays tiles over the tissue with counts;
:func:`_predict` runs the tiles as dask tasks and calibrates each to counts (:mod:`c3diff.tl._calibration`) as it is
blended; :func:`_finish` masks the layer and matches it to the spots; :func:`_write` publishes every layer of the
call and its provenance together, or none.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from c3diff._atomic import Publication, publish, recover, staging
from c3diff._constants import ATTRS_KEY, COORDINATE_SYSTEM
from c3diff._geometry import RasterGeometry, points_feature_key, points_genes, raster_geometry
from c3diff._provenance import record
from c3diff._validation import check_genes, check_key_added, check_scale, get_element
from c3diff.pp import ModelGeometry, ModelInputs, minmax_normalize
from c3diff.tl._calibration import CALIBRATIONS, to_counts
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
from c3diff.tl._tiling import BlendAccumulator, TilePlan, blend_window, plan_tiles
from c3diff.tl._tissue import layer_tissue_mask, zero_off_tissue

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: What the values of a super-resolved layer mean (also recorded with each layer).
UNITS = (
    "expected transcript counts per output pixel: the expected count of that square as if all tissue had been "
    "measured, so summed over each measured spot's disc (or 100 um transcript bin) the layer gives that spot's count "
    "(up to that count's Poisson noise, as recorded with the layer), and 0 off the tissue mask. Tiles are first "
    "calibrated to the LR counts: with calibration='lr_pixel' the prediction summed over each measured (or "
    "gap-filled) 100 um LR pixel equals its count; with calibration='tile' one factor per tile and gene makes the sum "
    "over the tile's measured LR pixels equal theirs"
)

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
        from c3diff.models import MODEL_CHOICES

        raise ValueError(
            f"`model` is required with method='c3diff', got None. Pass {MODEL_CHOICES}; or use "
            "method='bicubic', which needs no model."
        )
    if isinstance(model, str | Path):
        from c3diff.models import from_pretrained

        return from_pretrained(str(model), revision=revision), str(model)
    if not hasattr(model, "predict") or not hasattr(model, "config"):
        raise TypeError(f"`model` must be a c3diff model, a local folder or a Hub repo id, got {type(model).__name__}.")
    from c3diff.models import warn_ignored_revision

    warn_ignored_revision(revision, what="a model object")
    return model, None


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
    :func:`super_resolve` and :mod:`c3diff._atomic`), after refusing a store that already exists and cleaning up
    what killed or failed calls left; nothing is created yet."""
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
    recover(final)
    return staging(final)


@dataclass
class _Call:
    """One call of :func:`super_resolve`, every argument resolved (model loaded, defaults chosen, genes checked)."""

    method: str
    scale: int
    geometry: ModelGeometry  # the inputs' pixel sizes (the model's, or the paper's for bicubic), at the output scale
    genes: list[str]
    source_kind: str  # "table" or "points"
    source_key: str
    key: str
    calibration: str
    mode: str | None
    steps: int
    eta: float
    n_samples: int
    batch_size: int
    device: str
    seed: int
    size: int  # tile edge, histology pixels
    stride: int  # between tile corners, histology pixels (whole LR pixels)
    model: Any = None
    model_id: str | None = None
    revision: str | None = None
    store: Path | None = None
    store_tmp: Path | None = None
    texture: bool = False  # the model's mean network reads the H&E's texture

    @property
    def writes_std(self) -> bool:
        return self.n_samples > 1 and self.method == "c3diff" and self.mode == "sample"

    @property
    def out_factor(self) -> int:
        """Histology pixels per output pixel."""
        return self.geometry.hr_factor

    @property
    def out_size(self) -> int:
        """Tile edge in output pixels."""
        return self.size // self.out_factor


# ------------------------------------------------------------------------------------------------------ validate
def _check_numbers(steps: int, n_samples: int | None, batch_size: int, eta: float) -> None:
    for name, value, low in (
        ("steps", steps, 1),
        ("n_samples", 1 if n_samples is None else n_samples, 1),
        ("batch_size", batch_size, 1),
    ):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"`eta` must be in [0, 1], got {eta!r}.")


def _model_setup(
    sdata: SpatialData, model: Any, revision: str | None, mode: str | None, scale: int
) -> tuple[Any, str | None, str, ModelGeometry, int, list[str]]:
    """The model, its id, the mode, its stored geometry at ``scale``, its tile size and its genes."""
    model_obj, model_id = _load_model(model, revision)
    from c3diff.models import warn_demo_on_real_data

    warn_demo_on_real_data(model_obj, sdata)  # once: the demo model knows simulated tissue only
    config = model_obj.config
    geometry = ModelGeometry.of_model(config)
    has_mean = getattr(model_obj, "mean_net", None) is not None
    if mode == "mean" and not has_mean:
        raise ValueError(
            "`mode='mean'` needs a model with a conditional-mean stage (formulation='residual'); "
            "this model only samples: pass mode='sample' or None."
        )
    if scale > geometry.scale:
        raise ValueError(f"This model was trained for {geometry.scale}x; it cannot predict {scale}x.")
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    size, genes = int(get("image_size")), list(get("genes"))
    return model_obj, model_id, mode or ("mean" if has_mean else "sample"), geometry.at_scale(scale), size, genes


def _genes_in_data(genes: list[str], available: list[str], where: str, *, drop_missing_genes: bool) -> list[str]:
    """``genes`` that the LR source has; missing ones raise, or with ``drop_missing_genes`` are dropped (warned)."""
    missing = [g for g in genes if g not in set(available)]
    if not missing:
        return genes
    shown = f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
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
        f"super_resolve: dropping {len(missing)} gene(s) absent from the data: {missing}.", UserWarning, stacklevel=4
    )
    return [g for g in genes if g not in set(missing)]


def _stride(size: int, overlap: int | None, geometry: ModelGeometry) -> int:
    """The step between tiles of ``size`` histology pixels: ``size - overlap`` rounded down to whole LR pixels."""
    lr_factor = geometry.lr_factor
    if size % geometry.hr_factor or size < lr_factor:
        raise ValueError(
            f"The tile size must be a multiple of {geometry.hr_factor} and at least {lr_factor}, got {size}."
        )
    overlap = size // 4 if overlap is None else int(overlap)
    stride = ((size - overlap) // lr_factor) * lr_factor
    if stride <= 0:
        raise ValueError(f"`overlap={overlap}` leaves no stride for tiles of {size} px; use a smaller overlap.")
    return stride


def _options(args: dict[str, Any]) -> dict[str, Any]:
    """``method``, ``scale``, ``calibration``, ``mode``, ``steps``, ``n_samples``, ``batch_size`` and ``eta``
    checked, the device's defaults filled in (``defaults``; ``chosen``: those taken, to announce)."""
    method = args["method"]
    if method not in ("c3diff", "bicubic"):
        raise ValueError(f"`method` must be 'c3diff' or 'bicubic', got {method!r}.")
    scale = check_scale(args["scale"])
    calibration = args["calibration"] or ("lr_pixel" if method == "c3diff" else "tile")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"`calibration` must be one of {CALIBRATIONS}, got {calibration!r}.")
    device_kind, defaults = _device_defaults(args["device"])
    steps, batch_size = args["steps"], args["batch_size"]
    chosen = {k: defaults[k] for k, v in (("steps", steps), ("batch_size", batch_size)) if v is None}
    steps = defaults["steps"] if steps is None else steps
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    _check_numbers(steps, args["n_samples"], batch_size, args["eta"])
    if args["mode"] not in (None, "mean", "sample"):
        raise ValueError(f"`mode` must be 'mean', 'sample' or None, got {args['mode']!r}.")
    return dict(
        method=method,
        scale=scale,
        calibration=calibration,
        mode=args["mode"],
        steps=steps,
        n_samples=args["n_samples"],
        batch_size=batch_size,
        device_kind=device_kind,
        defaults=defaults,
        chosen=chosen,
    )


def _lr_source(sdata: SpatialData, image_key: str, args: dict[str, Any]) -> tuple[str, str, list[str]]:
    """The H&E checked, and the LR source: its kind (``"table"`` / ``"points"``), its key and its genes."""
    image = get_element(sdata, image_key, "images", arg="image_key")
    raster_geometry(image, coordinate_system=args["coordinate_system"], arg="image_key")  # axis-aligned, in um
    kind, key = _choose_lr_source(sdata, args["table_key"], args["points_key"])
    if kind == "table":
        return kind, key, [str(g) for g in sdata.tables[key].var_names]
    points = sdata.points[key]
    return kind, key, points_genes(points, points_feature_key(points, arg="points_key"))


def _sampling(options: dict[str, Any], model: Any, *, show: bool) -> None:
    """``steps`` and ``n_samples`` of ``options`` settled for the model (paper-formulation models keep
    :data:`PAPER_FORMULATION_DEFAULTS`) and the defaults taken announced."""
    defaults, chosen = options["defaults"], options["chosen"]
    sampling = options["method"] == "c3diff" and options["mode"] == "sample"
    if options["method"] == "c3diff" and getattr(model, "mean_net", None) is None:  # the samples are the map
        defaults = {**defaults, **PAPER_FORMULATION_DEFAULTS}
        if "steps" in chosen:
            options["steps"] = chosen["steps"] = defaults["steps"]
    if options["n_samples"] is None:
        options["n_samples"] = defaults["n_samples"] if sampling else 1
        if options["n_samples"] > 1:
            chosen["n_samples"] = options["n_samples"]
    if not sampling:
        chosen.pop("steps", None)
    if chosen:
        _announce({"device": options["device_kind"], **chosen}, show=show)


def _validate(sdata: SpatialData, image_key: str, args: dict[str, Any]) -> _Call:
    """Check every argument of :func:`super_resolve` (``args``) and resolve them into a :class:`_Call`, before any
    work: the model is loaded, the device's defaults chosen (and announced), the genes checked against the model
    and the data, and ``key_added`` and ``store`` checked against what exists."""
    options = _options(args)
    method, scale = options["method"], options["scale"]
    source_kind, source_key, available = _lr_source(sdata, image_key, args)
    model_obj = model_id = None
    genes = args["genes"]
    if method == "c3diff":
        model_obj, model_id, options["mode"], geometry, size, model_genes = _model_setup(
            sdata, args["model"], args["revision"], options["mode"], scale
        )
        genes = model_genes if genes is None else check_genes(genes, model_genes, arg="genes (of the model)")
    else:
        geometry = ModelGeometry(scale=scale)
        size = 256 if args["tile_size"] is None else int(args["tile_size"])
        genes = available if genes is None else check_genes(genes, available)
    _sampling(options, model_obj, show=args["progress"])
    genes = _genes_in_data(
        genes, available, f"`{source_kind}_key={source_key!r}`", drop_missing_genes=args["drop_missing_genes"]
    )
    call = _Call(
        method=method,
        scale=scale,
        geometry=geometry,
        genes=genes,
        source_kind=source_kind,
        source_key=source_key,
        key=args["key_added"] or f"{image_key}_{method}_x{scale}",
        calibration=options["calibration"],
        mode=options["mode"],
        steps=options["steps"],
        eta=float(args["eta"]),
        n_samples=options["n_samples"],
        batch_size=options["batch_size"],
        device=args["device"],
        seed=args["seed"],
        size=size,
        stride=0,
        model=model_obj,
        model_id=model_id,
        revision=args["revision"],
        store=None if args["store"] is None else Path(args["store"]),
        texture=method == "c3diff" and getattr(model_obj, "texture_channels", 0) > 0,
    )
    if args["inplace"]:
        keys = [call.key, *([f"{call.key}_std"] if call.writes_std else [])]
        check_key_added(sdata, keys, overwrite=args["overwrite"], inputs=(image_key, source_key))
    if call.store is not None:
        call.store_tmp = _temporary_store(call.store, sdata, call.key, overwrite=args["overwrite"] and args["inplace"])
    call.stride = _stride(size, args["overlap"], geometry)
    return call


# -------------------------------------------------------------------------------------------------------- inputs
def _inputs(sdata: SpatialData, image_key: str, call: _Call, coordinate_system: str) -> tuple[ModelInputs, Any]:
    """The model's inputs (:class:`c3diff.pp.ModelInputs`: the H&E at the model's histology pixel size, the LR maps
    and their mask at its LR pixel size) and the tissue with counts. The memory the run needs is checked once the
    H&E grid is known, before the LR rasters and the output are allocated."""
    inputs = ModelInputs.from_histology(sdata, image_key, geometry=call.geometry, coordinate_system=coordinate_system)
    height, width = inputs.grid.height, inputs.grid.width
    sizes = dict(
        out_shape=(math.ceil(height / call.out_factor), math.ceil(width / call.out_factor)),
        lr_shape=(math.ceil(height / call.geometry.lr_factor), math.ceil(width / call.geometry.lr_factor)),
        n_tiles=len(plan_tiles(height, width, size=call.size, stride=call.stride)),
        lr_tile=call.geometry.lr_size(call.size),
        out_tile=call.out_size,
        n_layers=2 if call.n_samples > 1 and call.method == "c3diff" else 1,
        spots=call.source_kind == "table",
    )
    streamed = call.store is not None
    check_memory(
        len(call.genes),
        bytes_per_gene(**sizes, streamed=streamed),
        streamed=streamed,
        streamed_per_gene=bytes_per_gene(**sizes, streamed=True),
    )
    inputs.add_lr(sdata, genes=call.genes, image_key=image_key, **{f"{call.source_kind}_key": call.source_key})
    if call.texture:
        inputs.add_texture(sdata, image_key=image_key)
    tissue = inputs.covered_tissue()
    if not tissue.any():
        raise ValueError(
            f"No tissue with counts: the H&E `image_key={image_key!r}` shows no tissue where "
            f"`{call.source_kind}_key={call.source_key!r}` has data."
        )
    return inputs, tissue


# ---------------------------------------------------------------------------------------------------------- plan
def _plan(inputs: ModelInputs, tissue: np.ndarray, call: _Call) -> TilePlan:
    """Tiles of the model's size over the histology grid, every ``call.stride`` pixels, those touching tissue."""
    return plan_tiles(inputs.grid.height, inputs.grid.width, size=call.size, stride=call.stride, keep=tissue)


# ------------------------------------------------------------------------------------------------------- predict
def _batches(inputs: ModelInputs, groups: list[list[Any]], call: _Call) -> list[TileBatch]:
    """Each group of tiles as the model's input: the H&E windows and the min-max normalised LR windows."""
    return [
        TileBatch(
            histology=np.stack([inputs.histology_window(t.row, t.col, call.size) for t in group]),
            lr=minmax_normalize(np.stack([inputs.lr_window(t.row, t.col, call.size)[0] for t in group]))[0],
            seeds=tuple(int(call.seed) + t.index for t in group),
            texture=np.stack([inputs.texture_window(t.row, t.col, call.size) for t in group]) if call.texture else None,
        )
        for group in groups
    ]


def _predictor(call: _Call) -> tuple[Any, Any]:
    """The per-tile predictor and the model argument its tasks get (a path, a scattered model, or the model)."""
    if call.method != "c3diff":
        return BicubicPredictor(factor=call.geometry.hr_per_lr, out_size=call.out_size), None
    from c3diff.models import auto_gene_batch_size

    config = call.model.config
    model_genes = list(config["genes"] if isinstance(config, dict) else config.genes)
    n_samples = call.n_samples if call.mode == "sample" else 1
    predictor = ModelPredictor(
        revision=call.revision,
        gene_indices=tuple(model_genes.index(g) for g in call.genes),
        scale=call.scale,
        steps=call.steps,
        eta=call.eta,
        n_samples=n_samples,
        device=call.device,
        mode=call.mode,
        gene_batch_size=auto_gene_batch_size(
            call.model, len(call.genes), mode=call.mode, device=resolve_device(call.device), n_samples=n_samples
        ),
    )
    client = active_client()
    if client is None:
        return predictor, call.model.to(resolve_device(call.device))
    import os

    client.run(_torch_threads_as_dask_threads, os.getpid())  # no oversubscription, no idle threads
    # one model per worker: by path (each worker loads and caches it) or scattered once as an object
    if call.model_id is not None:
        return predictor, call.model_id
    return predictor, client.scatter(ModelPayload(call.model), broadcast=True)


def _predict(
    inputs: ModelInputs, plan: TilePlan, call: _Call, out_grid: RasterGeometry, *, progress: bool
) -> list[BlendAccumulator]:
    """Run every tile (dask tasks of ``call.batch_size`` tiles), calibrate each prediction to the LR counts under it
    (:func:`c3diff.tl._calibration.to_counts`) and blend it into the layer(s): the mean, and the std with samples."""
    from tqdm.auto import tqdm

    groups = chunked(plan.tiles, call.batch_size)
    batches = _batches(inputs, groups, call)
    predictor, model_arg = _predictor(call)
    out_factor = call.out_factor
    weight = blend_window(call.out_size, (call.size - call.stride) // out_factor)
    corners = [(t.row // out_factor, t.col // out_factor) for t in plan.tiles]  # each store chunk written once
    layout = dict(height=out_grid.height, width=out_grid.width, chunk=256, tiles=corners, tile_size=call.out_size)
    names = ("mean", "std") if call.writes_std else ("mean",)
    accumulators = [
        BlendAccumulator(len(call.genes), **layout, store=None if call.store is None else call.store_tmp / name)
        for name in names
    ]
    bar = tqdm(total=len(plan), desc=f"super_resolve ({call.method})", unit="tile", disable=not progress)
    for b, (mean, std) in run_tasks(run_predictor, batches, extra_args=(predictor, model_arg)):
        for k, tile in enumerate(groups[b]):
            # the counts under the tile, cut again (a slice) rather than kept from _batches for every tile
            lr_counts, lr_mask = inputs.lr_window(tile.row, tile.col, call.size)
            counts, spread = to_counts(
                mean[k],
                None if std is None else std[k],
                lr_counts,
                lr_mask,
                call.geometry.hr_per_lr,
                call.calibration,
            )
            row, col = tile.row // out_factor, tile.col // out_factor
            accumulators[0].add(row, col, counts, weight)
            if len(accumulators) > 1 and spread is not None:
                accumulators[1].add(row, col, spread, weight)
        bar.update(len(groups[b]))
    bar.close()
    return accumulators


# -------------------------------------------------------------------------------------------------------- finish
def _out_grid(inputs: ModelInputs, call: _Call) -> RasterGeometry:
    """The output grid: the histology grid's corner, ``call.out_factor`` histology pixels per output pixel."""
    grid, factor = inputs.grid, call.out_factor
    return RasterGeometry(
        y0=grid.y0,
        x0=grid.x0,
        sy=grid.sy * factor,
        sx=grid.sx * factor,
        height=math.ceil(grid.height / factor),
        width=math.ceil(grid.width / factor),
    )


def _finish(
    sdata: SpatialData,
    inputs: ModelInputs,
    tissue: np.ndarray,
    accumulators: list[BlendAccumulator],
    call: _Call,
    out_grid: RasterGeometry,
    coordinate_system: str,
) -> tuple[list[Any], dict[str, Any]]:
    """The blended layers, 0 off the tissue and matched to the spots' (or bins') counts, and how closely."""
    results = [acc.result() for acc in accumulators]
    arrays = tuple(acc.values if acc.store is not None else r for acc, r in zip(accumulators, results, strict=True))
    on_tissue = layer_tissue_mask(tissue, call.out_factor, (out_grid.height, out_grid.width))  # one mask, any method
    zero_off_tissue(arrays, on_tissue)
    footprints = (
        spot_footprints(sdata, call.source_key, call.genes, out_grid, coordinate_system=coordinate_system)
        if call.source_kind == "table"
        else bin_footprints(inputs.lr, call.geometry.lr_pixel_size, out_grid)
    )
    return results, match_footprints(arrays[0], out_grid, footprints, on_tissue, others=arrays[1:])


# --------------------------------------------------------------------------------------------------------- write
def _provenance(image_key: str, call: _Call, plan: TilePlan, out_grid: RasterGeometry, fit: dict) -> dict:
    model = call.model_id if call.model_id is not None else (type(call.model).__name__ if call.model else None)
    return dict(
        image_key=image_key,
        source=f"{call.source_kind}:{call.source_key}",
        method=call.method,
        model=model,
        revision=call.revision,
        scale=call.scale,
        mode=call.mode,
        steps=call.steps,
        eta=call.eta,
        n_samples=call.n_samples,
        seed=call.seed,
        tile_size=call.size,
        overlap=call.size - call.stride,
        n_tiles=len(plan),
        genes=call.genes,
        units=UNITS,
        calibration=call.calibration,
        pixel_size_um=out_grid.sy,
        footprints=fit,
        std_key=f"{call.key}_std" if call.writes_std else None,
        store=None if call.store is None else str(call.store.resolve()),
    )


def _write(
    sdata: SpatialData,
    call: _Call,
    results: list[Any],
    transformations: dict[str, Any],
    provenance: dict[str, Any],
    *,
    inplace: bool,
) -> dict[str, Any] | None:
    """Publish every layer of the call - the store renamed into place, the layers and their provenance put into
    ``sdata`` - together or not at all: on any failure the store, the layers and the provenance it replaced are put
    back."""
    publication: Publication | None = None
    key, std_key = call.key, f"{call.key}_std"
    replaced_std = sdata.attrs.get(ATTRS_KEY, {}).get(key, {}).get("params", {}).get("std_key")
    touched = [k for k in dict.fromkeys((key, std_key, replaced_std)) if k is not None]
    saved_images = {k: sdata.images[k] for k in touched if k in sdata.images}
    had_attrs = ATTRS_KEY in sdata.attrs
    saved_attrs = copy.deepcopy(sdata.attrs.get(ATTRS_KEY, {}).get(key))
    try:
        if call.store is not None:  # complete: only now does the layer appear at `store`
            import dask.array as da

            final = call.store.expanduser().absolute()
            publication = publish(call.store_tmp, final)
            results = [da.from_zarr(str(final / name)) for name in ("mean", "std")[: len(results)]]
        layers = {"mean": _parse_layer(results[0], call.genes, transformations), "std": None}
        if call.writes_std:
            layers["std"] = _parse_layer(results[1], call.genes, transformations)
        if inplace:
            sdata.images[key] = layers["mean"]
            if layers["std"] is not None:
                sdata.images[std_key] = layers["std"]
            elif replaced_std is not None and replaced_std in sdata.images:
                del sdata.images[replaced_std]  # the replaced layer's uncertainty, which would no longer match
            record(sdata, key, "super_resolve", **provenance)
    except BaseException:
        if inplace:
            for k in touched:
                if k in saved_images:
                    sdata.images[k] = saved_images[k]
                elif k in sdata.images:
                    del sdata.images[k]
            if saved_attrs is not None:
                sdata.attrs[ATTRS_KEY][key] = saved_attrs
            elif key in sdata.attrs.get(ATTRS_KEY, {}):
                del sdata.attrs[ATTRS_KEY][key]
            if not had_attrs and not sdata.attrs.get(ATTRS_KEY, True):
                del sdata.attrs[ATTRS_KEY]
        if publication is not None:
            publication.rollback()
        raise
    if publication is not None:
        publication.commit()
    return None if inplace else layers


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
    :class:`c3diff.pp.ModelInputs`, as for training: an LR map (:func:`~c3diff.pp.spots_to_grid` /
    :func:`~c3diff.pp.bin_transcripts`) and the histology, at the pixel sizes stored in the model's config (the
    paper's 100 and 10 um/px; bicubic uses those), both anchored at the H&E's corner; past the slide's edge a tile
    sees white glass and its LR maps repeat their edge values (:data:`c3diff.pp._model_inputs.PADDING`). The tissue
    (detected in the H&E) is covered with overlapping tiles of the model's size (2.56 mm for the paper preset); each
    tile's LR maps are min-max
    normalised, the model predicts the HR maps, the predictions are mapped to expression units (:data:`UNITS`) and
    overlapping tiles are cross-faded (no seams). A pixel value is the expected count of that 10 um (20 um at
    ``scale=5``) square as if all tissue had been measured: the finished layer is 0 off the tissue (the H&E's tissue
    where the counts have data, one mask for every method) and a smooth correction brings its sum over each spot's
    disc (or 100 um transcript bin) to that spot's count, up to the count's Poisson noise (within two standard
    deviations: a count is one draw of the expected map; ``sdata.attrs["c3diff"][key_added]["params"]
    ["footprints"]`` records how closely). Before allocating, the memory the run needs is estimated; more genes than
    fit raise a MemoryError saying how many fit. Tiles run as dask tasks on the active scheduler - a
    ``dask.distributed.Client`` included (a model given by path or repo id is loaded once per worker; a model object
    is scattered once to each worker) - and results are blended as they arrive, so memory is bounded by the tile
    batch (plus the output, unless ``store`` streams it to disk). Nothing is written unless everything succeeded:
    the layers of one call (the mean and its ``_std``), their provenance and their store appear together, and a
    failure before the end leaves those they would replace as they were.

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
        10 (output pixels of the model's histology pixel size: 10 um in the paper's geometry) or 5 (twice that,
        20 um). A model trained at 10x predicts 5x by 2x2 averaging.
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
        genes go through the model in as few calls as memory allows.
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
        Replace an existing element named ``key_added`` (and ``f"{key_added}_std"``) instead of raising; the old
        layers (and store) stay until the new ones are complete, and come back if the call fails. The input H&E and
        the counts are never replaced.
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
    args = dict(locals())
    call = _validate(sdata, image_key, args)
    inputs, tissue = _inputs(sdata, image_key, call, coordinate_system)
    plan = _plan(inputs, tissue, call)
    out_grid = _out_grid(inputs, call)
    accumulators = _predict(inputs, plan, call, out_grid, progress=progress)
    results, fit = _finish(sdata, inputs, tissue, accumulators, call, out_grid, coordinate_system)
    transformations = _transformations_like(sdata.images[image_key], out_grid, coordinate_system)
    provenance = _provenance(image_key, call, plan, out_grid, fit)
    return _write(sdata, call, results, transformations, provenance, inplace=inplace)
