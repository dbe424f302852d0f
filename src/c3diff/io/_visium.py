"""10x Visium: a Space Ranger ``outs`` folder (``read_visium``) or spot arrays (``visium_from_arrays``)."""

from __future__ import annotations

import json
import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from c3diff._constants import HISTOLOGY_PIXEL_SIZE, VISIUM_PITCH, VISIUM_SPOT_DIAMETER, Key
from c3diff._geometry import raster_geometry
from c3diff._validation import check_counts
from c3diff.io._common import (
    as_rgb,
    build_sdata,
    check_on_image,
    first_existing,
    index_transform,
    is_blank,
    load_rgb,
    neighbour_distances,
    parse_rgb,
    raster_transform,
    read_10x_h5,
    read_table,
    require_dir,
    require_file,
    spot_elements,
)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


class VisiumFile(str, Enum):
    """Space Ranger output files, relative to the ``outs`` folder."""

    COUNTS = "filtered_feature_bc_matrix.h5"
    SCALEFACTORS = "spatial/scalefactors_json.json"
    POSITIONS = "spatial/tissue_positions.csv"  # Space Ranger >= 2.0, with a header
    POSITIONS_LIST = "spatial/tissue_positions_list.csv"  # Space Ranger 1.x, no header
    HIRES = "spatial/tissue_hires_image.png"
    LOWRES = "spatial/tissue_lowres_image.png"


class ScaleFactor(str, Enum):
    """Keys of ``scalefactors_json.json``."""

    SPOT_DIAMETER = "spot_diameter_fullres"
    HIRES = "tissue_hires_scalef"
    LOWRES = "tissue_lowres_scalef"


