"""10x Xenium Onboard Analysis (XOA) output: transcripts, cells, morphology image and an optional registered H&E."""

from __future__ import annotations

import json
import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM, Key
from c3diff._geometry import raster_geometry
from c3diff._validation import check_counts
from c3diff.io._common import (
    IMAGE_CHUNK,
    MAX_OUTSIDE_FRACTION,
    as_rgb,
    build_sdata,
    cell_elements,
    check_on_image,
    first_existing,
    index_transform,
    is_blank,
    load_rgb,
    parse_rgb,
    pyramid_scale_factors,
    read_10x_h5,
    read_parquet,
    read_table,
    read_tiff_level0,
    require_dir,
    require_file,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData
    from spatialdata import SpatialData


class XeniumFile(str, Enum):
    """Files of an XOA output folder."""

    TRANSCRIPTS = "transcripts.parquet"
    TRANSCRIPTS_CSV = "transcripts.csv.gz"
    CELLS = "cells.parquet"
    CELLS_CSV = "cells.csv.gz"
    CELL_MATRIX = "cell_feature_matrix.h5"
    MORPHOLOGY_FOCUS = "morphology_focus.ome.tif"  # XOA 1.x: one 2D DAPI image
    MORPHOLOGY_FOCUS_DIR = "morphology_focus"  # XOA >= 2: one OME-TIFF per stain, ch0000 first
    MORPHOLOGY_MIP = "morphology_mip.ome.tif"  # XOA 1.x maximum-intensity projection
    EXPERIMENT = "experiment.xenium"  # JSON with the morphology "pixel_size"


class XeniumColumn(str, Enum):
    """Columns of ``transcripts`` and ``cells`` tables (um)."""

    X = "x_location"
    Y = "y_location"
    FEATURE = "feature_name"
    CELL_ID = "cell_id"
    QV = "qv"
    IS_GENE = "is_gene"  # XOA >= 2
    CENTROID_X = "x_centroid"
    CENTROID_Y = "y_centroid"
    CELL_AREA = "cell_area"


#: Element name of the Xenium morphology (DAPI) image.

#: Feature-name prefixes of Xenium's control probes and codewords (used when ``is_gene`` is absent).
CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_Region",
    "antisense_",
)
#: ``cell_id`` values of transcripts outside every cell (XOA 1.x uses -1, later versions "UNASSIGNED").
_UNASSIGNED = {"-1", "UNASSIGNED", "", "0"}
_UNITS_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def read_xenium(
    path: str | Path,
    *,
    morphology: Literal["focus", "mip"] | None = "focus",
    morphology_pixel_size: float | None = None,
    morphology_origin: tuple[float, float] = (0.0, 0.0),
    hne: str | Path | None = None,
    hne_alignment: np.ndarray | str | Path | None = None,
    hne_alignment_units: Literal["morphology_px", "um"] = "morphology_px",
    min_qv: float = 20.0,
    keep_controls: bool = False,
    cells: bool = True,
) -> SpatialData:
    """Read a 10x Xenium Onboard Analysis output folder into a SpatialData in micrometres.

    Xenium already works in micrometres: transcripts (``x_location``, ``y_location``) and cell centroids are used as
    they are. The morphology image's pixel size comes from its OME metadata (``PhysicalSizeX``/``Y``), else from
    ``experiment.xenium``'s ``pixel_size``.

    Parameters
    ----------
    path
        The XOA output folder (``transcripts.parquet`` or ``transcripts.csv.gz`` required).
    morphology
        Which morphology image to read as ``"morphology"``: ``"focus"`` (``morphology_focus.ome.tif`` or the XOA 2
        ``morphology_focus/`` folder), ``"mip"`` (``morphology_mip.ome.tif``), or ``None``.
    morphology_pixel_size
        um/px of the morphology image, overriding its metadata: needed for images that lost their calibration (e.g.
        downsampled crops).
    morphology_origin
        ``(x, y)`` um of the morphology image's first pixel (centre); ``(0, 0)`` for XOA output, other values for
        crops.
    hne
        A registered H&E image (OME-TIFF, TIFF, JPEG, PNG), read as ``Key.HNE``.
    hne_alignment
        3x3 affine matrix (array, or a CSV file of 3 rows as Xenium Explorer's ``*_imagealignment.csv``) mapping
        H&E pixel coordinates ``(x, y, 1)`` to the space named by ``hne_alignment_units``. Required with ``hne``.
    hne_alignment_units
        ``"morphology_px"``: the matrix maps to full-resolution morphology pixels, as Xenium Explorer's alignment
        file does (the morphology pixel size then converts to um); ``"um"``: it maps straight to micrometres.
    min_qv
        Transcripts with a Phred quality ``qv`` below this are dropped (with a warning giving the count);
        ``0`` keeps all.
    keep_controls
        Keep negative-control probes/codewords and blank codewords as ``gene`` values (dropped by default, with a
        warning giving the count).
    cells
        Read ``cells.parquet`` (or ``.csv.gz``) and ``cell_feature_matrix.h5`` as ``Key.CELLS`` and
        ``Key.CELL_TABLE``.

    Returns
    -------
    SpatialData in the ``"global"`` coordinate system (um) with ``Key.TRANSCRIPTS`` (points ``x``, ``y``, ``gene``
    (categorical feature key), ``cell_id`` (int, 0 = not in a cell), ``qv``), and, as requested, ``Key.CELLS``
    (circles of radius ``sqrt(cell_area / pi)``, index = cell id 1..N in ``cells`` order), ``Key.CELL_TABLE`` (cells x
    genes raw counts of the Gene Expression features; ``obs`` ``cell_id``, ``region``, ``xenium_cell_id`` and the
    ``cells`` columns; ``obsm["spatial"]`` um), ``"morphology"`` and ``Key.HNE`` (images larger than 2048 px are
    multiscale, see ``docs/reliability.md``).

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.io.read_xenium(  # doctest: +SKIP
    ...     "Xenium_V1_FFPE_Human_Breast/outs",
    ...     hne="Xenium_V1_FFPE_Human_Breast_he_image.ome.tif",
    ...     hne_alignment="Xenium_V1_FFPE_Human_Breast_he_imagealignment.csv",
    ... )
    """
    root = require_dir(path, what="a Xenium output folder", arg="path")
    if morphology not in ("focus", "mip", None):
        raise ValueError(f"`morphology` must be 'focus', 'mip' or None, got {morphology!r}.")
    if hne_alignment_units not in ("morphology_px", "um"):
        raise ValueError(f"`hne_alignment_units` must be 'morphology_px' or 'um', got {hne_alignment_units!r}.")
    if (hne is None) != (hne_alignment is None):
        raise ValueError(
            "Pass `hne` and `hne_alignment` together: an H&E has no calibration of its own, the alignment matrix "
            "(Xenium Explorer's *_imagealignment.csv) places it on the Xenium coordinates."
        )
    if not (np.isfinite(min_qv) and min_qv >= 0):
        raise ValueError(f"`min_qv` must be a non-negative number, got {min_qv!r}.")
    origin_x, origin_y = map(float, morphology_origin)

    transcripts_path = first_existing(root, [XeniumFile.TRANSCRIPTS.value, XeniumFile.TRANSCRIPTS_CSV.value])
    if transcripts_path is None:
        require_file(root / XeniumFile.TRANSCRIPTS.value, what="transcripts (or transcripts.csv.gz)", arg="path")

    cell_frame, cell_table = (None, None)
    if cells:
        cell_frame, cell_table = _read_cells(root)
    cell_ids = None if cell_frame is None else cell_frame["xenium_cell_id"].to_numpy()
    points, counts = _read_transcripts(transcripts_path, cell_ids, min_qv=min_qv, keep_controls=keep_controls)
    xy = np.stack([points["x"].to_numpy(), points["y"].to_numpy()], axis=1)

    images: dict[str, Any] = {}
    pixel_size, source = None, None
    if morphology is not None:
        element, pixel_size, source = _read_morphology(root, morphology, morphology_pixel_size, (origin_y, origin_x))
        check_on_image(
            xy,
            raster_geometry(element, arg="morphology"),
            what="transcript",
            arg="morphology",
            hint="pass `morphology_pixel_size` (um/px) and `morphology_origin` for a resampled or cropped image.",
        )
        images[Key.MORPHOLOGY.value] = element
    elif hne is not None and hne_alignment_units == "morphology_px":
        pixel_size = morphology_pixel_size or _experiment_pixel_size(root)
    if hne is not None:
        if hne_alignment_units == "morphology_px" and pixel_size is None:
            raise ValueError(
                "`hne_alignment_units='morphology_px'` needs the morphology pixel size: read the morphology image or "
                "pass `morphology_pixel_size`."
            )
        images[Key.HNE.value] = _read_hne(
            Path(hne), hne_alignment, hne_alignment_units, pixel_size, (origin_x, origin_y), xy
        )

    from spatialdata.models import PointsModel
    from spatialdata.transformations import Identity

    shapes, tables = {}, {}
    points_element = PointsModel.parse(
        points,
        coordinates={"x": "x", "y": "y"},
        feature_key="gene",
        transformations={COORDINATE_SYSTEM: Identity()},
    )
    if cell_table is not None:
        shapes[Key.CELLS.value], tables[Key.CELL_TABLE.value] = cell_elements(
            cell_table, cell_frame[["x", "y"]].to_numpy(float), radius_um=cell_frame["radius"].to_numpy(float)
        )
    reader = {
        "name": "read_xenium",
        "path": str(root),
        "transcripts_file": transcripts_path.name,
        "morphology": None if source is None else str(source.relative_to(root)),
        "morphology_um_per_px": pixel_size,
        "hne": None if hne is None else str(hne),
        "hne_alignment_units": None if hne is None else hne_alignment_units,
        "min_qv": float(min_qv),
        "keep_controls": bool(keep_controls),
        **counts,
    }
    return build_sdata(
        images=images, shapes=shapes, points={Key.TRANSCRIPTS.value: points_element}, tables=tables, reader=reader
    )


