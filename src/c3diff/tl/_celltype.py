"""Cell-type map from super-resolved marker genes (METHOD.md section 8)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._validation import get_element, scale0
from c3diff.tl._evaluate import raster_channels

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: Marker genes of the paper's seven immune types (METHOD.md section 8; names as
#: :data:`c3diff._constants.IMMUNE_TYPES`). Copy, replace or extend it and pass it as ``markers``.
DEFAULT_MARKERS: dict[str, tuple[str, ...]] = {
    "B cell": ("MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "TCL1A"),
    "T cell CD4": ("CD4", "CD3E", "CD3G", "TRAC", "IL7R", "CCR7", "LTB", "TCF7"),
    "T cell CD8": ("CD8A", "CD3E", "CD3G", "TRAC", "GZMA", "GZMK", "PRF1", "NKG7", "CCL5"),
    "Tregs": ("FOXP3", "IL2RA", "CTLA4", "TIGIT"),
    "Macrophages M0": ("CD68", "AIF1", "LYZ", "IGSF6", "CXCL5", "APOC1"),
    "Macrophages M2": ("CD163", "MRC1", "C1QA", "C1QC"),
    "plasma cell": ("MZB1", "TNFRSF17", "CD27", "SLAMF7", "PRDM1"),
}

#: Channel of the ``..._scores`` image that holds the winning type's score.
MAX_SCORE = "max_score"
#: Label of pixels without a call.
NO_CALL = 0


@dataclass
class CelltypeMap:
    """Result of :func:`celltype_map` (returned with ``inplace=False``).

    Attributes
    ----------
    labels
        ``(height, width)`` uint8: 0 = no call, ``i`` = ``types[i - 1]``.
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