#: Micrometres spanned by ``spot_diameter_fullres``: Space Ranger sizes it for a 65 um circle (the 55 um spot and
#: its margin), not the 55 um spot itself. Checked on real outputs: the 100 um spot pitch measures 137 full-res px
#: where ``spot_diameter_fullres`` is 89.4 px (65 / 89.4 * 137 = 99.6 um; 55 um would give 84 um).
SCALEFACTOR_SPOT_UM = 65.0
#: Fewest image pixels across a spot below which the image barely resolves a spot (warned about).
MIN_PIXELS_PER_SPOT = 8.0
#: Relative mismatch between the measured and nominal spot pitch that is warned about.
PITCH_TOLERANCE = 0.05
_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_visium(
    path: str | Path,
    *,
    counts_file: str = VisiumFile.COUNTS.value,
    image: Literal["auto", "hires", "lowres"] | None = "auto",
    fullres_image: str | Path | None = None,
) -> SpatialData:
    """Read a 10x Visium Space Ranger ``outs`` folder into a SpatialData in micrometres.

    Reads ``spatial/scalefactors_json.json``, ``spatial/tissue_positions.csv`` (Space Ranger >= 2, with a header)
    or ``spatial/tissue_positions_list.csv`` (Space Ranger 1.x, without), the H&E images and the counts
    (``counts_file``, via :func:`scanpy.read_10x_h5`).

    The micrometre scale comes from the scale factors: Space Ranger's ``spot_diameter_fullres`` spans
    65 um (the 55 um spot and its margin), so one full-resolution pixel is ``65 / spot_diameter_fullres`` um, and a
    pixel of the hires (lowres) image is that divided by ``tissue_hires_scalef`` (``tissue_lowres_scalef``). The
    measured spot pitch is checked against the nominal 100 um.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder.
    counts_file
        Counts matrix in 10x HDF5 format, relative to ``path``; ``"raw_feature_bc_matrix.h5"`` keeps spots outside
        the tissue (flagged in ``obs["in_tissue"]``). A ``<library_id>_`` prefix is found on its own.
    image
        Which H&E becomes ``Key.HNE``: ``"auto"`` takes ``fullres_image`` if given, else the hires image unless it is
        missing or blank (a constant placeholder), else the lowres image; ``"hires"``/``"lowres"`` force one;
        ``None`` reads no image.
    fullres_image
        The full-resolution H&E that Space Ranger was run on (TIFF/JPEG/PNG); its pixels are full-res pixels.

    Returns
    -------
    SpatialData with ``Key.HNE`` (RGB uint8; multiscale when larger than 2048 px, see ``docs/reliability.md``),
    ``Key.SPOTS`` (circles of 55 um diameter, in um) and
    ``Key.SPOT_TABLE`` (spots x genes raw counts; ``obs["spot_id"]``, ``obs["region"]``, ``obs["in_tissue"]``,
    ``obs["array_row"]``, ``obs["array_col"]``; ``obsm["spatial"]`` in um; ``uns["c3diff"]["spots"]``), all in the
    ``"global"`` coordinate system (um). ``sdata.attrs["c3diff"]["reader"]`` records the source and calibration.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.io.read_visium("V1_Human_Heart/outs")  # doctest: +SKIP
    >>> sdata.attrs["c3diff"]["reader"]["image_um_per_px"]  # doctest: +SKIP
    4.84
    """
    root = require_dir(path, what="a Space Ranger `outs` folder", arg="path")
    if image not in ("auto", "hires", "lowres", None):
        raise ValueError(f"`image` must be 'auto', 'hires', 'lowres' or None, got {image!r}.")
    if fullres_image is not None and image != "auto":
        raise ValueError(f"`fullres_image` becomes the H&E with image='auto'; got image={image!r} as well.")

    scalefactors = _read_scalefactors(root)
    positions, positions_file = _read_positions(root)
    counts_path = _counts_path(root, counts_file)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not unique.*")  # 10x panels repeat symbols: made unique here
        adata = read_10x_h5(counts_path, arg="counts_file")
        adata.var_names_make_unique()
    check_counts(adata.X, ids=adata.obs_names.to_numpy(), arg=f"counts_file ({str(counts_path)!r})", what="spot")

    chosen, pixels, scalef = _choose_image(root, image, fullres_image, scalefactors)
    shared = adata.obs_names.intersection(positions.index)
    if len(shared) == 0:
        raise ValueError(
            f"None of the {adata.n_obs} barcodes of {counts_path.name!r} (e.g. {list(adata.obs_names[:2])}) is in "
            f"{positions_file.name!r} (e.g. {list(positions.index[:2])}): the counts and the spatial folder come "
            "from different runs, or the barcodes were renamed."
        )
    if len(shared) < adata.n_obs:
        warnings.warn(
            f"{adata.n_obs - len(shared)} of {adata.n_obs} barcodes of {counts_path.name!r} have no position in "
            f"{positions_file.name!r} and are dropped.",
            UserWarning,
            stacklevel=2,
        )
        adata = adata[shared].copy()
    pos = positions.loc[adata.obs_names]
    for column in ("array_row", "array_col"):
        adata.obs[column] = pos[column].to_numpy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not whole numbers")  # said above, naming the file
        sdata = visium_from_arrays(
            adata,
            spatial=pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float),
            spot_diameter_fullres=scalefactors[ScaleFactor.SPOT_DIAMETER.value],
            in_tissue=pos["in_tissue"].to_numpy().astype(bool),
            image=pixels,
            image_scalef=scalef,
        )
    sdata.attrs["c3diff"]["reader"].update(
        {
            "name": "read_visium",
            "path": str(root),
            "image": chosen,
            "counts_file": counts_path.name,
            "positions_file": positions_file.name,
            "scalefactors": {k: float(v) for k, v in scalefactors.items() if isinstance(v, int | float)},
        }
    )
    return sdata


