"""Ground-truth cell-type raster of a simulated (or segmented) section."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from c3diff._constants import ATTRS_KEY, COORDINATE_SYSTEM, Key
from c3diff._geometry import raster_geometry, scale0
from c3diff._validation import get_element

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from spatialdata import SpatialData


def true_cell_types(
    sdata: SpatialData,
    *,
    pixel_size: float = 10.0,
    types: Sequence[str] | None = None,
    key_added: str = "true_cell_types",
    labels_key: str = Key.CELL_LABELS.value,
    table_key: str = Key.CELL_TABLE.value,
    cell_type_key: str = "cell_type",
    min_fraction: float = 0.0,
    inplace: bool = True,
) -> xr.DataArray | None:
    """Rasterise the cell types of a section: per pixel, the type covering the largest area.

    Cell areas come from the cell-label raster (``labels_key``) and the type of each cell from the table that annotates
    the cells (``table_key``; its instance key holds the label values). The output grid starts at the label raster's
    corner (the section's ``(0, 0)``) and has square pixels of ``pixel_size`` um; a pixel's area is measured by the
    label pixels whose centres fall inside it (exact when ``pixel_size`` is a multiple of the label pixel size).

    Parameters
    ----------
    sdata
        SpatialData with a cell-label raster and a cell table, e.g. from :func:`simulate_section`.
    pixel_size
        Output pixel size in um (the paper's high-resolution grid is 10 um, or 20 um for 5x). Must not be finer
        than the label raster.
    types
        Cell types to keep, in label order (value ``i`` is ``types[i - 1]``, matching
        :func:`c3diff.tl.celltype_map` when given the same types, e.g. ``list(c3.tl.DEFAULT_MARKERS)``, the seven immune
        types).
        Cells of other types count as background. ``None``: every type of the table, in its category order.
    key_added
        Name of the new labels element.
    labels_key, table_key, cell_type_key
        The cell-label raster, the table annotating its cells, and the table column with the cell types.
    min_fraction
        A pixel takes its majority type only if that type covers at least this fraction of the pixel; otherwise 0.
        ``0`` (default): any covered pixel gets a type; 0 means no (kept) cell at all.
    inplace
        Add the raster to ``sdata.labels[key_added]`` and the value -> type mapping to
        ``sdata.attrs["c3diff"][key_added]["labels"]``; otherwise return the raster (its ``attrs["c3diff"]["labels"]``
        holds the mapping) and leave ``sdata`` untouched.

    Returns
    -------
    ``None`` if ``inplace``, else the ``Labels2DModel`` raster (``uint8`` when there are fewer than 256 types).

    Examples
    --------
    >>> import c3diff as c3
    >>> immune_types = list(c3.tl.DEFAULT_MARKERS)
    >>> sdata = c3.datasets.simulate_section(width=640, height=640, seed=0)  # doctest: +SKIP
    >>> c3.datasets.true_cell_types(sdata, types=immune_types, key_added="true_immune")  # doctest: +SKIP
    >>> sdata.attrs["c3diff"]["true_immune"]["labels"][1]  # doctest: +SKIP
    'B cell'
    """
    import pandas as pd
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale, Translation
    from spatialdata.transformations import Sequence as SeqTransform

    from c3diff._provenance import _plain, record

    if not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"`pixel_size` must be a positive number of micrometres, got {pixel_size!r}.")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"`min_fraction` must be between 0 and 1, got {min_fraction!r}.")
    labels_el = get_element(sdata, labels_key, "labels", arg="labels_key")
    table = get_element(sdata, table_key, "tables", arg="table_key")
    geom = raster_geometry(labels_el, arg="labels_key")
    if pixel_size < max(geom.sy, geom.sx) - 1e-9:
        raise ValueError(
            f"`pixel_size={pixel_size}` is finer than the label raster `{labels_key}` ({geom.sy} um/px); pass a "
            f"pixel size of at least {geom.sy} um."
        )
    if cell_type_key not in table.obs:
        raise KeyError(
            f"`cell_type_key={cell_type_key!r}` is not a column of `sdata.tables[{table_key!r}].obs` "
            f"(columns: {list(table.obs.columns)})."
        )
    instance_key = table.uns.get("spatialdata_attrs", {}).get("instance_key")
    if instance_key is None or instance_key not in table.obs:
        raise ValueError(
            f"`sdata.tables[{table_key!r}]` has no instance key column linking its rows to the label "
            "values; parse it with `TableModel.parse(..., instance_key=...)`."
        )
    cell_types = table.obs[cell_type_key]
    available = (
        list(cell_types.cat.categories)
        if isinstance(cell_types.dtype, pd.CategoricalDtype)
        else sorted(pd.unique(cell_types.astype(str)))
    )
    if types is None:
        types = available
    else:
        types = [types] if isinstance(types, str) else list(types)
        unknown = [t for t in types if t not in available]
        if unknown:
            raise KeyError(
                f"`types`: {unknown} not found in `{table_key}.obs[{cell_type_key!r}]` (types present: {available})."
            )
        if len(set(types)) != len(types):
            raise ValueError(f"`types` lists a type more than once: {types}.")
    code_of = {t: i + 1 for i, t in enumerate(types)}

    ids = np.asarray(table.obs[instance_key], dtype=np.int64)
    cell_codes = np.array([code_of.get(t, 0) for t in cell_types.astype(str)], dtype=np.int64)
    lab = np.asarray(scale0(labels_el).data)
    max_label = int(lab.max()) if lab.size else 0
    lut = np.zeros(max(max_label, int(ids.max(initial=0))) + 1, dtype=np.int64)
    valid = ids >= 0
    lut[ids[valid]] = cell_codes[valid]
    unannotated = np.setdiff1d(np.unique(lab), np.concatenate([[0], ids]))
    if unannotated.size:
        warnings.warn(
            f"{unannotated.size} label value(s) of `{labels_key}` have no row in `{table_key}`; they count "
            "as background.",
            UserWarning,
            stacklevel=2,
        )

    height_um, width_um = geom.height * geom.sy, geom.width * geom.sx
    ny, nx = int(np.ceil(height_um / pixel_size - 1e-9)), int(np.ceil(width_um / pixel_size - 1e-9))
    orow = np.minimum(((np.arange(geom.height) + 0.5) * geom.sy / pixel_size).astype(np.int64), ny - 1)
    ocol = np.minimum(((np.arange(geom.width) + 0.5) * geom.sx / pixel_size).astype(np.int64), nx - 1)
    k = len(types) + 1
    counts = np.zeros(ny * nx * k, dtype=np.int64)
    step = max(1, 4_000_000 // max(geom.width, 1))
    for r0 in range(0, geom.height, step):
        block = lut[lab[r0 : r0 + step]]
        bins = (orow[r0 : r0 + step, None] * nx + ocol[None, :]) * k + block
        counts += np.bincount(bins.ravel(), minlength=counts.size)
    counts = counts.reshape(ny * nx, k)
    area = counts.sum(axis=1)
    best = np.argmax(counts[:, 1:], axis=1) + 1 if k > 1 else np.zeros(ny * nx, np.int64)
    best_count = counts[np.arange(ny * nx), best] if k > 1 else np.zeros(ny * nx, np.int64)
    keep = (best_count > 0) & (best_count >= min_fraction * np.maximum(area, 1))
    dtype = np.uint8 if len(types) < 256 else np.int32
    out = np.where(keep, best, 0).astype(dtype).reshape(ny, nx)

    scale = Scale([pixel_size, pixel_size], axes=("y", "x"))
    transform = (
        scale
        if (geom.y0, geom.x0) == (0.0, 0.0)
        else SeqTransform([scale, Translation([geom.y0, geom.x0], axes=("y", "x"))])
    )
    element = Labels2DModel.parse(out, dims=("y", "x"), transformations={COORDINATE_SYSTEM: transform})
    mapping = {i + 1: t for i, t in enumerate(types)}
    if not inplace:
        element.attrs[ATTRS_KEY] = {"labels": mapping}
        return element
    sdata.labels[key_added] = element
    entry = record(
        sdata,
        key_added,
        "c3diff.datasets.true_cell_types",
        pixel_size=pixel_size,
        types=list(types),
        labels_key=labels_key,
        table_key=table_key,
        cell_type_key=cell_type_key,
        min_fraction=min_fraction,
    )
    entry["labels"] = mapping
    entry["pixel_size"] = _plain(pixel_size)
    return None


def main_types(
    sdata: SpatialData, types: Sequence[str], *, pixel_size: float = 10.0, **kwargs
) -> tuple[xr.DataArray, np.ndarray]:
    """The main cell type of each pixel, kept where it is one of ``types``: the truth that cell-type maps are scored
    against (``c3diff demo``, ``benchmarks/celltype_threshold.py``).

    :func:`true_cell_types` over *every* type of the table, so a pixel is labelled ``types[i - 1]`` (value ``i``) only
    if that type covers more of it than any other type; a pixel mostly of another type (tumour, stroma, ...) or
    without cells is 0. (``true_cell_types(types=types)`` instead lets other types count as background, so a pixel
    95 % tumour that an immune cell touches would be labelled with the immune type.)

    Returns the ``Labels2DModel`` raster (``attrs["c3diff"]["labels"]``: value -> type) and the tissue mask (pixels
    covered by any cell). ``kwargs`` go to :func:`true_cell_types` (``labels_key``, ``table_key``, ...).

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=640, height=640, seed=0)  # doctest: +SKIP
    >>> labels, tissue = c3.datasets.main_types(sdata, ["B cell", "T cell CD8"])  # doctest: +SKIP
    >>> sdata.labels["true_immune_types"] = labels  # 1: B cell, 2: T cell CD8, 0: other  # doctest: +SKIP
    """
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import get_transformation

    types = [types] if isinstance(types, str) else list(types)
    every = true_cell_types(sdata, pixel_size=pixel_size, inplace=False, **kwargs)
    names = every.attrs[ATTRS_KEY]["labels"]
    missing = [t for t in types if t not in names.values()]
    if missing:
        raise KeyError(f"`types`: {missing} are not cell types of the section (types: {list(names.values())}).")
    lut = np.zeros(max(names, default=0) + 1, dtype=np.uint8 if len(types) < 256 else np.int32)
    for value, name in names.items():
        if name in types:
            lut[value] = types.index(name) + 1
    codes = np.asarray(every.data)
    element = Labels2DModel.parse(
        lut[codes], dims=("y", "x"), transformations=copy.deepcopy(get_transformation(every, get_all=True))
    )
    element.attrs[ATTRS_KEY] = {"labels": {i + 1: t for i, t in enumerate(types)}}
    return element, codes > 0
