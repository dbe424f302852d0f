"""Pieces shared by the readers: locating files, loading images, calibrating rasters, assembling elements."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import ATTRS_KEY, COORDINATE_SYSTEM, RGB_CHANNELS, Key
from c3diff._geometry import RasterGeometry
from c3diff._provenance import _plain
from c3diff._validation import hne_to_uint8

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData

#: Chunk size (pixels) of the dask arrays behind image elements.
IMAGE_CHUNK = 4096
#: Largest image (in pixels) PIL may open here; H&E scans exceed PIL's decompression-bomb guard (89 Mpx).
MAX_IMAGE_PIXELS = 2_000_000_000
#: Fraction of spot centres that may fall outside the image before the pairing is called wrong.
MAX_OUTSIDE_FRACTION = 0.5
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf")
#: Images get 2x-downsampled pyramid levels (as spatialdata-io's readers) until the coarsest level has at most this
#: many pixels along its longer side, so that plots and tiling read the level they need; smaller images stay single.
PYRAMID_TOP_SIZE = 2048
#: Bytes read from the end of a text table to check that its last row is complete.
_TAIL_BYTES = 1 << 20


def require_file(path: Path, *, what: str, arg: str, hint: str = "") -> Path:
    """Return ``path`` if it is a file, else raise a ``FileNotFoundError`` that says what was expected where."""
    if not path.is_file():
        where = path.parent
        found = sorted(p.name for p in where.iterdir())[:12] if where.is_dir() else None
        listing = f" The folder holds: {found}." if found is not None else f" The folder {str(where)!r} does not exist."
        raise FileNotFoundError(
            f"`{arg}`: expected the {what} at {str(path)!r}, but there is no such file.{listing}{hint}"
        )
    return path


def require_dir(path: str | Path, *, what: str, arg: str) -> Path:
    """Return ``path`` as a ``Path`` if it is a folder, else raise a ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"`{arg}`: expected {what} at {str(path)!r}, but that path {state}.")
    return path


def first_existing(folder: Path, names: list[str]) -> Path | None:
    """The first of ``names`` that exists in ``folder`` (files or folders), or ``None``."""
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


@contextmanager
def _large_images():
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _rgb_from_pil(image: Any, *, arg: str) -> np.ndarray:
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels are glass, i.e. white in brightfield H&E
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if image.mode in ("RGB", "L", "P", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)  # 16-bit or float single-channel
    return np.repeat(hne_to_uint8(array, arg=arg)[..., None], 3, axis=2)


def load_rgb(path: Path, *, arg: str) -> Any:
    """Read an H&E image as ``(y, x, 3)`` uint8: PNG/JPEG into memory (alpha composited onto white), (OME-)TIFF
    lazily as a dask array (whole-slide H&E do not fit in memory)."""
    if path.suffix.lower() in _TIFF_SUFFIXES:
        array, axes, _ = read_tiff_level0(path, arg=arg)
        axes = axes.upper()
        for axis in [a for a in axes if a not in "YXSC"]:  # singleton T/Z/Q axes of OME writers
            array = array[tuple(0 if a == axis else slice(None) for a in axes)]
            axes = axes.replace(axis, "")
        if array.ndim == 2:
            array = array[..., None].repeat(3, axis=2)
        elif axes[0] in "SC" and array.shape[0] in (3, 4):
            array = array.transpose(1, 2, 0)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise ValueError(f"`{arg}`: {str(path)!r} is not an RGB image (axes {axes}, shape {array.shape}).")
        return hne_to_uint8(array[..., :3], arg=arg)
    import zlib

    from PIL import Image

    try:
        with _large_images(), Image.open(path) as image:
            image.load()
            return _rgb_from_pil(image, arg=arg)
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, SyntaxError, EOFError, zlib.error) as err:  # PIL: "image file is truncated", unidentified
        raise ValueError(
            f"`{arg}`: {str(path)!r} is truncated or not a readable image ({err}). Copy or download it again, or "
            "export it anew (JPEG, PNG or TIFF)."
        ) from err


