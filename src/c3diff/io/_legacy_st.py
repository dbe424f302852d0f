"""Legacy Spatial Transcriptomics (Stahl et al. 2016; 100 um spots on a 200 um pitch): counts, spot file, H&E."""

from __future__ import annotations

import re
import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import LEGACY_ST_PITCH, LEGACY_ST_SPOT_DIAMETER, Key
from c3diff._geometry import raster_geometry
from c3diff._validation import check_counts
from c3diff.io._common import (
    _large_images,
    _rgb_from_pil,
    build_sdata,
    check_on_image,
    frame_columns,
    index_transform,
    load_rgb,
    neighbour_distances,
    parse_rgb,
    pyramid_scale_factors,
    read_table,
    require_file,
    spot_elements,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from spatialdata import SpatialData


class SpotColumn(str, Enum):
    """Columns of an ST spot file (ST spot detector output, her2st ``*_selection.tsv``, STUtility
    ``alignment_table_*.tsv``); headerless files list them in this order."""

    X = "x"  # array column
    Y = "y"  # array row
    NEW_X = "new_x"  # array coordinates refined by the spot detector
    NEW_Y = "new_y"
    PIXEL_X = "pixel_x"  # spot centre in the H&E, pixel index coordinates
    PIXEL_Y = "pixel_y"
    SELECTED = "selected"  # 1 = under tissue


_ALIASES = {
    SpotColumn.X: ("x", "array_x", "x_coord", "xcoord"),
    SpotColumn.Y: ("y", "array_y", "y_coord", "ycoord"),
    SpotColumn.PIXEL_X: ("pixel_x", "pixelx", "pixel x", "pxl_x", "image_x", "imagex"),
    SpotColumn.PIXEL_Y: ("pixel_y", "pixely", "pixel y", "pxl_y", "image_y", "imagey"),
    SpotColumn.SELECTED: ("selected", "in_tissue", "under_tissue", "tissue"),
}
#: Spot ids of legacy-ST count files: "<x>x<y>" array coordinates (an "X" prefix as R's make.names adds is allowed).
_SPOT_ID = re.compile(r"^X?(\d+)x(\d+)$")
#: Relative difference between the x and y pixel sizes above which the image is reported as stretched.
ANISOTROPY_TOLERANCE = 0.02


def read_legacy_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path,
    *,
    pitch: float = LEGACY_ST_PITCH,
    spot_diameter: float = LEGACY_ST_SPOT_DIAMETER,
) -> SpatialData:
    """Read a legacy Spatial Transcriptomics section (counts, spot file, H&E) into a SpatialData in micrometres.

    The H&E has no calibration of its own; the spot array provides it. The spot file pairs every spot's array
    coordinates ``(x, y)`` with its pixel centre in the H&E; a least-squares affine fit array -> pixel gives the
    pixels per array step along each axis, and the known centre-to-centre ``pitch`` turns that into um/px (``x`` and
    ``y`` separately: downscaled images are sometimes stretched). Spot centres in um are their pixel centres times
    that pixel size, so spots sit on the H&E exactly where the alignment put them.

    Parameters
    ----------
    counts
        Tab-separated counts (``.tsv`` or ``.tsv.gz``; ``.csv`` for comma-separated), spot ids ``"<x>x<y>"`` as row
        names and genes as columns (her2st, STUtility); the transposed layout (genes x spots) is detected. Gene ids
        are kept as written (Ensembl ids included). Counts must be finite and non-negative (the error names the
        spots); a file cut short is reported as truncated.
    spots
        Spot file with columns ``x``, ``y`` (array), ``pixel_x``, ``pixel_y`` (H&E pixel centres) and optionally
        ``selected`` (1 = under tissue; absent: every listed spot is under tissue): her2st ``*_selection.tsv``,
        STUtility ``alignment_table_*.tsv``, or the spot detector's headerless ``x y new_x new_y pixel_x pixel_y
        [selected]``.
    image
        The H&E (JPEG/PNG/TIFF) that ``pixel_x``/``pixel_y`` refer to; 16-bit and float images are converted to
        uint8 by the rule in ``docs/reliability.md``.
    pitch
        Centre-to-centre distance (um) of neighbouring spots along an array row or column: 200 um for the 1k array.
        The staggered 2k array (spots where ``x + y`` is even) steps by 2 array units between such neighbours; the
        reader detects that step, so ``pitch`` stays 200 um for it too.
    spot_diameter
        Spot diameter in um (100 um on both arrays).

    Returns
    -------
    SpatialData with ``Key.HNE`` (RGB uint8; multiscale when larger than 2048 px, see ``docs/reliability.md``),
    ``Key.SPOTS`` (circles, um) and ``Key.SPOT_TABLE`` (spots x genes raw
    counts; ``obs`` ``spot_id``, ``region``, ``in_tissue``, ``array_x``, ``array_y``; ``obsm["spatial"]`` in um;
    ``uns["c3diff"]["spots"]``) in the ``"global"`` coordinate system (um). ``sdata.attrs["c3diff"]["reader"]``
    reports the fitted pixel size (``um_per_px`` as (y, x)) and the fit's residual (``fit_rms_um``).

    Raises
    ------
    ValueError
        When the spot file's array spacing disagrees with the counts' spot ids or with both ST arrays (rows missing
        from the spot file would otherwise halve the pixel size), or a file is truncated.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.io.read_legacy_st("B4/B4.tsv.gz", "B4/B4_selection.tsv", "B4/HE_BT10737_D2_HE.jpg")  # doctest: +SKIP
    >>> sdata.attrs["c3diff"]["reader"]["um_per_px"]  # doctest: +SKIP
    [0.69, 0.685]
    """
    counts_path = require_file(Path(counts), what="counts table (spots x genes)", arg="counts")
    spots_path = require_file(Path(spots), what="spot file (array x, y -> pixel_x, pixel_y)", arg="spots")
    image_path = require_file(Path(image), what="H&E image", arg="image")
    for name, value in (("pitch", pitch), ("spot_diameter", spot_diameter)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"`{name}` must be a positive number of micrometres, got {value!r}.")

    frame = _read_counts(counts_path)
    check_counts(frame, ids=frame.index.to_numpy(), arg=f"counts ({str(counts_path)!r})", what="spot")
    spot_table = _read_spot_file(spots_path)
    calibration = _fit_calibration(spot_table, pitch=pitch, arg="spots")

    ids = frame.index.to_series().str.extract(_SPOT_ID).astype(int).to_numpy()
    _check_array_step(calibration, ids, spot_table, pitch=pitch, counts_path=counts_path, spots_path=spots_path)
    keyed = spot_table.set_index([SpotColumn.X.value, SpotColumn.Y.value])
    wanted = list(map(tuple, ids))
    found = np.array([key in keyed.index for key in wanted])
    if not found.any():
        raise ValueError(
            f"None of the {len(frame)} spots of `counts` ({str(counts_path)!r}, e.g. {list(frame.index[:3])}) is in "
            f"`spots` ({str(spots_path)!r}, array x {spot_table['x'].min()}..{spot_table['x'].max()}, y "
            f"{spot_table['y'].min()}..{spot_table['y'].max()}): the spot file belongs to another section."
        )
    if not found.all():
        warnings.warn(
            f"{int((~found).sum())} of {len(frame)} spots of `counts` have no entry in `spots` (no position in the "
            f"H&E) and are dropped, e.g. {list(frame.index[~found][:5])}.",
            UserWarning,
            stacklevel=2,
        )
        frame, ids = frame[found], ids[found]
    matched = keyed.loc[list(map(tuple, ids))]
    in_tissue = matched[SpotColumn.SELECTED.value].to_numpy(dtype=bool)
    if not in_tissue.any():
        raise ValueError(
            f"None of the {len(frame)} spots of `counts` is under tissue (`selected` is 0 for all of them in "
            f"{str(spots_path)!r}): nothing to analyse. Check that the spot file belongs to these counts."
        )

    sy, sx = calibration["um_per_px"]
    element = _read_hne(image_path, index_transform(sy=sy, sx=sx))
    pixel_xy = matched[[SpotColumn.PIXEL_X.value, SpotColumn.PIXEL_Y.value]].to_numpy(float)
    centres = pixel_xy * [sx, sy]
    check_on_image(
        centres[in_tissue],
        raster_geometry(element, arg="image"),
        what="spot",
        arg="image",
        hint="pass the H&E that `pixel_x`/`pixel_y` of `spots` refer to (a rescaled copy needs rescaled pixels).",
    )

    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"array_x": ids[:, 0], "array_y": ids[:, 1]}, index=frame.index.astype(str))
    adata = ad.AnnData(X=frame.to_numpy(), obs=obs, var=pd.DataFrame(index=frame.columns.astype(str)))
    distances = neighbour_distances(centres[in_tissue])
    nn = float(np.median(distances)) if distances.size else float("nan")
    shapes, table = spot_elements(
        adata,
        centres,
        in_tissue=in_tissue,
        diameter_um=spot_diameter,
        layout={
            "layout": "legacy_st",
            "pitch_um": float(pitch),
            "array_step": calibration["array_step"],
            "nn_distance_um": nn,
        },
    )
    reader = {
        "name": "read_legacy_st",
        "path": str(counts_path),
        "spots": str(spots_path),
        "image": str(image_path),
        "um_per_px": [sy, sx],
        "fit_rms_um": calibration["fit_rms_um"],
        "array_step": calibration["array_step"],
        "pitch_um": float(pitch),
        "n_spots": len(frame),
        "n_in_tissue": int(in_tissue.sum()),
    }
    return build_sdata(
        images={Key.HNE.value: element},
        shapes={Key.SPOTS.value: shapes},
        tables={Key.SPOT_TABLE.value: table},
        reader=reader,
    )


