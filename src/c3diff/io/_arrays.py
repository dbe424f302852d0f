"""Spot data held in memory (counts, centres, an H&E and its pixel size) -> the SpatialData the readers return."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import Key
from c3diff._geometry import raster_geometry
from c3diff._validation import check_counts
from c3diff.io._common import (
    as_rgb,
    build_sdata,
    check_on_image,
    index_transform,
    neighbour_distances,
    parse_rgb,
    spot_elements,
)

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def _positive(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not (np.isfinite(value) and value > 0)
    ):
        raise ValueError(f"`{name}` must be a positive number of micrometres, got {value!r}.")
    return float(value)


def spots_from_arrays(
    counts: Any,
    coordinates: np.ndarray,
    *,
    genes: Sequence[str],
    spot_diameter: float,
    image: np.ndarray | None = None,
    pixel_size: float | None = None,
    pitch: float | None = None,
    spot_ids: Sequence[str] | None = None,
    in_tissue: np.ndarray | None = None,
    obs: Any = None,
    layout: str = "arrays",
) -> SpatialData:
    """Build spot data in memory: the SpatialData that :func:`read_legacy_st` / :func:`read_visium` return, from
    arrays instead of files.

    For spots that come from another tool, from a simulation, or that a benchmark pools from real spots (each
    pseudo-spot is then a larger disc on a coarser pitch).

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` raw counts (numpy, scipy sparse or a DataFrame), finite and non-negative.
    coordinates
        ``(n_spots, 2)`` spot centres as ``(x, y)`` in micrometres, y running down, in the frame of ``image``: image
        pixel ``(row i, column j)`` has its centre at ``(x, y) = (j * pixel_size, i * pixel_size)`` (the readers'
        convention; ``obsm["spatial"]`` of a c3diff spot table is already in this frame).
    genes
        Gene names, one per column of ``counts``.
    spot_diameter
        Spot diameter in micrometres (Visium 55, legacy ST 100); the spots' circles get half of it as radius.
    image
        The H&E as a ``(y, x, 3)`` array (grey and RGBA accepted), or ``None`` for spots without an image.
    pixel_size
        Micrometres per pixel of ``image`` (required with ``image``).
    pitch
        Centre-to-centre distance of neighbouring spots in micrometres. Default: the median distance from each
        spot under tissue to its nearest neighbour.
    spot_ids
        Spot names (``obs_names``). Default ``"0"``, ``"1"``, ...
    in_tissue
        Boolean flag per spot (default: all under tissue).
    obs
        Extra per-spot columns (a DataFrame or mapping with ``n_spots`` rows), e.g. array coordinates.
    layout
        Name of the layout, recorded in ``table.uns["c3diff"]["spots"]["layout"]``.

    Returns
    -------
    SpatialData with ``Key.HNE`` (when ``image`` is given), ``Key.SPOTS`` (circles, um) and ``Key.SPOT_TABLE``
    (spots x genes raw counts; ``obs`` ``spot_id``, ``region``, ``in_tissue`` and ``obs``'s columns;
    ``obsm["spatial"]`` in um; ``uns["c3diff"]["spots"]`` with the pitch and diameter), in the ``"global"``
    coordinate system (um), with ``attrs["c3diff"]["reader"]["name"] == "spots_from_arrays"``.

    Examples
    --------
    >>> import numpy as np
    >>> import c3diff as c3
    >>> xy = np.array([[100.0, 100.0], [300.0, 100.0], [100.0, 300.0], [300.0, 300.0]])
    >>> sdata = c3.io.spots_from_arrays(
    ...     np.array([[5, 1], [3, 0], [0, 2], [1, 1]]), xy, genes=["A", "B"], spot_diameter=100.0, pitch=200.0,
    ...     image=np.full((400, 400, 3), 230, dtype=np.uint8), pixel_size=1.0,
    ... )
    >>> sdata["table"].shape
    (4, 2)
    """
    import anndata as ad
    import pandas as pd

    spot_diameter = _positive(spot_diameter, "spot_diameter")
    genes = [str(g) for g in genes]
    values = counts.to_numpy() if isinstance(counts, pd.DataFrame) else counts
    shape = getattr(values, "shape", None) or np.shape(values)
    if len(shape) != 2 or shape[1] != len(genes):
        raise ValueError(
            f"`counts` must be an (n_spots, n_genes={len(genes)}) matrix with one column per name in `genes`, got "
            f"shape {tuple(shape)}."
        )
    n = int(shape[0])
    if n == 0:
        raise ValueError("`counts` has no spot (0 rows).")
    if len(set(genes)) != len(genes):
        raise ValueError(f"`genes` holds duplicate names: {sorted({g for g in genes if genes.count(g) > 1})[:5]}.")
    ids = [str(i) for i in (range(n) if spot_ids is None else spot_ids)]
    if len(ids) != n:
        raise ValueError(f"`spot_ids` must name each of the {n} spots, got {len(ids)} names.")
    if len(set(ids)) != n:
        raise ValueError("`spot_ids` must be unique.")
    check_counts(values, ids=ids, arg="counts", what="spot")
    centres = np.asarray(coordinates, dtype=float)
    if centres.shape != (n, 2):
        raise ValueError(f"`coordinates` must have shape (n_spots, 2) = ({n}, 2) as (x, y) um, got {centres.shape}.")
    if not np.isfinite(centres).all():
        raise ValueError(
            f"`coordinates` has {int((~np.isfinite(centres)).any(axis=1).sum())} spot(s) without a finite position."
        )
    in_tissue = np.ones(n, dtype=bool) if in_tissue is None else np.asarray(in_tissue, dtype=bool)
    if in_tissue.shape != (n,):
        raise ValueError(f"`in_tissue` must have one flag per spot ({n}), got shape {in_tissue.shape}.")
    if not in_tissue.any():
        raise ValueError(f"None of the {n} spots is under tissue (`in_tissue` is all False): nothing to analyse.")
    distances = neighbour_distances(centres[in_tissue])
    nn = float(np.median(distances)) if distances.size else float("nan")
    if pitch is None:
        if not np.isfinite(nn):
            raise ValueError("Pass `pitch`: it cannot be inferred from fewer than two spots under tissue.")
        pitch = nn
    pitch = _positive(pitch, "pitch")

    images, reader = (
        {},
        {
            "name": "spots_from_arrays",
            "path": None,
            "pitch_um": pitch,
            "n_spots": n,
            "n_in_tissue": int(in_tissue.sum()),
        },
    )
    if image is not None:
        if pixel_size is None:
            raise ValueError("Pass `pixel_size` (micrometres per pixel of `image`) to place the image.")
        pixel_size = _positive(pixel_size, "pixel_size")
        element = parse_rgb(as_rgb(image, arg="image"), index_transform(sy=pixel_size, sx=pixel_size))
        check_on_image(
            centres[in_tissue],
            raster_geometry(element, arg="image"),
            what="spot",
            arg="image",
            hint="check that `coordinates` are (x, y) in micrometres and `pixel_size` is the image's.",
        )
        images[Key.HNE.value] = element
        reader["um_per_px"] = [pixel_size, pixel_size]
    elif pixel_size is not None:
        raise ValueError("`pixel_size` places an image, but `image` is None.")

    frame = pd.DataFrame(index=pd.Index(ids))
    if obs is not None:
        extra = pd.DataFrame(obs)
        if len(extra) != n:
            raise ValueError(f"`obs` must have one row per spot ({n}), got {len(extra)}.")
        for column in extra.columns:
            frame[str(column)] = extra[column].to_numpy()
    adata = ad.AnnData(X=values, obs=frame, var=pd.DataFrame(index=pd.Index(genes)))
    shapes, table = spot_elements(
        adata,
        centres,
        in_tissue=in_tissue,
        diameter_um=spot_diameter,
        layout={"layout": str(layout), "pitch_um": pitch, "nn_distance_um": nn},
    )
    return build_sdata(
        images=images, shapes={Key.SPOTS.value: shapes}, tables={Key.SPOT_TABLE.value: table}, reader=reader
    )
