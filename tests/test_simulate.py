"""c3diff.datasets: the simulated section (geometry, counts, determinism, provenance) and its cell-type truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import c3diff as c3
from c3diff._constants import IMMUNE_TYPES, Key
from c3diff._validation import raster_geometry, raster_levels, scale0

SMALL = {"width": 640.0, "height": 640.0}


@pytest.fixture(scope="module")
def section():
    return c3.datasets.simulate_section(**SMALL, seed=0, progress=False)


@pytest.fixture(scope="module")
def transcripts(section):
    return section.points[Key.TRANSCRIPTS.value].compute()


def _hne(sdata) -> np.ndarray:
    return np.asarray(scale0(sdata.images[Key.HNE.value]).data)


def _labels(sdata) -> np.ndarray:
    return np.asarray(scale0(sdata.labels[Key.CELL_LABELS.value]).data)


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_data_and_other_seed_other_tissue():
    kw = {"width": 400.0, "height": 300.0, "progress": False}
    a = c3.datasets.simulate_section(**kw, seed=7)
    b = c3.datasets.simulate_section(**kw, seed=7)
    c = c3.datasets.simulate_section(**kw, seed=8)
    assert np.array_equal(_hne(a), _hne(b))
    assert np.array_equal(_labels(a), _labels(b))
    pd.testing.assert_frame_equal(a.points["transcripts"].compute(), b.points["transcripts"].compute())
    for key in (Key.CELL_TABLE, Key.VISIUM_TABLE, Key.ST_TABLE):
        assert (a.tables[key.value].X != b.tables[key.value].X).nnz == 0
    assert a.attrs["c3diff"]["simulation"] == b.attrs["c3diff"]["simulation"]
    assert _hne(a).shape == _hne(c).shape
    assert not np.array_equal(_hne(a), _hne(c))
    assert not np.array_equal(_labels(a), _labels(c))


# ---------------------------------------------------------------------------------------------- elements
def test_elements_models_and_transforms(section):
    from spatialdata.models import get_model
    from spatialdata.transformations import get_transformation

    sd = section
    assert set(sd.images) == {Key.HNE.value}
    assert set(sd.labels) == {Key.CELL_LABELS.value}
    assert set(sd.points) == {Key.TRANSCRIPTS.value}
    assert set(sd.shapes) == {Key.CELLS.value, Key.VISIUM_SPOTS.value, Key.ST_SPOTS.value}
    assert set(sd.tables) == {Key.CELL_TABLE.value, Key.VISIUM_TABLE.value, Key.ST_TABLE.value}
    for group in (sd.images, sd.labels, sd.points, sd.shapes, sd.tables):
        for element in group.values():
            get_model(element).validate(element)

    hne = sd.images["hne"]
    levels = raster_levels(hne)
    assert [lv.shape for lv in levels] == [(3, 1280, 1280), (3, 640, 640), (3, 320, 320), (3, 160, 160)]
    assert levels[0].dtype == np.uint8
    assert list(levels[0].coords["c"].values) == ["r", "g", "b"]
    g = raster_geometry(hne)
    assert (g.sy, g.sx, g.y0, g.x0, g.height, g.width) == (0.5, 0.5, 0.0, 0.0, 1280, 1280)
    g = raster_geometry(sd.labels["cell_labels"])
    assert (g.sy, g.sx, g.y0, g.x0, g.height, g.width) == (1.0, 1.0, 0.0, 0.0, 640, 640)
    assert _labels(sd).dtype == np.int32
    for key in ("transcripts", "cells", "visium_spots", "st_spots"):
        element = sd.points[key] if key == "transcripts" else sd.shapes[key]
        m = get_transformation(element, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        assert np.allclose(m, np.eye(3))

    table = sd.tables["cell_table"]
    cells = sd.shapes["cells"]
    n = len(cells)
    assert table.n_obs == n and table.n_vars == 280
    assert list(cells.index) == list(range(1, n + 1))
    assert np.array_equal(table.obs["cell_id"].to_numpy(), np.arange(1, n + 1))
    assert table.uns["spatialdata_attrs"] == {"region": "cells", "region_key": "region", "instance_key": "cell_id"}
    assert set(IMMUNE_TYPES) <= set(table.obs["cell_type"].cat.categories)
    assert np.allclose(table.obsm["spatial"], np.column_stack([cells.geometry.x, cells.geometry.y]))
    assert table.X.format == "csr"
    assert set(table.var["kind"]) == {"type_linked", "spatial_field", "housekeeping"}

    frame = sd.points["transcripts"]
    assert frame.attrs["spatialdata_attrs"] == {"feature_key": "gene", "instance_key": "cell_id"}

    attrs = sd.attrs["c3diff"]["simulation"]
    assert attrs["seed"] == 0 and attrs["version"] == c3.__version__
    assert attrs["params"]["width"] == 640.0 and attrs["params"]["pixel_size"] == 0.5
    kinds = attrs["gene_kinds"]
    assert sorted(g for genes in kinds.values() for g in genes) == sorted(table.var_names)
    assert len(kinds["spatial_field"]) >= 5
    # the immune markers (docs/method.md, Cell-type map) are all type-linked
    markers = {
        "MS4A1",
        "CD79A",
        "CD79B",
        "CD19",
        "BANK1",
        "TCL1A",
        "CD4",
        "CD3E",
        "CD3G",
        "TRAC",
        "IL7R",
        "CCR7",
        "LTB",
        "TCF7",
        "CD8A",
        "GZMA",
        "GZMK",
        "PRF1",
        "NKG7",
        "CCL5",
        "FOXP3",
        "IL2RA",
        "CTLA4",
        "TIGIT",
        "CD68",
        "AIF1",
        "LYZ",
        "IGSF6",
        "CXCL5",
        "APOC1",
        "CD163",
        "MRC1",
        "C1QA",
        "C1QC",
        "MZB1",
        "TNFRSF17",
        "CD27",
        "SLAMF7",
        "PRDM1",
    }
    assert markers <= set(kinds["type_linked"])


def test_glass_background_has_no_cells_and_few_transcripts(section, transcripts):
    from scipy import ndimage as ndi

    hne = _hne(section)
    labels = _labels(section)
    bright = hne.min(axis=0).reshape(640, 2, 640, 2).min(axis=(1, 3)) > 215  # per 1 um label pixel
    # glass: large bright areas outside every cell (fat vacuoles belong to adipocytes, lumens are small)
    deep = ndi.binary_erosion(bright & (labels == 0), iterations=10)
    lab, _ = ndi.label(deep)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    glass = np.isin(lab, np.flatnonzero(sizes > 20_000))
    assert 0.03 < glass.mean() < 0.5
    cells = section.shapes["cells"]
    ci = cells.geometry.y.to_numpy().astype(int)
    cj = cells.geometry.x.to_numpy().astype(int)
    assert not glass[ci, cj].any()
    i = np.minimum(transcripts["y"].to_numpy().astype(int), 639)
    j = np.minimum(transcripts["x"].to_numpy().astype(int), 639)
    on_glass = glass[i, j]
    assert (transcripts["cell_id"].to_numpy()[on_glass] == 0).all()
    tissue_density = (transcripts["cell_id"].to_numpy() > 0).sum() / (labels > 0).sum()
    assert on_glass.sum() / glass.sum() < 0.01 * tissue_density


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize(
    ("table_key", "layout", "diameter", "pitch"),
    [("visium_table", "visium", 55.0, 100.0), ("st_table", "legacy_st", 100.0, 200.0)],
)
def test_spot_counts_are_the_transcripts_in_each_disc(section, transcripts, table_key, layout, diameter, pitch):
    table = section.tables[table_key]
    assert table.uns["c3diff"]["spots"] == {"layout": layout, "diameter_um": diameter, "pitch_um": pitch}
    shapes_key = table.uns["spatialdata_attrs"]["region"]
    shapes = section.shapes[shapes_key]
    assert np.array_equal(shapes.index.to_numpy(), table.obs["spot_id"].to_numpy())
    assert np.allclose(shapes["radius"], diameter / 2)
    centres = table.obsm["spatial"]
    r = diameter / 2
    assert (centres - r >= 0).all() and (centres + r <= 640).all()  # discs entirely inside the section
    # lattice: nearest neighbours one pitch apart; hexagonal rows sqrt(3)/2 pitch apart
    from scipy.spatial import cKDTree

    d, _ = cKDTree(centres).query(centres, k=2)
    assert np.allclose(d[:, 1], pitch)
    rows = np.unique(np.round(centres[:, 1], 6))
    assert np.allclose(np.diff(rows), pitch * np.sqrt(3) / 2 if layout == "visium" else pitch)
    assert table.obs["in_tissue"].dtype == bool and table.obs["in_tissue"].any()

    x = transcripts["x"].to_numpy(np.float64)
    y = transcripts["y"].to_numpy(np.float64)
    codes = transcripts["gene"].cat.codes.to_numpy()
    assert list(transcripts["gene"].cat.categories) == list(table.var_names)
    X = table.X.toarray()
    for k, (cx, cy) in enumerate(centres):
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        assert np.array_equal(np.bincount(codes[inside], minlength=table.n_vars), X[k])
    assert X.sum() > 0


def test_cell_table_counts_are_the_cell_transcripts(section, transcripts):
    from scipy import sparse

    table = section.tables["cell_table"]
    cid = transcripts["cell_id"].to_numpy()
    codes = transcripts["gene"].cat.codes.to_numpy()
    assigned = cid > 0
    counts = sparse.coo_matrix(
        (np.ones(assigned.sum()), (cid[assigned] - 1, codes[assigned])), shape=table.shape
    ).tocsr()
    assert abs(counts - table.X).max() == 0
    assert (cid == 0).sum() > 0  # background transcripts
    per_cell = np.asarray(table.X.sum(axis=1)).ravel()
    assert 60 < np.median(per_cell) < 300
    # overdispersed and sparse, like real data
    dense = table.X.toarray()
    assert (dense == 0).mean() > 0.5
    tumour = dense[(table.obs["cell_type"] == "Tumor").to_numpy()]
    mean, var = tumour.mean(axis=0), tumour.var(axis=0)
    assert np.median((var / np.maximum(mean, 1e-9))[mean > 1]) > 1.2


def test_marker_genes_are_type_specific(section):
    table = section.tables["cell_table"]
    dense = pd.DataFrame(table.X.toarray(), columns=table.var_names)
    types = table.obs["cell_type"].astype(str)
    common = types.map(types.value_counts()) >= 10
    by_type = dense[common.to_numpy()].groupby(types[common].to_numpy()).mean()
    for cell_type, markers in {
        "B cell": ["MS4A1", "BANK1"],
        "T cell CD8": ["CD8A", "GZMK"],
        "Tregs": ["FOXP3", "CTLA4"],
        "Macrophages M2": ["CD163", "MRC1"],
        "plasma cell": ["MZB1", "TNFRSF17"],
    }.items():
        if cell_type not in by_type.index:
            continue
        for gene in markers:
            others = by_type.drop(index=cell_type)[gene]
            assert by_type.loc[cell_type, gene] > 5 * others.max(), (cell_type, gene)


def test_gene_subset_keeps_the_simulated_expression():
    kw = {"width": 300.0, "height": 300.0, "seed": 3, "progress": False, "spot_layouts": ("visium",)}
    full = c3.datasets.simulate_section(**kw)
    sub = c3.datasets.simulate_section(**kw, genes=["CD8A", "MS4A1", "EPCAM"])
    assert list(sub.tables["cell_table"].var_names) == ["CD8A", "MS4A1", "EPCAM"]
    assert set(sub.tables) == {"cell_table", "visium_table"}
    cols = [full.tables["cell_table"].var_names.get_loc(g) for g in ["CD8A", "MS4A1", "EPCAM"]]
    assert (full.tables["cell_table"].X[:, cols] != sub.tables["cell_table"].X).nnz == 0
    assert list(sub.points["transcripts"].compute()["gene"].cat.categories) == ["CD8A", "MS4A1", "EPCAM"]


# ---------------------------------------------------------------------------------------------- geometry
def test_labels_cells_transcripts_and_hne_line_up(section, transcripts):
    from skimage.color import rgb2hed

    labels = _labels(section)
    cells = section.shapes["cells"]
    x, y = cells.geometry.x.to_numpy(), cells.geometry.y.to_numpy()
    ids = cells.index.to_numpy()
    g = raster_geometry(section.labels["cell_labels"])
    i, j = (np.floor(v).astype(int) for v in g.to_pixel(y, x))
    assert np.array_equal(labels[i, j], ids)  # the label at every cell centre is the cell's id
    area = np.bincount(labels.ravel(), minlength=len(ids) + 1)[1:]
    assert (area <= np.pi * (cells["radius"].to_numpy() + 1) ** 2).all()  # a cell's pixels lie in its circle

    # transcripts lie in (or right next to) their cell; most of a cell's cytoplasmic transcripts on its own label
    cid = transcripts["cell_id"].to_numpy()
    tx, ty = transcripts["x"].to_numpy(), transcripts["y"].to_numpy()
    own = cid > 0
    k = cid[own] - 1
    dist = np.hypot(tx[own] - x[k], ty[own] - y[k])
    assert np.mean(dist <= cells["radius"].to_numpy()[k] + 2.5) > 0.999
    li, lj = (np.clip(np.floor(v).astype(int), 0, 639) for v in g.to_pixel(ty[own], tx[own]))
    assert np.mean(labels[li, lj] == cid[own]) > 0.85

    # H&E: haematoxylin at nuclei (lymphocyte and tumour nuclei are centred) far above the extracellular matrix
    hed = rgb2hed(np.moveaxis(_hne(section), 0, -1))[..., 0]
    gh = raster_geometry(section.images["hne"])
    types = section.tables["cell_table"].obs["cell_type"].to_numpy()
    centred = np.isin(types, ["Tumor", "B cell", "T cell CD4", "T cell CD8", "Tregs"])
    hi, hj = (np.floor(v).astype(int) for v in gh.to_pixel(y[centred], x[centred]))
    nuclei = hed[hi, hj]
    hne_labels = labels[np.arange(1280)[:, None] // 2, np.arange(1280)[None, :] // 2]
    matrix = hed[(hne_labels == 0) & (_hne(section).min(axis=0) < 215)]
    assert np.median(nuclei) > np.median(matrix) + 0.05
    assert np.mean(nuclei > np.median(matrix)) > 0.95
    # no half-pixel shift: the haematoxylin centroid of lymphocyte nuclei sits on the cell centre
    lymph = np.isin(types, ["B cell", "T cell CD4", "T cell CD8", "Tregs"])
    offsets = []
    for xc, yc in zip(x[lymph], y[lymph], strict=True):
        i, j = int(yc / gh.sy), int(xc / gh.sx)
        if 8 <= i < 1280 - 8 and 8 <= j < 1280 - 8:
            win = np.clip(hed[i - 8 : i + 9, j - 8 : j + 9] - np.median(matrix), 0, None)
            ii, jj = np.mgrid[i - 8 : i + 9, j - 8 : j + 9]
            offsets.append(
                (((jj + 0.5) * gh.sx * win).sum() / win.sum() - xc, ((ii + 0.5) * gh.sy * win).sum() / win.sum() - yc)
            )
    assert len(offsets) > 20
    assert np.all(np.abs(np.mean(offsets, axis=0)) < 0.1)
    # nuclear transcripts fall on dark (haematoxylin-rich) pixels
    nuc = transcripts["overlaps_nucleus"].to_numpy() & own
    ti, tj = (np.clip(np.floor(v).astype(int), 0, 1279) for v in gh.to_pixel(ty[nuc], tx[nuc]))
    assert np.median(hed[ti, tj]) > np.median(matrix) + 0.03


# ---------------------------------------------------------------------------------------------- biology
def test_immune_types_present_and_clustered():
    from scipy.spatial import cKDTree

    sd = c3.datasets.simulate_section(width=1000.0, height=1000.0, seed=1, progress=False, spot_layouts=())
    obs = sd.tables["cell_table"].obs
    xy = sd.tables["cell_table"].obsm["spatial"]
    counts = obs["cell_type"].value_counts()
    assert all(counts[t] >= 5 for t in IMMUNE_TYPES), counts
    tree = cKDTree(xy)
    _, nb = tree.query(xy, k=11)
    types = obs["cell_type"].to_numpy()
    for t, enrichment in (("B cell", 4.0), ("plasma cell", 2.5), ("T cell CD4", 2.0)):
        m = types == t
        same = (types[nb[m, 1:]] == t).mean()  # share of a cell's 10 neighbours that have its type
        assert same > enrichment * m.mean(), (t, same, m.mean())
    immune = np.isin(types, IMMUNE_TYPES)
    assert immune[nb[immune, 1:]].mean() > 1.6 * immune.mean()
    # B cells sit in follicles, closer to each other than T cells are to B cells
    b = xy[types == "B cell"]
    dist_b, _ = cKDTree(b).query(b, k=2)
    t4 = xy[types == "T cell CD4"]
    dist_t, _ = cKDTree(b).query(t4, k=1)
    assert np.median(dist_b[:, 1]) < np.median(dist_t)
    # infiltrates: CD8 T cells are enriched at tumour borders, plasma cells in stroma
    niche = obs["niche"].to_numpy()
    assert np.mean(niche[types == "T cell CD8"] == "tumor_border") > np.mean(niche == "tumor_border")
    assert np.mean(np.isin(niche[types == "plasma cell"], ["stroma", "tumor_border"])) > 0.5


def test_true_cell_types_follow_the_cells(section):
    sd = section
    c3.datasets.true_cell_types(sd, pixel_size=10.0, key_added="tct")
    out = np.asarray(scale0(sd.labels["tct"]).data)
    assert out.shape == (64, 64)
    g = raster_geometry(sd.labels["tct"])
    assert (g.sy, g.sx, g.y0, g.x0) == (10.0, 10.0, 0.0, 0.0)
    mapping = sd.attrs["c3diff"]["tct"]["labels"]
    types = list(sd.tables["cell_table"].obs["cell_type"].cat.categories)
    assert mapping == {i + 1: t for i, t in enumerate(types)}
    # brute force: the majority type by area of every 10 x 10 label block
    labels = _labels(sd)
    code = np.concatenate([[0], sd.tables["cell_table"].obs["cell_type"].cat.codes.to_numpy() + 1])
    blocks = code[labels].reshape(64, 10, 64, 10).transpose(0, 2, 1, 3).reshape(64, 64, 100)
    expected = np.zeros((64, 64), int)
    for a in range(64):
        for b in range(64):
            counts = np.bincount(blocks[a, b], minlength=len(types) + 1)
            if counts[1:].max() > 0:
                expected[a, b] = counts[1:].argmax() + 1
    assert np.array_equal(out, expected)
    assert (out > 0).mean() > 0.3

    # immune subset: values index IMMUNE_TYPES, other cells are background; sdata untouched with inplace=False
    before = set(sd.labels)
    imm = c3.datasets.true_cell_types(sd, types=IMMUNE_TYPES, pixel_size=20.0, inplace=False)
    assert set(sd.labels) == before
    assert imm.shape == (32, 32) and imm.attrs["c3diff"]["labels"][1] == "B cell"
    values = np.asarray(imm.data)
    assert values.max() <= 7 and (values > 0).any()
    is_immune = np.isin(code[labels], [types.index(t) + 1 for t in IMMUNE_TYPES])
    has_immune = is_immune.reshape(32, 20, 32, 20).any(axis=(1, 3))
    assert np.array_equal(values > 0, has_immune)


def test_true_cell_types_errors(section):
    with pytest.raises(ValueError, match="finer than the label raster"):
        c3.datasets.true_cell_types(section, pixel_size=0.5)
    with pytest.raises(KeyError, match="Macrophages M9"):
        c3.datasets.true_cell_types(section, types=["Macrophages M9"])
    with pytest.raises(KeyError, match="labels_key"):
        c3.datasets.true_cell_types(section, labels_key="nope")


# ---------------------------------------------------------------------------------------------- errors, io
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"width": 0}, ValueError, "width"),
        ({"height": -5}, ValueError, "height"),
        ({"width": 100}, ValueError, "at least 200 um"),
        ({"spot_layouts": ("visium", "slide-seq")}, ValueError, "slide-seq"),
        ({"spot_layouts": ("visium", "visium")}, ValueError, "more than once"),
        ({"genes": ["CD8A", "NOTAGENE"]}, KeyError, "NOTAGENE"),
        ({"pixel_size": 10.0}, ValueError, "pixel_size"),
        ({"tissue_fraction": 0.0}, ValueError, "tissue_fraction"),
        ({"tumor_fraction": 0.7, "fat_fraction": 0.5}, ValueError, "tumor_fraction"),
        ({"n_lymphoid_aggregates": 1.5}, ValueError, "n_lymphoid_aggregates"),
        ({"seed": -1}, TypeError, "seed"),
        ({"width": 200000.0, "height": 200000.0}, ValueError, "pixels"),
    ],
)
def test_bad_parameters_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        c3.datasets.simulate_section(progress=False, **kwargs)


def test_write_and_read_back(tmp_path):
    import spatialdata

    sd = c3.datasets.simulate_section(width=300.0, height=240.0, seed=5, progress=False)
    c3.datasets.true_cell_types(sd)
    path = tmp_path / "section.zarr"
    sd.write(path)
    back = spatialdata.read_zarr(path)
    assert set(back.images) == {"hne"} and set(back.labels) == {"cell_labels", "true_cell_types"}
    assert np.array_equal(_hne(back), _hne(sd))
    shapes = [lv.shape for lv in raster_levels(sd.images["hne"])]
    assert [lv.shape for lv in raster_levels(back.images["hne"])] == shapes
    assert np.array_equal(_labels(back), _labels(sd))
    assert raster_geometry(back.images["hne"]).sx == 0.5
    a, b = sd.points["transcripts"].compute(), back.points["transcripts"].compute()
    assert np.array_equal(a["x"].to_numpy(), b["x"].to_numpy()) and (a["gene"] == b["gene"]).all()
    assert (back.tables["visium_table"].X != sd.tables["visium_table"].X).nnz == 0
    assert back.attrs["c3diff"]["simulation"]["seed"] == 5
    assert back.attrs["c3diff"]["simulation"]["gene_kinds"] == sd.attrs["c3diff"]["simulation"]["gene_kinds"]
