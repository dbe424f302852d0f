"""c3diff.pl: figures are built from the transforms, have the expected panels and fail clearly."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import c3diff as c3  # noqa: E402

GENES = ["CD3E", "MS4A1", "EPCAM"]
EXTENT_X, EXTENT_Y = (200.0, 200.0 + 48 * 10.0), (100.0, 100.0 + 40 * 10.0)


def _transform(pixel: float, origin: tuple[float, float]):
    from spatialdata.transformations import Scale, Sequence, Translation

    return {"global": Sequence([Scale([pixel, pixel], axes=("y", "x")), Translation(list(origin), axes=("y", "x"))])}


def _raster(values, pixel, origin=(100.0, 200.0), genes=GENES):
    from spatialdata.models import Image2DModel

    return Image2DModel.parse(
        np.asarray(values, np.float32), dims=("c", "y", "x"), c_coords=genes, transformations=_transform(pixel, origin)
    )


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def sdata():
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(0)
    pred = rng.gamma(2.0, 1.0, size=(3, 40, 48))
    # H&E at 2 um/px, larger than the prediction, with a pyramid
    hne = Image2DModel.parse(
        rng.integers(0, 255, size=(3, 300, 400), dtype=np.uint8),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=_transform(2.0, (50.0, 150.0)),
        scale_factors=[2, 2],
    )
    xs, ys = np.meshgrid(np.arange(250.0, 700.0, 100.0), np.arange(150.0, 500.0, 100.0))
    xy = np.column_stack([xs.ravel(), ys.ravel()])
    shapes = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(xs.size, 27.5),
        index=pd.Index(np.arange(xs.size), name="spot_id"),
        transformations={"global": Identity()},
    )
    table = ad.AnnData(rng.poisson(5.0, size=(xs.size, 3)).astype(np.float32))
    table.var_names = GENES
    table.obs["spot_id"] = np.arange(xs.size)
    table.obs["region"] = pd.Categorical(["spots"] * xs.size)
    table.obsm["spatial"] = xy
    table.obs["in_tissue"] = np.arange(xs.size) != 0
    table.uns["c3diff"] = {"spots": {"layout": "visium", "diameter_um": 55.0, "pitch_um": 100.0}}
    return SpatialData(
        images={
            "hne": hne,
            "sr": _raster(pred, 10.0),
            "lr": _raster(pred.reshape(3, 4, 10, 6, 8).sum(axis=(2, 4)), 100.0, (100.0, 200.0)),
            "truth": _raster(rng.poisson(pred), 10.0),
            "sr_std": _raster(pred * 0.1, 10.0),
        },
        shapes={"spots": shapes},
        tables={"spots_table": TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")},
    )


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_super_resolved_panels_titles_and_extent(sdata):
    fig = c3.pl.super_resolved(sdata, "sr", ["CD3E", "MS4A1"], lr_key="lr", truth_key="truth", std_key="sr_std")
    assert isinstance(fig, Figure)
    panels = _panels(fig)
    assert len(panels) == 2 * 5
    assert len(fig.axes) - len(panels) == 2 * 4  # a colourbar per map, none for the H&E
    assert [ax.get_title() for ax in panels[:5]] == [
        "CD3E: H&E",
        "CD3E: LR input",
        "CD3E: prediction",
        "CD3E: truth",
        "CD3E: std",
    ]
    assert panels[5].get_title() == "MS4A1: H&E"
    for ax in panels:  # every panel shows the prediction's extent in um, y running down
        np.testing.assert_allclose(ax.get_xlim(), EXTENT_X)
        np.testing.assert_allclose(ax.get_ylim(), EXTENT_Y[::-1])
    # the LR raster is placed by its own transform (100 um pixels), the prediction by its own
    lr_image = panels[1].get_images()[0]
    # (6 columns of 100 um from x = 200 um; those reaching into the 480 um wide view are drawn)
    assert lr_image.get_array().shape == (4, 5)
    np.testing.assert_allclose(lr_image.get_extent(), [200.0, 700.0, 500.0, 100.0])
    np.testing.assert_allclose(panels[2].get_images()[0].get_array(), sdata.images["sr"].sel(c="CD3E").values)


def test_super_resolved_hne_uses_a_coarser_level_and_overlay(sdata):
    fig = c3.pl.super_resolved(sdata, "sr", "EPCAM", overlay=True, max_pixels=100)
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == ["EPCAM: H&E", "EPCAM: prediction"]
    hne = panels[0].get_images()[0]
    # the view is 480 um wide: level 1 (4 um/px) is the coarsest with >= 100 pixels across it (level 2 has 60);
    # its crop covers the view with whole pixels (12.5 .. 132.5 -> columns 12 .. 133)
    assert hne.get_array().shape[:2] == (101, 121)
    np.testing.assert_allclose(hne.get_extent(), [198.0, 682.0, 502.0, 98.0])
    images = panels[1].get_images()
    assert len(images) == 2 and images[1].get_alpha() == pytest.approx(0.6)  # prediction over the H&E


def test_super_resolved_spot_table_input(sdata):
    fig = c3.pl.super_resolved(sdata, "sr", ["MS4A1"], lr_key="spots_table", image_key=None)
    lr_panel = _panels(fig)[0]
    assert lr_panel.get_title() == "MS4A1: LR input"
    (spots,) = [c for c in lr_panel.collections if isinstance(c, PatchCollection)]
    table = sdata.tables["spots_table"]
    keep = table.obs["in_tissue"].to_numpy()
    np.testing.assert_allclose(spots.get_array(), table[keep, "MS4A1"].X.ravel())
    assert len(spots.get_paths()) == keep.sum()
    # each disc has the spot's true diameter, at its centre in um
    first = spots.get_paths()[0].get_extents()
    np.testing.assert_allclose([first.width, first.height], [55.0, 55.0], rtol=1e-3)
    np.testing.assert_allclose(
        [(first.x0 + first.x1) / 2, (first.y0 + first.y1) / 2], table.obsm["spatial"][keep][0], atol=1e-6
    )


def test_super_resolved_errors(sdata):
    with pytest.raises(KeyError, match="NOPE"):
        c3.pl.super_resolved(sdata, "sr", ["CD3E", "NOPE"])
    with pytest.raises(KeyError, match="`key='missing'`"):
        c3.pl.super_resolved(sdata, "missing", ["CD3E"])
    with pytest.raises(KeyError, match="`image_key='he'`"):
        c3.pl.super_resolved(sdata, "sr", ["CD3E"], image_key="he")
    with pytest.raises(KeyError, match="neither a gene raster"):
        c3.pl.super_resolved(sdata, "sr", ["CD3E"], lr_key="nothing")
    sdata.images["truth2"] = _raster(np.ones((1, 4, 4)), 10.0, genes=["CD3E"])
    with pytest.raises(KeyError, match="truth_key='truth2'"):
        c3.pl.super_resolved(sdata, "sr", ["MS4A1"], truth_key="truth2")
    with pytest.raises(ValueError, match="overlay"):
        c3.pl.super_resolved(sdata, "sr", ["CD3E"], image_key=None, overlay=True)


def test_celltype_map_figure(sdata):
    from spatialdata.models import Labels2DModel

    markers = {"T cell": ["CD3E"], "B cell": ["MS4A1"], "Tumour": ["EPCAM"]}
    c3.tl.celltype_map(sdata, "sr", markers=markers)
    truth = np.zeros((40, 48), dtype=np.uint8)
    truth[:, :24] = 1
    truth[:, 24:] = 2
    sdata.labels["true_types"] = Labels2DModel.parse(
        truth, dims=("y", "x"), transformations=_transform(10.0, (100.0, 200.0))
    )
    # names recorded as a value -> name mapping (as c3.datasets.true_cell_types writes them)
    sdata.attrs["c3diff"]["true_types"] = {"labels": {1: "T cell", 2: "Tumour"}}
    fig = c3.pl.celltype_map(sdata, "sr_celltypes", truth_key="true_types")
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == ["hne", "sr_celltypes", "true_types (truth)"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["T cell", "B cell", "Tumour"]
    # label colours follow the type, and "no call" (0) is transparent
    rgba = panels[2].get_images()[0].get_array()
    assert rgba.shape == (40, 48, 4)
    np.testing.assert_allclose(rgba[0, 0], legend.get_patches()[0].get_facecolor())  # T cell
    np.testing.assert_allclose(rgba[0, -1], legend.get_patches()[2].get_facecolor())  # Tumour, label 2 of the truth
    for ax in panels:
        np.testing.assert_allclose(ax.get_xlim(), EXTENT_X)


def test_celltype_map_figure_errors(sdata):
    from spatialdata.models import Labels2DModel

    sdata.labels["plain"] = Labels2DModel.parse(
        np.full((40, 48), 3, np.uint8), dims=("y", "x"), transformations=_transform(10.0, (100.0, 200.0))
    )
    with pytest.raises(KeyError, match="Pass `categories`"):
        c3.pl.celltype_map(sdata, "plain")
    with pytest.raises(ValueError, match="go up to 3 but only 2"):
        c3.pl.celltype_map(sdata, "plain", categories=["a", "b"])
    with pytest.raises(KeyError, match="not in `sdata.labels`"):
        c3.pl.celltype_map(sdata, "nope")
    fig = c3.pl.celltype_map(sdata, "plain", categories=["a", "b", "c"], image_key=None, palette={"c": "red"})
    np.testing.assert_allclose(_panels(fig)[0].get_images()[0].get_array()[0, 0], [1, 0, 0, 1])


def test_super_resolved_compares_methods_side_by_side(sdata):
    sdata.images["sr_other"] = sdata.images["sr"]
    fig = c3.pl.super_resolved(
        sdata, "sr", ["CD3E"], image_key=None, compare_keys={"bicubic": "sr_other"}, label="C3-Diff"
    )
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == ["CD3E: bicubic", "CD3E: C3-Diff"]
    np.testing.assert_allclose(panels[0].get_images()[0].get_array(), panels[1].get_images()[0].get_array())
    with pytest.raises(KeyError, match="compare_keys\\['bicubic'\\]"):
        c3.pl.super_resolved(sdata, "sr", ["CD3E"], compare_keys={"bicubic": "nope"})
    with pytest.raises(ValueError, match="clashes"):
        c3.pl.super_resolved(sdata, "sr", ["CD3E"], compare_keys={"x": "sr_other"}, label="x")


def test_single_scale_large_hne_is_reduced_lazily_before_drawing():
    """A large single-scale H&E (dask, as read from a store) is block-averaged chunk by chunk to about `max_pixels`
    across the view: the figure holds a small array, not the full image (issue 16: 9.9k x 9.3k drew 7 GB)."""
    import dask.array as da
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    h, w = 3000, 2400  # 0.5 um/px: 1500 x 1200 um
    rows = da.arange(h, chunks=1024, dtype=np.int64)[:, None] // 300
    cols = da.arange(w, chunks=1024, dtype=np.int64)[None, :] // 300
    stripes = ((rows + cols) % 2 * 200 + 20).astype(np.uint8)  # 300 px checkerboard of 20 / 220
    hne = Image2DModel.parse(
        da.stack([stripes] * 3),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=_transform(0.5, (0.0, 0.0)),
    )
    assert isinstance(hne.data, da.Array) and len(hne.data.chunks[1]) > 1
    pred = np.random.default_rng(0).gamma(2.0, 1.0, size=(1, 150, 120))
    sdata = SpatialData(images={"hne": hne, "sr": _raster(pred, 10.0, (0.0, 0.0), ["CD3E"])})
    fig = c3.pl.super_resolved(sdata, "sr", ["CD3E"], max_pixels=256)
    drawn = _panels(fig)[0].get_images()[0]
    array = drawn.get_array()
    # factor 3000 // 256 = 11: 272 x 218 block means, placed over 272 * 11 * 0.5 um
    assert array.shape == (272, 218, 3) and array.dtype == np.uint8
    np.testing.assert_allclose(drawn.get_extent(), [0.0, 218 * 5.5, 272 * 5.5, 0.0])
    # a block inside a checkerboard square keeps its value; one across an edge is averaged
    assert array[0, 0, 0] == 20 and array[30, 0, 0] == 220
    assert 20 < array[27, 0, 0] < 220  # rows 297..307 straddle the edge at 300

    from c3diff.pl._render import downsample

    labels = sdata.images["hne"].isel(c=0).drop_vars("c")  # no channel axis: labels are subsampled, not averaged
    sub = downsample(labels.isel(y=slice(290, 320), x=slice(0, 30)), 10)
    assert set(np.unique(sub).tolist()) <= {20, 220}
    gene = _raster(np.array([[[np.nan, 1.0], [3.0, np.nan]]]), 10.0, genes=["CD3E"]).isel(c=slice(0, 1))
    np.testing.assert_allclose(downsample(gene, 2), [[[2.0]]])  # NaN-aware mean


def test_celltype_map_names_from_the_annotating_table(sdata):
    markers = {"T cell": ["CD3E"], "B cell": ["MS4A1"], "Tumour": ["EPCAM"]}
    c3.tl.celltype_map(sdata, "sr", markers=markers, min_score=0.0)
    del sdata.attrs["c3diff"]["sr_celltypes"]  # e.g. a store written by another tool: only the table names them
    fig = c3.pl.celltype_map(sdata, "sr_celltypes", image_key=None)
    (legend,) = fig.legends
    assert [t.get_text().removesuffix(" (absent)") for t in legend.get_texts()] == ["T cell", "B cell", "Tumour"]


def test_spatialdata_plot_shows_the_type_names(sdata):
    """The table written by celltype_map is what spatialdata-plot needs to colour the labels by name."""
    pytest.importorskip("spatialdata_plot")
    markers = {"T cell": ["CD3E"], "B cell": ["MS4A1"], "Tumour": ["EPCAM"]}
    c3.tl.celltype_map(sdata, "sr", markers=markers, min_score=0.3)
    sdata.pl.render_labels("sr_celltypes", color="cell_type", table_name="sr_celltypes_table").pl.show()
    legend = [t.get_text() for ax in plt.gcf().axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    present = sdata.tables["sr_celltypes_table"].obs.query("n_pixels > 0")["cell_type"].tolist()
    assert sorted(legend) == sorted(present) and len(present) >= 2