def visium_from_arrays(
    adata: AnnData,
    *,
    spatial: np.ndarray,
    spot_diameter_fullres: float,
    in_tissue: np.ndarray | None = None,
    image: np.ndarray | str | Path | None = None,
    image_scalef: float | None = None,
    image_extent: tuple[float, float, float, float] | None = None,
) -> SpatialData:
    """Build a Visium SpatialData (micrometres) from counts, full-resolution spot positions and an optional H&E.

    The lower-level entry point behind :func:`read_visium`, for Visium data that does not come as a Space Ranger
    folder (e.g. Giotto's or Seurat's exports). Calibration is Space Ranger's: one full-resolution pixel is
    ``65 / spot_diameter_fullres`` um.

    Parameters
    ----------
    adata
        Spots x genes raw counts; ``obs_names`` are the barcodes. Copied, not modified.
    spatial
        ``(n_spots, 2)`` spot centres as ``(x, y)`` = (column, row) in full-resolution pixels, y running down. Data
        with y running up (Giotto's ``sdimy``) must be negated first.
    spot_diameter_fullres
        ``spot_diameter_fullres`` of the run's ``scalefactors_json.json``.
    in_tissue
        Boolean flag per spot (default: all under tissue).
    image
        The H&E, an ``(y, x, 3)`` array or an image file; placed by exactly one of ``image_scalef`` or
        ``image_extent``.
    image_scalef
        Image pixel = full-res pixel x ``image_scalef`` (Space Ranger's ``tissue_hires_scalef`` / ``..._lowres_...``;
        1 for the full-resolution image).
    image_extent
        ``(xmin, xmax, ymin, ymax)``: the image's outer edges in full-resolution pixels, y running down (e.g. a
        Giotto image extent, with its y values negated and swapped).

    Returns
    -------
    SpatialData with ``Key.HNE`` (if ``image``), ``Key.SPOTS`` and ``Key.SPOT_TABLE``, as :func:`read_visium`.

    Examples
    --------
    Giotto's mini Visium (spots in full-res px with y up; an H&E crop with its extent):

    >>> import json, numpy as np, pandas as pd, anndata as ad
    >>> import c3diff as c3
    >>> expr = pd.read_csv("visium_DG_expr.txt.gz", sep=r"\\s+")  # doctest: +SKIP
    >>> locs = np.loadtxt("visium_DG_locs.txt")  # doctest: +SKIP
    >>> sf = json.load(open("scalefactors_json.json"))  # doctest: +SKIP
    >>> sdata = c3.io.visium_from_arrays(  # doctest: +SKIP
    ...     ad.AnnData(expr.T),
    ...     spatial=locs * [1, -1],
    ...     spot_diameter_fullres=sf["spot_diameter_fullres"],
    ...     image="images/deg_image2.png",
    ...     image_extent=(2000.5, 6790.5, 2380.75, 5730.25),
    ... )
    """
    n = adata.n_obs
    check_counts(adata.X, ids=adata.obs_names.to_numpy(), arg="adata.X", what="spot")
    spatial = np.asarray(spatial, dtype=float)
    if spatial.shape != (n, 2):
        raise ValueError(f"`spatial` must have shape (n_spots, 2) = ({n}, 2) as (x, y), got {spatial.shape}.")
    if not np.isfinite(spatial).all():
        raise ValueError(f"`spatial` has {int((~np.isfinite(spatial)).any(axis=1).sum())} spot(s) without a position.")
    if not (np.isfinite(spot_diameter_fullres) and spot_diameter_fullres > 0):
        raise ValueError(f"`spot_diameter_fullres` must be a positive number of pixels, got {spot_diameter_fullres!r}.")
    in_tissue = np.ones(n, dtype=bool) if in_tissue is None else np.asarray(in_tissue, dtype=bool)
    if in_tissue.shape != (n,):
        raise ValueError(f"`in_tissue` must have one flag per spot ({n}), got shape {in_tissue.shape}.")
    if not in_tissue.any():
        raise ValueError(
            f"None of the {n} spots is under tissue (`in_tissue` is all False): these are the counts of the slide's "
            "background. Use the filtered matrix or check the tissue positions file."
        )

    um_per_px = SCALEFACTOR_SPOT_UM / float(spot_diameter_fullres)
    centres = spatial * um_per_px
    distances = neighbour_distances(centres)
    spacing = float(distances.min()) if distances.size else float("nan")
    # The closest two spots of any subset of a Visium lattice are neighbours, one pitch apart.
    if np.isfinite(spacing) and abs(spacing / VISIUM_PITCH - 1) > PITCH_TOLERANCE:
        warnings.warn(
            f"The closest spots are {spacing:.1f} um apart with `spot_diameter_fullres={spot_diameter_fullres:.2f}`, "
            f"not the Visium pitch of {VISIUM_PITCH:.0f} um: the scale factors may belong to another image, or the "
            "spots are not in full-resolution pixels.",
            UserWarning,
            stacklevel=2,
        )

    images, image_px = {}, None
    if image is not None:
        if (image_scalef is None) == (image_extent is None):
            raise ValueError("Pass exactly one of `image_scalef` or `image_extent` to place `image`.")
        pixels = load_rgb(Path(image), arg="image") if isinstance(image, str | Path) else as_rgb(image, arg="image")
        height, width = pixels.shape[:2]
        if image_scalef is not None:
            if not (np.isfinite(image_scalef) and image_scalef > 0):
                raise ValueError(f"`image_scalef` must be a positive number, got {image_scalef!r}.")
            sy = sx = um_per_px / float(image_scalef)
            transform = index_transform(sy=sy, sx=sx)
        else:
            xmin, xmax, ymin, ymax = map(float, image_extent)
            if not (xmax > xmin and ymax > ymin):
                raise ValueError(f"`image_extent` must be (xmin, xmax, ymin, ymax) with min < max, got {image_extent}.")
            sx, sy = (xmax - xmin) / width * um_per_px, (ymax - ymin) / height * um_per_px
            transform = raster_transform(sy=sy, sx=sx, y0=ymin * um_per_px, x0=xmin * um_per_px)
        element = parse_rgb(pixels, transform)
        geometry = raster_geometry(element, arg="image")
        check_on_image(
            centres[in_tissue],
            geometry,
            what="spot",
            arg="image",
            hint="pass the image these spots were aligned to, with its own `image_scalef` / `image_extent`.",
        )
        image_px = float(np.sqrt(sy * sx))
        per_spot = VISIUM_SPOT_DIAMETER / image_px
        if per_spot < MIN_PIXELS_PER_SPOT:
            if image_px > HISTOLOGY_PIXEL_SIZE:
                meaning = (
                    f"this image is coarser, so the patches are upsampled and hold no detail below {image_px:.0f} um: "
                    "the super-resolved maps can follow tissue regions, not cell-scale morphology"
                )
            else:
                meaning = "this image barely reaches that grid, so nuclei-scale morphology is blurred or lost"
            warnings.warn(
                f"The H&E has {image_px:.1f} um/px: a {VISIUM_SPOT_DIAMETER:.0f} um spot is only {per_spot:.1f} px "
                f"across. c3diff feeds the model {HISTOLOGY_PIXEL_SIZE:.0f} um/px histology patches resampled from "
                f"the H&E; {meaning}. Use the full-resolution H&E (`read_visium(..., fullres_image=)`) when you can.",
                UserWarning,
                stacklevel=2,
            )
        images[Key.HNE.value] = element
    elif image_scalef is not None or image_extent is not None:
        raise ValueError("`image_scalef` / `image_extent` place an image, but `image` is None.")

    shapes, table = spot_elements(
        adata,
        centres,
        in_tissue=in_tissue,
        diameter_um=VISIUM_SPOT_DIAMETER,
        layout={
            "layout": "visium",
            "pitch_um": VISIUM_PITCH,
            "closest_spacing_um": spacing,
            "fullres_um_per_px": um_per_px,
        },
    )
    reader = {
        "name": "visium_from_arrays",
        "path": None,
        "fullres_um_per_px": um_per_px,
        "image": (str(image) if isinstance(image, str | Path) else "array") if image is not None else None,
        "image_um_per_px": image_px,
        "n_spots": n,
        "n_in_tissue": int(in_tissue.sum()),
    }
    return build_sdata(
        images=images, shapes={Key.SPOTS.value: shapes}, tables={Key.SPOT_TABLE.value: table}, reader=reader
    )