def cells_from_arrays(
    adata: AnnData,
    *,
    spatial: np.ndarray,
    radius: float | np.ndarray,
    image: np.ndarray | str | Path | None = None,
    image_pixel_size: float | None = None,
) -> SpatialData:
    """Build a cell-level SpatialData (micrometres) from counts, cell centres and an optional H&E.

    For single-cell spatial data that does not come as an XOA folder (e.g. HEST or DeepSpot exports of Xenium:
    an ``h5ad`` with cell positions plus a registered H&E).

    Parameters
    ----------
    adata
        Cells x genes raw counts; ``obs_names`` are the cell names. Copied, not modified.
    spatial
        ``(n_cells, 2)`` cell centres as ``(x, y)`` in um, y running down (pixel positions times the pixel size).
    radius
        Cell radius in um, one value or one per cell.
    image
        The H&E, an ``(y, x, 3)`` array or an image file, whose pixel ``(i, j)`` is centred on
        ``(j, i) * image_pixel_size`` um (the frame ``spatial`` is given in).
    image_pixel_size
        um/px of ``image`` (required with it).

    Returns
    -------
    SpatialData with ``Key.CELLS`` (circles, index = cell id 1..N in ``adata`` order), ``Key.CELL_TABLE`` (``obs``
    ``cell_id``, ``region``; ``obsm["spatial"]`` um) and ``Key.HNE`` (if ``image``), in ``"global"`` (um).

    Examples
    --------
    The DeepSpot/HEST Xenium lung sample: ``obs["x_pixel"]`` is the *row* of the 2.125 um/px H&E.

    >>> import anndata as ad
    >>> import c3diff as c3
    >>> adata = ad.read_h5ad("NCBI858.h5ad")  # doctest: +SKIP
    >>> xy = adata.obs[["y_pixel", "x_pixel"]].to_numpy() * 2.125  # doctest: +SKIP
    >>> sdata = c3.io.cells_from_arrays(  # doctest: +SKIP
    ...     adata, spatial=xy, radius=10.0, image="NCBI858.jpg", image_pixel_size=2.125
    ... )
    """
    n = adata.n_obs
    check_counts(adata.X, ids=adata.obs_names.to_numpy(), arg="adata.X", what="cell")
    spatial = np.asarray(spatial, dtype=float)
    if spatial.shape != (n, 2) or not np.isfinite(spatial).all():
        raise ValueError(f"`spatial` must be a finite (n_cells, 2) = ({n}, 2) array of (x, y) um, got {spatial.shape}.")
    radius = np.broadcast_to(np.asarray(radius, dtype=float), (n,))
    if not (np.isfinite(radius).all() and (radius > 0).all()):
        raise ValueError("`radius` must be positive micrometres (one value or one per cell).")
    images = {}
    if image is not None:
        if image_pixel_size is None or not (np.isfinite(image_pixel_size) and image_pixel_size > 0):
            raise ValueError(
                f"`image_pixel_size` must be the H&E's um/px (a positive number) when `image` is given, got "
                f"{image_pixel_size!r}: c3diff never guesses a pixel size."
            )
        pixels = load_rgb(Path(image), arg="image") if isinstance(image, str | Path) else as_rgb(image, arg="image")
        element = parse_rgb(pixels, index_transform(sy=image_pixel_size, sx=image_pixel_size))
        check_on_image(
            spatial,
            raster_geometry(element, arg="image"),
            what="cell",
            arg="image",
            hint="check the pixel size and the axis order of the cell positions ((x, y) = (column, row)).",
        )
        images[Key.HNE.value] = element
    elif image_pixel_size is not None:
        raise ValueError("`image_pixel_size` calibrates an image, but `image` is None.")
    shapes, table = cell_elements(adata, spatial, radius_um=radius)
    reader = {
        "name": "cells_from_arrays",
        "path": None,
        "image": (str(image) if isinstance(image, str | Path) else "array") if image is not None else None,
        "image_um_per_px": None if image is None else float(image_pixel_size),
        "n_cells": n,
    }
    return build_sdata(
        images=images, shapes={Key.CELLS.value: shapes}, tables={Key.CELL_TABLE.value: table}, reader=reader
    )


