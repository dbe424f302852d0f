"""Memory guard of super_resolve: estimate what a run holds in memory before allocating it."""

from __future__ import annotations

import contextlib
import math
import os

#: Share of the available memory a run may plan to use (the rest is left to Python, torch and the OS).
MEMORY_SHARE = 0.8

#: Bytes of one float32 value.
FLOAT_BYTES = 4

#: Bytes per LR pixel and gene of spots_to_grid's thin-plate RBF fill: 3 x 3 sub-samples per pixel, float64, about
#: four arrays of them alive at once (surface, clipped, expm1, product).
RBF_BYTES_PER_LR_PIXEL = 3 * 3 * 8 * 4


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now (``psutil`` when installed, else ``sysconf``), or None."""
    with contextlib.suppress(ImportError):  # psutil is optional
        import psutil

        return int(psutil.virtual_memory().available)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def bytes_per_gene(
    *,
    out_shape: tuple[int, int],
    lr_shape: tuple[int, int],
    n_tiles: int,
    lr_tile: int,
    out_tile: int,
    n_layers: int,
    streamed: bool,
    spots: bool = False,
) -> int:
    """Bytes super_resolve holds per gene: the LR raster (and, from ``spots``, its RBF fill), the tiles' LR inputs
    and predictions, and - unless the output is streamed to a store - each output layer twice (the weighted sums and
    the blended result)."""
    per_gene = lr_shape[0] * lr_shape[1] * 2  # the LR raster and its normalised copy
    per_gene += n_tiles * lr_tile * lr_tile  # the tiles' normalised LR inputs, made up front
    per_gene += 4 * out_tile * out_tile  # a tile's prediction, counts and factors
    if not streamed:
        per_gene += 2 * n_layers * out_shape[0] * out_shape[1]
    rbf = RBF_BYTES_PER_LR_PIXEL * lr_shape[0] * lr_shape[1] if spots else 0
    return FLOAT_BYTES * per_gene + rbf


def check_memory(
    n_genes: int, per_gene: int, *, streamed: bool = False, streamed_per_gene: int | None = None, arg: str = "genes"
) -> None:
    """Raise a MemoryError naming how many genes fit when ``n_genes`` of ``per_gene`` bytes exceed the memory
    available now (:func:`available_memory`, of which :data:`MEMORY_SHARE` is used). ``streamed_per_gene``: the
    bytes per gene with the output streamed to a store, to say how many genes would fit that way."""
    available = available_memory()
    if available is None:
        return
    budget = MEMORY_SHARE * available
    needed = n_genes * per_gene
    if needed <= budget:
        return
    fit = max(0, math.floor(budget / per_gene))
    stream = ""
    if not streamed and streamed_per_gene:
        fit_streamed = max(0, math.floor(budget / streamed_per_gene))
        if fit_streamed > fit:
            stream = (
                f', or pass `store="out.zarr"` to stream the output layers to disk (then at most '
                f"{min(fit_streamed, n_genes)} genes fit)"
            )
    raise MemoryError(
        f"super_resolve: `{arg}` has {n_genes} genes, which would need {needed / 2**30:.1f} GiB of memory, but "
        f"{available / 2**30:.1f} GiB are available ({MEMORY_SHARE:.0%} of it usable): at most {fit} genes fit. "
        f"Pass `{arg}=` a subset of at most {fit} genes (e.g. from c3.pp.select_genes), or run super_resolve once "
        f"per gene batch with its own `key_added`{stream}."
    )
