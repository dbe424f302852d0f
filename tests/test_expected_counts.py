"""c3diff.datasets.expected_counts: the noise-free expected count map of a simulated section (the noise ceiling)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import c3diff as c3
from c3diff._constants import Key

SMALL = {"width": 640.0, "height": 640.0}


@pytest.fixture(scope="module")
def section():
    return c3.datasets.simulate_section(**SMALL, seed=0, spot_layouts=(), progress=False)


@pytest.fixture(scope="module")
def tiny():
    return c3.datasets.simulate_section(width=320, height=320, seed=3, spot_layouts=(), progress=False)


def _observed(sdata, bin_size: float, **kwargs) -> np.ndarray:
    return c3.pp.bin_transcripts(sdata, bin_size=bin_size, image_key="hne", inplace=False, **kwargs).values


def _dense(x) -> np.ndarray:
    return x.toarray() if hasattr(x, "toarray") else np.asarray(x)


def _pool(a: np.ndarray, f: int) -> np.ndarray:
    g, h, w = a.shape
    return a[:, : h // f * f, : w // f * f].reshape(g, h // f, f, w // f, f).sum(axis=(2, 4))


# ------------------------------------------------------------------------------------------ the simulation itself
def test_returning_the_expectation_leaves_the_simulation_bit_identical(tiny):
    # recorded with the simulator before `mu` was returned and stored (numpy's default PCG64 streams are stable
    # across platforms and versions); any extra random draw would change them. The hash covers the integer outcomes
    # (which transcript, of which gene, in which cell; the cell counts); the positions are compared by their sums,
    # because numpy's SIMD exp/log/sin differ in the last bit between CPUs (AVX2 vs AVX-512) and an exact hash of
    # float32 positions does not survive that, while an extra draw moves every later transcript by micrometres.
    tx = tiny.points[Key.TRANSCRIPTS.value].compute()
    h = hashlib.sha256()
    for c in ("cell_id", "overlaps_nucleus"):
        h.update(np.ascontiguousarray(tx[c].to_numpy()).tobytes())
    h.update(np.ascontiguousarray(tx["gene"].cat.codes.to_numpy()).tobytes())
    h.update(np.ascontiguousarray(_dense(tiny.tables[Key.CELL_TABLE.value].X), dtype=np.float32).tobytes())
    assert len(tx) == 33120
    assert h.hexdigest() == "2e65d60181e4115f8263d55f3043b15b5b4b07bd6d68a7966c33859230a7f98f"
    assert tx["x"].to_numpy(np.float64).sum() == pytest.approx(4139412.7706, rel=1e-7)
    assert tx["y"].to_numpy(np.float64).sum() == pytest.approx(7322470.4712, rel=1e-7)


def test_expected_layer_is_the_mean_of_the_counts(section):
    table = section.tables[Key.CELL_TABLE.value]
    mu, X = table.layers["expected"], _dense(table.X)
    assert mu.dtype == np.float32 and mu.shape == X.shape and (mu >= 0).all() and (mu.sum(axis=1) > 0).all()
    assert mu.sum() == pytest.approx(X.sum(), rel=0.03)
    # per cell, the expected total follows the drawn total (library noise is in the expectation, counting noise not)
    assert np.corrcoef(mu.sum(axis=1), X.sum(axis=1))[0, 1] > 0.8
    geometry = table.obsm["cell_geometry"]
    assert list(geometry.columns) == ["radius", "nucleus_x", "nucleus_y", "nucleus_a", "nucleus_b", "nucleus_theta"]
    assert np.allclose(geometry["radius"], section.shapes[Key.CELLS.value]["radius"])
    assert table.var["background_share"].sum() == pytest.approx(1.0)


def test_gene_subset_stores_the_same_expectation(tiny):
    genes = ["ERBB2", "CD3E", "PTPRC"]
    sub = c3.datasets.simulate_section(width=320, height=320, seed=3, genes=genes, spot_layouts=(), progress=False)
    full = tiny.tables[Key.CELL_TABLE.value][:, genes]
    np.testing.assert_array_equal(sub.tables[Key.CELL_TABLE.value].layers["expected"], full.layers["expected"])


# ------------------------------------------------------------------------------------------------ expected map
@pytest.mark.parametrize("pixel_size", [10.0, 30.0, 100.0])
def test_grid_is_the_grid_of_bin_transcripts(section, pixel_size):
    genes = ["ERBB2", "CD3E"]
    out = c3.datasets.expected_counts(section, genes=genes, pixel_size=pixel_size)
    assert out.dtype == np.float32 and out.shape == _observed(section, pixel_size, genes=genes).shape
    shifted = c3.datasets.expected_counts(section, genes=genes, pixel_size=pixel_size, origin=(-5.0, 3.0))
    assert (
        shifted.shape
        == c3.pp.bin_transcripts(
            section, bin_size=pixel_size, genes=genes, image_key="hne", origin=(-5.0, 3.0), inplace=False
        ).shape
    )


def test_expected_mass_is_the_cells_plus_the_background(section):
    table = section.tables[Key.CELL_TABLE.value]
    sim = table.uns["c3diff"]["simulation"]
    out = c3.datasets.expected_counts(section, pixel_size=10.0)
    tissue_area = sim["tissue_mask"].sum() * sim["tissue_mask_spacing"] ** 2
    background = tissue_area * 0.002 + (640.0**2 - tissue_area) * 0.0002
    assert out.sum() == pytest.approx(float(table.layers["expected"].sum(dtype=np.float64)) + background, rel=1e-4)
    genes = ["ERBB2", "KRT7"]
    part = c3.datasets.expected_counts(section, genes=genes, pixel_size=10.0)
    np.testing.assert_allclose(part, out[[table.var_names.get_loc(g) for g in genes]], rtol=1e-5, atol=1e-7)


def test_expected_totals_match_the_observed_totals(section):
    expected = c3.datasets.expected_counts(section, pixel_size=10.0).sum(axis=(1, 2))
    observed = _observed(section, 10.0).sum(axis=(1, 2))
    assert expected.sum() == pytest.approx(observed.sum(), rel=0.03)
    abundant = observed > 1000
    assert abundant.sum() >= 20
    rel = np.abs(expected[abundant] / observed[abundant] - 1)
    assert np.median(rel) < 0.05 and rel.max() < 0.25


def test_expected_map_correlates_with_the_observed_counts_at_100um(section):
    expected, observed = c3.datasets.expected_counts(section, pixel_size=10.0), _observed(section, 10.0)
    e100, o100 = _pool(expected, 10), _pool(observed, 10)
    top = np.argsort(-expected.sum(axis=(1, 2)))[:10]
    r = np.array([np.corrcoef(e100[k].ravel(), o100[k].ravel())[0, 1] for k in top])
    assert r[0] > 0.9 and np.median(r) > 0.9
    # at 10 um the counting noise shows: the expected map predicts the counts, but not perfectly
    r10 = np.corrcoef(expected[top[0]].ravel(), observed[top[0]].ravel())[0, 1]
    assert 0.5 < r10 < 0.98


def test_placement_matches_the_simulator_given_the_counts(section):
    # with the drawn counts as the expectation, the only noise left is where each transcript lands: at 2 um the
    # Pearson chi^2 per pixel is then about 1 (a multinomial), and moving the nuclei by 2 um inflates it
    sd = section.subset(
        [Key.HNE.value, Key.CELL_LABELS.value, Key.CELLS.value, Key.TRANSCRIPTS.value, Key.CELL_TABLE.value]
    )
    table = sd.tables[Key.CELL_TABLE.value] = section.tables[Key.CELL_TABLE.value].copy()
    table.layers["expected"] = _dense(table.X).astype(np.float32)
    observed = _observed(sd, 2.0).sum(axis=0)

    def chi2() -> float:
        expected = c3.datasets.expected_counts(sd, pixel_size=2.0).sum(axis=0)
        m = expected > 0.5
        return float((((observed - expected) ** 2)[m] / expected[m]).mean())

    assert 0.85 < chi2() < 1.15
    table.obsm["cell_geometry"]["nucleus_x"] += 2.0
    assert chi2() > 1.5


def test_survives_writing_and_reading(tiny, tmp_path):
    from spatialdata import read_zarr

    tiny.write(tmp_path / "s.zarr")
    back = read_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(
        c3.datasets.expected_counts(back, pixel_size=20.0), c3.datasets.expected_counts(tiny, pixel_size=20.0)
    )


def test_errors_name_the_argument(tiny):
    with pytest.raises(ValueError, match="pixel_size"):
        c3.datasets.expected_counts(tiny, pixel_size=0)
    with pytest.raises(KeyError, match="NOTAGENE"):
        c3.datasets.expected_counts(tiny, genes=["NOTAGENE"])
    with pytest.raises(KeyError, match="image_key"):
        c3.datasets.expected_counts(tiny, image_key="nope")
    sd = tiny.subset([Key.HNE.value, Key.CELL_LABELS.value, Key.CELLS.value, Key.CELL_TABLE.value])
    table = sd.tables[Key.CELL_TABLE.value] = tiny.tables[Key.CELL_TABLE.value].copy()
    del table.layers["expected"]
    with pytest.raises(ValueError, match=r'layers\["expected"\].*simulate_section'):
        c3.datasets.expected_counts(sd)
    assert "expected" in tiny.tables[Key.CELL_TABLE.value].layers
