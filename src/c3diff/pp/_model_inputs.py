"""SpatialData -> a model's inputs, for training (:func:`~c3diff.pp.make_patches`) and inference
(:func:`c3diff.tl.super_resolve`) alike: the H&E at the model's pixel size, the LR maps and their coverage mask on the
H&E-anchored grid, windows cut with one padding policy, and the 100 um -> 10/20 um scale arithmetic
(:doc:`/method`, *Geometry*)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import COORDINATE_SYSTEM, HISTOLOGY_PIXEL_SIZE, LR_PIXEL_SIZE, MASK_MEASURED, MASK_OUTSIDE
from c3diff._geometry import RasterGeometry, raster_geometry, scale0
from c3diff._validation import check_genes, get_element
from c3diff.pp._binning import bin_transcripts
from c3diff.pp._histology import detect_tissue, histology_raster
from c3diff.pp._spots import spots_to_grid

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: What a window holds past the edge of the data, for training and inference alike: the gene maps (LR counts, HR
#: truth) repeat their edge values - a neutral context, no change that min-max normalisation or the model would read
#: as a pattern - while the LR mask says "outside" (so the calibration leaves those pixels alone); the H&E shows
#: bare glass (white), the tissue mask no tissue and the texture its slide mean (0).
PADDING = {"histology": 255, "tissue": False, "lr": "edge", "lr_mask": MASK_OUTSIDE, "hr": "edge", "texture": 0.0}


def _whole(ratio: float) -> int | None:
    n = round(ratio)
    return n if n >= 1 and abs(ratio - n) <= 1e-6 * max(1.0, ratio) else None


@dataclass(frozen=True)
class ModelGeometry:
    """Pixel sizes of a model's inputs and outputs, and the arithmetic between them.

    A model sees the H&E at ``histology_pixel_size`` and LR maps at ``lr_pixel_size`` (um per pixel) and predicts
    maps on its histology grid; ``scale=10`` is that grid and ``scale=5`` its 2 x 2 blocks, so the output pixel is
    ``histology_pixel_size * 10 / scale``. The paper's geometry (the defaults): 10 um histology and 100 um LR, output
    10 um at 10x and 20 um at 5x. An LR pixel must cover whole output pixels.

    Examples
    --------
    >>> from c3diff.pp import ModelGeometry
    >>> geometry = ModelGeometry(scale=5)
    >>> geometry.hr_pixel_size, geometry.lr_factor, geometry.hr_factor, geometry.hr_per_lr, geometry.lr_size(256)
    (20.0, 10, 2, 5, 26)
    """

    histology_pixel_size: float = HISTOLOGY_PIXEL_SIZE
    lr_pixel_size: float = LR_PIXEL_SIZE
    scale: int = 10

    def __post_init__(self) -> None:
        from c3diff._validation import check_scale

        check_scale(self.scale)
        if not (self.histology_pixel_size > 0 and self.lr_pixel_size > 0):
            raise ValueError(f"Pixel sizes must be positive, got {self.describe()}.")
        lr_factor = _whole(self.lr_pixel_size / self.histology_pixel_size)
        if lr_factor is None or lr_factor % self.hr_factor:
            raise ValueError(f"An LR pixel must cover whole output pixels; {self.describe()} does not.")

    @classmethod
    def of_model(cls, config: Any) -> ModelGeometry:
        """The geometry stored in a model's config (``histology_pixel_size``, ``lr_pixel_size``; the paper's values
        where absent), at the model's ``scale``. A config whose HR grid (``hr_pixel_size``) is not its histology
        grid, or whose LR pixel is not whole output pixels, is refused naming its geometry."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        histology = float(get("histology_pixel_size", HISTOLOGY_PIXEL_SIZE))
        hr = float(get("hr_pixel_size", histology) or histology)
        stored = (
            f"histology_pixel_size={histology:g}, hr_pixel_size={hr:g}, "
            f"lr_pixel_size={float(get('lr_pixel_size', LR_PIXEL_SIZE)):g}, scale={get('scale', 10)!r}"
        )
        if abs(hr - histology) > 1e-6 * histology:
            raise ValueError(
                f"The model's stored geometry ({stored}) predicts on a {hr:g} um grid from {histology:g} um "
                "histology; super_resolve and make_patches cut maps and histology on one grid (hr_pixel_size == "
                "histology_pixel_size). Check the model's config.json."
            )
        try:
            return cls(
                histology_pixel_size=histology,
                lr_pixel_size=float(get("lr_pixel_size", LR_PIXEL_SIZE)),
                scale=int(get("scale", 10)),
            )
        except ValueError as err:
            raise ValueError(f"The model's stored geometry ({stored}) cannot be used: {err}") from None

    def describe(self) -> str:
        return (
            f"histology {self.histology_pixel_size:g} um/px, LR {self.lr_pixel_size:g} um/px, {self.scale}x "
            f"(output {self.hr_pixel_size:g} um/px)"
        )

    @property
    def hr_factor(self) -> int:
        """Histology pixels per output (HR) pixel along one axis: 1 at 10x, 2 at 5x."""
        return 10 // self.scale

    @property
    def hr_pixel_size(self) -> float:
        """um per output (HR) pixel."""
        return self.histology_pixel_size * self.hr_factor

    @property
    def lr_factor(self) -> int:
        """Histology pixels per LR pixel along one axis."""
        return round(self.lr_pixel_size / self.histology_pixel_size)

    @property
    def hr_per_lr(self) -> int:
        """Output pixels per LR pixel along one axis."""
        return self.lr_factor // self.hr_factor

    def lr_size(self, size: int) -> int:
        """LR pixels that cover ``size`` histology pixels."""
        return math.ceil(size / self.lr_factor)

    def hr_size(self, size: int) -> int:
        """Output pixels in ``size`` histology pixels."""
        return size // self.hr_factor

    def at_scale(self, scale: int) -> ModelGeometry:
        """The same inputs, predicting at ``scale`` (5x from a 10x model: its 2 x 2 blocks)."""
        return replace(self, scale=int(scale))