def as_rgb(image: Any, *, arg: str) -> Any:
    """An in-memory image given by the user as ``(y, x, 3)`` uint8 (grey is repeated, alpha dropped)."""
    array = image if hasattr(image, "dask") else np.asarray(image)
    if array.ndim == 2:
        array = array[..., None].repeat(3, axis=2)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"`{arg}` must be an (y, x, 3) RGB array, got shape {array.shape}.")
    return hne_to_uint8(array[..., :3], arg=arg)


def read_tiff_level0(path: Path, *, arg: str) -> tuple[Any, str, str]:
    """Full-resolution level of a (pyramidal, OME-)TIFF as a lazy dask array, its axes and the OME-XML (or "")."""
    import dask.array as da
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
            ome = tif.ome_metadata or ""
            end = max(
                (
                    offset + count
                    for page in tif.series[0].levels[0].pages
                    if page is not None
                    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
                ),
                default=0,
            )
        store = tifffile.imread(path, aszarr=True, series=0, level=0)  # the store keeps its own file handle
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as err:
        raise ValueError(f"`{arg}`: {str(path)!r} is truncated or not a readable TIFF ({err}).") from err
    size = path.stat().st_size
    if end > size:  # the pixels are read lazily: a cut file would fail later, far from here
        raise ValueError(
            f"`{arg}`: {str(path)!r} is truncated: its image data run to byte {end} but the file has {size} bytes. "
            "Copy or download it again."
        )
    return da.from_zarr(zarr.open(store, mode="r")), axes, ome


def is_blank(image: np.ndarray) -> bool:
    """Whether an image is constant (a placeholder): every channel has a single value (checked on a subsample)."""
    step = max(1, int(np.ceil(max(image.shape[:2]) / 1024)))
    sample = np.asarray(image[::step, ::step])  # computes a dask array's subsample only
    return bool(np.all(sample.max(axis=(0, 1)).astype(int) - sample.min(axis=(0, 1)).astype(int) == 0))


def raster_transform(*, sy: float, sx: float, y0: float = 0.0, x0: float = 0.0):
    """Transformation putting pixel ``(i, j)`` at ``[y0 + i*sy, y0 + (i+1)*sy) x [x0 + j*sx, x0 + (j+1)*sx)``."""
    return RasterGeometry(y0=float(y0), x0=float(x0), sy=float(sy), sx=float(sx), height=1, width=1).transformation()


def index_transform(*, sy: float, sx: float, y0: float = 0.0, x0: float = 0.0):
    """Transformation for pixel *index* coordinates (a pixel's centre at integer ``(i, j)``), as Space Ranger, the
    ST spot detector and Xenium use: the centre of pixel ``(i, j)`` lands on ``(y0 + i*sy, x0 + j*sx)``."""
    return raster_transform(sy=sy, sx=sx, y0=y0 - 0.5 * sy, x0=x0 - 0.5 * sx)


def pyramid_scale_factors(height: int, width: int) -> list[int]:
    """Scale factors (each 2) of the pyramid of a ``height x width`` image: levels are added until the coarsest has at
    most :data:`PYRAMID_TOP_SIZE` pixels along its longer side (none for smaller images)."""
    factors, size = [], max(int(height), int(width))
    while size > PYRAMID_TOP_SIZE:
        factors.append(2)
        size = -(-size // 2)
    return factors


def parse_rgb(image: np.ndarray, transform: Any) -> xr.DataArray | xr.DataTree:
    """An ``Image2DModel`` element (uint8, ``c = r, g, b``) from a ``(y, x, 3)`` array and its transform to global:
    multiscale (a ``DataTree`` with the levels of :func:`pyramid_scale_factors`) when the image is large."""
    from spatialdata.models import Image2DModel

    data = image.transpose(2, 0, 1)
    data = data if hasattr(data, "dask") else np.ascontiguousarray(data)
    factors = pyramid_scale_factors(*data.shape[1:])
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=list(RGB_CHANNELS),
        transformations={COORDINATE_SYSTEM: transform},
        scale_factors=factors or None,
        chunks=(3, IMAGE_CHUNK, IMAGE_CHUNK),
    )


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def check_last_row(path: Path, *, sep: str, arg: str) -> None:
    """Raise when an uncompressed text table ends in the middle of a row (fewer fields than the row before it and
    no final newline): a file cut short by an interrupted copy or download."""
    if _is_gzip(path):
        return  # a cut gzip stream fails to decompress (see read_table)
    size = path.stat().st_size
    with path.open("rb") as fh:
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read()
    if not tail or tail.endswith((b"\n", b"\r")):
        return
    lines = tail.replace(b"\r\n", b"\n").split(b"\n")
    if len(lines) < 2:
        return
    last, previous = lines[-1], lines[-2]
    field = sep.encode()
    if last.count(field) < previous.count(field):
        raise ValueError(
            f"`{arg}`: {str(path)!r} is truncated: its last line has {last.count(field) + 1} fields where the line "
            f"before has {previous.count(field) + 1}, and the file does not end with a newline (it was cut mid-row). "
            "Copy or download it again."
        )


