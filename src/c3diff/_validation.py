"""Checks made at the boundary of every public function, with messages that say how to fix the input."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

# The geometry helpers moved to c3diff._geometry; callers that import them from here keep working.
from c3diff._geometry import (  # noqa: F401
    RasterGeometry,
    is_integer,
    level_geometries,
    raster_geometry,
    raster_levels,
    scale0,
    transform_matrix,
)

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

_KINDS = ("images", "labels", "points", "shapes", "tables")


def get_element(sdata: SpatialData, key: str, kind: str, *, arg: str) -> Any:
    """Return ``sdata.<kind>[key]`` or raise a ``KeyError`` naming the argument and the keys that exist."""
    if kind not in _KINDS:
        raise ValueError(f"Unknown element kind {kind!r}; expected one of {_KINDS}.")
    if not isinstance(key, str):
        raise TypeError(f"`{arg}` must be a string naming an element of `sdata.{kind}`, got {type(key).__name__}.")
    elements = getattr(sdata, kind)
    if key not in elements:
        available = sorted(elements.keys())
        elsewhere = [k for k in _KINDS if k != kind and key in getattr(sdata, k)]
        hint = f" {key!r} is in `sdata.{elsewhere[0]}`, not `sdata.{kind}`." if elsewhere else ""
        raise KeyError(f"`{arg}={key!r}` is not in `sdata.{kind}` (available: {available}).{hint}")
    return elements[key]


def check_scale(scale: Any, *, arg: str = "scale") -> int:
    """``scale`` as an int when it is one of :data:`c3diff._constants.SCALES` (5 or 10); else a ValueError naming
    ``arg``."""
    from c3diff._constants import SCALES

    if isinstance(scale, bool) or scale not in SCALES:
        raise ValueError(f"`{arg}` must be {' or '.join(map(str, SCALES))}, got {scale!r}.")
    return int(scale)


def check_key_added(
    sdata: SpatialData,
    keys: Iterable[str],
    *,
    overwrite: bool,
    inputs: Iterable[str | None] = (),
    arg: str = "key_added",
) -> None:
    """The elements a call is about to write (``keys``) may be written into ``sdata``.

    None of them may be one of the call's ``inputs`` (an input is never replaced, even with ``overwrite=True``), and
    none may exist already unless ``overwrite`` is True. Raises ``ValueError`` naming the argument, the elements in
    the way and the way out; checked before any work, so a refused call changes nothing.
    """
    keys = list(dict.fromkeys(keys))
    inputs = {k for k in inputs if k is not None}
    clash = [k for k in keys if k in inputs]
    if clash:
        raise ValueError(
            f"`{arg}` would write {clash[0]!r}, which is an input of this call; inputs are never replaced, even with "
            f"overwrite=True. Choose another `{arg}`."
        )
    if overwrite is not True and overwrite is not False:
        raise TypeError(f"`overwrite` must be True or False, got {overwrite!r}.")
    existing = [f"sdata.{kind}[{k!r}]" for k in keys for kind in _KINDS if k in getattr(sdata, kind)]
    if existing and not overwrite:
        raise ValueError(
            f"`{arg}`: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; nothing was changed. "
            f"Pass another `{arg}`, or overwrite=True to replace {'it' if len(existing) == 1 else 'them'}."
        )


def _row_ids(ids: Any, rows: np.ndarray, *, shown: int = 5) -> str:
    """The ids of ``rows`` (positions) for a message: the first few, and how many in all."""
    picked = [str(ids[i]) if ids is not None else f"row {i}" for i in rows[:shown]]
    return f"{picked}{f' ... ({len(rows)} in all)' if len(rows) > shown else ''}"


def check_counts(counts: Any, *, ids: Sequence[Any] | None = None, arg: str = "counts", what: str = "spot") -> None:
    """Raise unless ``counts`` (rows x genes; numpy, scipy sparse or a DataFrame) are finite and non-negative.

    The message names the rows (``ids``: spot barcodes, cell ids) that hold NaN, inf or negative values. Counts that
    are not whole numbers (normalised or log-transformed data) pass with a single one-line ``UserWarning``: c3diff's
    maps are in counts, so such values give maps in other units. Nothing is modified.
    """
    from scipy import sparse

    if hasattr(counts, "to_numpy") and not sparse.issparse(counts):
        counts = counts.to_numpy()
    if sparse.issparse(counts):
        matrix = counts.tocsr()
        values = matrix.data
        value_rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    else:
        values = np.asarray(counts)
        if values.ndim == 1:
            values = values[:, None]
        value_rows = None
    if values.dtype == object or not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        raise TypeError(
            f"`{arg}` must hold numbers (raw counts), got values of type {values.dtype}. Convert the table to "
            "numbers first (e.g. `pd.to_numeric`), or check that the file is a counts matrix."
        )

    def offending(flags: np.ndarray) -> np.ndarray:
        if value_rows is not None:
            return np.unique(value_rows[flags.ravel()])
        return np.flatnonzero(flags.reshape(len(flags), -1).any(axis=1))

    problems = []
    if np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.complexfloating):
        bad = offending(~np.isfinite(values))
        if bad.size:
            problems.append(f"{bad.size} {what}(s) with NaN or infinite counts: {_row_ids(ids, bad)}")
    if not (np.issubdtype(values.dtype, np.unsignedinteger) or values.dtype == bool):
        with np.errstate(invalid="ignore"):
            bad = offending(values < 0)
        if bad.size:
            problems.append(f"{bad.size} {what}(s) with negative counts: {_row_ids(ids, bad)}")
    if problems:
        raise ValueError(
            f"`{arg}`: counts must be finite, non-negative numbers of molecules; found {'; '.join(problems)}. Fix or "
            f"drop these {what}s (a NaN is often a row cut short in the file; negative values come from centred or "
            "batch-corrected data: pass the raw counts)."
        )
    if np.issubdtype(values.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            fractional = offending(values != np.round(values))
        if fractional.size:
            warnings.warn(
                f"`{arg}`: counts of {fractional.size} {what}(s) are not whole numbers (e.g. "
                f"{_row_ids(ids, fractional, shown=3)}); c3diff expects raw integer counts and normalised or "
                "log-transformed values give maps in other units.",
                UserWarning,
                stacklevel=3,
            )


def check_table_counts(
    sdata: SpatialData, table_key: str, *, genes: Iterable[str] | None = None, arg: str = "table_key"
) -> None:
    """:func:`check_counts` on the rows of a spot table that computations use (``obs["in_tissue"]`` when present)
    and on ``genes`` when they all exist (otherwise on every gene; unknown genes are reported by ``check_genes``)."""
    table = get_element(sdata, table_key, "tables", arg=arg)
    rows = np.ones(table.n_obs, dtype=bool)
    if "in_tissue" in table.obs:
        rows = table.obs["in_tissue"].to_numpy(dtype=bool)
    columns = slice(None)
    if genes is not None:
        wanted = [genes] if isinstance(genes, str) else list(genes)
        index = {str(g): i for i, g in enumerate(table.var_names)}
        if wanted and all(str(g) in index for g in wanted):
            columns = [index[str(g)] for g in wanted]
    matrix = table.X[rows][:, columns]
    check_counts(matrix, ids=table.obs_names[rows].to_numpy(), arg=f"{arg}={table_key!r}", what="spot")


#: The H&E pixel types c3diff reads, and how each becomes uint8 (``docs/reliability.md``).
HNE_DTYPE_RULE = (
    "uint8 as is; uint16 divided by 257 (the full 16-bit range, as skimage's img_as_ubyte) unless every value is at "
    "most 255 (8-bit values stored as uint16: taken as they are); floats in [0, 1] times 255 and floats in [0, 255] "
    "as they are (a float image whose maximum is at most 1 is read as [0, 1]); other integer types only when every "
    "value lies in 0..255; anything else is refused"
)


def _value_range(values: Any) -> tuple[float, float]:
    if hasattr(values, "dask"):
        import dask

        lo, hi = dask.compute(values.min(), values.max())
        return float(lo), float(hi)
    values = np.asarray(values)
    return (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)


def hne_to_uint8(values: Any, *, dtype: Any = None, arg: str = "image") -> Any:
    """An H&E (numpy or dask, any shape) as uint8 by :data:`HNE_DTYPE_RULE`; other pixel types are refused by name.

    ``dtype`` is the pixel type of the stored image when ``values`` were computed from it (e.g. float averages of
    a uint16 image); it defaults to ``values.dtype``.
    """
    dtype = np.dtype(values.dtype if dtype is None else dtype)
    fix = "Convert it to uint8 (0..255 per channel) first; docs/reliability.md lists the pixel types c3diff reads."
    if dtype == np.uint8:
        return values if values.dtype == np.uint8 else np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if dtype.kind == "b" or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(
            f"`{arg}`: the H&E has pixel type {dtype}; c3diff reads uint8, uint16 and float H&E images. {fix}"
        )
    lo, hi = _value_range(values)
    if dtype == np.uint16:
        divisor = 1.0 if hi <= 255 else 257.0
        return np.clip(np.rint(values.astype(np.float32) / divisor), 0, 255).astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(
                f"`{arg}`: the {dtype} H&E holds NaN or infinite pixels; replace them (e.g. by 255, white glass) first."
            )
        if lo < 0 or hi > 255:
            raise ValueError(
                f"`{arg}`: the {dtype} H&E has values in {lo:g}..{hi:g}; c3diff reads float H&E images in "
                f"[0, 1] or [0, 255]. {fix}"
            )
        top = 1.0 if hi <= 1.0 else 255.0
        return np.clip(np.rint(values.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
    if lo < 0 or hi > 255:
        raise TypeError(
            f"`{arg}`: the H&E has pixel type {dtype} with values in {lo:g}..{hi:g}; c3diff reads uint8, "
            f"uint16 and float H&E images (other integer types only with values in 0..255). {fix}"
        )
    return np.clip(np.rint(values), 0, 255).astype(np.uint8) if values.dtype.kind == "f" else values.astype(np.uint8)


def case_mismatches(requested: Iterable[str], available: Iterable[str]) -> dict[str, str]:
    """Requested genes that are not in ``available`` but differ from one of its genes only by case (``"CD8A"`` ->
    ``"Cd8a"``), mapped to the available spelling."""
    available = [str(g) for g in available]
    known = set(available)
    by_lower = {}
    for gene in available:
        by_lower.setdefault(gene.lower(), gene)
    return {g: by_lower[g.lower()] for g in map(str, requested) if g not in known and g.lower() in by_lower}


def _symbol_style(genes: Iterable[str]) -> str | None:
    """``"human"`` when gene symbols are upper case (CD8A), ``"mouse"`` when capitalised (Cd8a), else ``None``."""
    lettered = [g for g in genes if any(c.isalpha() for c in g)]
    if lettered and all(g == g.upper() for g in lettered):
        return "human"
    if lettered and all(g[:1].isupper() and g[1:] != g[1:].upper() for g in lettered):
        return "mouse"
    return None


def species_hint(mismatches: dict[str, str], *, shown: int = 5) -> str | None:
    """A sentence naming a likely species mismatch for genes that differ from the data's only by case (``None`` when
    there are none); human symbols are upper case (CD8A), mouse symbols capitalised (Cd8a)."""
    if not mismatches:
        return None
    pairs = ", ".join(f"{a} -> {b}" for a, b in list(mismatches.items())[:shown])
    pairs += f" ... ({len(mismatches)} in all)" if len(mismatches) > shown else ""
    asked, found = _symbol_style(mismatches), _symbol_style(mismatches.values())
    species = (
        f"the names asked for are {asked} gene symbols but the data's are {found} ones (human symbols are "
        "upper case, mouse symbols capitalised): a species mismatch? "
        if asked and found and asked != found
        else ""
    )
    return (
        f"{len(mismatches)} differ from genes of the data only by case ({pairs}): {species}Gene names are "
        "case-sensitive; use the data's spelling (for cell types, `markers='mouse'` or `markers='human'`). "
    )


def check_genes(requested: Iterable[str], available: Sequence[str], *, arg: str = "genes") -> list[str]:
    """Return ``requested`` as a list, raising a ``KeyError`` that lists the unknown genes."""
    requested = [requested] if isinstance(requested, str) else list(requested)
    if len(requested) == 0:
        raise ValueError(f"`{arg}` is empty; pass at least one gene name.")
    known = set(available)
    missing = [g for g in requested if g not in known]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise KeyError(
            f"`{arg}`: {len(missing)} gene(s) not found: {shown}. "
            f"{species_hint(case_mismatches(missing, available)) or ''}"
            f"Available genes include {list(available)[:8]}."
        )
    duplicated = sorted({g for g in requested if requested.count(g) > 1})
    if duplicated:
        raise ValueError(f"`{arg}` lists genes more than once: {duplicated}.")
    return requested