def window(array: np.ndarray, row: int, col: int, size: int, fill: Any) -> np.ndarray:
    """``array[..., row:row+size, col:col+size]``; where the window runs past the array (on any side) it holds
    ``fill``, or with ``fill="edge"`` the array's nearest edge values. The one windowing function of the model
    inputs; ``fill`` comes from :data:`PADDING`.

    Examples
    --------
    >>> window(np.arange(4).reshape(2, 2), 1, 1, 2, "edge")
    array([[3, 3],
           [3, 3]])
    >>> window(np.arange(4).reshape(2, 2), 1, 1, 2, 0)
    array([[3, 0],
           [0, 0]])
    """
    h, w = array.shape[-2:]
    r0, c0, r1, c1 = max(row, 0), max(col, 0), min(row + size, h), min(col + size, w)
    if r0 == row and c0 == col and r1 == row + size and c1 == col + size:
        return array[..., row : row + size, col : col + size].copy()
    if isinstance(fill, str):
        if fill != "edge":
            raise ValueError(f"`fill` must be a value or 'edge', got {fill!r}.")
        rows = np.clip(np.arange(row, row + size), 0, h - 1)
        cols = np.clip(np.arange(col, col + size), 0, w - 1)
        return array[..., rows[:, None], cols[None, :]]
    out = np.full((*array.shape[:-2], size, size), fill, dtype=array.dtype)
    if r1 > r0 and c1 > c0:
        out[..., r0 - row : r1 - row, c0 - col : c1 - col] = array[..., r0:r1, c0:c1]
    return out


def _offset(source: RasterGeometry, histology: RasterGeometry, *, arg: str) -> tuple[int, int]:
    """Offset of ``source``'s corner from the histology grid's corner, in histology pixels (must be whole)."""
    oy, ox = (source.y0 - histology.y0) / histology.sy, (source.x0 - histology.x0) / histology.sx
    if abs(oy - round(oy)) > 1e-3 or abs(ox - round(ox)) > 1e-3:
        raise ValueError(
            f"`{arg}`'s grid (corner y={source.y0:g}, x={source.x0:g} um) is not aligned with the H&E's "
            f"{histology.sy:g} um grid (corner y={histology.y0:g}, x={histology.x0:g} um). Rebuild it with "
            "`image_key` set to the H&E so both grids start at the same corner."
        )
    return round(oy), round(ox)


def _gene_raster(sdata: SpatialData, key: str, genes: list[str], *, arg: str, coordinate_system: str):
    element = get_element(sdata, key, "images", arg=arg)
    data = scale0(element)
    if "c" not in data.dims:
        raise ValueError(f"`{arg}={key!r}` must be a gene raster with a channel axis `c` of gene names.")
    check_genes(genes, [str(c) for c in data.coords["c"].values], arg=f"genes (channels of `{arg}={key!r}`)")
    values = np.asarray(data.sel(c=genes).data, dtype=np.float32)
    return values, raster_geometry(element, coordinate_system=coordinate_system, arg=arg)


