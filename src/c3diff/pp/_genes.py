"""Choosing the genes a model predicts: top highly variable genes (scanpy), optionally forcing markers in."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import numpy as np

from c3diff._constants import ATTRS_KEY
from c3diff._provenance import _plain
from c3diff._validation import check_genes, get_element

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

_MIN_GENES_SEURAT_V3 = 20


@contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Keep torch's intra-op thread count across scanpy calls: scanpy's numba kernels run on the OpenMP runtime torch
    shares and leave it at numba's thread count (every core, whatever ``OMP_NUM_THREADS`` says), so a later model
    call or training run in the same process would otherwise use other threads, and sum in another order."""
    torch = sys.modules.get("torch")  # (not imported here: torch imported later reads its threads from the env)
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _resolve_table(data: SpatialData | AnnData, table_key: str | None) -> AnnData:
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    if table_key is None:
        keys = sorted(data.tables)
        if len(keys) != 1:
            raise ValueError(f"`table_key` is required: the SpatialData has {len(keys)} tables {keys}.")
        table_key = keys[0]
    return get_element(data, table_key, "tables", arg="table_key")


def select_genes(
    data: SpatialData | AnnData,
    *,
    table_key: str | None = None,
    n_top_genes: int = 200,
    flavor: Literal["seurat_v3", "seurat", "cell_ranger"] = "seurat_v3",
    include: Sequence[str] | None = None,
    batch_key: str | None = None,
    key_added: str = "c3diff_selected",
    inplace: bool = True,
) -> list[str]:
    """Select the genes to super-resolve: the top ``n_top_genes`` highly variable genes (scanpy), markers forced in.

    The paper keeps the top 200 HVGs of a 280-gene panel (:doc:`/method`, *Geometry*). Marker genes needed downstream
    (e.g. by :func:`~c3diff.tl.celltype_map`) can be forced in with ``include``; they take the places of the
    lowest-ranked HVGs, so the result still has ``n_top_genes`` genes.

    Parameters
    ----------
    data
        A SpatialData (the table ``table_key`` is used) or an AnnData of raw counts (cells or spots x genes).
    table_key
        Table to use when ``data`` is a SpatialData with several tables.
    n_top_genes
        Number of genes to return.
    flavor
        scanpy's HVG flavour. ``"seurat_v3"`` (default) ranks raw counts by standardised variance; ``"seurat"`` and
        ``"cell_ranger"`` rank normalised, log1p-transformed counts (computed on a copy).
    include
        Genes that must be selected (e.g. cell-type markers).
    batch_key
        ``obs`` column of samples/batches, passed to scanpy so HVGs are ranked within batches.
    key_added
        Boolean column written to ``var`` (with ``inplace``), next to ``var[f"{key_added}_rank"]``; the parameters
        and the gene list go to ``uns["c3diff"]["select_genes"]``.
    inplace
        Write the selection into the table.

    Returns
    -------
    The selected genes, most variable first (forced genes in their own HVG rank order).

    Examples
    --------
    >>> import c3diff as c3
    >>> sdata = c3.datasets.simulate_section(seed=0)  # doctest: +SKIP
    >>> genes = c3.pp.select_genes(
    ...     sdata, table_key="cell_table", n_top_genes=200, include=["CD8A", "FOXP3"]
    ... )  # doctest: +SKIP
    """
    import scanpy as sc

    adata = _resolve_table(data, table_key)
    var_names = [str(v) for v in adata.var_names]
    if not isinstance(n_top_genes, int | np.integer) or not 0 < n_top_genes <= adata.n_vars:
        raise ValueError(
            f"`n_top_genes` must be an integer in [1, {adata.n_vars}] (the number of genes), got {n_top_genes!r}."
        )
    include = [] if include is None else check_genes(include, var_names, arg="include")
    if len(include) > n_top_genes:
        raise ValueError(f"`include` has {len(include)} genes, more than `n_top_genes={n_top_genes}`.")
    if adata.n_obs < 2:
        raise ValueError(f"The table has {adata.n_obs} observation(s); highly variable genes need at least two.")

    work = adata.copy()
    if flavor == "seurat_v3" and adata.n_vars < _MIN_GENES_SEURAT_V3:
        # its loess fit of variance on mean needs many genes (skmisc crashes on a handful)
        warnings.warn(
            f"select_genes: flavor='seurat_v3' needs at least {_MIN_GENES_SEURAT_V3} genes, the table has "
            f"{adata.n_vars}; using flavor='seurat' instead.",
            UserWarning,
            stacklevel=2,
        )
        flavor = "seurat"
    if flavor not in ("seurat_v3", "seurat", "cell_ranger"):
        raise ValueError(f"`flavor` must be 'seurat_v3', 'seurat' or 'cell_ranger', got {flavor!r}.")
    with _torch_threads_kept():
        if flavor == "seurat_v3":
            result = sc.pp.highly_variable_genes(
                work, n_top_genes=adata.n_vars, flavor="seurat_v3", batch_key=batch_key, inplace=False
            )
            score = result["variances_norm"].to_numpy()
        else:
            sc.pp.normalize_total(work)
            sc.pp.log1p(work)
            result = sc.pp.highly_variable_genes(work, flavor=flavor, batch_key=batch_key, inplace=False)
            score = result["dispersions_norm"].to_numpy()
    score = np.nan_to_num(np.asarray(score, dtype=float), nan=-np.inf)
    ranking = [var_names[i] for i in np.argsort(-score, kind="stable")]
    rank = {g: r for r, g in enumerate(ranking)}

    forced = set(include)
    free = [g for g in ranking if g not in forced][: n_top_genes - len(forced)]
    selected = sorted([*free, *forced], key=rank.__getitem__)

    if inplace:
        adata.var[key_added] = [g in set(selected) for g in var_names]
        adata.var[f"{key_added}_rank"] = [rank[g] for g in var_names]
        adata.uns.setdefault(ATTRS_KEY, {})["select_genes"] = _plain(
            {
                "n_top_genes": int(n_top_genes),
                "flavor": flavor,
                "include": include,
                "batch_key": batch_key,
                "key_added": key_added,
                "genes": selected,
            }
        )
    return selected