#: Pyramid levels a JPEG decodes directly at reduced size (libjpeg's DCT scaling: 1/2, 1/4, 1/8).
_JPEG_DRAFT_LEVELS = 3


def _read_hne(path: Path, transform) -> Any:
    """The H&E element. A JPEG (her2st's are 9936 x 9270 px) is read at the level needed instead of decoded whole:
    pyramid levels 1-3 are decoded directly at 1/2, 1/4 and 1/8 size (DCT scaling, each output pixel a block
    average; the 1/8 level now, which also checks the file, the others when read), deeper levels are 2 x 2 means of
    the 1/8 one, and level 0 is decoded when something reads it (e.g. writing the SpatialData). Slide-wide work
    (``super_resolve`` at 10 um) reads one coarse level. Other formats: decoded (or, for TIFF, mapped) as before."""
    from PIL import Image

    with _large_images(), Image.open(path) as image:
        is_jpeg = image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK", "YCbCr")
        width, height = image.size
    factors = pyramid_scale_factors(height, width)
    if not is_jpeg or not factors:
        return parse_rgb(load_rgb(path, arg="image"), transform)
    import dask
    import dask.array as da

    coarse = _decode_jpeg(path, 2 ** min(len(factors), _JPEG_DRAFT_LEVELS))  # validates the file now
    level0 = da.from_delayed(
        dask.delayed(load_rgb, pure=True)(path, arg="image"), shape=(height, width, 3), dtype=np.uint8
    )
    element = parse_rgb(level0, transform)
    previous = coarse
    for level in range(1, len(factors) + 1):
        node = element[f"scale{level}"]["image"]
        shape = node.shape[1:]
        if level < min(len(factors), _JPEG_DRAFT_LEVELS):
            data = da.from_delayed(
                dask.delayed(_decode_jpeg, pure=True)(path, 2**level),
                dtype=np.uint8,
                shape=(-(-height // 2**level), -(-width // 2**level), 3),
            )
        elif level == _JPEG_DRAFT_LEVELS or level == len(factors):
            previous = coarse
            data = da.from_array(coarse)
        else:  # deeper than 1/8: 2 x 2 means of the level above (trimmed, as the pyramid does)
            h, w = previous.shape[0] // 2 * 2, previous.shape[1] // 2 * 2
            previous = previous[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            data = da.from_array(previous)
        data = data[: shape[0], : shape[1]].transpose(2, 0, 1).rechunk(node.data.chunksize)
        element[f"scale{level}"]["image"] = node.copy(data=data)
    return element


def _decode_jpeg(path: Path, scale: int) -> np.ndarray:
    """``(y, x, 3)`` uint8 of a JPEG decoded at ``1/scale`` of its size (``scale`` 1, 2, 4 or 8)."""
    from PIL import Image

    with _large_images(), Image.open(path) as image:
        width = image.width
        if scale > 1:  # PIL picks the largest DCT scale whose floor-divided size is still the requested one
            image.draft("RGB", (max(1, image.width // scale), max(1, image.height // scale)))
        try:
            image.load()
        except (OSError, SyntaxError, EOFError) as err:
            raise ValueError(
                f"`image`: {str(path)!r} is truncated or not a readable image ({err}). Copy or download it again, or "
                "export it anew (JPEG, PNG or TIFF)."
            ) from err
        done = round(width / image.width)
        if done < scale:  # a decoder that scaled less (or not at all): block means for the rest
            image = image.reduce(scale // done)
        return _rgb_from_pil(image, arg="image")


def _read_counts(path: Path) -> pd.DataFrame:
    """Counts as spots x genes with ``"<x>x<y>"`` row ids (transposed when the spots are the columns)."""
    sep = "," if ".csv" in path.suffixes else "\t"
    frame = read_table(path, arg="counts", sep=sep, index_col=0)
    rows = frame.index.astype(str).str.strip().str.fullmatch(_SPOT_ID.pattern)
    cols = frame.columns.astype(str).str.strip().str.fullmatch(_SPOT_ID.pattern)
    if cols.mean() > 0.9 and rows.mean() < 0.5:
        frame = frame.T  # genes x spots
        rows = cols
    if rows.mean() < 0.9:
        raise ValueError(
            f"`counts`: {str(path)!r} has no '<x>x<y>' spot ids (array coordinates) as row or column names (rows "
            f"start {list(frame.index[:3])}, columns {list(frame.columns[:3])}); legacy-ST counts are named by them."
        )
    if not rows.all():
        warnings.warn(
            f"`counts`: {int((~rows).sum())} rows without an '<x>x<y>' spot id are dropped, e.g. "
            f"{list(frame.index[~rows][:3])}.",
            UserWarning,
            stacklevel=3,
        )
        frame = frame[rows]
    frame.index = frame.index.astype(str).str.strip()
    if not all(np.issubdtype(t, np.number) for t in frame.dtypes.unique()):
        raise ValueError(f"`counts`: {str(path)!r} holds non-numeric values; expected a matrix of counts.")
    return frame


def _read_spot_file(path: Path) -> pd.DataFrame:
    """Spot file as columns x, y (int), pixel_x, pixel_y (float), selected (bool); one row per array position."""
    import pandas as pd

    with path.open("rb") as fh:
        is_gzip = fh.read(2) == b"\x1f\x8b"
    sep = "," if ".csv" in path.suffixes else "\t"
    frame = read_table(path, arg="spots", sep=sep, compression="gzip" if is_gzip else None)
    try:
        [float(c) for c in frame.columns]
        headerless = True
    except ValueError:
        headerless = False
    if headerless:  # the spot detector's plain output: x y new_x new_y pixel_x pixel_y [selected]
        frame = read_table(path, arg="spots", sep=sep, header=None, compression="gzip" if is_gzip else None)
        if frame.shape[1] not in (6, 7):
            raise ValueError(
                f"`spots`: {str(path)!r} has no header and {frame.shape[1]} columns; a headerless spot file must list "
                f"{[c.value for c in SpotColumn]} (the last one optional)."
            )
        frame.columns = [c.value for c in SpotColumn][: frame.shape[1]]
    columns = frame_columns(frame, {k.value: v for k, v in _ALIASES.items()})
    missing = [
        c.value for c in (SpotColumn.X, SpotColumn.Y, SpotColumn.PIXEL_X, SpotColumn.PIXEL_Y) if c.value not in columns
    ]
    if missing:
        raise ValueError(
            f"`spots`: {str(path)!r} lacks the column(s) {missing} (found {list(frame.columns)}); a spot file needs "
            "the array coordinates x, y and the H&E pixel centres pixel_x, pixel_y: without pixel centres the image "
            "has no calibration."
        )
    out = pd.DataFrame(
        {
            "x": np.rint(frame[columns["x"]].to_numpy(float)).astype(int),
            "y": np.rint(frame[columns["y"]].to_numpy(float)).astype(int),
            "pixel_x": frame[columns["pixel_x"]].to_numpy(float),
            "pixel_y": frame[columns["pixel_y"]].to_numpy(float),
            "selected": frame[columns["selected"]].to_numpy().astype(bool) if "selected" in columns else True,
        }
    )
    duplicated = out.duplicated(["x", "y"])
    if duplicated.any():
        warnings.warn(
            f"`spots`: {int(duplicated.sum())} array positions are listed twice in {str(path)!r}; the first is kept.",
            UserWarning,
            stacklevel=3,
        )
        out = out[~duplicated]
    return out.reset_index(drop=True)


def _array_step(values: np.ndarray, groups: np.ndarray) -> int:
    """Most common spacing of occupied array coordinates along one axis (1 on the 1k array, 2 on the staggered 2k)."""
    steps = []
    for group in np.unique(groups):
        line = np.unique(values[groups == group])
        steps.append(np.diff(line))
    steps = np.concatenate(steps) if steps else np.array([], dtype=int)
    steps = steps[steps > 0]
    if steps.size == 0:
        return 1
    counts = np.bincount(steps.astype(int))
    return int(np.argmax(counts))


def _check_array_step(
    calibration: dict, ids: np.ndarray, spots: pd.DataFrame, *, pitch: float, counts_path: Path, spots_path: Path
) -> None:
    """Refuse a spot file whose array spacing disagrees with the counts' spot ids or with any ST array.

    The array step (1 on the 1k array, 2 on the staggered 2k array) sets the pixel size: a spot file that lost every
    second row looks like a 2k array and would halve the um/px silently.
    """
    step_y, step_x = calibration["array_step"]
    sy, sx = calibration["um_per_px"]
    staggered = ((spots["x"] + spots["y"]) % 2).nunique() == 1
    if step_x != step_y or (max(step_x, step_y) > 1 and not staggered):
        raise ValueError(
            f"`spots`: the array positions in {str(spots_path)!r} step by {step_x} along x and {step_y} along y"
            f"{'' if staggered else ' without the checkerboard of the staggered 2k array'}, which gives "
            f"{sx:.3f} x {sy:.3f} um/px from the {pitch:g} um pitch; neither ST array is laid out like that. Rows are "
            "missing from the spot file (e.g. every second one): use the complete spot file of this section."
        )
    count_step_x = _array_step(ids[:, 0], ids[:, 1])
    count_step_y = _array_step(ids[:, 1], ids[:, 0])
    if len(ids) >= 3 and (count_step_x < step_x or count_step_y < step_y):
        known = set(zip(spots["x"].tolist(), spots["y"].tolist(), strict=True))
        absent = [f"{x}x{y}" for x, y in ids.tolist() if (x, y) not in known]
        raise ValueError(
            f"`spots`: the spot file {str(spots_path)!r} spaces its positions {step_x} array units apart (read as the "
            f"staggered 2k array: {sx:.3f} um/px), but the spot ids of `counts` ({str(counts_path)!r}) are "
            f"{count_step_x} unit(s) apart, which gives {sx * step_x / count_step_x:.3f} um/px from the {pitch:g} um "
            f"pitch. {len(absent)} of the {len(ids)} counted spots have no row in the spot file (e.g. {absent[:5]}): "
            "rows are missing from it. Use the complete spot file of this section."
        )


def _fit_calibration(spots: pd.DataFrame, *, pitch: float, arg: str) -> dict:
    """Least-squares affine array (x, y) -> pixel; um/px per axis from ``pitch``; residual in um."""
    x, y = spots["x"].to_numpy(float), spots["y"].to_numpy(float)
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    if len(spots) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ValueError(
            f"`{arg}`: the spot file has {len(spots)} spot(s) that do not span two array directions; at least three "
            "spots off a single line are needed to calibrate the H&E (the image has no calibration of its own)."
        )
    pixels = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)  # rows: d/dx, d/dy, offset; columns: pixel_x, pixel_y
    step_x = _array_step(spots["x"].to_numpy(), spots["y"].to_numpy())
    step_y = _array_step(spots["y"].to_numpy(), spots["x"].to_numpy())
    px_per_unit_x, px_per_unit_y = float(np.hypot(*coef[0])), float(np.hypot(*coef[1]))
    if min(px_per_unit_x, px_per_unit_y) <= 0:
        raise ValueError(f"`{arg}`: pixel positions do not change with the array coordinates; cannot calibrate.")
    sx = pitch / step_x / px_per_unit_x
    sy = pitch / step_y / px_per_unit_y
    residual = pixels - design @ coef
    rms = float(np.sqrt(np.mean((residual[:, 0] * sx) ** 2 + (residual[:, 1] * sy) ** 2)))
    if abs(sx / sy - 1) > ANISOTROPY_TOLERANCE:
        warnings.warn(
            f"The spot array gives different pixel sizes along x ({sx:.3f} um/px) and y ({sy:.3f} um/px): the H&E was "
            "probably resized without keeping its aspect ratio. Both are kept (non-square pixels).",
            UserWarning,
            stacklevel=3,
        )
    return {"um_per_px": (float(sy), float(sx)), "fit_rms_um": rms, "array_step": [step_y, step_x]}
