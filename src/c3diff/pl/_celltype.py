"""Figure of a cell-type label map (from :func:`c3diff.tl.celltype_map`), optionally beside a truth map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import ATTRS_KEY
from c3diff._geometry import raster_geometry
from c3diff._validation import get_element
from c3diff.pl._render import crop, imshow_extent, rgb, set_view

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def _from_mapping(mapping: dict[int, str], where: str) -> list[str]:
    """Names of labels 1..T from a mapping label value -> name (0, unassigned, left out)."""
    mapping = {k: v for k, v in mapping.items() if k != 0}
    if sorted(mapping) != list(range(1, len(mapping) + 1)):
        raise ValueError(f"{where} must map 1..T to type names, got {mapping}.")
    return [mapping[i] for i in range(1, len(mapping) + 1)]


def _table_names(sdata: SpatialData, key: str) -> list[str] | None:
    """Names of labels 1..T from a table annotating the labels element ``key`` (spatialdata's region / instance-key
    convention) with a categorical column, ``cell_type`` preferred (as :func:`c3diff.tl.celltype_map` writes)."""
    import pandas as pd
    from spatialdata.models import get_table_keys

    for name, table in sdata.tables.items():
        try:
            region, region_key, instance_key = get_table_keys(table)
        except (KeyError, ValueError, TypeError):
            continue
        if key not in ([region] if isinstance(region, str) else list(region)):
            continue
        obs = table.obs[table.obs[region_key].astype(str) == key]
        columns = [c for c in obs.columns if isinstance(obs[c].dtype, pd.CategoricalDtype) and c != region_key]
        columns.sort(key=lambda c: c != "cell_type")
        if columns:
            values = obs[instance_key].to_numpy(dtype=np.int64)
            return _from_mapping(
                dict(zip(values.tolist(), obs[columns[0]].astype(str), strict=True)),
                f"`sdata.tables[{name!r}].obs[{columns[0]!r}]`",
            )
    return None


def _categories(sdata: SpatialData, key: str, given: Sequence[str] | None, arg: str) -> list[str] | None:
    """Type names in label order: given, else recorded in ``sdata.attrs["c3diff"][key]``: ``categories`` (by
    :func:`c3diff.tl.celltype_map`) or a ``labels`` mapping value -> name (e.g. by
    :func:`c3diff.datasets.true_cell_types`), else the categorical column of a table annotating the labels."""
    if given is not None:
        return [str(c) for c in given]
    entry = sdata.attrs.get(ATTRS_KEY, {}).get(key, {})
    if "categories" in entry:
        return [str(c) for c in entry["categories"]]
    if "labels" in entry:
        return _from_mapping(
            {int(k): str(v) for k, v in entry["labels"].items()}, f"`sdata.attrs['c3diff'][{key!r}]['labels']`"
        )
    return _table_names(sdata, key)


def _palette(types: list[str], palette: Mapping[str, Any] | None) -> dict[str, Any]:
    """A colour per type name: the user's, else tab10/tab20 in order (same name, same colour in every panel)."""
    import matplotlib as mpl
    from matplotlib.colors import to_rgba

    base = mpl.colormaps["tab10" if len(types) <= 10 else "tab20"]
    colours = {t: to_rgba(base(i % base.N)) for i, t in enumerate(types)}
    if palette is not None:
        unknown = [t for t in palette if t not in colours]
        if unknown:
            raise KeyError(f"`palette` names cell types that are not in the maps: {unknown} (types: {types}).")
        colours.update({t: to_rgba(c) for t, c in palette.items()})
    return colours


def _to_rgba(labels: np.ndarray, types: list[str], colours: dict[str, Any], key: str) -> np.ndarray:
    """Label ids -> RGBA (0 = unassigned, transparent)."""
    top = int(labels.max()) if labels.size else 0
    if top > len(types):
        raise ValueError(
            f"Labels of {key!r} go up to {top} but only {len(types)} cell types are known ({types}); pass "
            "`categories`/`truth_categories` in label order."
        )
    lut = np.zeros((len(types) + 1, 4))
    for i, t in enumerate(types):
        lut[i + 1] = colours[t]
    return lut[labels.astype(np.int64)]


