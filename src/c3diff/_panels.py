"""Gene panels shipped with c3diff (copied from the 10x Xenium human breast panel and the C3-Diff paper)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import pandas as pd


@cache
def _read(name: str) -> pd.DataFrame:
    with resources.files("c3diff.data").joinpath(name).open("r") as fh:
        return pd.read_csv(fh)


def xenium_breast_panel() -> pd.DataFrame:
    """The 280-gene 10x Xenium human breast panel with each gene's cell-type ``group`` (may be empty)."""
    return _read("xenium_human_breast_280.csv").fillna({"group": ""}).copy()


def paper_genes() -> list[str]:
    """The 200 genes predicted by the C3-Diff paper, in the paper's order."""
    return _read("c3diff_200_genes.csv")["gene"].tolist()
