"""Figure of super-resolved genes next to the H&E, the low-resolution input, the truth and the uncertainty."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._geometry import raster_channels, raster_geometry
from c3diff._validation import check_genes, get_element
from c3diff.pl._render import Extent, colour_limits, crop, imshow_extent, rgb, set_view

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def _gene_raster(sdata: SpatialData, key: str, genes: list[str], arg: str) -> Any:
    element = get_element(sdata, key, "images", arg=arg)
    check_genes(genes, raster_channels(element), arg=f"genes (in `{arg}={key!r}`)")
    return element


def _draw_raster(
    ax: Any,
    element: Any,
    gene: str,
    extent: Extent,
    *,
    cmap: str,
    robust: bool,
    alpha: float = 1.0,
    max_pixels: int,
    arg: str,
) -> Any:
    """Draw one gene of a raster on ``ax`` (cropped to ``extent``) and return the image artist."""
    part = crop(element, extent, max_pixels=max_pixels, arg=arg, channels=[gene])
    if part is None:
        ax.text(0.5, 0.5, "outside the layer", ha="center", va="center", transform=ax.transAxes)
        return None
    values, own = part
    values = values[0].astype(np.float32)
    vmin, vmax = colour_limits(values, robust)
    return ax.imshow(
        values,
        extent=imshow_extent(own),
        origin="upper",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        alpha=alpha,
        interpolation="nearest",
    )


def _spots(sdata: SpatialData, key: str, gene: str) -> Any:
    """The in-tissue spots of a table (:func:`c3diff.pp.spots_from_table`) with the counts of ``gene``."""
    from c3diff.pp import spots_from_table

    try:
        return spots_from_table(sdata, key, genes=[gene], in_tissue_only=True)
    except (KeyError, ValueError) as error:
        raise type(error)(f"`lr_key={key!r}` is not a usable spot table: {error}") from error


def _draw_spots(ax: Any, spots: Any, extent: Extent, *, cmap: str, robust: bool) -> Any:
    """Draw the spots inside ``extent`` as discs of their true diameter coloured by their (single gene) counts."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    ymin, xmin, ymax, xmax = extent
    r = spots.radius
    y, x = spots.centres[:, 0], spots.centres[:, 1]
    keep = (x >= xmin - r) & (x <= xmax + r) & (y >= ymin - r) & (y <= ymax + r)
    counts = spots.counts[keep, 0]
    collection = PatchCollection(
        [Circle((cx, cy), r) for cx, cy in zip(x[keep], y[keep], strict=True)], cmap=cmap, linewidth=0
    )
    collection.set_array(counts)
    collection.set_clim(*colour_limits(counts, robust))
    ax.add_collection(collection)
    return collection


