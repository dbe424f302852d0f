"""SpatialData -> the paper's training tensors: histology, LR and HR patches (:doc:`/method`, *Geometry*)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from c3diff._constants import ATTRS_KEY, COORDINATE_SYSTEM
from c3diff._validation import check_genes, check_scale
from c3diff.pp._model_inputs import ModelGeometry, ModelInputs
from c3diff.pp._normalize import minmax_denormalize, minmax_normalize

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

_ARRAYS = (
    "histology",
    "tissue",
    "lr",
    "lr_low",
    "lr_high",
    "lr_mask",
    "hr",
    "hr_low",
    "hr_high",
    "origins",
    "sample_id",
    "texture",
)


@dataclass
class PatchSet:
    """Training/inference patches of one or more sections, in the paper's geometry.

    Attributes
    ----------
    histology
        uint8 ``(n, 3, S, S)``: H&E at ``histology_pixel_size`` um/px (divide by 255 for the model).
    tissue
        bool ``(n, S, S)``: tissue mask on the histology grid.
    lr
        float32 ``(n, G, L, L)``: LR maps, per (patch, gene) min-max normalised to [0, 1].
    lr_low, lr_high
        float32 ``(n, G)``: each LR map's min and max before normalisation (counts per LR pixel).
    lr_mask
        uint8 ``(n, L, L)``: 0 outside tissue / past the data, 1 measured, 2 filled between spots.
    hr, hr_low, hr_high
        Like ``lr`` for the HR ground truth ``(n, G, H, H)`` (H = S at 10x, S/2 at 5x), or ``None`` without truth.
    origins
        float64 ``(n, 2)``: (y, x) of each patch's top-left corner in micrometres (``coordinate_system``).
    sample_id
        str ``(n,)``: the section/patient each patch comes from (splits are made on this, never on patches).
    texture
        float16 ``(n, K, S, S)``: the H&E's texture on the histology grid (:func:`~c3diff.pp.histology_texture`,
        standardised per section), for models whose mean network reads it; ``None`` unless made with
        ``texture=True``.
    genes
        Gene names, channel order.
    params
        Geometry and provenance (scale, pixel sizes, patch size, stride, normalisation, sources).
    """

    histology: np.ndarray
    tissue: np.ndarray
    lr: np.ndarray
    lr_low: np.ndarray
    lr_high: np.ndarray
    lr_mask: np.ndarray
    hr: np.ndarray | None
    hr_low: np.ndarray | None
    hr_high: np.ndarray | None
    origins: np.ndarray
    sample_id: np.ndarray
    genes: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    texture: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.histology.shape[0])

    def __repr__(self) -> str:
        hr = "none" if self.hr is None else "x".join(map(str, self.hr.shape[1:]))
        return (
            f"PatchSet({len(self)} patches from {len(np.unique(self.sample_id))} sample(s), {len(self.genes)} genes, "
            f"scale {self.params.get('scale')}x, histology {self.histology.shape[-1]} px, "
            f"LR {self.lr.shape[-1]} px, HR {hr})"
        )

    @property
    def scale(self) -> int:
        return int(self.params["scale"])

    @property
    def samples(self) -> list[str]:
        """Sample ids in order of first appearance."""
        return list(dict.fromkeys(self.sample_id.tolist()))

    def hr_counts(self, index: int | slice | np.ndarray = slice(None)) -> np.ndarray:
        """HR maps mapped back to the input units (counts per HR pixel)."""
        if self.hr is None:
            raise ValueError("This PatchSet has no HR ground truth (made without `hr_key`/`points_key`).")
        return minmax_denormalize(self.hr[index], self.hr_low[index], self.hr_high[index])

    def lr_counts(self, index: int | slice | np.ndarray = slice(None)) -> np.ndarray:
        """LR maps mapped back to the input units (counts per LR pixel)."""
        return minmax_denormalize(self.lr[index], self.lr_low[index], self.lr_high[index])

    def subset(self, *, samples: list[str] | None = None, index: np.ndarray | None = None) -> PatchSet:
        """The patches of the given samples (or at the given indices)."""
        if (samples is None) == (index is None):
            raise ValueError("Pass exactly one of `samples` or `index`.")
        if samples is not None:
            unknown = sorted(set(samples) - set(self.sample_id.tolist()))
            if unknown:
                raise KeyError(f"`samples`: unknown sample id(s) {unknown}; this PatchSet has {self.samples}.")
            index = np.flatnonzero(np.isin(self.sample_id, list(samples)))
        return self._take(np.asarray(index))

    def _take(self, index: np.ndarray) -> PatchSet:
        taken = {name: (None if getattr(self, name) is None else getattr(self, name)[index]) for name in _ARRAYS}
        return replace(self, **taken, genes=list(self.genes), params=dict(self.params))

    @classmethod
    def concat(cls, patchsets: list[PatchSet]) -> PatchSet:
        """Concatenate patch sets of identical genes and geometry (e.g. several sections)."""
        if not patchsets:
            raise ValueError("`patchsets` is empty.")
        first = patchsets[0]
        geometry_keys = ("scale", "patch_size", "hr_pixel_size", "lr_pixel_size", "histology_pixel_size")
        for other in patchsets[1:]:
            if other.genes != first.genes:
                raise ValueError("Cannot concatenate PatchSets with different genes (or gene order).")
            for k in geometry_keys:
                if other.params.get(k) != first.params.get(k):
                    raise ValueError(
                        f"Cannot concatenate PatchSets with different {k}: "
                        f"{first.params.get(k)} vs {other.params.get(k)}."
                    )
            if (other.hr is None) != (first.hr is None):
                raise ValueError("Cannot concatenate PatchSets with and without HR ground truth.")
            if (other.texture is None) != (first.texture is None):
                raise ValueError(
                    "Cannot concatenate PatchSets with and without texture; make them all with the same `texture`."
                )
        arrays = {
            name: (None if getattr(first, name) is None else np.concatenate([getattr(p, name) for p in patchsets]))
            for name in _ARRAYS
        }
        params = {k: first.params[k] for k in first.params if k in geometry_keys or k == "normalization"}
        params["sources"] = [p.params.get("sources") for p in patchsets]
        return cls(**arrays, genes=list(first.genes), params=params)

    def save(self, path: str | Path) -> None:
        """Write to a ``.npz`` file (arrays + genes + params as JSON)."""
        arrays = {n: getattr(self, n) for n in _ARRAYS if getattr(self, n) is not None}
        arrays["sample_id"] = self.sample_id.astype(str)
        meta = json.dumps({"genes": self.genes, "params": self.params})
        np.savez(Path(path), __meta__=np.array(meta), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> PatchSet:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No patch file at {str(path)!r}; write one with `PatchSet.save`.")
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["__meta__"]))
            arrays = {n: (f[n] if n in f.files else None) for n in _ARRAYS}
        return cls(**arrays, genes=meta["genes"], params=meta["params"])

    def dataset(self, **kwargs: Any):
        """A :class:`~c3diff.pp.PatchDataset` over (patch, gene) pairs; keyword arguments are passed on."""
        from c3diff.pp._dataset import PatchDataset

        return PatchDataset(self, **kwargs)


def _default_sample_id(sdata: SpatialData) -> str:
    attrs = sdata.attrs.get(ATTRS_KEY, {})
    if "sample_id" in attrs:
        return str(attrs["sample_id"])
    if "simulation" in attrs and "seed" in attrs["simulation"].get("params", attrs["simulation"]):
        sim = attrs["simulation"].get("params", attrs["simulation"])
        return f"simulated_seed{sim['seed']}"
    if "reader" in attrs and "path" in attrs["reader"]:
        return Path(str(attrs["reader"]["path"])).name
    return "sample"


def make_patches(
    sdata: SpatialData,
    *,
    image_key: str = "hne",
    genes: list[str],
    hr_key: str | None = None,
    points_key: str | None = None,
    lr_key: str | None = None,
    table_key: str | None = None,
    scale: int = 10,
    patch_size: int = 256,
    stride: int | None = None,
    min_tissue: float = 0.5,
    sample_id: str | None = None,
    geometry: ModelGeometry | None = None,
    texture: bool = False,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> PatchSet:
    """Cut a section into the paper's training/inference patches.

    The histology is resampled from the H&E (through its transform) to 10 um/px (the ``geometry``'s histology pixel
    size); a patch is ``patch_size`` pixels square (the paper: 256 px = 2.56 mm). Its LR map is the
    ``ceil(patch_size * 10 / 100)`` LR pixels (100 um) starting at the same corner; its HR map covers the patch at
    10 um (``scale=10``) or 20 um (``scale=5``). Windows are cut from :class:`~c3diff.pp.ModelInputs`, as
    :func:`c3diff.tl.super_resolve` cuts its tiles.
    Maps are min-max normalised per (patch, gene) (:doc:`/method`, *Normalisation and units*), the ranges kept.

    Parameters
    ----------
    sdata
        The section.
    image_key
        The H&E image.
    genes
        Genes, in the model's order.
    hr_key
        HR ground truth: a gene raster at the HR pixel size aligned with the H&E (e.g. from
        :func:`~c3diff.pp.bin_transcripts` with ``image_key``).
    points_key
        Transcripts to bin for the HR truth (when ``hr_key`` is not given) and for the LR maps (100 um bins, when
        neither ``lr_key`` nor ``table_key`` is given).
    lr_key
        LR maps: a gene raster at 100 um aligned with the H&E (from :func:`~c3diff.pp.spots_to_grid` or
        :func:`~c3diff.pp.bin_transcripts`). Its coverage mask ``f"{lr_key}_mask"`` is used when present.
    table_key
        A spot table to grid (with :func:`~c3diff.pp.spots_to_grid`) for the LR maps.
    scale
        10 (HR 10 um/px) or 5 (HR 20 um/px).
    patch_size
        Patch edge in histology pixels (10 um).
    stride
        Step between patch corners in histology pixels. Default: the largest multiple of the LR pixel (10 px) not
        above ``patch_size`` (250 for 256), so every patch's LR window lies on the LR grid.
    min_tissue
        Minimum fraction of tissue in a patch; patches with less are skipped.
    sample_id
        The section's sample/patient id. Default: ``sdata.attrs["c3diff"]["sample_id"]``, else derived from the
        simulation seed or the reader's path.
    texture
        Also cut the H&E's texture (:func:`~c3diff.pp.histology_texture`; needs the H&E at 2.5 um/px or finer), for
        models whose mean network reads it (``mean_net_config["texture_channels"]``).
    geometry
        The model's pixel sizes (:class:`~c3diff.pp.ModelGeometry`, e.g. ``ModelGeometry.of_model(model.config)``;
        its scale is replaced by ``scale``). Default: the paper's 10 um histology and 100 um LR maps.
    coordinate_system
        Coordinate system (micrometres) shared by all elements.

    Returns
    -------
    A :class:`PatchSet`; without ground truth (no ``hr_key``/``points_key``) its ``hr`` is ``None``.

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> patches = c3.pp.make_patches(sdata, genes=["GATA3", "CD8A"], points_key="transcripts")  # doctest: +SKIP
    >>> patches.hr.shape  # doctest: +SKIP
    (1, 2, 256, 256)
    """
    geometry = (geometry or ModelGeometry()).at_scale(check_scale(scale))
    if not isinstance(patch_size, int) or patch_size < 8 or patch_size % 2:
        raise ValueError(f"`patch_size` must be an even integer >= 8 (histology pixels), got {patch_size!r}.")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"`min_tissue` must be in [0, 1], got {min_tissue!r}.")
    if lr_key is not None and table_key is not None:
        raise ValueError("Pass at most one LR source: `lr_key` or `table_key`.")
    if isinstance(genes, str):
        genes = [genes]
    genes = list(genes)
    check_genes(genes, genes)  # empty / duplicates

    lr_factor = geometry.lr_factor
    lr_size, hr_size = geometry.lr_size(patch_size), geometry.hr_size(patch_size)
    if stride is None:
        stride = max(lr_factor, (patch_size // lr_factor) * lr_factor)
    if not isinstance(stride, int) or stride <= 0 or stride % lr_factor:
        raise ValueError(
            f"`stride` must be a positive multiple of {lr_factor} histology pixels (one LR pixel), got {stride!r}."
        )

    inputs = ModelInputs.from_histology(sdata, image_key, geometry=geometry, coordinate_system=coordinate_system)
    hist_px, hist_grid, tissue = geometry.histology_pixel_size, inputs.grid, inputs.tissue
    if not tissue.any():
        raise ValueError(f"No tissue found in `image_key={image_key!r}` (the H&E looks blank at {hist_px:g} um/px).")
    inputs.add_lr(sdata, genes=genes, image_key=image_key, table_key=table_key, points_key=points_key, lr_key=lr_key)
    inputs.add_hr(sdata, image_key=image_key, hr_key=hr_key, points_key=points_key)
    if texture:
        inputs.add_texture(sdata, image_key=image_key)

    # --- patch corners on the histology grid, on LR (and HR) pixel corners ------------------------------------------
    phase_y, phase_x = inputs.phase
    rows = range(phase_y, hist_grid.height - patch_size + 1, stride)
    cols = range(phase_x, hist_grid.width - patch_size + 1, stride)
    if len(rows) == 0 or len(cols) == 0:
        raise ValueError(
            f"`image_key={image_key!r}` covers {hist_grid.height}x{hist_grid.width} px at {hist_px:g} um/px, smaller "
            f"than one patch of {patch_size} px; use a smaller `patch_size`."
        )
    corners = [
        (r, c) for r in rows for c in cols if tissue[r : r + patch_size, c : c + patch_size].mean() >= min_tissue
    ]
    if not corners:
        raise ValueError(
            f"No patch of {patch_size} px has at least {min_tissue:.0%} tissue in `image_key={image_key!r}`; lower "
            "`min_tissue` or `patch_size`."
        )

    n = len(corners)
    histology = np.empty((n, 3, patch_size, patch_size), dtype=np.uint8)
    tissue_patches = np.empty((n, patch_size, patch_size), dtype=bool)
    lr = np.empty((n, len(genes), lr_size, lr_size), dtype=np.float32)
    lr_mask = np.empty((n, lr_size, lr_size), dtype=np.uint8)
    hr = None if inputs.hr is None else np.empty((n, len(genes), hr_size, hr_size), dtype=np.float32)
    origins = np.empty((n, 2), dtype=np.float64)
    textures = (
        None if inputs.texture is None else np.empty((n, len(inputs.texture), patch_size, patch_size), np.float16)
    )
    for i, (r, c) in enumerate(corners):
        if textures is not None:
            textures[i] = inputs.texture_window(r, c, patch_size)
        histology[i] = inputs.histology_window(r, c, patch_size)
        tissue_patches[i] = inputs.tissue_window(r, c, patch_size)
        origins[i] = (hist_grid.y0 + r * hist_px, hist_grid.x0 + c * hist_px)
        lr[i], lr_mask[i] = inputs.lr_window(r, c, patch_size)
        if hr is not None:
            hr[i] = inputs.hr_window(r, c, patch_size)

    lr, lr_low, lr_high = minmax_normalize(lr)
    hr_low = hr_high = None
    if hr is not None:
        hr, hr_low, hr_high = minmax_normalize(hr)
    params = {
        "scale": scale,
        "patch_size": patch_size,
        "stride": stride,
        "lr_size": lr_size,
        "hr_size": hr_size,
        "histology_pixel_size": hist_px,
        "lr_pixel_size": geometry.lr_pixel_size,
        "hr_pixel_size": geometry.hr_pixel_size,
        "min_tissue": min_tissue,
        "normalization": "minmax",
        "coordinate_system": coordinate_system,
        "sources": inputs.sources,
        "n_candidates": len(rows) * len(cols),
        "texture": bool(texture),
    }
    return PatchSet(
        histology=histology,
        tissue=tissue_patches,
        lr=lr,
        lr_low=lr_low,
        lr_high=lr_high,
        lr_mask=lr_mask,
        hr=hr,
        hr_low=hr_low,
        hr_high=hr_high,
        origins=origins,
        sample_id=np.array([sample_id or _default_sample_id(sdata)] * n),
        genes=genes,
        params=params,
        texture=textures,
    )