@dataclass
class ModelInputs:
    """A section's model inputs on the H&E-anchored grids (see :func:`model_inputs`).

    Attributes
    ----------
    geometry
        The :class:`ModelGeometry` they were built for.
    histology
        uint8 ``(3, H, W)``: the H&E at ``geometry.histology_pixel_size`` (white outside the image).
    grid
        The histology grid's placement.
    tissue
        bool ``(H, W)``: tissue detected in the H&E.
    genes
        Gene names, the channel order of ``lr`` and ``hr``.
    lr, lr_mask, lr_grid
        float32 ``(G, h, w)`` LR counts per LR pixel, uint8 ``(h, w)`` coverage (outside / measured / filled) and
        the LR grid's placement; ``None`` until :meth:`add_lr`.
    hr, hr_grid
        float32 ``(G, h', w')`` HR counts (ground truth) and its grid; ``None`` unless :meth:`add_hr` found some.
    texture
        float32 ``(K, H, W)``: the H&E's texture on the histology grid (:func:`~c3diff.pp.histology_texture`);
        ``None`` until :meth:`add_texture`.
    sources
        Where each input came from (element keys), for provenance.
    """

    geometry: ModelGeometry
    histology: np.ndarray
    grid: RasterGeometry
    tissue: np.ndarray
    coordinate_system: str = COORDINATE_SYSTEM
    genes: list[str] = field(default_factory=list)
    lr: np.ndarray | None = None
    lr_mask: np.ndarray | None = None
    lr_grid: RasterGeometry | None = None
    hr: np.ndarray | None = None
    hr_grid: RasterGeometry | None = None
    texture: np.ndarray | None = None
    sources: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_histology(
        cls,
        sdata: SpatialData,
        image_key: str,
        *,
        geometry: ModelGeometry | None = None,
        coordinate_system: str = COORDINATE_SYSTEM,
    ) -> ModelInputs:
        """The H&E of ``image_key`` resampled to the model's histology pixel size, and its tissue mask."""
        geometry = geometry or ModelGeometry()
        pixel_size = geometry.histology_pixel_size
        rgb, grid = histology_raster(sdata, image_key, pixel_size=pixel_size, coordinate_system=coordinate_system)
        return cls(
            geometry=geometry,
            histology=rgb,
            grid=grid,
            tissue=detect_tissue(rgb, pixel_size=pixel_size),
            coordinate_system=coordinate_system,
            sources={"image_key": image_key},
        )

    def add_lr(
        self,
        sdata: SpatialData,
        *,
        genes: list[str],
        image_key: str,
        table_key: str | None = None,
        points_key: str | None = None,
        lr_key: str | None = None,
    ) -> ModelInputs:
        """The LR maps at ``geometry.lr_pixel_size`` from one source - an LR gene raster (``lr_key``, with its mask
        ``f"{lr_key}_mask"`` when present), spots gridded with :func:`~c3diff.pp.spots_to_grid` (``table_key``) or
        transcripts binned with :func:`~c3diff.pp.bin_transcripts` (``points_key``) - on a grid anchored at the H&E
        (``image_key``). Returns ``self``."""
        px, cs = self.geometry.lr_pixel_size, self.coordinate_system
        self.genes = list(genes)
        mask = None
        if lr_key is not None:
            lr, grid = _gene_raster(sdata, lr_key, self.genes, arg="lr_key", coordinate_system=cs)
            if f"{lr_key}_mask" in sdata.labels:
                mask = np.asarray(scale0(sdata.labels[f"{lr_key}_mask"]).data, dtype=np.uint8)
            self.sources["lr_key"] = lr_key
        elif table_key is not None:
            raster, labels = spots_to_grid(
                sdata,
                table_key=table_key,
                pixel_size=px,
                genes=self.genes,
                image_key=image_key,
                inplace=False,
                coordinate_system=cs,
            )
            lr, grid = np.asarray(raster.data, dtype=np.float32), raster_geometry(raster, coordinate_system=cs)
            mask = np.asarray(labels.data, dtype=np.uint8)
            self.sources["table_key"] = table_key
        elif points_key is not None:
            lr, grid = self._binned(sdata, points_key, px, image_key)
            self.sources["lr_from"] = f"{points_key} binned at {px:g} um"
        else:
            raise ValueError(
                "No LR source: pass `lr_key` (an LR gene raster), `table_key` (a spot table) or `points_key` "
                "(transcripts)."
            )
        if abs(grid.sy - px) > 1e-6 or abs(grid.sx - px) > 1e-6:
            raise ValueError(f"The LR raster has {grid.sy:g} um pixels; the model's LR maps are {px:g} um.")
        _offset(grid, self.grid, arg="the LR source")
        self.lr, self.lr_grid = lr, grid
        self.lr_mask = np.full(lr.shape[-2:], MASK_MEASURED, dtype=np.uint8) if mask is None else mask
        return self

    def add_hr(
        self,
        sdata: SpatialData,
        *,
        image_key: str,
        hr_key: str | None = None,
        points_key: str | None = None,
    ) -> ModelInputs:
        """HR ground truth at ``geometry.hr_pixel_size`` for the genes of :meth:`add_lr`: a gene raster aligned
        with the H&E (``hr_key``) or transcripts binned (``points_key``); neither: no truth. Returns ``self``."""
        px, cs = self.geometry.hr_pixel_size, self.coordinate_system
        if hr_key is not None:
            hr, grid = _gene_raster(sdata, hr_key, self.genes, arg="hr_key", coordinate_system=cs)
            if abs(grid.sy - px) > 1e-6 or abs(grid.sx - px) > 1e-6:
                raise ValueError(
                    f"`hr_key={hr_key!r}` has {grid.sy:g} um pixels; scale {self.geometry.scale} needs {px:g} um."
                )
            self.sources["hr_key"] = hr_key
        elif points_key is not None:
            hr, grid = self._binned(sdata, points_key, px, image_key)
            self.sources["points_key"] = points_key
        else:
            return self
        hr_dy, hr_dx = _offset(grid, self.grid, arg="the HR source")
        lr_dy, lr_dx = self.lr_offset
        factor = self.geometry.hr_factor
        if (hr_dy - lr_dy) % factor or (hr_dx - lr_dx) % factor:
            raise ValueError(
                "The HR and LR grids are not aligned with each other; build both with the same `image_key`."
            )
        self.hr, self.hr_grid = hr, grid
        return self

    def _binned(
        self, sdata: SpatialData, points_key: str, bin_size: float, image_key: str
    ) -> tuple[np.ndarray, RasterGeometry]:
        """The genes' transcripts counted in ``bin_size`` bins anchored at the H&E, and the bins' grid."""
        cs = self.coordinate_system
        raster = bin_transcripts(
            sdata,
            points_key=points_key,
            bin_size=bin_size,
            genes=self.genes,
            image_key=image_key,
            inplace=False,
            coordinate_system=cs,
        )
        return np.asarray(raster.data, dtype=np.float32), raster_geometry(raster, coordinate_system=cs)

    def add_texture(self, sdata: SpatialData, *, image_key: str) -> ModelInputs:
        """The texture of the H&E (:func:`~c3diff.pp.histology_texture`, standardised over the tissue) on the
        histology grid, for models whose mean network reads it. Returns ``self``."""
        from c3diff.pp._texture import histology_texture

        self.texture = histology_texture(
            sdata, image_key, grid=self.grid, tissue=self.tissue, coordinate_system=self.coordinate_system
        )
        return self

    def texture_window(self, row: int, col: int, size: int) -> np.ndarray:
        """The texture ``(K, size, size)`` at ``(row, col)``, padded by :data:`PADDING`."""
        if self.texture is None:
            raise ValueError("No texture: call `add_texture` first.")
        return window(self.texture, row, col, size, PADDING["texture"])

    @property
    def lr_offset(self) -> tuple[int, int]:
        """The LR grid's corner relative to the histology grid's, in histology pixels."""
        return _offset(self.lr_grid, self.grid, arg="the LR source")

    @property
    def phase(self) -> tuple[int, int]:
        """The first histology row and column on an LR pixel's corner: windows start there, every LR pixel."""
        dy, dx = self.lr_offset
        return dy % self.geometry.lr_factor, dx % self.geometry.lr_factor

    def covered_tissue(self) -> np.ndarray:
        """The tissue where the LR source has data (its mask not "outside"), on the histology grid."""
        factor = self.geometry.lr_factor
        dy, dx = self.lr_offset
        h, w = self.tissue.shape
        rows = np.clip((np.arange(h) - dy) // factor, -1, None)
        cols = np.clip((np.arange(w) - dx) // factor, -1, None)
        inside = (rows[:, None] >= 0) & (rows[:, None] < self.lr_mask.shape[0])
        inside = inside & (cols[None, :] >= 0) & (cols[None, :] < self.lr_mask.shape[1])
        covered = np.zeros((h, w), dtype=bool)
        rr, cc = np.nonzero(inside)
        covered[rr, cc] = self.lr_mask[rows[rr], cols[cc]] != MASK_OUTSIDE
        return self.tissue & covered

    def _lr_corner(self, row: int, col: int) -> tuple[int, int]:
        dy, dx = self.lr_offset
        factor = self.geometry.lr_factor
        if (row - dy) % factor or (col - dx) % factor:
            raise ValueError(
                f"A window at histology pixel ({row}, {col}) does not start on an LR pixel's corner (every {factor} "
                f"px from ({dy % factor}, {dx % factor})); its LR window would be shifted."
            )
        return (row - dy) // factor, (col - dx) // factor

    def lr_window(self, row: int, col: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The LR counts ``(G, L, L)`` and mask ``(L, L)`` under the ``size``-pixel histology window at
        ``(row, col)`` (``L = geometry.lr_size(size)``), padded by :data:`PADDING`."""
        r, c = self._lr_corner(row, col)
        n = self.geometry.lr_size(size)
        return window(self.lr, r, c, n, PADDING["lr"]), window(self.lr_mask, r, c, n, PADDING["lr_mask"])

    def histology_window(self, row: int, col: int, size: int) -> np.ndarray:
        """The H&E ``(3, size, size)`` at ``(row, col)``, padded by :data:`PADDING`."""
        return window(self.histology, row, col, size, PADDING["histology"])

    def tissue_window(self, row: int, col: int, size: int) -> np.ndarray:
        """The tissue mask ``(size, size)`` at ``(row, col)``, padded by :data:`PADDING`."""
        return window(self.tissue, row, col, size, PADDING["tissue"])

    def hr_window(self, row: int, col: int, size: int) -> np.ndarray:
        """The HR truth ``(G, H, H)`` under the ``size``-pixel histology window at ``(row, col)``
        (``H = geometry.hr_size(size)``), padded by :data:`PADDING`."""
        dy, dx = _offset(self.hr_grid, self.grid, arg="the HR source")
        factor = self.geometry.hr_factor
        return window(self.hr, (row - dy) // factor, (col - dx) // factor, self.geometry.hr_size(size), PADDING["hr"])


def model_inputs(
    sdata: SpatialData,
    *,
    image_key: str,
    genes: list[str],
    geometry: ModelGeometry | None = None,
    table_key: str | None = None,
    points_key: str | None = None,
    lr_key: str | None = None,
    hr_key: str | None = None,
    truth: bool = False,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> ModelInputs:
    """Build a model's inputs from a section: the H&E at the model's histology pixel size and its tissue mask, the
    LR maps and their coverage mask, and (with ``truth``) HR ground truth, all on grids anchored at the H&E's corner.

    Training (:func:`~c3diff.pp.make_patches`) and inference (:func:`c3diff.tl.super_resolve`) both cut their windows
    from these, with one padding policy (:data:`PADDING`).

    Parameters
    ----------
    sdata
        The section.
    image_key
        The H&E image.
    genes
        Genes, in the model's order.
    geometry
        The model's pixel sizes and scale (:class:`ModelGeometry`; the paper's 10 / 100 um at 10x by default).
    table_key, points_key, lr_key
        The LR source (see :meth:`ModelInputs.add_lr`): a spot table, transcripts, or an LR gene raster; the first
        given of ``lr_key``, ``table_key``, ``points_key`` is used.
    hr_key
        HR ground truth raster (with ``truth``); else the transcripts of ``points_key`` are binned.
    truth
        Also build HR ground truth.
    coordinate_system
        Coordinate system (micrometres) shared by all elements.

    Returns
    -------
    A :class:`ModelInputs`.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> inputs = c3.pp.model_inputs(sdata, image_key="hne", genes=["GATA3"], points_key="transcripts")  # doctest: +SKIP
    >>> inputs.lr_window(0, 0, 256)[0].shape  # doctest: +SKIP
    (1, 26, 26)
    """
    inputs = ModelInputs.from_histology(sdata, image_key, geometry=geometry, coordinate_system=coordinate_system)
    inputs.add_lr(sdata, genes=genes, image_key=image_key, table_key=table_key, points_key=points_key, lr_key=lr_key)
    if truth:
        inputs.add_hr(sdata, image_key=image_key, hr_key=hr_key, points_key=points_key)
    return inputs