def read_table(path: Path, *, arg: str, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` that names the file when it is truncated (gzip stream cut, last row cut) or unreadable."""
    import gzip
    import zlib

    import pandas as pd

    sep = kwargs.get("sep", ",")
    try:
        frame = pd.read_csv(path, **kwargs)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(
            f"`{arg}`: {str(path)!r} is truncated or corrupt ({err}): the compressed file ends early or is damaged. "
            "Copy or download it again."
        ) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(
            f"`{arg}`: {str(path)!r} cannot be read as a {'tab' if sep == chr(9) else 'comma'}-separated table "
            f"({err}). Check that it is the right file and that it is complete."
        ) from err
    if isinstance(sep, str) and len(sep) == 1:
        check_last_row(path, sep=sep, arg=arg)
    return frame


def read_parquet(path: Path, *, arg: str, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_parquet`` that names the file when it is truncated or not Parquet."""
    import pandas as pd
    import pyarrow as pa

    try:
        return pd.read_parquet(path, **kwargs)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(
            f"`{arg}`: {str(path)!r} is truncated or not a Parquet file ({err}). Copy or download it again."
        ) from err


def read_10x_h5(path: Path, *, arg: str, **kwargs: Any) -> AnnData:
    """``scanpy.read_10x_h5`` that names the file when it is truncated, not HDF5 or not a 10x counts matrix."""
    import scanpy as sc

    try:
        return sc.read_10x_h5(path, **kwargs)
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as err:  # h5py: "Unable to open file (truncated file: eof = ...)", "file signature not found"
        raise ValueError(
            f"`{arg}`: {str(path)!r} is truncated or not an HDF5 file ({err}). Copy or download it again."
        ) from err
    except KeyError as err:
        raise ValueError(
            f"`{arg}`: {str(path)!r} is HDF5 but not a 10x counts matrix (no {err} in it); pass the "
            "filtered_feature_bc_matrix.h5 that Space Ranger / Xenium wrote."
        ) from err


def check_on_image(centres_um: np.ndarray, geometry: RasterGeometry, *, what: str, arg: str, hint: str) -> int:
    """Raise when most centres ``(n, 2)`` as (x, y) um fall outside the image, warn when some do; return the count."""
    ymin, xmin, ymax, xmax = geometry.extent
    x, y = centres_um[:, 0], centres_um[:, 1]
    outside = ~((x >= xmin) & (x < xmax) & (y >= ymin) & (y < ymax))
    n_out, n = int(outside.sum()), len(centres_um)
    if n and n_out > MAX_OUTSIDE_FRACTION * n:
        raise ValueError(
            f"`{arg}`: {n_out} of {n} {what} centres fall outside the image, which covers x {xmin:.0f}..{xmax:.0f} um "
            f"and y {ymin:.0f}..{ymax:.0f} um while the {what}s span x {x.min():.0f}..{x.max():.0f} um and y "
            f"{y.min():.0f}..{y.max():.0f} um. The image does not belong to these {what}s or its calibration is wrong; "
            f"{hint}"
        )
    if n_out:
        warnings.warn(
            f"{n_out} of {n} {what} centres fall outside the image ({str(arg)}); they are kept, with no image under "
            "them.",
            UserWarning,
            stacklevel=3,
        )
    return n_out


def neighbour_distances(centres: np.ndarray) -> np.ndarray:
    """Distance from each point to its nearest other point, ignoring exact duplicates (empty for < 2 points)."""
    from scipy.spatial import cKDTree

    if len(centres) < 2:
        return np.array([])
    distances = cKDTree(centres).query(centres, k=2)[0][:, 1]
    return distances[distances > 1e-9]


def counts_to_csr(values: Any) -> Any:
    """Counts as a float32 CSR matrix (exact for counts below 2**24)."""
    from scipy import sparse

    matrix = values.tocsr() if sparse.issparse(values) else sparse.csr_matrix(np.asarray(values))
    return matrix.astype(np.float32)


def spot_elements(
    adata: AnnData,
    centres_um: np.ndarray,
    *,
    in_tissue: np.ndarray,
    diameter_um: float,
    layout: Mapping[str, Any],
) -> tuple[Any, AnnData]:
    """Circles (``Key.SPOTS``, in um) and the spot table (``Key.SPOT_TABLE``) annotating them.

    ``adata`` holds the raw counts (spots x genes); it is copied, its ``obs_names`` (barcodes / array ids) kept.
    """
    import pandas as pd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    n = adata.n_obs
    spot_id = np.arange(n, dtype=np.int64)
    table = adata.copy()
    table.X = counts_to_csr(table.X)
    table.var_names_make_unique()
    table.obs["spot_id"] = spot_id
    table.obs["region"] = pd.Categorical([Key.SPOTS.value] * n)
    table.obs["in_tissue"] = np.asarray(in_tissue, dtype=bool)
    table.obsm["spatial"] = np.asarray(centres_um, dtype=np.float64)
    table.uns[ATTRS_KEY] = {"spots": _plain(dict(layout, diameter_um=float(diameter_um)))}
    shapes = ShapesModel.parse(
        np.asarray(centres_um, dtype=np.float64),
        geometry=0,
        radius=np.full(n, diameter_um / 2.0),
        index=pd.Index(spot_id, name="spot_id"),
        transformations={COORDINATE_SYSTEM: Identity()},
    )
    table = TableModel.parse(table, region=Key.SPOTS.value, region_key="region", instance_key="spot_id")
    return shapes, table


def cell_elements(adata: AnnData, centres_um: np.ndarray, *, radius_um: np.ndarray) -> tuple[Any, AnnData]:
    """Circles (``Key.CELLS``, in um, index = cell id 1..N in row order) and the cell table annotating them.

    ``adata`` holds the raw counts (cells x genes); it is copied, its ``obs_names`` kept.
    """
    import pandas as pd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    n = adata.n_obs
    cell_id = np.arange(1, n + 1, dtype=np.int64)
    table = adata.copy()
    table.X = counts_to_csr(table.X)
    table.var_names_make_unique()
    table.obs["cell_id"] = cell_id
    table.obs["region"] = pd.Categorical([Key.CELLS.value] * n)
    table.obsm["spatial"] = np.asarray(centres_um, dtype=np.float64)
    shapes = ShapesModel.parse(
        np.asarray(centres_um, dtype=np.float64),
        geometry=0,
        radius=np.broadcast_to(np.asarray(radius_um, dtype=np.float64), (n,)).copy(),
        index=pd.Index(cell_id, name="cell_id"),
        transformations={COORDINATE_SYSTEM: Identity()},
    )
    table = TableModel.parse(table, region=Key.CELLS.value, region_key="region", instance_key="cell_id")
    return shapes, table


def build_sdata(
    *,
    images: Mapping[str, Any] | None = None,
    shapes: Mapping[str, Any] | None = None,
    points: Mapping[str, Any] | None = None,
    tables: Mapping[str, Any] | None = None,
    reader: Mapping[str, Any],
) -> SpatialData:
    """A SpatialData with the reader's provenance in ``attrs["c3diff"]["reader"]``."""
    from spatialdata import SpatialData

    return SpatialData(
        images=dict(images or {}),
        shapes=dict(shapes or {}),
        points=dict(points or {}),
        tables=dict(tables or {}),
        attrs={ATTRS_KEY: {"reader": _plain(dict(reader))}},
    )


def frame_columns(frame: pd.DataFrame, aliases: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Map canonical column names to the columns of ``frame`` (case-insensitive aliases); missing ones are absent."""
    lower = {str(c).strip().lower(): c for c in frame.columns}
    found = {}
    for name, options in aliases.items():
        for option in options:
            if option in lower:
                found[name] = lower[option]
                break
    return found