def _resolve_markers(
    markers: Mapping[str, Iterable[str]], genes: list[str], sr_key: str
) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Markers present per type, markers missing per type, and the types without any marker in the layer."""
    if not isinstance(markers, Mapping) or len(markers) == 0:
        raise TypeError(
            "`markers` must be a non-empty mapping of cell type -> marker genes, e.g. "
            "`{**c3.tl.DEFAULT_MARKERS, 'NK cell': ['NCAM1', 'KLRD1']}`; "
            f"got {type(markers).__name__} {markers!r:.80}."
        )
    known = set(genes)
    used, missing, excluded = {}, {}, []
    for cell_type, type_markers in markers.items():
        type_markers = [type_markers] if isinstance(type_markers, str) else list(dict.fromkeys(type_markers))
        if cell_type == MAX_SCORE or not isinstance(cell_type, str) or not cell_type:
            raise ValueError(f"`markers`: cell type names must be non-empty strings other than {MAX_SCORE!r}, got "
                             f"{cell_type!r}.")
        present = [g for g in type_markers if g in known]
        absent = [g for g in type_markers if g not in known]
        if absent:
            missing[cell_type] = absent
        if present:
            used[cell_type] = present
        else:
            excluded.append(cell_type)
    if not used:
        raise ValueError(
            f"None of the {len(markers)} cell types in `markers` has a marker gene in `sr_key={sr_key!r}` "
            f"(layer genes include {genes[:8]}; markers asked for: "
            f"{sorted({g for gs in missing.values() for g in gs})[:12]}). Super-resolve the marker genes, or pass "
            "`markers` that the layer has."
        )
    if len(used) > 255:
        raise ValueError(f"`markers` defines {len(used)} cell types; at most 255 fit the uint8 label map.")
    return used, missing, excluded


def _compute(data: Any, used: dict[str, list[str]], min_score: float | None) -> tuple[
    np.ndarray, np.ndarray, np.ndarray, list[str]
]:
    """Scores, max score and labels from a ``(c, y, x)`` DataArray; also the markers that are constant."""
    import dask.array as da

    union = list(dict.fromkeys(g for gs in used.values() for g in gs))
    values = da.asarray(data.sel(c=union).data).astype(np.float32)
    lo, hi = da.compute(da.nanmin(values, axis=(1, 2)), da.nanmax(values, axis=(1, 2)))
    span = hi - lo
    constant = [g for g, s in zip(union, span, strict=True) if not (np.isfinite(s) and s > 0)]
    ok = np.isfinite(span) & (span > 0)
    # per marker min-max over the whole region; a constant marker carries no signal and becomes 0 (METHOD.md 2)
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
    # no call where no marker is finite, where no marker is expressed at all (argmax would be arbitrary) or below
    # min_score
    called = finite & (max_score > 0)
    if min_score is not None:
        called &= max_score >= min_score
    labels = np.where(called, best + 1, NO_CALL).astype(np.uint8)
    return labels, scores, max_score, constant


def _scale_factors(element: Any) -> list[int] | None:
    """Downscale factors between consecutive pyramid levels of a multiscale element (None for a single scale)."""
    from c3diff._validation import raster_levels

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


def celltype_map(
    sdata: SpatialData,
    sr_key: str,
    *,
    markers: Mapping[str, Iterable[str]] | None = None,
    key_added: str | None = None,
    min_score: float | None = None,
    inplace: bool = True,
) -> CelltypeMap | None:
    """Call a cell type per pixel from super-resolved marker genes (METHOD.md section 8).

    Each marker's map is min-max normalised to [0, 1] over the whole layer; a type's score is the mean of its
    markers' normalised maps; each pixel gets the type of highest score (the first type wins ties), and the score
    is kept.

    Parameters
    ----------
    sdata
        SpatialData holding the super-resolved layer.
    sr_key
        Gene raster in ``sdata.images`` (e.g. ``"hne_c3diff_x10"`` from :func:`c3diff.tl.super_resolve`, or a
        binned ground truth); level 0 of a multiscale image is used. NaN pixels (e.g. outside tissue) are ignored.
    markers
        Cell type -> marker genes. Default :data:`DEFAULT_MARKERS` (the paper's seven immune types). Markers not in
        the layer are dropped (a warning lists them); a type with no marker left is excluded (warned); it is an
        error if no type has a marker.
    key_added
        Key of the label map in ``sdata.labels``. Default ``f"{sr_key}_celltypes"``. The scores go to
        ``sdata.images[f"{key_added}_scores"]``.
    min_score
        Leave pixels whose best score is below this (in [0, 1]) uncalled (label 0). Pixels where no marker is
        expressed (best score 0) or no marker is finite are never called.
    inplace
        Write the results into ``sdata`` (and return ``None``); otherwise return them as a :class:`CelltypeMap`
        and leave ``sdata`` untouched.

    Returns
    -------
    ``None``, writing (only once everything succeeded):

    - ``sdata.labels[key_added]``: uint8 Labels2DModel, 0 = no call, ``i`` = the ``i``-th type;
    - ``sdata.images[f"{key_added}_scores"]``: float32 Image2DModel with one channel per type (its score) and a
      last channel ``"max_score"`` (the called type's score), so the scores travel as one element;
    - ``sdata.attrs["c3diff"][key_added]``: ``categories`` (types in label order), ``labels`` (``"0"`` ->
      ``"no call"``, ``"1"`` -> first type, ...), the markers used and missing, excluded types and parameters.

    Both rasters carry all of the source layer's transformations and its pyramid (scale factors), as
    :func:`squidpy.experimental.im.detect_tissue` does. With ``inplace=False`` a :class:`CelltypeMap`.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> c3.pp.bin_transcripts(sdata, bin_size=10, image_key="hne", key_added="truth")  # doctest: +SKIP
    >>> c3.tl.celltype_map(sdata, "truth", min_score=0.1)  # doctest: +SKIP
    >>> sdata.attrs["c3diff"]["truth_celltypes"]["categories"]  # doctest: +SKIP
    >>> markers = {**c3.tl.DEFAULT_MARKERS, "Tumour": ["EPCAM", "KRT8"]}
    >>> c3.tl.celltype_map(sdata, "truth", markers=markers, key_added="truth_types")  # doctest: +SKIP
    """
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import get_transformation

    element = get_element(sdata, sr_key, "images", arg="sr_key")
    genes = raster_channels(element)
    if min_score is not None and not (isinstance(min_score, int | float) and 0 <= min_score <= 1):
        raise ValueError(f"`min_score` must be a number in [0, 1] (scores are mean min-max values), got {min_score!r}.")
    used, missing, excluded = _resolve_markers(DEFAULT_MARKERS if markers is None else markers, genes, sr_key)
    key = key_added if key_added is not None else f"{sr_key}_celltypes"
    scores_key = f"{key}_scores"
    if inplace:
        if scores_key == sr_key:
            raise ValueError(f"`key_added={key!r}` would overwrite the source layer {sr_key!r} with its scores.")
        _check_free(sdata, key, "labels", arg="key_added")
        _check_free(sdata, scores_key, "images", arg="key_added")

    if missing:
        listed = "; ".join(f"{t}: {', '.join(gs)}" for t, gs in missing.items())
        warnings.warn(
            f"celltype_map: {sum(map(len, missing.values()))} marker gene(s) are not in `sr_key={sr_key!r}` and were "
            f"dropped ({listed}).",
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
    labels, scores, max_score, constant = _compute(scale0(element), used, min_score)
    if constant:
        warnings.warn(
            f"celltype_map: {len(constant)} marker(s) are constant over `sr_key={sr_key!r}` and score 0 everywhere: "
            f"{constant}.",
            UserWarning,
            stacklevel=2,
        )
    types = list(used)
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

    previous = sdata.labels[key] if key in sdata.labels else None
    sdata.labels[key] = label_el
    try:
        sdata.images[scores_key] = scores_el
    except Exception:
        # keep the user's object as it was
        if previous is None:
            del sdata.labels[key]
        else:
            sdata.labels[key] = previous
        raise
    entry = record(
        sdata, key, "celltype_map", sr_key=sr_key, markers=used, min_score=min_score, scores_key=scores_key
    )
    entry.update(
        categories=types,
        labels={str(NO_CALL): "no call", **{str(i + 1): t for i, t in enumerate(types)}},
        missing_markers=missing,
        excluded_types=excluded,
        constant_markers=constant,
        scores_key=scores_key,
    )
    return None