def celltype_map(
    sdata: SpatialData,
    key: str,
    *,
    image_key: str | None = "hne",
    truth_key: str | None = None,
    categories: Sequence[str] | None = None,
    truth_categories: Sequence[str] | None = None,
    palette: Mapping[str, Any] | None = None,
    panel_size: float = 4.0,
    max_pixels: int = 1024,
) -> Figure:
    """A cell-type label map with a legend of type names, beside the H&E and optionally a truth map.

    Parameters
    ----------
    sdata
        SpatialData holding the label map.
    key
        Labels element written by :func:`c3diff.tl.celltype_map` (0 = unassigned, drawn transparent).
    image_key
        H&E image shown as the first panel, cropped to the map's extent; ``None`` for none.
    truth_key
        A reference label map (e.g. true cell types) drawn beside it over the same extent.
    categories, truth_categories
        Type names in label order (label ``i`` is ``categories[i - 1]``). Default: those recorded in
        ``sdata.attrs["c3diff"][key]`` (and ``[truth_key]``): ``categories``, or a ``labels`` mapping value ->
        name as :func:`c3diff.datasets.true_cell_types` writes, else the categorical column (``cell_type``
        preferred) of a table annotating the labels (spatialdata's region / instance key); a truth map without
        names uses the predicted map's names.
    palette
        Colours of some or all types (name -> matplotlib colour); the rest follow tab10/tab20.
    panel_size
        Panel edge in inches.
    max_pixels
        Resolution to draw at (pixels across the view), choosing coarser pyramid levels when they suffice.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (not shown).

    Examples
    --------
    >>> import c3diff as c3
    >>> c3.tl.celltype_map(sdata, "hne_c3diff_x10")  # doctest: +SKIP
    >>> fig = c3.pl.celltype_map(sdata, "hne_c3diff_x10_celltypes", truth_key="true_celltypes")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    element = get_element(sdata, key, "labels", arg="key")
    types = _categories(sdata, key, categories, "categories")
    if types is None:
        raise KeyError(
            f"No cell-type names for `key={key!r}`: `sdata.attrs['c3diff'][{key!r}]['categories']` is missing (it is "
            "written by `c3.tl.celltype_map`) and no table annotates the labels with a categorical column. Pass "
            "`categories` (type names in label order)."
        )
    extent = raster_geometry(element, arg="key").extent
    maps = [(key, element, types)]
    if truth_key is not None:
        truth = get_element(sdata, truth_key, "labels", arg="truth_key")
        maps.append((f"{truth_key} (truth)", truth, _categories(sdata, truth_key, truth_categories, "") or types))
    all_types = list(dict.fromkeys(t for _, _, ts in maps for t in ts))
    colours = _palette(all_types, palette)

    hne_part = None
    if image_key is not None:
        hne_part = crop(
            get_element(sdata, image_key, "images", arg="image_key"), extent, max_pixels=max_pixels, arg="image_key"
        )
        if hne_part is None:
            raise ValueError(f"`image_key={image_key!r}` does not overlap the extent of `key={key!r}`.")
    n_panels = len(maps) + (hne_part is not None)
    fig, axes = plt.subplots(
        1, n_panels, figsize=(panel_size * n_panels + 2.0, panel_size), squeeze=False, layout="constrained"
    )
    axes = list(axes[0])
    if hne_part is not None:
        ax = axes.pop(0)
        ax.imshow(rgb(hne_part[0]), extent=imshow_extent(hne_part[1]), origin="upper")
        set_view(ax, extent)
        ax.set_title(image_key)
    shown: list[str] = []
    for ax, (title, labels_el, names) in zip(axes, maps, strict=True):
        part = crop(labels_el, extent, max_pixels=max_pixels, arg="truth_key" if "(truth)" in title else "key")
        if part is None:
            ax.text(0.5, 0.5, "outside the map", ha="center", va="center", transform=ax.transAxes)
        else:
            labels, own = part
            ax.imshow(
                _to_rgba(np.asarray(labels), names, colours, title),
                extent=imshow_extent(own),
                origin="upper",
                interpolation="nearest",
            )
            present = set(np.unique(labels).tolist()) - {0}
            shown += [t for i, t in enumerate(names) if i + 1 in present]
        set_view(ax, extent)
        ax.set_title(title)
    # every type of the maps' names in the legend, so that absent ones are visible as absent (their label unused)
    handles = [Patch(facecolor=colours[t], label=t if t in shown else f"{t} (absent)") for t in all_types]
    fig.legend(handles=handles, loc="outside right center", frameon=False, title="cell type")
    return fig