def _read_frame(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    if path.suffix == ".parquet":
        if columns is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                available = set(pq.read_schema(path).names)
            except (pa.ArrowException, OSError) as err:
                raise ValueError(
                    f"`path`: {str(path)!r} is truncated or not a Parquet file ({err}). Copy or download it again."
                ) from err
            columns = [c for c in columns if c in available]
        return read_parquet(path, arg="path", columns=columns)
    frame = read_table(path, arg="path", sep=",")
    return frame if columns is None else frame[[c for c in columns if c in frame.columns]]


def _as_str(values: Any) -> np.ndarray:
    """Strings from a column that XOA 1.x may store as bytes."""
    array = np.asarray(values, dtype=object)
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in array], dtype=object)


def _read_cells(root: Path) -> tuple[pd.DataFrame, AnnData]:
    import pandas as pd

    path = first_existing(root, [XeniumFile.CELLS.value, XeniumFile.CELLS_CSV.value])
    if path is None:
        require_file(
            root / XeniumFile.CELLS.value,
            what="cells (or cells.csv.gz)",
            arg="path",
            hint=" Pass cells=False to read the transcripts without cells.",
        )
    frame = _read_frame(path)
    needed = [
        XeniumColumn.CELL_ID.value,
        XeniumColumn.CENTROID_X.value,
        XeniumColumn.CENTROID_Y.value,
        XeniumColumn.CELL_AREA.value,
    ]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the column(s) {missing} (found {list(frame.columns)}).")
    ids = _as_str(frame[XeniumColumn.CELL_ID.value])
    cells = pd.DataFrame(
        {
            "cell_id": np.arange(1, len(frame) + 1, dtype=np.int64),
            "xenium_cell_id": ids,
            "x": frame[XeniumColumn.CENTROID_X.value].to_numpy(float),
            "y": frame[XeniumColumn.CENTROID_Y.value].to_numpy(float),
            "radius": np.sqrt(frame[XeniumColumn.CELL_AREA.value].to_numpy(float) / np.pi),
        }
    )
    extra = frame.drop(
        columns=[XeniumColumn.CELL_ID.value, XeniumColumn.CENTROID_X.value, XeniumColumn.CENTROID_Y.value]
    ).reset_index(drop=True)

    matrix_path = require_file(
        root / XeniumFile.CELL_MATRIX.value,
        what="cell x gene counts (10x HDF5)",
        arg="path",
        hint=" Pass cells=False to read the transcripts without cells.",
    )
    matrix = read_10x_h5(matrix_path, arg="path", gex_only=True)
    matrix.obs_names = _as_str(matrix.obs_names)
    check_counts(matrix.X, ids=matrix.obs_names.to_numpy(), arg=f"counts ({str(matrix_path)!r})", what="cell")
    position = pd.Series(np.arange(matrix.n_obs), index=matrix.obs_names)
    in_matrix = np.isin(ids, matrix.obs_names)
    if not in_matrix.any():
        raise ValueError(
            f"None of the {len(ids)} cells of {path.name!r} (e.g. {list(ids[:2])}) is in {matrix_path.name!r} (e.g. "
            f"{list(matrix.obs_names[:2])}): the files come from different runs."
        )
    extra_cells = matrix.n_obs - int(np.isin(matrix.obs_names, ids).sum())
    if extra_cells or not in_matrix.all():
        warnings.warn(
            f"{path.name!r} and {matrix_path.name!r} disagree: {int((~in_matrix).sum())} cells have no counts (kept "
            f"with zero counts) and {extra_cells} counted cells have no centroid (dropped).",
            UserWarning,
            stacklevel=3,
        )
    from scipy import sparse

    rows = sparse.csr_matrix(matrix.X)
    take = position.reindex(ids).to_numpy()
    picked = rows[np.nan_to_num(take, nan=0).astype(int)]
    picked = sparse.diags(in_matrix.astype(np.float32)) @ picked  # zero the cells without counts
    import anndata as ad

    obs = pd.concat([cells[["xenium_cell_id"]].reset_index(drop=True), extra], axis=1)
    obs.index = pd.Index(ids)
    table = ad.AnnData(X=sparse.csr_matrix(picked, dtype=np.float32), obs=obs, var=matrix.var.copy())
    return cells, table


