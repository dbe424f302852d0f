"""Cell-type map from super-resolved marker genes (:doc:`/method`, *Cell-type map*)."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from c3diff._constants import IMMUNE_MARKERS_HUMAN, IMMUNE_MARKERS_MOUSE, UNASSIGNED
from c3diff._geometry import raster_channels, raster_levels, scale0
from c3diff._validation import case_mismatches, check_key_added, get_element, species_hint

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: Marker genes of the paper's seven immune types (:doc:`/method`, *Cell-type map*; names as
#: :data:`c3diff._constants.IMMUNE_TYPES`), human gene symbols. Copy, replace or extend it and pass it as ``markers``.
DEFAULT_MARKERS: dict[str, tuple[str, ...]] = IMMUNE_MARKERS_HUMAN
#: The same types with mouse gene symbols (``markers="mouse"``).
MOUSE_MARKERS: dict[str, tuple[str, ...]] = IMMUNE_MARKERS_MOUSE
#: Marker sets selectable by name.
MARKER_SETS: dict[str, dict[str, tuple[str, ...]]] = {"human": DEFAULT_MARKERS, "mouse": MOUSE_MARKERS}

#: Channel of the ``..._scores`` image that holds the winning type's score.
MAX_SCORE = "max_score"
#: Label of pixels left without a type: the class :data:`c3diff._constants.UNASSIGNED`.
NO_CALL = 0
#: Default ``min_score`` of :func:`celltype_map` (with the default ``log1p=True``), chosen on simulated sections where
#: the true types are known (``benchmarks/celltype_threshold.py``, docs page "Benchmarks"): the threshold of highest
#: macro F1 over the seven types and "unassigned", averaged over bicubic maps and 10 um transcript counts. With
#: ``log1p=False`` the best threshold is lower (0.03).
DEFAULT_MIN_SCORE = 0.1


@dataclass
class CelltypeMap:
    """Result of :func:`celltype_map` (returned with ``inplace=False``).

    Attributes
    ----------
    labels
        ``(height, width)`` uint8: 0 = unassigned, ``i`` = ``types[i - 1]``.
    scores
        ``(n_types, height, width)`` float32 mean normalised marker expression per type (NaN where no marker is
        finite).
    max_score
        ``(height, width)`` float32 score of the winning type (NaN where no marker is finite).
    types
        Types in label order.
    markers
        Markers used per type (those present in the layer).
    missing_markers
        Markers absent from the layer, per type.
    excluded_types
        Types left out because none of their markers is in the layer.
    """

    labels: np.ndarray
    scores: np.ndarray
    max_score: np.ndarray
    types: list[str]
    markers: dict[str, list[str]]
    missing_markers: dict[str, list[str]] = field(default_factory=dict)
    excluded_types: list[str] = field(default_factory=list)


def _marker_set(markers: Any, genes: list[str]) -> tuple[Any, str | None]:
    """The markers to use and the species they were chosen for (``None`` for a user mapping): a name of
    :data:`MARKER_SETS`, or ``None`` for the set with more markers in the layer (human on a tie)."""
    if markers is None:
        known = set(genes)
        present = {name: len({g for gs in ms.values() for g in gs} & known) for name, ms in MARKER_SETS.items()}
        species = "mouse" if present["mouse"] > present["human"] else "human"
        return MARKER_SETS[species], species
    if isinstance(markers, str):
        if markers not in MARKER_SETS:
            raise ValueError(
                f"`markers={markers!r}` is not a marker set; use one of {sorted(MARKER_SETS)} or a "
                "mapping of cell type -> marker genes."
            )
        return MARKER_SETS[markers], markers
    return markers, None


def _resolve_markers(
    markers: Mapping[str, Iterable[str]], genes: list[str], sr_key: str
) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str], str | None]:
    """Markers present per type, markers missing per type, the types without any marker in the layer, and a hint
    when missing markers differ from the layer's genes only by case (another species' symbols)."""
    if not isinstance(markers, Mapping) or len(markers) == 0:
        raise TypeError(
            "`markers` must be a non-empty mapping of cell type -> marker genes, e.g. "
            "`{**c3.tl.DEFAULT_MARKERS, 'NK cell': ['NCAM1', 'KLRD1']}`, or the name of a marker set "
            f"({sorted(MARKER_SETS)}); got {type(markers).__name__} {markers!r:.80}."
        )
    known = set(genes)
    used, missing, excluded = {}, {}, []
    for cell_type, type_markers in markers.items():
        type_markers = [type_markers] if isinstance(type_markers, str) else list(dict.fromkeys(type_markers))
        if cell_type in (MAX_SCORE, UNASSIGNED) or not isinstance(cell_type, str) or not cell_type:
            raise ValueError(
                f"`markers`: cell type names must be non-empty strings other than {MAX_SCORE!r} and "
                f"{UNASSIGNED!r}, got {cell_type!r}."
            )
        present = [g for g in type_markers if g in known]
        absent = [g for g in type_markers if g not in known]
        if absent:
            missing[cell_type] = absent
        if present:
            used[cell_type] = present
        else:
            excluded.append(cell_type)
    absent_all = list(dict.fromkeys(g for gs in missing.values() for g in gs))
    hint = species_hint(case_mismatches(absent_all, genes))
    if not used:
        raise ValueError(
            f"None of the {len(markers)} cell types in `markers` has a marker gene in `sr_key={sr_key!r}` "
            f"(layer genes include {genes[:8]}; markers asked for: {sorted(absent_all)[:12]}). "
            f"{hint or ''}Super-resolve the marker genes, or pass `markers` that the layer has."
        )
    if len(used) > 255:
        raise ValueError(f"`markers` defines {len(used)} cell types; at most 255 fit the uint8 label map.")
    return used, missing, excluded, hint


def _compute(
    data: Any, used: dict[str, list[str]], min_score: float | None, *, log1p: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Scores, max score and labels from a ``(c, y, x)`` DataArray; also the markers that are constant. ``log1p``:
    min-max scale ``log1p(max(x, 0))`` instead of ``x`` (lazily, chunk by chunk; NaN stays NaN)."""
    import dask.array as da

    union = list(dict.fromkeys(g for gs in used.values() for g in gs))
    values = da.asarray(data.sel(c=union).data).astype(np.float32)
    if log1p:
        # a marker's maximum on a super-resolved map is often one outlier pixel; on the log scale it no longer squeezes
        # every other pixel towards 0 (docs/method.md, Cell-type map)
        values = da.log1p(da.maximum(values, np.float32(0)))
    lo, hi = da.compute(da.nanmin(values, axis=(1, 2)), da.nanmax(values, axis=(1, 2)))
    span = hi - lo
    constant = [g for g, s in zip(union, span, strict=True) if not (np.isfinite(s) and s > 0)]
    ok = np.isfinite(span) & (span > 0)
    # per marker min-max over the whole region; a constant marker carries no signal and becomes 0 (docs/method.md)
    scale = np.where(ok, 1.0 / np.where(ok, span, 1.0), 0.0).astype(np.float32)
    offset = np.where(np.isfinite(lo), lo, 0.0).astype(np.float32)
    normed = (values - offset[:, None, None]) * scale[:, None, None]
    index = {g: i for i, g in enumerate(union)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels (outside tissue) give NaN, on purpose
        per_type = [da.nanmean(normed[[index[g] for g in gs]], axis=0) for gs in used.values()]
        scores = np.asarray(da.stack(per_type).compute(), dtype=np.float32)
        finite = np.isfinite(scores).any(axis=0)
        best = np.argmax(np.where(np.isfinite(scores), scores, -np.inf), axis=0)
        max_score = np.where(finite, np.take_along_axis(scores, best[None], axis=0)[0], np.nan).astype(np.float32)
    # unassigned where no marker is finite, where no marker is expressed at all (argmax would be arbitrary) or below
    # min_score
    called = finite & (max_score > 0)
    if min_score is not None:
        called &= max_score >= min_score
    labels = np.where(called, best + 1, NO_CALL).astype(np.uint8)
    return labels, scores, max_score, constant


def _scale_factors(element: Any) -> list[int] | None:
    """Downscale factors between consecutive pyramid levels of a multiscale element (None for a single scale)."""
    levels = raster_levels(element)
    if len(levels) < 2:
        return None
    shapes = [(lv.sizes["y"], lv.sizes["x"]) for lv in levels]
    return [max(1, round((a[0] / b[0] + a[1] / b[1]) / 2)) for a, b in zip(shapes, shapes[1:], strict=False)]


def _check_free(sdata: SpatialData, key: str, kind: str, *, arg: str) -> None:
    """``key`` may be written to ``sdata.<kind>``: no element of another kind (or case-variant) holds the name."""
    for other in ("images", "labels", "points", "shapes", "tables"):
        for name in getattr(sdata, other):
            if name.lower() == key.lower() and (other != kind or name != key):
                raise ValueError(
                    f"`{arg}={key!r}` cannot be written to `sdata.{kind}`: `sdata.{other}` already holds {name!r} "
                    "(SpatialData names must be unique across element types, ignoring case). Choose another key."
                )


def _annotation_table(key: str, labels: np.ndarray, scores: np.ndarray, types: list[str]) -> Any:
    """AnnData annotating the label map (spatialdata's region / instance-key convention): one row per type, label
    value 1..T, with its name (categorical ``cell_type``), its pixel count and, as ``X``, the mean score of every type
    over its pixels. Label 0 (unassigned) is background for spatialdata-plot and napari, which refuse a row for it."""
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    names = [UNASSIGNED, *types]  # by label value; row 0 is dropped below
    flat = labels.ravel().astype(np.int64)
    n_pixels = np.bincount(flat, minlength=len(names))
    finite = np.isfinite(scores).reshape(len(types), -1)
    sums = np.stack(
        [
            np.bincount(flat, weights=np.where(f, s, 0.0), minlength=len(names))
            for f, s in zip(finite, scores.reshape(len(types), -1), strict=True)
        ],
        axis=1,
    )
    counts = np.stack([np.bincount(flat, weights=f.astype(np.float64), minlength=len(names)) for f in finite], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_scores = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
    obs = pd.DataFrame(
        {
            "region": pd.Categorical([key] * len(types)),
            "label": np.arange(1, len(names), dtype=np.int64),
            "cell_type": pd.Categorical(types, categories=types),
            "n_pixels": n_pixels[1:].astype(np.int64),
        },
        index=[str(i) for i in range(1, len(names))],
    )
    table = ad.AnnData(X=mean_scores[1:], obs=obs, var=pd.DataFrame(index=pd.Index(types, name="cell_type")))
    return TableModel.parse(table, region=key, region_key="region", instance_key="label")


def celltype_map(
    sdata: SpatialData,
    sr_key: str,
    *,
    markers: Mapping[str, Iterable[str]] | Literal["human", "mouse"] | None = None,
    key_added: str | None = None,
    min_score: float | None = DEFAULT_MIN_SCORE,
    log1p: bool = True,
    overwrite: bool = False,
    inplace: bool = True,
) -> CelltypeMap | None:
    """Call a cell type per pixel from super-resolved markers, or leave it unassigned (:doc:`/method`, *Cell-type map*).

    Each marker's map is min-max normalised to [0, 1] over the whole layer (after ``log1p``, by default); a type's
    score is the mean of its markers' normalised maps; each pixel gets the type of highest score (the first type
    wins ties), and the score is kept. Pixels whose best score is below ``min_score`` stay **unassigned** (label 0):
    tumour, stroma and other tissue that expresses none of the types' markers is not forced into one of them.

    Parameters
    ----------
    sdata
        SpatialData holding the super-resolved layer.
    sr_key
        Gene raster in ``sdata.images`` (e.g. ``"hne_c3diff_x10"`` from :func:`c3diff.tl.super_resolve`, or a
        binned ground truth); level 0 of a multiscale image is used. NaN pixels (e.g. outside tissue) are ignored.
    markers
        Cell type -> marker genes, or the name of a marker set: ``"human"`` (:data:`DEFAULT_MARKERS`, the paper's
        seven immune types) or ``"mouse"`` (:data:`MOUSE_MARKERS`, the same types with mouse gene symbols).
        Default: the set of which the layer has more markers (human on a tie). Markers not in the layer are
        dropped (a warning lists them, and names a species mismatch when they differ from the layer's genes only by
        case); a type with no marker left is excluded (warned); it is an error if no type has a marker.
    key_added
        Key of the label map in ``sdata.labels``. Default ``f"{sr_key}_celltypes"``. The scores go to
        ``sdata.images[f"{key_added}_scores"]`` and the table naming the labels to
        ``sdata.tables[f"{key_added}_table"]``.
    overwrite
        Replace existing elements of these names (a map made before) instead of raising. ``sr_key`` is never
        replaced.
    min_score
        Leave pixels whose best score is below this (in [0, 1]) unassigned (label 0). The default,
        :data:`DEFAULT_MIN_SCORE` (0.1, for ``log1p=True``), has the best macro F1 over the seven types and
        "unassigned" on simulated sections with known types (:doc:`/benchmarks`, ``celltype_threshold``, which also
        gives how much tissue it leaves unassigned on counts and on smooth maps): a higher ``min_score`` leaves more
        tissue unassigned, a lower one keeps more immune pixels. ``None`` or ``0``: call every pixel where a marker
        is expressed (the paper's argmax). Pixels where no marker is expressed (best score 0) or no marker is
        finite are never called.
    log1p
        Min-max scale ``log1p(max(x, 0))`` of each marker instead of its expression ``x`` (ours; the default).
        ``False``: scale the expression itself, the paper's formulation (:doc:`/method`, *Cell-type map*). On a
        super-resolved map a marker's maximum is often a single outlier pixel, so plain min-max squeezes every other
        pixel towards 0, and the types whose markers peak lowest are over-called; on the log scale the peaks weigh
        less (the accuracies with and without it are on the :doc:`/benchmarks` page, ``demo``). Scores, and so
        ``min_score``, are on the scale chosen here: with ``log1p=False`` pass ``min_score=0.03``.
    inplace
        Write the results into ``sdata`` (and return ``None``); otherwise return them as a :class:`CelltypeMap`
        and leave ``sdata`` untouched.

    Returns
    -------
    ``None``, writing (only once everything succeeded):

    - ``sdata.labels[key_added]``: uint8 Labels2DModel, 0 = unassigned, ``i`` = the ``i``-th type;
    - ``sdata.tables[f"{key_added}_table"]``: AnnData annotating the labels the spatialdata way (``region`` =
      ``key_added``, ``region_key="region"``, ``instance_key="label"``), one row per type (label values 1..T; 0,
      unassigned, is the viewers' background) with the categorical column ``cell_type``, ``n_pixels``, and as ``X``
      the mean score of every type (``var_names``) over the label's pixels; spatialdata-plot and napari-spatialdata
      show the names (e.g. ``sdata.pl.render_labels(key_added, color="cell_type",
      table_name=f"{key_added}_table")``);
    - ``sdata.images[f"{key_added}_scores"]``: float32 Image2DModel with one channel per type (its score) and a
      last channel ``"max_score"`` (the called type's score), so the scores travel as one element;
    - ``sdata.attrs["c3diff"][key_added]``: ``categories`` (types in label order), ``labels`` (``"0"`` ->
      ``"unassigned"``, ``"1"`` -> first type, ...), ``species`` of the marker set (``None`` for a mapping), the
      markers used and missing, excluded types, ``table_key`` and parameters.

    The rasters carry all of the source layer's transformations and its pyramid (scale factors), as
    :func:`squidpy.experimental.im.detect_tissue` does. With ``inplace=False`` a :class:`CelltypeMap`.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> c3.pp.bin_transcripts(sdata, bin_size=10, image_key="hne", key_added="truth")  # doctest: +SKIP
    >>> c3.tl.celltype_map(sdata, "truth")  # doctest: +SKIP
    >>> sdata.tables["truth_celltypes_table"].obs["cell_type"].tolist()[:2]  # doctest: +SKIP
    ['B cell', 'T cell CD4']
    >>> markers = {**c3.tl.DEFAULT_MARKERS, "Tumour": ["EPCAM", "KRT8"]}
    >>> c3.tl.celltype_map(sdata, "truth", markers=markers, key_added="truth_types")  # doctest: +SKIP
    >>> c3.tl.celltype_map(mouse_sdata, "hne_bicubic_x10", markers="mouse")  # doctest: +SKIP
    """
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import get_transformation

    element = get_element(sdata, sr_key, "images", arg="sr_key")
    genes = raster_channels(element)
    if min_score is not None and (
        isinstance(min_score, bool) or not isinstance(min_score, int | float) or not 0 <= min_score <= 1
    ):
        raise ValueError(
            f"`min_score` must be a number in [0, 1] (scores are mean min-max values) or None, got {min_score!r}."
        )
    if not isinstance(log1p, bool | np.bool_):
        raise TypeError(f"`log1p` must be True or False, got {log1p!r}.")
    chosen, species = _marker_set(markers, genes)
    used, missing, excluded, hint = _resolve_markers(chosen, genes, sr_key)
    key = key_added if key_added is not None else f"{sr_key}_celltypes"
    scores_key = f"{key}_scores"
    table_key = f"{key}_table"
    if inplace:
        if sr_key in (scores_key, table_key):
            raise ValueError(f"`key_added={key!r}` would overwrite the source layer {sr_key!r}.")
        _check_free(sdata, key, "labels", arg="key_added")
        _check_free(sdata, scores_key, "images", arg="key_added")
        _check_free(sdata, table_key, "tables", arg="key_added")
        check_key_added(sdata, [key, scores_key, table_key], overwrite=overwrite, inputs=(sr_key,))

    if missing:
        listed = "; ".join(f"{t}: {', '.join(gs)}" for t, gs in missing.items())
        warnings.warn(
            f"celltype_map: {len(dict.fromkeys(g for gs in missing.values() for g in gs))} marker gene(s) are not in "
            f"`sr_key={sr_key!r}` and were dropped ({listed}).{' ' + hint.strip() if hint else ''}",
            UserWarning,
            stacklevel=2,
        )
    if excluded:
        warnings.warn(
            f"celltype_map: {len(excluded)} cell type(s) have no marker in `sr_key={sr_key!r}` and are left out of "
            f"the map: {excluded}.",
            UserWarning,
            stacklevel=2,
        )
    threshold = None if min_score is None else float(min_score)
    labels, scores, max_score, constant = _compute(scale0(element), used, threshold, log1p=bool(log1p))
    if constant:
        warnings.warn(
            f"celltype_map: {len(constant)} marker(s) are constant over `sr_key={sr_key!r}` and score 0 everywhere: "
            f"{constant}.",
            UserWarning,
            stacklevel=2,
        )
    types = list(used)
    finite = np.isfinite(max_score)
    logger.info(
        "celltype_map: %d of %d pixels with data assigned to %d type(s), %d unassigned (min_score=%s)",
        int((labels > 0).sum()),
        int(finite.sum()),
        len(types),
        int((finite & (labels == NO_CALL)).sum()),
        min_score,
    )
    if not inplace:
        return CelltypeMap(labels, scores, max_score, types, used, missing, excluded)

    transformations = copy.deepcopy(get_transformation(element, get_all=True))
    scale_factors = _scale_factors(element)
    label_el = Labels2DModel.parse(
        labels, dims=("y", "x"), transformations=transformations, scale_factors=scale_factors
    )
    scores_el = Image2DModel.parse(
        np.concatenate([scores, max_score[None]]),
        dims=("c", "y", "x"),
        c_coords=[*types, MAX_SCORE],
        transformations=copy.deepcopy(transformations),
        scale_factors=scale_factors,
    )

    from c3diff._provenance import record

    previous = {
        kind: getattr(sdata, kind)[name] if name in getattr(sdata, kind) else None
        for kind, name in (("labels", key), ("images", scores_key), ("tables", table_key))
    }
    try:
        sdata.labels[key] = label_el
        sdata.images[scores_key] = scores_el
        sdata.tables[table_key] = _annotation_table(key, labels, scores, types)
    except Exception:
        # keep the user's object as it was
        for kind, name in (("labels", key), ("images", scores_key), ("tables", table_key)):
            elements = getattr(sdata, kind)
            if previous[kind] is not None:
                elements[name] = previous[kind]
            elif name in elements:
                del elements[name]
        raise
    entry = record(
        sdata,
        key,
        "celltype_map",
        sr_key=sr_key,
        markers=used,
        min_score=min_score,
        log1p=bool(log1p),
        scores_key=scores_key,
        species=species,
    )
    entry.update(
        categories=types,
        labels={str(NO_CALL): UNASSIGNED, **{str(i + 1): t for i, t in enumerate(types)}},
        species=species,
        missing_markers=missing,
        excluded_types=excluded,
        constant_markers=constant,
        scores_key=scores_key,
        table_key=table_key,
    )
    return None
