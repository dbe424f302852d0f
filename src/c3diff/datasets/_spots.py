"""Spot layouts of spot-based ST platforms and exact counting of transcripts in spot discs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from c3diff._constants import LEGACY_ST_PITCH, LEGACY_ST_SPOT_DIAMETER, VISIUM_PITCH, VISIUM_SPOT_DIAMETER, Key


@dataclass(frozen=True)
class SpotLayout:
    """A spot array: ``hexagonal`` (rows ``pitch * sqrt(3) / 2`` apart, odd rows shifted by half a pitch) or square."""

    name: str
    diameter: float
    pitch: float
    hexagonal: bool
    shapes_key: str
    table_key: str

    @property
    def row_step(self) -> float:
        return self.pitch * np.sqrt(3.0) / 2.0 if self.hexagonal else self.pitch


#: Spot geometries the simulator can lay out: Visium-like (55 um spots, 100 um hex pitch) and legacy-ST-like
#: (100 um spots, 200 um square pitch).
SPOT_LAYOUTS: dict[str, SpotLayout] = {
    "visium": SpotLayout(
        "visium", VISIUM_SPOT_DIAMETER, VISIUM_PITCH, True, Key.VISIUM_SPOTS.value, Key.VISIUM_TABLE.value
    ),
    "legacy_st": SpotLayout(
        "legacy_st", LEGACY_ST_SPOT_DIAMETER, LEGACY_ST_PITCH, False, Key.ST_SPOTS.value, Key.ST_TABLE.value
    ),
}


def spot_grid(layout: SpotLayout, width: float, height: float) -> dict[str, np.ndarray]:
    """Centres (um) and array coordinates of all spots whose disc lies entirely inside ``[0, width] x [0, height]``.

    The lattice is centred in the section. Visium-style array coordinates: ``array_col`` counts half pitches (even in
    even rows, odd in odd rows); for a square lattice it counts pitches.
    """
    r = layout.diameter / 2.0
    n_rows = int(np.floor((height - 2 * r) / layout.row_step + 1e-9)) + 1 if height >= 2 * r else 0
    if n_rows <= 0:
        return {"x": np.zeros(0), "y": np.zeros(0), "array_row": np.zeros(0, int), "array_col": np.zeros(0, int)}
    shift = layout.pitch / 2.0 if layout.hexagonal and n_rows > 1 else 0.0
    n_cols = int(np.floor((width - 2 * r - shift) / layout.pitch + 1e-9)) + 1 if width - 2 * r - shift >= 0 else 0
    y0 = (height - (n_rows - 1) * layout.row_step) / 2.0
    x0 = (width - ((n_cols - 1) * layout.pitch + shift)) / 2.0
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    odd = (rows % 2 == 1) & layout.hexagonal
    x = x0 + cols * layout.pitch + np.where(odd, shift, 0.0)
    y = y0 + rows * layout.row_step
    inside = (x - r >= 0) & (x + r <= width) & (y - r >= 0) & (y + r <= height)
    array_col = 2 * cols + odd if layout.hexagonal else cols
    return {"x": x[inside], "y": y[inside], "array_row": rows[inside], "array_col": array_col[inside]}


def assign_to_spots(layout: SpotLayout, grid: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Index of the spot whose closed disc contains each point (``-1``: none).

    Discs are disjoint (diameter < pitch), so a point can only be in the disc of the nearest lattice site, found by
    rounding; the disc test is then exact.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    out = np.full(x.size, -1, np.int64)
    if grid["x"].size == 0:
        return out
    r0, c0 = int(grid["array_row"].min()), int(grid["array_col"].min())
    n_r = int(grid["array_row"].max()) - r0 + 1
    n_c = int(grid["array_col"].max()) - c0 + 1
    lut = np.full((n_r, n_c), -1, np.int64)
    lut[grid["array_row"] - r0, grid["array_col"] - c0] = np.arange(grid["x"].size)
    # lattice origin: a spot with array coordinates (row, col) sits at (x_ref + ..., y_ref + ...)
    k0 = 0
    y_ref = grid["y"][k0] - grid["array_row"][k0] * layout.row_step
    row = np.rint((y - y_ref) / layout.row_step).astype(np.int64)
    if layout.hexagonal:
        x_ref = grid["x"][k0] - grid["array_col"][k0] * layout.pitch / 2.0
        odd = row % 2
        half = np.rint(((x - x_ref) / (layout.pitch / 2.0) - odd) / 2.0).astype(np.int64)
        col = 2 * half + odd
    else:
        x_ref = grid["x"][k0] - grid["array_col"][k0] * layout.pitch
        col = np.rint((x - x_ref) / layout.pitch).astype(np.int64)
    ok = (row >= r0) & (row < r0 + n_r) & (col >= c0) & (col < c0 + n_c)
    cand = np.full(x.size, -1, np.int64)
    cand[ok] = lut[row[ok] - r0, col[ok] - c0]
    has = cand >= 0
    r = layout.diameter / 2.0
    d2 = (x[has] - grid["x"][cand[has]]) ** 2 + (y[has] - grid["y"][cand[has]]) ** 2
    inside = d2 <= r * r
    out[np.flatnonzero(has)[inside]] = cand[has][inside]
    return out


def count_spots(spot: np.ndarray, gene: np.ndarray, n_spots: int, n_genes: int) -> sparse.csr_matrix:
    """Spots x genes counts (CSR, float32) of the points assigned to spots."""
    m = spot >= 0
    flat = spot[m] * n_genes + gene[m]
    counts = np.bincount(flat, minlength=n_spots * n_genes).reshape(n_spots, n_genes)
    return sparse.csr_matrix(counts.astype(np.float32))


def disc_coverage(mask: np.ndarray, spacing: float, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of each disc covered by a boolean field-grid mask (sampled on a 7 x 7 stencil clipped to the disc)."""
    t = np.linspace(-1, 1, 7)
    dy, dx = np.meshgrid(t, t, indexing="ij")
    keep = dx**2 + dy**2 <= 1.0
    dy, dx = dy[keep] * radius, dx[keep] * radius
    py = np.asarray(y)[:, None] + dy[None, :]
    px = np.asarray(x)[:, None] + dx[None, :]
    i = np.clip((py / spacing).astype(np.int64), 0, mask.shape[0] - 1)
    j = np.clip((px / spacing).astype(np.int64), 0, mask.shape[1] - 1)
    return mask[i, j].mean(axis=1)