def _read_scalefactors(root: Path) -> dict:
    path = require_file(root / VisiumFile.SCALEFACTORS.value, what="Space Ranger scale factors", arg="path")
    try:
        scalefactors = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"`path`: {str(path)!r} is truncated or not JSON ({err}); copy it again from the Space Ranger output."
        ) from err
    if not isinstance(scalefactors, dict):
        raise ValueError(f"`path`: {str(path)!r} must hold a JSON object of scale factors, got {scalefactors!r}.")
    if ScaleFactor.SPOT_DIAMETER.value not in scalefactors:
        raise ValueError(
            f"{str(path)!r} has no {ScaleFactor.SPOT_DIAMETER.value!r}: without it the images and spots have no "
            f"micrometre calibration (found keys {sorted(scalefactors)})."
        )
    return scalefactors


def _read_positions(root: Path):
    path = first_existing(root, [VisiumFile.POSITIONS.value, VisiumFile.POSITIONS_LIST.value])
    if path is None:
        require_file(
            root / VisiumFile.POSITIONS.value,
            what="spot positions (tissue_positions.csv, or tissue_positions_list.csv for Space Ranger 1.x)",
            arg="path",
        )
    with path.open() as fh:
        first = fh.readline().split(",")[0].strip()
    # Space Ranger 2 writes a header; 1.x does not. The column order is the same.
    frame = read_table(path, arg="path", sep=",", header=0 if first == "barcode" else None)
    if frame.shape[1] != len(_POSITION_COLUMNS):
        raise ValueError(f"{str(path)!r} has {frame.shape[1]} columns; Space Ranger writes {_POSITION_COLUMNS}.")
    frame.columns = _POSITION_COLUMNS
    return frame.set_index("barcode"), path