def _read_transcripts(
    path: Path, cell_ids: np.ndarray | None, *, min_qv: float, keep_controls: bool
) -> tuple[pd.DataFrame, dict]:
    import pandas as pd

    wanted = [
        c.value
        for c in (
            XeniumColumn.X,
            XeniumColumn.Y,
            XeniumColumn.FEATURE,
            XeniumColumn.CELL_ID,
            XeniumColumn.QV,
            XeniumColumn.IS_GENE,
        )
    ]
    frame = _read_frame(path, wanted)
    missing = [c for c in wanted[:3] if c not in frame.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the column(s) {missing} (found {list(frame.columns)}).")
    positions = frame[[XeniumColumn.X.value, XeniumColumn.Y.value]].to_numpy(float)
    unplaced = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if unplaced.size:
        raise ValueError(
            f"`path`: {unplaced.size} transcript(s) of {str(path)!r} have no finite x/y location (rows "
            f"{unplaced[:5].tolist()}{' ...' if unplaced.size > 5 else ''}): the file is damaged or was edited; "
            "copy it again from the Xenium output."
        )
    n_read = len(frame)
    counts = {"n_transcripts_read": n_read, "n_low_qv": 0, "n_controls": 0}
    keep = np.ones(n_read, dtype=bool)
    if min_qv > 0 and XeniumColumn.QV.value in frame.columns:
        low = frame[XeniumColumn.QV.value].to_numpy(float) < min_qv
        counts["n_low_qv"] = int(low.sum())
        if low.any():
            warnings.warn(
                f"Dropped {int(low.sum())} of {n_read} transcripts with qv < {min_qv:g} (low-quality decoding); pass "
                "`min_qv=0` to keep them.",
                UserWarning,
                stacklevel=3,
            )
        keep &= ~low
    genes = _as_str(frame[XeniumColumn.FEATURE.value])
    if XeniumColumn.IS_GENE.value in frame.columns:
        control = ~frame[XeniumColumn.IS_GENE.value].to_numpy(bool)
    else:
        control = np.array([g.startswith(CONTROL_PREFIXES) for g in genes], dtype=bool)
    counts["n_controls"] = int((control & keep).sum())
    if not keep_controls:
        if (control & keep).any():
            warnings.warn(
                f"Dropped {int((control & keep).sum())} control-probe/codeword transcripts (e.g. "
                f"{sorted(set(genes[control]))[:3]}); pass `keep_controls=True` to keep them.",
                UserWarning,
                stacklevel=3,
            )
        keep &= ~control
    frame, genes = frame[keep], genes[keep]
    if len(frame) == 0:
        raise ValueError(f"No transcript of {str(path)!r} is left after the qv and control filters.")

    raw = _as_str(frame[XeniumColumn.CELL_ID.value]) if XeniumColumn.CELL_ID.value in frame.columns else None
    if raw is None:
        cell = np.zeros(len(frame), dtype=np.int64)
    elif cell_ids is not None:
        lookup = pd.Series(np.arange(1, len(cell_ids) + 1), index=cell_ids)
        cell = lookup.reindex(raw).fillna(0).to_numpy(np.int64)
    else:
        unassigned = np.isin(raw, list(_UNASSIGNED))
        codes, _ = pd.factorize(np.where(unassigned, None, raw))
        cell = np.where(unassigned, 0, codes + 1).astype(np.int64)
    points = pd.DataFrame(
        {
            "x": frame[XeniumColumn.X.value].to_numpy(float),
            "y": frame[XeniumColumn.Y.value].to_numpy(float),
            "gene": pd.Categorical(genes, categories=sorted(set(genes))),
            "cell_id": cell,
        }
    )
    if XeniumColumn.QV.value in frame.columns:
        points["qv"] = frame[XeniumColumn.QV.value].to_numpy(np.float32)
    counts["n_transcripts"] = len(points)
    return points, counts


def _experiment_pixel_size(root: Path) -> float | None:
    path = root / XeniumFile.EXPERIMENT.value
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("pixel_size")
    return float(value) if value else None


def _ome_pixels(ome: str) -> dict:
    """The ``Pixels`` attributes of the first OME image (``{}`` without OME-XML)."""
    if not ome:
        return {}
    import tifffile

    image = tifffile.xml2dict(ome).get("OME", {}).get("Image", {})
    image = image[0] if isinstance(image, list) else image
    return image.get("Pixels", {}) or {}


def _ome_pixel_size(pixels: dict) -> tuple[float, float] | None:
    """(y, x) um/px from OME ``PhysicalSizeY/X`` (converted from their units), or ``None``."""
    sizes = []
    for axis in ("Y", "X"):
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        unit = str(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if unit not in _UNITS_TO_UM:
            raise ValueError(f"OME PhysicalSize{axis}Unit {unit!r} is not a length unit c3diff knows.")
        sizes.append(float(value) * _UNITS_TO_UM[unit])
    return sizes[0], sizes[1]


def _morphology_path(root: Path, which: str) -> Path:
    if which == "mip":
        return require_file(root / XeniumFile.MORPHOLOGY_MIP.value, what="morphology MIP image", arg="morphology")
    single = root / XeniumFile.MORPHOLOGY_FOCUS.value
    folder = root / XeniumFile.MORPHOLOGY_FOCUS_DIR.value
    if not single.is_file() and folder.is_dir():
        files = sorted(folder.glob("*.ome.tif"))
        if files:  # the first file's OME-XML describes all channels (a multi-file OME-TIFF)
            return files[0]
    return require_file(
        single,
        what="morphology focus image (or a morphology_focus/ folder)",
        arg="morphology",
        hint=" Pass morphology=None to read without it.",
    )


def _read_morphology(root: Path, which: str, override: float | None, origin_yx: tuple[float, float]):
    from spatialdata.models import Image2DModel

    path = _morphology_path(root, which)
    data, axes, ome = read_tiff_level0(path, arg="morphology")
    pixels = _ome_pixels(ome)
    if override is not None:
        if not (np.isfinite(override) and override > 0):
            raise ValueError(f"`morphology_pixel_size` must be a positive number of um/px, got {override!r}.")
        sy = sx = float(override)
    else:
        sizes = _ome_pixel_size(pixels)
        if sizes is None:
            experiment = _experiment_pixel_size(root)
            if experiment is None:
                raise ValueError(
                    f"`morphology`: {str(path)!r} has no calibration (no PhysicalSizeX/Y in its OME metadata, no "
                    f"{XeniumFile.EXPERIMENT.value} with a pixel_size). Pass `morphology_pixel_size=` (um/px; and "
                    "`morphology_origin=` for a crop) or `morphology=None`."
                )
            sizes = (experiment, experiment)
        sy, sx = sizes
    axes = axes.upper()
    if "Z" in axes and data.shape[axes.index("Z")] > 1:
        raise ValueError(f"`morphology`: {str(path)!r} is a z-stack ({axes} {data.shape}); use morphology='mip'.")
    for axis in [a for a in axes if a not in "CYX"]:
        data = data.take(0, axis=axes.index(axis))
        axes = axes.replace(axis, "")
    if "C" not in axes:
        data, axes = data[None], "C" + axes
    data = data.transpose([axes.index(a) for a in "CYX"])
    channels = pixels.get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    names = [c.get("Name") for c in channels if isinstance(c, dict)]
    if len(names) != data.shape[0] or not all(names) or len(set(names)) != len(names):
        # XOA 1.x leaves its single DAPI channel unnamed
        names = ["DAPI"] if data.shape[0] == 1 else [f"ch{i}" for i in range(data.shape[0])]
    element = Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=names,
        transformations={COORDINATE_SYSTEM: index_transform(sy=sy, sx=sx, y0=origin_yx[0], x0=origin_yx[1])},
        scale_factors=pyramid_scale_factors(*data.shape[1:]) or None,
        chunks=(1, IMAGE_CHUNK, IMAGE_CHUNK),
    )
    return element, float(np.sqrt(sy * sx)), path


def _alignment_matrix(value: np.ndarray | str | Path) -> np.ndarray:
    if isinstance(value, str | Path):
        path = require_file(Path(value), what="H&E alignment matrix (3x3 CSV)", arg="hne_alignment")
        import pandas as pd

        matrix = pd.read_csv(path, header=None).to_numpy(float)
    else:
        matrix = np.asarray(value, dtype=float)
    if matrix.shape != (3, 3) or not np.allclose(matrix[2], [0, 0, 1]) or abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise ValueError(
            f"`hne_alignment` must be an invertible 3x3 affine matrix with last row (0, 0, 1), got {matrix.tolist()}."
        )
    return matrix


def _read_hne(path: Path, alignment, units: str, pixel_size: float | None, origin_xy, transcripts_xy: np.ndarray):
    from spatialdata.transformations import Affine

    path = require_file(path, what="H&E image", arg="hne")
    matrix = _alignment_matrix(alignment)
    if units == "morphology_px":
        to_um = np.array([[pixel_size, 0, origin_xy[0]], [0, pixel_size, origin_xy[1]], [0, 0, 1]], dtype=float)
        matrix = to_um @ matrix
    pixels = load_rgb(path, arg="hne")
    if is_blank(pixels):
        raise ValueError(f"`hne`: {str(path)!r} is blank (a single colour).")
    height, width = pixels.shape[:2]
    # The transcripts must land on the H&E; a wrong direction or unit of the matrix puts them elsewhere.
    sample = transcripts_xy[:: max(1, len(transcripts_xy) // 100_000)]
    inverse = np.linalg.inv(matrix)
    px = sample @ inverse[:2, :2].T + inverse[:2, 2]
    outside = ~((px[:, 0] >= -0.5) & (px[:, 0] < width - 0.5) & (px[:, 1] >= -0.5) & (px[:, 1] < height - 0.5))
    if len(sample) and outside.mean() > MAX_OUTSIDE_FRACTION:
        raise ValueError(
            f"`hne_alignment`: {outside.mean():.0%} of the transcripts fall outside the H&E ({width}x{height} px) "
            f"through this matrix with hne_alignment_units={units!r}. Check that it maps H&E pixels to Xenium (not "
            "the inverse) and its units."
        )
    linear = matrix[:2, :2]
    scale = np.sqrt(abs(np.linalg.det(linear)))
    if not np.allclose(linear / scale, np.eye(2), atol=1e-3):
        warnings.warn(
            "The H&E is rotated, sheared or flipped relative to the Xenium axes; it is kept as read with an affine "
            "transform. c3diff's patch tools need an axis-aligned raster: resample it first, e.g. "
            "`sdata['hne'] = spatialdata.transform(sdata['hne'], to_coordinate_system='global')` and re-register it.",
            UserWarning,
            stacklevel=3,
        )
    transform = Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    # H&E pixel coordinates in the alignment are pixel indices (centre at integer): shift by half a pixel.
    from spatialdata.transformations import Sequence, Translation

    return parse_rgb(pixels, Sequence([Translation([-0.5, -0.5], axes=("y", "x")), transform]))
