"""TESLA (Hu et al. 2023, Cell Systems) run from its PyPI package (``TESLAforST``) as a benchmark peer of C3-Diff.

TESLA imputes gene expression on a lattice of "superpixels" from spot-level counts and the H&E: every superpixel
gets an inverse-distance-weighted average of its ``num_nbs`` nearest spots, distances measured in 3-D - the two
image axes plus a third axis made from the standardised colour of the H&E around the point, scaled to the spread of
the points' positions (``TESLA.imputation``).

How c3diff's data are fed to it:

- **Spots.** For Xenium-like data the LR map's pixels (100 um bins of the transcripts, the same LR that C3-Diff
  sees) act as spots at their centres, 100 um apart on a square grid. An LR pixel cut by the image border counts if
  at least half of it lies inside, its counts scaled up by its covered fraction. By default every such pixel is a
  spot, glass included (Xenium measures everywhere; TESLA's ``in_tissue`` filter is for Visium) - see
  ``min_tissue``. Counts are ``log1p``-transformed before imputation as in TESLA's tutorial, and the imputed values
  are mapped back with ``expm1``.
- **Contour.** ``TESLA.scan_contour(..., shape="square")`` on the spot grid, as TESLA's tutorial does for ST data;
  ``TESLA.imputation`` enlarges it by 5 %.
- **Image.** The H&E resampled (area average, through its coordinate transforms) to ``image_pixel_size`` um/px
  (default 2 um: TESLA was designed for ~0.5 um/px images, coarser is much faster and the colour windows stay the
  same size in micrometres). The image grid is placed so that TESLA's superpixel centres (every ``res`` pixels,
  ``res = res_um / image_pixel_size``) fall exactly on the centres of a ``res_um`` lattice anchored at the test
  patches' corners; its colour window (``beta = res``) is then one lattice cell.
- **Output.** Lattice cells TESLA leaves out (outside its enlarged contour) take the nearest imputed value; each
  patch's HR pixels are sampled from the lattice through the patch origins in micrometres (bilinear: exact when the
  lattice is the HR grid, a 2x2 mean for 5x HR pixels on a 10 um lattice), then min-max normalised per
  (patch, gene) to [0, 1], the paper's scoring protocol.

``backend="tesla"`` calls ``TESLA.imputation`` itself. Its two loops over (superpixel, spot) pairs are pure Python
(~5 us a pair: 4.6 minutes for a 2.56 mm section at 10 um on this CPU, ~1 minute at 20 um), so
``backend="vectorized"`` offers the same arithmetic with numpy/scipy (TESLA's own ``extract_color`` and
``scale_contour`` for the colours and the contour; ~4 s a section); the smoke run checks that both give the same maps.

Installed for this benchmark (not c3diff dependencies): ``pip install --no-deps --no-build-isolation TESLAforST``
(1.2.2) and ``pip install opencv-python-headless``; TESLA's other requirements (numpy, pandas, scipy, scanpy,
anndata, torch, numba) are c3diff's own.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from unittest import mock

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM, HISTOLOGY_PIXEL_SIZE
from c3diff._validation import RasterGeometry, check_genes, get_element, raster_geometry, scale0

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

    from c3diff.pp import PatchSet

__all__ = ["TeslaResult", "sample_patches", "tesla_impute", "tesla_predict"]


@dataclass
class TeslaResult:
    """TESLA's imputation of one section on a regular lattice.

    Attributes
    ----------
    maps
        float32 ``(G, h, w)``: imputed expression, counts per LR pixel (``expm1`` of TESLA's log-scale output when
        ``log1p``), NaN nowhere (cells outside TESLA's contour hold the nearest imputed value).
    geometry
        The lattice: cell ``(i, j)`` covers ``[y0 + i*res_um, ...)``, its centre is the superpixel's position.
    covered
        bool ``(h, w)``: cells TESLA imputed itself (inside its enlarged contour).
    genes
        Channel order of ``maps``.
    params
        Parameters, counts of spots and superpixels, and the seconds TESLA took (``seconds_imputation``) and the
        whole call took (``seconds_total``).
    """

    maps: np.ndarray
    geometry: RasterGeometry
    covered: np.ndarray
    genes: list[str]
    params: dict[str, Any] = field(default_factory=dict)


class _LegacyAnnData:
    """The container ``TESLA.imputation`` builds its result in, keeping ``obs`` exactly as assigned.

    TESLA 1.2.2 assigns a frame with a ``RangeIndex`` to ``AnnData.obs`` and then looks its labels up in a frame
    indexed by integers; anndata < 0.10 kept that index, recent anndata turns it into strings (``KeyError: '0'``).
    Only this result container is swapped (``unittest.mock.patch`` of the name in ``TESLA.imputation``'s module);
    TESLA's arithmetic is untouched.
    """

    def __init__(self, X: np.ndarray) -> None:
        self.X = np.asarray(X, dtype=np.float64)
        self.obs = None
        self.var = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape


def _import_tesla():
    try:
        import cv2
        import TESLA
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"The TESLA baseline needs the `TESLAforST` and `opencv-python-headless` packages ({err}). Install them "
            "with `pip install --no-deps --no-build-isolation TESLAforST` and `pip install opencv-python-headless`."
        ) from err
    return TESLA, cv2


def _lr_spots(
    sdata: SpatialData,
    *,
    genes: list[str],
    image_key: str,
    points_key: str | None,
    lr_key: str | None,
    lr_pixel_size: float,
    min_tissue: float,
    coordinate_system: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The LR pixels used as spots: ``(counts (n, G), centres (n, 2) um (y, x), grid indices (n, 2), pitch)``."""
    from c3diff.pp import bin_transcripts, detect_tissue, histology_raster

    if (points_key is None) == (lr_key is None):
        raise ValueError("Pass exactly one LR source: `points_key` (transcripts to bin) or `lr_key` (an LR raster).")
    if lr_key is not None:
        element = get_element(sdata, lr_key, "images", arg="lr_key")
        data = scale0(element)
        check_genes(genes, [str(c) for c in data.coords["c"].values], arg=f"genes (channels of `lr_key={lr_key!r}`)")
        values = np.asarray(data.sel(c=genes).data, dtype=np.float64)
        grid = raster_geometry(element, coordinate_system=coordinate_system, arg="lr_key")
    else:
        raster = bin_transcripts(
            sdata,
            points_key=points_key,
            bin_size=lr_pixel_size,
            genes=genes,
            image_key=image_key,
            inplace=False,
            coordinate_system=coordinate_system,
        )
        values = np.asarray(raster.data, dtype=np.float64)
        grid = raster_geometry(raster, coordinate_system=coordinate_system, arg="points_key")
    if abs(grid.sy - grid.sx) > 1e-6:
        raise ValueError(f"The LR raster's pixels must be square, got {grid.sy:g} x {grid.sx:g} um.")

    # fraction of each LR pixel inside the H&E (pixels cut by the image border hold fewer transcripts)
    ymin, xmin, ymax, xmax = raster_geometry(
        get_element(sdata, image_key, "images", arg="image_key"), coordinate_system=coordinate_system, arg="image_key"
    ).extent
    rows, cols = np.arange(grid.height), np.arange(grid.width)
    fy = np.clip(
        (np.minimum(grid.y0 + (rows + 1) * grid.sy, ymax) - np.maximum(grid.y0 + rows * grid.sy, ymin)) / grid.sy, 0, 1
    )
    fx = np.clip(
        (np.minimum(grid.x0 + (cols + 1) * grid.sx, xmax) - np.maximum(grid.x0 + cols * grid.sx, xmin)) / grid.sx, 0, 1
    )
    coverage = fy[:, None] * fx[None, :]
    keep = coverage >= 0.5
    if min_tissue > 0:
        rgb, hist = histology_raster(
            sdata, image_key, pixel_size=HISTOLOGY_PIXEL_SIZE, coordinate_system=coordinate_system
        )
        tissue = detect_tissue(rgb, pixel_size=HISTOLOGY_PIXEL_SIZE)
        # tissue fraction of each LR pixel, from the 10 um tissue mask's pixel centres
        cy, cx = hist.pixel_centres()
        iy = np.floor((cy - grid.y0) / grid.sy).astype(int)
        ix = np.floor((cx - grid.x0) / grid.sx).astype(int)
        ok_y, ok_x = (iy >= 0) & (iy < grid.height), (ix >= 0) & (ix < grid.width)
        sums = np.zeros((grid.height, grid.width))
        counts = np.zeros((grid.height, grid.width))
        yy, xx = np.meshgrid(iy[ok_y], ix[ok_x], indexing="ij")
        np.add.at(sums, (yy, xx), tissue[np.ix_(ok_y, ok_x)])
        np.add.at(counts, (yy, xx), 1.0)
        fraction = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        keep &= fraction >= min_tissue
    n_dropped = int((coverage > 0).sum() - keep.sum())
    if n_dropped:
        warnings.warn(
            f"TESLA: {n_dropped} of {int((coverage > 0).sum())} LR pixel(s) are not used as spots (less than half "
            f"inside the image{' or under `min_tissue`' if min_tissue > 0 else ''}).",
            UserWarning,
            stacklevel=3,
        )
    if keep.sum() < 2:
        raise ValueError(f"TESLA needs at least 2 spots; only {int(keep.sum())} LR pixel(s) qualify.")
    r, c = np.nonzero(keep)
    spot_counts = values[:, r, c].T / coverage[r, c][:, None]
    centres = np.stack([grid.y0 + (r + 0.5) * grid.sy, grid.x0 + (c + 0.5) * grid.sx], axis=1)
    return spot_counts, centres, np.stack([r, c], axis=1), float(grid.sy)


def _superpixels(tesla, cv2, img: np.ndarray, cnt: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """TESLA.imputation's superpixel lattice (inside the 1.05x-enlarged contour) and their colour values."""
    binary_enlarged = np.zeros(img.shape[:2])
    cv2.drawContours(binary_enlarged, [tesla.scale_contour(cnt, 1.05)], -1, (1), thickness=-1)
    xs = np.arange(res, img.shape[0], res)
    ys = np.arange(res, img.shape[1], res)
    x, y = np.repeat(xs, len(ys)), np.tile(ys, len(xs))
    inside = binary_enlarged[x, y] != 0
    x, y = x[inside], y[inside]
    color = tesla.extract_color(x_pixel=x.tolist(), y_pixel=y.tolist(), image=img, beta=res, RGB=True)
    return np.stack([x, y], axis=1), np.asarray(color, dtype=np.float64)


def _vectorized_imputation(tesla, cv2, img, raw_x, spot_pixels, cnt, *, res, s, k, num_nbs, chunk=2048):
    """The arithmetic of ``TESLA.imputation`` with its two Python loops over (superpixel, spot) pairs vectorised."""
    from scipy.spatial.distance import cdist

    xy, color = _superpixels(tesla, cv2, img, cnt, res)
    z_scale = np.max([np.std(xy[:, 0]), np.std(xy[:, 1])]) * s
    z = (color - np.mean(color)) / np.std(color) * z_scale
    known_color = np.asarray(
        tesla.extract_color(
            x_pixel=spot_pixels[:, 0].astype(int).tolist(),
            y_pixel=spot_pixels[:, 1].astype(int).tolist(),
            image=img,
            beta=res,
            RGB=False,
        ),
        dtype=np.float64,
    )
    known_z = (known_color - np.mean(known_color)) / np.std(known_color) * z_scale
    known = np.column_stack([spot_pixels.astype(np.float64), known_z])
    sudo = np.column_stack([xy.astype(np.float64), z])
    n_nbs = min(num_nbs, len(known))
    out = np.zeros((len(sudo), raw_x.shape[1]))
    for start in range(0, len(sudo), chunk):
        d = cdist(sudo[start : start + chunk], known)
        idx = np.argpartition(d, n_nbs - 1, axis=1)[:, :n_nbs] if n_nbs < len(known) else np.argsort(d, axis=1)
        nbs = np.take_along_axis(d, idx, axis=1)
        rel = (nbs + 0.1) / np.min(nbs + 0.1, axis=1, keepdims=True)  # as TESLA: avoid 0 distance
        w = 1.0 / rel**k if isinstance(k, int) else np.exp(-rel)
        w /= w.sum(axis=1, keepdims=True)
        out[start : start + chunk] = np.einsum("nk,nkg->ng", w, raw_x[idx])
    return xy, out


def tesla_impute(
    sdata: SpatialData,
    *,
    genes: list[str],
    image_key: str = "hne",
    points_key: str | None = "transcripts",
    lr_key: str | None = None,
    lr_pixel_size: float = 100.0,
    res_um: float = 10.0,
    origin: tuple[float, float] | None = None,
    image_pixel_size: float = 2.0,
    log1p: bool = True,
    s: float = 1.0,
    k: int | float = 2,
    num_nbs: int = 10,
    min_tissue: float = 0.0,
    backend: Literal["tesla", "vectorized"] = "tesla",
    verbose: bool = False,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> TeslaResult:
    """Run TESLA's imputation on a whole section, onto a ``res_um`` lattice.

    Parameters
    ----------
    sdata
        The section (an H&E and transcripts, or an LR gene raster).
    genes
        Genes to impute.
    image_key
        The H&E image.
    points_key
        Transcripts, binned at ``lr_pixel_size`` um onto the H&E-aligned grid for the LR spots (as
        :func:`c3diff.pp.make_patches` does). Set to ``None`` when passing ``lr_key``.
    lr_key
        Instead of ``points_key``: an LR gene raster aligned with the H&E (its pixel size from its transform).
    lr_pixel_size
        Bin size of the LR spots made from ``points_key`` (the paper's 100 um).
    res_um
        Superpixel spacing in um (TESLA's ``res`` times ``image_pixel_size``): the lattice of the output.
    origin
        ``(y, x)`` um of one lattice corner, e.g. a patch origin, so that lattice cells coincide with HR pixels.
        Default: the H&E's corner.
    image_pixel_size
        Pixel size (um) of the H&E given to TESLA; ``res_um`` must be a whole multiple of it.
    log1p
        Impute ``log1p`` counts (TESLA's tutorial) and map the result back with ``expm1``.
    s, k, num_nbs
        ``TESLA.imputation``'s colour-axis scale, distance exponent and number of neighbouring spots (its defaults).
    min_tissue
        Use only LR pixels with at least this tissue fraction as spots (0: every measured pixel, glass included).
    backend
        ``"tesla"``: ``TESLA.imputation`` itself; ``"vectorized"``: the same arithmetic, vectorised (much faster).
    verbose
        Show TESLA's own prints.
    coordinate_system
        Coordinate system (um) of every element.

    Returns
    -------
    A :class:`TeslaResult`.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=640, height=640, seed=0)  # doctest: +SKIP
    >>> result = tesla_impute(sdata, genes=["ERBB2", "CD3E"], backend="vectorized")  # doctest: +SKIP
    >>> result.maps.shape  # doctest: +SKIP
    (2, 64, 64)
    """
    import pandas as pd
    from anndata import AnnData

    from c3diff.pp import histology_raster

    tesla, cv2 = _import_tesla()
    if backend not in ("tesla", "vectorized"):
        raise ValueError(f"`backend` must be 'tesla' or 'vectorized', got {backend!r}.")
    genes = check_genes(genes, genes)
    res_float = res_um / image_pixel_size
    res = round(res_float)
    if res < 1 or abs(res - res_float) > 1e-6:
        raise ValueError(
            f"`res_um` ({res_um:g}) must be a whole multiple of `image_pixel_size` ({image_pixel_size:g}): TESLA's "
            "superpixels are `res` image pixels apart."
        )
    t_start = time.perf_counter()
    counts, centres, array_idx, pitch = _lr_spots(
        sdata,
        genes=genes,
        image_key=image_key,
        points_key=points_key,
        lr_key=lr_key,
        lr_pixel_size=lr_pixel_size,
        min_tissue=min_tissue,
        coordinate_system=coordinate_system,
    )

    # Lattice covering the H&E, anchored at `origin`; TESLA's image grid shifted so that superpixel m (pixel index
    # res*m, m >= 1) sits at the centre of lattice cell m - 1.
    hne_geom = raster_geometry(
        get_element(sdata, image_key, "images", arg="image_key"), coordinate_system=coordinate_system, arg="image_key"
    )
    ymin, xmin, ymax, xmax = hne_geom.extent
    oy, ox = origin if origin is not None else (ymin, xmin)
    ly0 = oy - math.ceil((oy - ymin) / res_um - 1e-9) * res_um
    lx0 = ox - math.ceil((ox - xmin) / res_um - 1e-9) * res_um
    n_rows = math.ceil((ymax - ly0) / res_um - 1e-9)
    n_cols = math.ceil((xmax - lx0) / res_um - 1e-9)
    lattice = RasterGeometry(y0=ly0, x0=lx0, sy=res_um, sx=res_um, height=n_rows, width=n_cols)
    p = float(image_pixel_size)
    img_grid = RasterGeometry(
        y0=ly0 - 0.5 * res_um - 0.5 * p,
        x0=lx0 - 0.5 * res_um - 0.5 * p,
        sy=p,
        sx=p,
        height=res * (n_rows + 1),
        width=res * (n_cols + 1),
    )
    rgb, _ = histology_raster(sdata, image_key, grid=img_grid, coordinate_system=coordinate_system)
    img = np.ascontiguousarray(rgb.transpose(1, 2, 0))

    # spots in TESLA's convention: x = row, y = column, in image pixels; array_x/array_y = grid indices
    pixel = np.floor((centres - [img_grid.y0, img_grid.x0]) / p).astype(int)
    spots = pd.DataFrame(
        {"array_x": array_idx[:, 0], "array_y": array_idx[:, 1], "pixel_x": pixel[:, 0], "pixel_y": pixel[:, 1]}
    )
    raw_x = np.log1p(counts) if log1p else counts.copy()
    cnt = tesla.scan_contour(spots, scan_x=True, shape="square")

    t_impute = time.perf_counter()
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TESLA's anndata/pandas idioms warn on recent versions
        if backend == "tesla":
            obs = spots.copy()
            obs.index = [f"spot{i}" for i in range(len(obs))]
            raw = AnnData(raw_x.astype(np.float64), obs=obs, var=pd.DataFrame(index=genes))
            module = importlib.import_module("TESLA.imputation")
            with mock.patch.object(module, "AnnData", _LegacyAnnData):
                sudo = module.imputation(
                    img=img, raw=raw, cnt=cnt, genes=genes, shape="None", res=res, s=s, k=k, num_nbs=num_nbs
                )
            xy = np.column_stack([sudo.obs["x"].to_numpy(), sudo.obs["y"].to_numpy()]).astype(int)
            values = np.asarray(sudo.X, dtype=np.float64)
            order = [list(sudo.var.index).index(g) for g in genes]
            values = values[:, order]
        else:
            xy, values = _vectorized_imputation(tesla, cv2, img, raw_x, pixel, cnt, res=res, s=s, k=k, num_nbs=num_nbs)
    seconds_imputation = time.perf_counter() - t_impute
    if log1p:
        values = np.expm1(values)

    maps = np.zeros((len(genes), n_rows, n_cols), dtype=np.float32)
    covered = np.zeros((n_rows, n_cols), dtype=bool)
    i, j = xy[:, 0] // res - 1, xy[:, 1] // res - 1
    ok = (i >= 0) & (i < n_rows) & (j >= 0) & (j < n_cols)
    maps[:, i[ok], j[ok]] = values[ok].T
    covered[i[ok], j[ok]] = True
    if not covered.any():
        raise RuntimeError("TESLA imputed no superpixel inside the section; check the spots and the contour.")
    if not covered.all():
        from scipy import ndimage

        _, (ni, nj) = ndimage.distance_transform_edt(~covered, return_indices=True)
        maps = maps[:, ni, nj]
    params = {
        "backend": backend,
        "res_um": res_um,
        "res_px": res,
        "image_pixel_size": p,
        "lr_pixel_size": pitch,
        "log1p": log1p,
        "s": s,
        "k": k,
        "num_nbs": num_nbs,
        "min_tissue": min_tissue,
        "n_spots": len(counts),
        "n_superpixels": int(ok.sum()),
        "image_shape": list(img.shape[:2]),
        "seconds_imputation": seconds_imputation,
        "seconds_total": time.perf_counter() - t_start,
        "tesla_version": getattr(tesla, "__version__", "unknown"),
    }
    return TeslaResult(maps=maps, geometry=lattice, covered=covered, genes=list(genes), params=params)


def sample_patches(result: TeslaResult, patches: PatchSet, *, normalize: bool = True) -> np.ndarray:
    """Sample a :class:`TeslaResult` onto each patch's HR pixel centres (through ``patches.origins`` in um).

    Bilinear on the lattice (exact where HR pixel centres are lattice centres); ``normalize`` min-max scales each
    (patch, gene) map to [0, 1] (constant maps become 0). Returns float32 ``(N, G, H, H)`` in ``patches.genes``
    order.
    """
    from scipy import ndimage

    from c3diff.pp import minmax_normalize

    genes = check_genes(patches.genes, result.genes, arg="patches.genes (genes TESLA imputed)")
    channels = [result.genes.index(g) for g in genes]
    hr_px = float(patches.params["hr_pixel_size"])
    size = int(patches.params["hr_size"])
    geom = result.geometry
    out = np.empty((len(patches), len(genes), size, size), dtype=np.float32)
    centres = (np.arange(size) + 0.5) * hr_px
    for n, (oy, ox) in enumerate(patches.origins):
        fy = (oy + centres - geom.y0) / geom.sy - 0.5
        fx = (ox + centres - geom.x0) / geom.sx - 0.5
        coords = np.stack(np.meshgrid(fy, fx, indexing="ij"))
        for g, c in enumerate(channels):
            out[n, g] = ndimage.map_coordinates(result.maps[c], coords, order=1, mode="nearest")
    if normalize:
        out, _, _ = minmax_normalize(out)
    return out


def tesla_predict(
    sdata: SpatialData,
    patches: PatchSet,
    *,
    genes: list[str] | None = None,
    image_key: str = "hne",
    points_key: str | None = "transcripts",
    lr_key: str | None = None,
    lr_pixel_size: float = 100.0,
    res_um: float | None = None,
    image_pixel_size: float = 2.0,
    backend: Literal["tesla", "vectorized"] = "tesla",
    return_result: bool = False,
    **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, TeslaResult]:
    """TESLA's super-resolved maps for the patches of one section, scored like C3-Diff's.

    Parameters
    ----------
    sdata
        The section the patches were cut from.
    patches
        Its patches (from :func:`c3diff.pp.make_patches`; one sample).
    genes
        Genes to predict; default ``patches.genes``. The output follows this order.
    image_key, points_key, lr_key, lr_pixel_size, image_pixel_size, backend
        See :func:`tesla_impute`.
    res_um
        Superpixel spacing; default the patches' HR pixel size (10 um at 10x, 20 um at 5x). A 10 um lattice also
        serves 5x patches (each 20 um pixel is then the mean of 2 x 2 superpixels).
    return_result
        Also return the section-level :class:`TeslaResult` (to sample other patches from it).
    **kwargs
        Passed to :func:`tesla_impute` (``log1p``, ``s``, ``k``, ``num_nbs``, ``min_tissue``, ``verbose``).

    Returns
    -------
    float32 ``(N, G, H, H)`` in [0, 1], min-max normalised per (patch, gene); with ``return_result`` also the
    :class:`TeslaResult`.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(width=1280, height=1280, seed=0)  # doctest: +SKIP
    >>> patches = c3.pp.make_patches(sdata, genes=["ERBB2"], points_key="transcripts", patch_size=64)  # doctest: +SKIP
    >>> tesla_predict(sdata, patches, backend="vectorized").shape[1:]  # doctest: +SKIP
    (1, 64, 64)
    """
    if len(np.unique(patches.sample_id)) > 1:
        raise ValueError(
            f"`patches` holds {len(np.unique(patches.sample_id))} samples ({patches.samples}); TESLA runs on one "
            "section: pass `patches.subset(samples=[...])` with that section's `sdata`."
        )
    genes = check_genes(patches.genes if genes is None else genes, patches.genes, arg="genes")
    if res_um is None:
        res_um = float(patches.params["hr_pixel_size"])
    origin = tuple(float(v) for v in patches.origins[0]) if len(patches) else None
    result = tesla_impute(
        sdata,
        genes=genes,
        image_key=image_key,
        points_key=points_key,
        lr_key=lr_key,
        lr_pixel_size=lr_pixel_size,
        res_um=res_um,
        origin=origin,
        image_pixel_size=image_pixel_size,
        backend=backend,
        **kwargs,
    )
    subset = patches if genes == list(patches.genes) else _with_genes(patches, genes)
    pred = sample_patches(result, subset)
    return (pred, result) if return_result else pred


def _with_genes(patches: PatchSet, genes: list[str]) -> PatchSet:
    from dataclasses import replace

    idx = [patches.genes.index(g) for g in genes]
    pick = {
        n: (None if getattr(patches, n) is None else getattr(patches, n)[:, idx])
        for n in ("lr", "lr_low", "lr_high", "hr", "hr_low", "hr_high")
    }
    return replace(patches, **pick, genes=list(genes))


def _smoke() -> None:
    """A small simulated section (1.28 mm): TESLA (both backends) vs bicubic on 64 px patches, 10x and 5x."""
    import c3diff as c3

    from .unet_regressor import bicubic_predict

    sdata = c3.datasets.simulate_section(width=1280, height=1280, seed=0, progress=False)
    genes = c3.pp.select_genes(sdata, table_key="cell_table", n_top_genes=6, inplace=False)
    for scale in (10, 5):
        patches = c3.pp.make_patches(
            sdata, genes=genes, points_key="transcripts", scale=scale, patch_size=64, stride=30
        )
        t0 = time.perf_counter()
        pred, result = tesla_predict(sdata, patches, backend="vectorized", return_result=True)
        seconds = {"vectorized": time.perf_counter() - t0}
        preds = {"tesla_vectorized": pred}
        if scale == 5:  # the package's Python loops: ~5 us per (superpixel, spot) pair, so only on the coarser grid
            t0 = time.perf_counter()
            preds["tesla_package"] = tesla_predict(sdata, patches, backend="tesla")
            seconds["package"] = time.perf_counter() - t0
        preds["bicubic"] = bicubic_predict(patches)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = {
                name: c3.metrics.summarize_scores(c3.metrics.score_maps(p, patches.hr, genes=genes))
                for name, p in preds.items()
            }
        timing = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
        print(
            f"scale {scale}x: {len(patches)} patches, {len(genes)} genes, {result.params['n_spots']} spots, "
            f"{result.params['n_superpixels']} superpixels; TESLA {timing}"
        )
        if "tesla_package" in preds:
            print(f"  max |package - vectorised| = {np.abs(preds['tesla_package'] - pred).max():.2e}")
        for name, frame in rows.items():
            print(
                f"  {name:>17}: rmse {frame['rmse'].item():.3f}  pcc {frame['pcc'].item():.3f}  "
                f"ssim {frame['ssim'].item():.3f}"
            )


if __name__ == "__main__":
    _smoke()