def _counts_path(root: Path, counts_file: str) -> Path:
    path = root / counts_file
    if not path.is_file():
        prefixed = sorted(root.glob(f"*_{Path(counts_file).name}"))
        if len(prefixed) == 1:  # Space Ranger names it <library_id>_filtered_feature_bc_matrix.h5 when asked
            return prefixed[0]
    return require_file(path, what="counts matrix (10x HDF5)", arg="counts_file")


def _choose_image(root: Path, image, fullres_image, scalefactors) -> tuple[str | None, np.ndarray | None, float | None]:
    """(name, pixels, scalef) of the H&E to use."""
    if image is None:
        return None, None, None
    if fullres_image is not None and image == "auto":
        path = require_file(Path(fullres_image), what="full-resolution H&E", arg="fullres_image")
        return "fullres", load_rgb(path, arg="fullres_image"), 1.0
    candidates = ["hires", "lowres"] if image == "auto" else [image]
    skipped = []
    for name in candidates:
        file = VisiumFile.HIRES if name == "hires" else VisiumFile.LOWRES
        key = ScaleFactor.HIRES if name == "hires" else ScaleFactor.LOWRES
        path = root / file.value
        if not path.is_file():
            if image != "auto":
                require_file(path, what=f"{name} H&E", arg="image")
            skipped.append(f"{file.value} is missing")
            continue
        if key.value not in scalefactors:
            raise ValueError(
                f"The scale factors have no {key.value!r}, so {file.value!r} has no calibration; pass "
                f"image={'lowres' if name == 'hires' else 'hires'!r} or image=None."
            )
        pixels = load_rgb(path, arg="image")
        if is_blank(pixels):
            if image != "auto":
                raise ValueError(f"{str(path)!r} is blank (a single colour); pass image='auto' to fall back.")
            skipped.append(f"{file.value} is blank (one colour, a placeholder)")
            continue
        if skipped:
            warnings.warn(f"{'; '.join(skipped)}: using {file.value} as the H&E instead.", UserWarning, stacklevel=3)
        return name, pixels, float(scalefactors[key.value])
    warnings.warn(f"No usable H&E ({'; '.join(skipped)}); the SpatialData has no image.", UserWarning, stacklevel=3)
    return None, None, None