def super_resolved(
    sdata: SpatialData,
    key: str,
    genes: str | Sequence[str],
    *,
    image_key: str | None = "hne",
    lr_key: str | None = None,
    truth_key: str | None = None,
    std_key: str | None = None,
    compare_keys: Mapping[str, str] | None = None,
    label: str = "prediction",
    overlay: bool = False,
    cmap: str = "magma",
    std_cmap: str = "viridis",
    alpha: float = 0.6,
    robust: bool = True,
    panel_size: float = 3.0,
    max_pixels: int = 1024,
) -> Figure:
    """Super-resolved gene maps next to their inputs and references, one row per gene.

    Panels, left to right: the H&E (``image_key``), the low-resolution input (``lr_key``), other predictions to
    compare with (``compare_keys``), the prediction (``key``), the truth (``truth_key``) and the prediction's
    standard deviation (``std_key``); those not given are left out. Every panel shows the prediction's extent in
    micrometres (placed through each element's transform),
    with a colourbar per map.

    Parameters
    ----------
    sdata
        SpatialData holding the layers.
    key
        Super-resolved gene raster (e.g. ``"hne_c3diff_x10"``).
    genes
        Gene(s) to show, one row each.
    image_key
        H&E image, cropped to the prediction's extent; ``None`` for no H&E panel. Large images are drawn from the
        coarsest pyramid level that still has ``max_pixels`` across the view; a single-scale image (or level) with
        more is reduced lazily by block means, chunk by chunk, before it reaches numpy, so a whole slide draws in
        seconds and well under 1 GB.
    lr_key
        Low-resolution input: a gene raster in ``sdata.images`` (e.g. 100 um bins), or a spot table in
        ``sdata.tables`` (annotating circles, read with :func:`c3diff.pp.spots_from_table`) whose in-tissue spots
        are drawn as discs of their true diameter coloured by counts.
    truth_key
        Ground-truth gene raster.
    std_key
        Raster of the prediction's standard deviation (e.g. ``f"{key}_std"``).
    compare_keys
        Other gene rasters to show before the prediction, as ``{title: key}`` (e.g.
        ``{"bicubic": "hne_bicubic_x10"}``).
    label
        Title of the prediction's panel (e.g. ``"C3-Diff"``).
    overlay
        Draw the prediction semi-transparently (``alpha``) over the H&E in its panel (needs ``image_key``).
    cmap, std_cmap
        Colour maps of the expression panels and of the standard deviation.
    alpha
        Opacity of the prediction with ``overlay``.
    robust
        Colour each map from its 1st to 99th percentile (else min to max).
    panel_size
        Panel edge in inches.
    max_pixels
        Resolution to draw rasters at (pixels across the view), choosing coarser pyramid levels when they suffice.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (not shown), for further editing or ``savefig``.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> fig = c3.pl.super_resolved(  # doctest: +SKIP
    ...     sdata, "hne_c3diff_x10", ["CD3E", "MS4A1"], lr_key="visium_table", truth_key="truth", overlay=True
    ... )
    >>> fig.savefig("sr.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    genes = check_genes(genes, raster_channels(get_element(sdata, key, "images", arg="key")))
    pred = get_element(sdata, key, "images", arg="key")
    extent = raster_geometry(pred, arg="key").extent
    if overlay and image_key is None:
        raise ValueError("`overlay=True` draws the prediction over the H&E; pass `image_key`.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")
    hne = get_element(sdata, image_key, "images", arg="image_key") if image_key is not None else None
    lr = None
    lr_spots = {}
    if lr_key is not None:
        if lr_key in sdata.images:
            lr = _gene_raster(sdata, lr_key, genes, "lr_key")
        elif lr_key in sdata.tables:
            check_genes(genes, [str(g) for g in sdata.tables[lr_key].var_names], arg=f"genes (in `lr_key={lr_key!r}`)")
            lr_spots = {gene: _spots(sdata, lr_key, gene) for gene in genes}
        else:
            raise KeyError(
                f"`lr_key={lr_key!r}` is neither a gene raster in `sdata.images` ({sorted(sdata.images)}) nor a "
                f"spot table in `sdata.tables` ({sorted(sdata.tables)})."
            )
    compare = {
        title: _gene_raster(sdata, other, genes, f"compare_keys[{title!r}]")
        for title, other in (compare_keys or {}).items()
    }
    if label in compare or label in ("H&E", "LR input", "truth", "std"):
        raise ValueError(f"`label={label!r}` clashes with another panel's title; choose another.")
    truth = _gene_raster(sdata, truth_key, genes, "truth_key") if truth_key is not None else None
    std = _gene_raster(sdata, std_key, genes, "std_key") if std_key is not None else None

    hne_part = None
    if hne is not None:
        hne_part = crop(hne, extent, max_pixels=max_pixels, arg="image_key")
        if hne_part is None:
            raise ValueError(
                f"`image_key={image_key!r}` does not overlap the extent of `key={key!r}` "
                f"(y {extent[0]:g}..{extent[2]:g}, x {extent[1]:g}..{extent[3]:g} um)."
            )
    panels = (["H&E"] if hne is not None else []) + (["LR input"] if lr_key is not None else []) + [*compare, label]
    panels += (["truth"] if truth is not None else []) + (["std"] if std is not None else [])

    fig, axes = plt.subplots(
        len(genes),
        len(panels),
        figsize=(panel_size * len(panels) * 1.25, panel_size * len(genes)),
        squeeze=False,
        layout="constrained",
    )
    for row, gene in zip(axes, genes, strict=True):
        for ax, panel in zip(row, panels, strict=True):
            artist = None
            if panel == "H&E":
                ax.imshow(rgb(hne_part[0]), extent=imshow_extent(hne_part[1]), origin="upper")
            elif panel == "LR input":
                if lr is not None:
                    artist = _draw_raster(
                        ax, lr, gene, extent, cmap=cmap, robust=robust, max_pixels=max_pixels, arg="lr_key"
                    )
                else:
                    artist = _draw_spots(ax, lr_spots[gene], extent, cmap=cmap, robust=robust)
            elif panel in compare:
                artist = _draw_raster(
                    ax,
                    compare[panel],
                    gene,
                    extent,
                    cmap=cmap,
                    robust=robust,
                    max_pixels=max_pixels,
                    arg=f"compare_keys[{panel!r}]",
                )
            elif panel == label:
                if overlay:
                    ax.imshow(rgb(hne_part[0]), extent=imshow_extent(hne_part[1]), origin="upper")
                artist = _draw_raster(
                    ax,
                    pred,
                    gene,
                    extent,
                    cmap=cmap,
                    robust=robust,
                    max_pixels=max_pixels,
                    alpha=alpha if overlay else 1.0,
                    arg="key",
                )
            elif panel == "truth":
                artist = _draw_raster(
                    ax, truth, gene, extent, cmap=cmap, robust=robust, max_pixels=max_pixels, arg="truth_key"
                )
            else:
                artist = _draw_raster(
                    ax, std, gene, extent, cmap=std_cmap, robust=robust, max_pixels=max_pixels, arg="std_key"
                )
            if artist is not None:
                fig.colorbar(artist, ax=ax, shrink=0.8)
            set_view(ax, extent)
            ax.set_title(f"{gene}: {panel}")
    return fig
