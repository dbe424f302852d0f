"""Readers: tiny fixture folders in the real file formats, written here (Space Ranger, legacy ST, Xenium)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import c3diff as c3
from c3diff._constants import Key
from c3diff._validation import raster_geometry, scale0

GENES = ["GAPDH", "ACTB", "CD3E", "CD3E", "KRT8"]  # a duplicated symbol, as in real 10x panels
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------------------------- helpers
def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], names: list[str], types: list[str] | None = None):
    """CellRanger v3 HDF5: ``matrix/`` holds a features x barcodes CSC matrix (one indptr entry per barcode)."""
    types = types or ["Gene Expression"] * len(names)
    data, indices, indptr = [], [], [0]
    for row in counts:  # one barcode = one column of the features x barcodes matrix
        nz = np.flatnonzero(row)
        data.extend(row[nz].tolist())
        indices.extend(nz.tolist())
        indptr.append(len(data))
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=np.array(data, dtype=np.int32))
        m.create_dataset("indices", data=np.array(indices, dtype=np.int64))
        m.create_dataset("indptr", data=np.array(indptr, dtype=np.int64))
        m.create_dataset("shape", data=np.array([len(names), len(barcodes)], dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))
        feat.create_dataset("id", data=np.array([f"ENSG{i:011d}" for i in range(len(names))], dtype="S"))
        feat.create_dataset("name", data=np.array(names, dtype="S"))
        feat.create_dataset("feature_type", data=np.array(types, dtype="S"))
        feat.create_dataset("genome", data=np.array(["GRCh38"] * len(names), dtype="S"))


def disc_image(height: int, width: int, centres_rc: list[tuple[float, float]], radius: float = 2.0) -> np.ndarray:
    """Light-pink RGB image with dark discs centred on pixel-index coordinates (row, col)."""
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = (235, 200, 220)
    rows, cols = np.mgrid[:height, :width]
    for r, c in centres_rc:
        image[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = (40, 20, 60)
    return image


def darkest_centre_um(sdata, key: str = Key.HNE.value) -> np.ndarray:
    """(x, y) um of the centre of the dark disc (mean of its pixels' centres) through the image transform."""
    element = sdata.images[key]
    geometry = raster_geometry(element)
    pixels = np.asarray(scale0(element).data).sum(axis=0)
    rows, cols = np.nonzero(pixels < (int(pixels.min()) + int(pixels.max())) / 2)  # the disc, JPEG noise aside
    ys, xs = geometry.pixel_centres()
    return np.array([xs[cols].mean(), ys[rows].mean()])


def counts_of(table) -> np.ndarray:
    return np.asarray(table.X.todense())


# --------------------------------------------------------------------------------------------- Visium
SPOT_DIAMETER_FULLRES = 13.0  # -> 65 / 13 = 5 um per full-res px; the 100 um pitch is 20 px
HIRES, LOWRES = 0.5, 0.25  # hires px = 10 um, lowres px = 20 um


def visium_lattice():
    """20 spots (4 rows x 5) on the Visium hex lattice in full-res px, plus 6 off-tissue positions."""
    rows, cols = [], []
    for r in range(5):
        for k in range(6):
            rows.append(r)
            cols.append(2 * k + r % 2)
    rows, cols = np.array(rows), np.array(cols)
    x = 40 + cols * 10.0  # array_col step = half the pitch = 50 um = 10 px
    y = 30 + rows * 10.0 * np.sqrt(3)  # array_row step = 86.6 um
    return rows, cols, x, y


def make_visium(root: Path, *, layout: str = "sr2", hires: str = "ok", scalef_hires: float = HIRES) -> dict:
    spatial = root / "spatial"
    spatial.mkdir(parents=True)
    rows, cols, x, y = visium_lattice()
    n_all = len(rows)
    barcodes = [f"{''.join(RNG.choice(list('ACGT'), 16))}-1" for _ in range(n_all)]
    in_tissue = np.ones(n_all, dtype=int)
    in_tissue[-6:] = 0  # last row: background, not in the filtered matrix
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": np.rint(y).astype(int),
            "pxl_col_in_fullres": np.rint(x).astype(int),
        }
    )
    if layout == "sr2":
        positions.to_csv(spatial / "tissue_positions.csv", index=False)
    else:
        positions.to_csv(spatial / "tissue_positions_list.csv", index=False, header=False)
    scalefactors = {
        "spot_diameter_fullres": SPOT_DIAMETER_FULLRES,
        "tissue_hires_scalef": scalef_hires,
        "fiducial_diameter_fullres": 21.0,
        "tissue_lowres_scalef": LOWRES,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    marked = 7  # the spot drawn as a dark disc
    px, py = positions.pxl_col_in_fullres[marked], positions.pxl_row_in_fullres[marked]
    if hires != "missing":
        image = disc_image(96, 96, [(py * scalef_hires, px * scalef_hires)], radius=1.5)
        if hires == "blank":
            image[:] = 0
        Image.fromarray(image).save(spatial / "tissue_hires_image.png")
    Image.fromarray(disc_image(48, 48, [(py * LOWRES, px * LOWRES)], radius=1.0)).save(
        spatial / "tissue_lowres_image.png"
    )
    keep = in_tissue.astype(bool)
    counts = RNG.poisson(3.0, size=(int(keep.sum()), len(GENES)))
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", counts, list(np.array(barcodes)[keep]), GENES)
    return {"counts": counts, "barcodes": list(np.array(barcodes)[keep]), "marked": marked, "positions": positions}


@pytest.mark.parametrize("layout", ["sr2", "sr1"])
def test_read_visium_elements_calibration_counts(tmp_path, layout):
    truth = make_visium(tmp_path, layout=layout)
    with pytest.warns(UserWarning, match="55 um spot is only 5.5 px across"):  # the fixture's hires is 10 um/px
        sdata = c3.io.read_visium(tmp_path)

    assert set(sdata.images) == {Key.HNE.value}
    assert set(sdata.shapes) == {Key.SPOTS.value}
    assert set(sdata.tables) == {Key.SPOT_TABLE.value}
    table = sdata.tables[Key.SPOT_TABLE.value]
    assert table.shape == (24, 5)
    np.testing.assert_array_equal(counts_of(table), truth["counts"])
    assert list(table.obs_names) == truth["barcodes"]
    assert table.var_names.is_unique and "CD3E" in table.var_names
    assert table.obs["in_tissue"].all() and table.obs["region"].eq(Key.SPOTS.value).all()
    assert table.uns["c3diff"]["spots"]["layout"] == "visium"
    assert table.uns["c3diff"]["spots"]["diameter_um"] == 55.0

    geometry = raster_geometry(sdata.images[Key.HNE.value])
    assert geometry.sx == pytest.approx(65 / SPOT_DIAMETER_FULLRES / HIRES)  # 10 um/px
    assert geometry.sy == pytest.approx(10.0)
    assert np.asarray(scale0(sdata.images[Key.HNE.value]).data).dtype == np.uint8

    pos = truth["positions"].set_index("barcode").loc[truth["barcodes"]]
    expected = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float) * 65 / SPOT_DIAMETER_FULLRES
    np.testing.assert_allclose(table.obsm["spatial"], expected)
    shapes = sdata.shapes[Key.SPOTS.value]
    np.testing.assert_allclose(shapes["radius"], 27.5)
    np.testing.assert_allclose(np.c_[shapes.geometry.x, shapes.geometry.y], expected)
    # the dark disc drawn under one spot is found at that spot's micrometre position
    marked = truth["positions"].barcode[truth["marked"]]
    spot = table.obsm["spatial"][table.obs_names.get_loc(marked)]
    np.testing.assert_allclose(darkest_centre_um(sdata), spot, atol=1.0)
    assert table.uns["c3diff"]["spots"]["closest_spacing_um"] == pytest.approx(100.0, rel=0.03)
    reader = sdata.attrs["c3diff"]["reader"]
    assert reader["name"] == "read_visium" and reader["image"] == "hires" and reader["path"] == str(tmp_path)


def test_read_visium_fullres_tiff(tmp_path):
    import tifffile

    truth = make_visium(tmp_path)
    pos = truth["positions"]
    marked = truth["marked"]
    image = disc_image(220, 200, [(pos.pxl_row_in_fullres[marked], pos.pxl_col_in_fullres[marked])], radius=3.0)
    tifffile.imwrite(tmp_path / "fullres.ome.tif", image, ome=True, photometric="rgb", tile=(64, 64))
    sdata = c3.io.read_visium(tmp_path, fullres_image=tmp_path / "fullres.ome.tif")
    assert sdata.attrs["c3diff"]["reader"]["image"] == "fullres"
    element = sdata.images[Key.HNE.value]
    assert raster_geometry(element).sx == pytest.approx(5.0) and scale0(element).shape == (3, 220, 200)
    table = sdata.tables[Key.SPOT_TABLE.value]
    spot = table.obsm["spatial"][table.obs_names.get_loc(pos.barcode[marked])]
    np.testing.assert_allclose(darkest_centre_um(sdata), spot, atol=0.5)


def test_read_visium_blank_hires_falls_back_to_lowres_and_warns(tmp_path):
    truth = make_visium(tmp_path, hires="blank")
    with pytest.warns(UserWarning) as record:
        sdata = c3.io.read_visium(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "blank" in messages and "tissue_lowres_image.png" in messages
    assert "2.8 px across" in messages  # 55 um spot at 20 um/px
    assert raster_geometry(sdata.images[Key.HNE.value]).sx == pytest.approx(20.0)
    assert sdata.attrs["c3diff"]["reader"]["image"] == "lowres"
    table = sdata.tables[Key.SPOT_TABLE.value]
    marked = truth["positions"].barcode[truth["marked"]]
    spot = table.obsm["spatial"][table.obs_names.get_loc(marked)]
    np.testing.assert_allclose(darkest_centre_um(sdata), spot, atol=10.0)  # within half a 20 um lowres pixel


def test_read_visium_missing_hires_warns(tmp_path):
    make_visium(tmp_path, hires="missing")
    missing = pytest.warns(UserWarning, match="hires_image.png is missing")
    coarse = pytest.warns(UserWarning, match="2.8 px")
    with missing, coarse:
        sdata = c3.io.read_visium(tmp_path)
    assert sdata.attrs["c3diff"]["reader"]["image"] == "lowres"
    with pytest.raises(FileNotFoundError, match="hires H&E"):
        c3.io.read_visium(tmp_path, image="hires")
    no_image = c3.io.read_visium(tmp_path, image=None)
    assert len(no_image.images) == 0 and Key.SPOTS.value in no_image.shapes


def test_read_visium_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Space Ranger `outs` folder"):
        c3.io.read_visium(tmp_path / "nope")
    make_visium(tmp_path)
    (tmp_path / "spatial" / "scalefactors_json.json").rename(tmp_path / "sf.json")
    with pytest.raises(FileNotFoundError, match=r"scale factors at .*scalefactors_json.json"):
        c3.io.read_visium(tmp_path)
    (tmp_path / "sf.json").rename(tmp_path / "spatial" / "scalefactors_json.json")
    with pytest.raises(ValueError, match="`fullres_image` becomes the H&E with image='auto'"):
        c3.io.read_visium(tmp_path, image="hires", fullres_image=tmp_path / "x.tif")
    with pytest.raises(FileNotFoundError, match="counts matrix"):
        c3.io.read_visium(tmp_path, counts_file="raw_feature_bc_matrix.h5")
    (tmp_path / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="tissue_positions_list.csv for Space Ranger 1.x"):
        c3.io.read_visium(tmp_path)


def test_read_visium_uncalibrated_and_mismatched(tmp_path):
    make_visium(tmp_path)
    sf_path = tmp_path / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    del sf["spot_diameter_fullres"]
    sf_path.write_text(json.dumps(sf))
    with pytest.raises(ValueError, match="no micrometre calibration"):
        c3.io.read_visium(tmp_path)

    other = tmp_path / "other"
    make_visium(other)
    positions = pd.read_csv(other / "spatial" / "tissue_positions.csv")
    positions["barcode"] = [f"TTTT{i:012d}-1" for i in range(len(positions))]
    positions.to_csv(other / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(ValueError, match="different runs"):
        c3.io.read_visium(other)


def test_read_visium_no_spot_under_tissue(tmp_path):
    make_visium(tmp_path)
    positions = pd.read_csv(tmp_path / "spatial" / "tissue_positions.csv")
    positions["in_tissue"] = 0
    positions.to_csv(tmp_path / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(ValueError, match="None of the 24 spots is under tissue"):
        c3.io.read_visium(tmp_path)


def test_read_visium_spots_outside_image(tmp_path):
    make_visium(tmp_path, scalef_hires=0.05)  # the hires image then covers 96 px * 100 um, but claims too little
    sf_path = tmp_path / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    sf["tissue_hires_scalef"] = 5.0  # now each hires px is 1 um: the 96 um image misses most spots
    sf_path.write_text(json.dumps(sf))
    with pytest.raises(ValueError, match="fall outside the image"):
        c3.io.read_visium(tmp_path, image="hires")


def test_visium_from_arrays_giotto_style_extent(tmp_path):
    """Spots with y running up (Giotto) and an image placed by its extent, as the Giotto mini Visium ships."""
    _, _, x, y = visium_lattice()
    n = len(x)
    counts = RNG.poisson(2.0, size=(n, 3)).astype(np.float32)
    adata = ad.AnnData(
        counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]), var=pd.DataFrame(index=["a", "b", "c"])
    )
    sdimx, sdimy = x, -y  # Giotto's full-res coordinates, y up
    xmin, xmax, ymin, ymax = 20.0, 160.0, 10.0, 110.0  # image edges in full-res px, y down
    width, height = 70, 50  # 2 full-res px = 10 um per image px
    marked = 9
    col = (sdimx[marked] - xmin) / 2 - 0.5  # pixel index (centre at integer) of the marked spot
    row = (-sdimy[marked] - ymin) / 2 - 0.5
    image = disc_image(height, width, [(row, col)], radius=1.0)
    with pytest.warns(UserWarning, match="5.5 px across"):
        sdata = c3.io.visium_from_arrays(
            adata,
            spatial=np.c_[sdimx, -sdimy],
            spot_diameter_fullres=SPOT_DIAMETER_FULLRES,
            image=image,
            image_extent=(xmin, xmax, ymin, ymax),
        )
    geometry = raster_geometry(sdata.images[Key.HNE.value])
    assert (geometry.x0, geometry.y0, geometry.sx, geometry.sy) == pytest.approx((100.0, 50.0, 10.0, 10.0))
    table = sdata.tables[Key.SPOT_TABLE.value]
    np.testing.assert_array_equal(counts_of(table), counts)
    np.testing.assert_allclose(darkest_centre_um(sdata), table.obsm["spatial"][marked], atol=5.0)  # half a pixel
    with pytest.raises(ValueError, match="exactly one of `image_scalef` or `image_extent`"):
        c3.io.visium_from_arrays(adata, spatial=np.c_[x, y], spot_diameter_fullres=13.0, image=image)
    with pytest.raises(ValueError, match="shape"):
        c3.io.visium_from_arrays(adata, spatial=np.c_[x, y][:5], spot_diameter_fullres=13.0)
    with pytest.warns(UserWarning, match="not the Visium pitch"):
        c3.io.visium_from_arrays(adata, spatial=np.c_[x, y], spot_diameter_fullres=9.0)


# --------------------------------------------------------------------------------------------- legacy ST
def make_legacy_st(
    root: Path,
    *,
    staggered: bool = False,
    spot_file: str = "her2st",
    transpose: bool = False,
    px_per_unit: tuple[float, float] = (20.0, 20.0),
    image_size: int = 140,
    ensembl: bool = False,
):
    root.mkdir(parents=True, exist_ok=True)
    if staggered:
        grid = [(x, y) for x in range(1, 9) for y in range(1, 9) if (x + y) % 2 == 0]
    else:
        grid = [(x, y) for x in range(1, 6) for y in range(1, 6)]
    xs, ys = np.array(grid).T
    pixel_x = 10 + (xs - 1) * px_per_unit[0]
    pixel_y = 12 + (ys - 1) * px_per_unit[1]
    selected = np.ones(len(grid), dtype=int)
    selected[:3] = 0
    spots = pd.DataFrame(
        {
            "x": xs,
            "y": ys,
            "new_x": xs + 0.01,
            "new_y": ys - 0.01,
            "pixel_x": pixel_x,
            "pixel_y": pixel_y,
            "selected": selected,
        }
    )
    if spot_file == "her2st":
        spots.to_csv(root / "S_selection.tsv", sep="\t", index=False)
    elif spot_file == "headerless":
        spots.drop(columns="selected").to_csv(root / "S_selection.tsv", sep="\t", index=False, header=False)
    elif spot_file == "no_pixels":
        spots.drop(columns=["pixel_x", "pixel_y"]).to_csv(root / "S_selection.tsv", sep="\t", index=False)
    # counts for 20 of the spots (+ one id the spot file lacks)
    ids = [f"{x}x{y}" for x, y in grid[:20]] + ["99x99"]
    genes = [f"ENSMUSG{i:011d}.1" for i in range(5)] if ensembl else ["Gapdh", "Actb", "Cd3e", "Krt8", "Mbp"]
    counts = pd.DataFrame(RNG.poisson(4.0, size=(len(ids), 5)), index=ids, columns=genes)
    (counts.T if transpose else counts).to_csv(root / "S.tsv.gz", sep="\t", compression="gzip")
    marked = 12
    image = disc_image(image_size, image_size, [(pixel_y[marked], pixel_x[marked])], radius=2.0)
    Image.fromarray(image).save(root / "HE.jpg", quality=95)
    return {
        "counts": counts,
        "spots": spots,
        "marked": marked,
        "paths": (root / "S.tsv.gz", root / "S_selection.tsv", root / "HE.jpg"),
    }


def test_read_legacy_st_calibration_counts_and_positions(tmp_path):
    truth = make_legacy_st(tmp_path)
    with pytest.warns(UserWarning, match="1 of 21 spots of `counts` have no entry"):
        sdata = c3.io.read_legacy_st(*truth["paths"])
    assert set(sdata.images) == {Key.HNE.value} and set(sdata.shapes) == {Key.SPOTS.value}
    table = sdata.tables[Key.SPOT_TABLE.value]
    np.testing.assert_array_equal(counts_of(table), truth["counts"].iloc[:20].to_numpy())
    assert list(table.obs_names) == list(truth["counts"].index[:20])
    reader = sdata.attrs["c3diff"]["reader"]
    assert reader["um_per_px"] == pytest.approx([10.0, 10.0])  # 200 um pitch / 20 px
    assert reader["fit_rms_um"] == pytest.approx(0.0, abs=1e-6)
    assert reader["array_step"] == [1, 1]
    geometry = raster_geometry(sdata.images[Key.HNE.value])
    assert (geometry.sx, geometry.sy) == pytest.approx((10.0, 10.0))
    spots = truth["spots"].iloc[:20]
    np.testing.assert_allclose(table.obsm["spatial"], spots[["pixel_x", "pixel_y"]].to_numpy() * 10.0)
    np.testing.assert_array_equal(table.obs["in_tissue"], spots["selected"].astype(bool))
    np.testing.assert_allclose(sdata.shapes[Key.SPOTS.value]["radius"], 50.0)
    np.testing.assert_allclose(darkest_centre_um(sdata), table.obsm["spatial"][truth["marked"]], atol=1.0)
    layout = table.uns["c3diff"]["spots"]
    assert (layout["layout"], layout["pitch_um"], layout["diameter_um"]) == ("legacy_st", 200.0, 100.0)
    assert list(layout["array_step"]) == [1, 1] and layout["nn_distance_um"] == pytest.approx(200.0)


def test_read_legacy_st_layouts_orientation_and_stagger(tmp_path):
    """Genes x spots counts with Ensembl ids, a headerless spot file, the staggered 2k array, stretched pixels."""
    truth = make_legacy_st(
        tmp_path,
        transpose=True,
        spot_file="headerless",
        ensembl=True,
        staggered=True,
        px_per_unit=(10.0, 11.0),
        image_size=100,
    )
    with pytest.warns(UserWarning) as record:
        sdata = c3.io.read_legacy_st(*truth["paths"])
    assert any("different pixel sizes along x" in str(w.message) for w in record)
    table = sdata.tables[Key.SPOT_TABLE.value]
    assert table.var_names[0].startswith("ENSMUSG") and table.n_obs == 20
    np.testing.assert_array_equal(counts_of(table), truth["counts"].iloc[:20].to_numpy())
    assert table.obs["in_tissue"].all()  # no `selected` column: every listed spot is under tissue
    reader = sdata.attrs["c3diff"]["reader"]
    assert reader["array_step"] == [2, 2]  # neighbours along a row are 2 array units = 200 um apart
    assert reader["um_per_px"] == pytest.approx([100 / 11.0, 100 / 10.0])
    np.testing.assert_allclose(darkest_centre_um(sdata), table.obsm["spatial"][truth["marked"]], atol=1.0)


def test_read_legacy_st_errors(tmp_path):
    truth = make_legacy_st(tmp_path / "a")
    counts, spots, image = truth["paths"]
    with pytest.raises(FileNotFoundError, match="expected the spot file"):
        c3.io.read_legacy_st(counts, tmp_path / "missing.tsv", image)
    with pytest.raises(ValueError, match="`pitch` must be a positive"):
        c3.io.read_legacy_st(counts, spots, image, pitch=0)

    other = make_legacy_st(tmp_path / "b")  # a spot file of another section: no common array position
    shifted = pd.read_csv(other["paths"][1], sep="\t")
    shifted[["x", "y"]] += 40
    shifted.to_csv(other["paths"][1], sep="\t", index=False)
    with pytest.raises(ValueError, match="belongs to another section"):
        c3.io.read_legacy_st(counts, other["paths"][1], image)

    none_selected = pd.read_csv(spots, sep="\t").assign(selected=0)
    none_selected.to_csv(tmp_path / "none.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="None of the 20 spots of `counts` is under tissue"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c3.io.read_legacy_st(counts, tmp_path / "none.tsv", image)

    nopix = make_legacy_st(tmp_path / "c", spot_file="no_pixels")
    with pytest.raises(ValueError, match="no calibration"):
        c3.io.read_legacy_st(counts, nopix["paths"][1], image)

    small = make_legacy_st(tmp_path / "d", image_size=30)  # the H&E is a 30 px thumbnail the spots miss
    with pytest.raises(ValueError, match="fall outside the image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c3.io.read_legacy_st(*small["paths"])

    pd.DataFrame({"a": [1, 2]}, index=["g1", "g2"]).to_csv(tmp_path / "bad.tsv", sep="\t")
    with pytest.raises(ValueError, match="no '<x>x<y>' spot ids"):
        c3.io.read_legacy_st(tmp_path / "bad.tsv", spots, image)


# --------------------------------------------------------------------------------------------- Xenium
XENIUM_GENES = ["EPCAM", "CD3E", "KRT8"]
CONTROLS = ["NegControlProbe_00001", "BLANK_0002"]


def make_xenium(root: Path, *, csv: bool = False, calibrated: bool = True) -> dict:
    import tifffile

    root.mkdir(parents=True, exist_ok=True)
    cell_ids = ["aaaa-1", "bbbb-1", "cccc-1"]
    cells = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "x_centroid": [10.0, 30.0, 22.0],
            "y_centroid": [12.0, 20.0, 35.0],
            "transcript_counts": [5, 7, 3],
            "cell_area": [np.pi * 4**2, np.pi * 5**2, np.pi * 3**2],
            "nucleus_area": [20.0, 30.0, 10.0],
        }
    )
    n = 60
    features = RNG.choice(XENIUM_GENES + CONTROLS, size=n, p=[0.3, 0.3, 0.3, 0.05, 0.05])
    features[:2] = CONTROLS
    qv = np.full(n, 40.0)
    qv[[5, 9, 11]] = 12.0
    tx_cells = RNG.choice(cell_ids + ["UNASSIGNED"], size=n)
    transcripts = pd.DataFrame(
        {
            "transcript_id": np.arange(n),
            "cell_id": tx_cells,
            "overlaps_nucleus": 0,
            "feature_name": features,
            "x_location": RNG.uniform(1, 39, n),
            "y_location": RNG.uniform(1, 39, n),
            "z_location": 5.0,
            "qv": qv,
        }
    )
    if csv:
        transcripts.to_csv(root / "transcripts.csv.gz", index=False)
        cells.to_csv(root / "cells.csv.gz", index=False)
    else:
        transcripts.to_parquet(root / "transcripts.parquet")
        cells.to_parquet(root / "cells.parquet")
    counts = RNG.poisson(2.0, size=(3, 4))
    write_10x_h5(
        root / "cell_feature_matrix.h5",
        counts,
        cell_ids,
        XENIUM_GENES + [CONTROLS[0]],
        ["Gene Expression"] * 3 + ["Negative Control Probe"],
    )
    dapi = (RNG.random((80, 80)) * 1000).astype(np.uint16)  # 0.5 um/px: covers 40 x 40 um
    metadata = {"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5} if calibrated else {"axes": "YX"}
    tifffile.imwrite(root / "morphology_focus.ome.tif", dapi, ome=True, metadata=metadata)
    return {"cells": cells, "transcripts": transcripts, "counts": counts[:, :3]}


def test_read_xenium_points_cells_morphology(tmp_path):
    truth = make_xenium(tmp_path)
    with pytest.warns(UserWarning) as record:
        sdata = c3.io.read_xenium(tmp_path)
    messages = [str(w.message) for w in record]
    assert any("Dropped 3 of 60 transcripts with qv < 20" in m for m in messages)
    tx = truth["transcripts"]
    good = tx[tx.qv >= 20]
    n_controls = int(good.feature_name.isin(CONTROLS).sum())
    assert any(f"Dropped {n_controls} control-probe" in m for m in messages)

    assert set(sdata.points) == {Key.TRANSCRIPTS.value}
    assert set(sdata.shapes) == {Key.CELLS.value} and set(sdata.tables) == {Key.CELL_TABLE.value}
    assert set(sdata.images) == {"morphology"}
    points = sdata.points[Key.TRANSCRIPTS.value].compute()
    kept = good[~good.feature_name.isin(CONTROLS)].reset_index(drop=True)
    assert len(points) == len(kept)
    assert set(points["gene"].cat.categories) <= set(XENIUM_GENES)
    np.testing.assert_allclose(points["x"], kept.x_location)
    np.testing.assert_allclose(points["y"], kept.y_location)
    expected_ids = kept.cell_id.map({"aaaa-1": 1, "bbbb-1": 2, "cccc-1": 3}).fillna(0).astype(int)
    np.testing.assert_array_equal(points["cell_id"], expected_ids)
    assert points.attrs["spatialdata_attrs"]["feature_key"] == "gene"

    table = sdata.tables[Key.CELL_TABLE.value]
    np.testing.assert_array_equal(counts_of(table), truth["counts"])
    assert list(table.var_names) == XENIUM_GENES  # gene-expression features only
    np.testing.assert_array_equal(table.obs["cell_id"], [1, 2, 3])
    np.testing.assert_array_equal(table.obs["xenium_cell_id"], ["aaaa-1", "bbbb-1", "cccc-1"])
    np.testing.assert_allclose(table.obsm["spatial"], truth["cells"][["x_centroid", "y_centroid"]].to_numpy())
    shapes = sdata.shapes[Key.CELLS.value]
    np.testing.assert_array_equal(shapes.index, [1, 2, 3])
    np.testing.assert_allclose(shapes["radius"], [4.0, 5.0, 3.0])
    geometry = raster_geometry(sdata.images["morphology"])
    assert (geometry.sx, geometry.sy, geometry.x0, geometry.y0) == pytest.approx((0.5, 0.5, -0.25, -0.25))
    assert list(scale0(sdata.images["morphology"]).coords["c"].values) == ["DAPI"]
    reader = sdata.attrs["c3diff"]["reader"]
    assert reader["n_low_qv"] == 3 and reader["morphology_um_per_px"] == 0.5


def test_read_xenium_csv_controls_and_qv_options(tmp_path):
    truth = make_xenium(tmp_path, csv=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped, so nothing is warned about
        sdata = c3.io.read_xenium(tmp_path, min_qv=0, keep_controls=True, cells=False, morphology=None)
    points = sdata.points[Key.TRANSCRIPTS.value].compute()
    assert len(points) == 60 and set(CONTROLS) <= set(points["gene"].cat.categories)
    assert len(sdata.shapes) == 0 and len(sdata.images) == 0
    np.testing.assert_array_equal(points["cell_id"] == 0, truth["transcripts"].cell_id.eq("UNASSIGNED"))


def test_read_xenium_uncalibrated_morphology(tmp_path):
    make_xenium(tmp_path, calibrated=False)
    with pytest.raises(ValueError, match="has no calibration.*morphology_pixel_size"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c3.io.read_xenium(tmp_path)
    (tmp_path / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = c3.io.read_xenium(tmp_path)
        assert raster_geometry(sdata.images["morphology"]).sx == 0.5
        crop = c3.io.read_xenium(tmp_path, morphology_pixel_size=0.5, morphology_origin=(1.0, 2.0))
    geometry = raster_geometry(crop.images["morphology"])
    assert (geometry.sx, geometry.x0, geometry.y0) == pytest.approx((0.5, 0.75, 1.75))
    with pytest.raises(ValueError, match="transcript centres fall outside the image"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c3.io.read_xenium(tmp_path, morphology_pixel_size=0.25, morphology_origin=(5.0, 10.0))


def test_read_xenium_morphology_folder_and_mip(tmp_path):
    """XOA >= 2 keeps the focus image in a morphology_focus/ folder; XOA 1 also writes a MIP."""
    make_xenium(tmp_path)
    (tmp_path / "morphology_focus").mkdir()
    (tmp_path / "morphology_focus.ome.tif").rename(tmp_path / "morphology_focus" / "morphology_focus_0000.ome.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = c3.io.read_xenium(tmp_path)
        assert raster_geometry(sdata.images["morphology"]).sx == 0.5
        with pytest.raises(FileNotFoundError, match="morphology MIP image"):
            c3.io.read_xenium(tmp_path, morphology="mip")


def test_read_xenium_registered_hne(tmp_path):
    make_xenium(tmp_path)
    # H&E at 1 um/px covering 50 x 50 um; a dark disc at H&E pixel (row 20, col 30) = Xenium (x, y) = (30, 20) um
    Image.fromarray(disc_image(50, 50, [(20, 30)], radius=1.0)).save(tmp_path / "he.png")
    to_morphology_px = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])  # 0.5 um morphology px
    np.savetxt(tmp_path / "he_imagealignment.csv", to_morphology_px, delimiter=",")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = c3.io.read_xenium(tmp_path, hne=tmp_path / "he.png", hne_alignment=tmp_path / "he_imagealignment.csv")
        in_um = c3.io.read_xenium(tmp_path, hne=tmp_path / "he.png", hne_alignment=np.eye(3), hne_alignment_units="um")
    for result in (sdata, in_um):
        geometry = raster_geometry(result.images[Key.HNE.value])
        assert (geometry.sx, geometry.sy) == pytest.approx((1.0, 1.0))
        np.testing.assert_allclose(darkest_centre_um(result), [30.0, 20.0], atol=0.5)

    with pytest.raises(ValueError, match="Pass `hne` and `hne_alignment` together"):
        c3.io.read_xenium(tmp_path, hne=tmp_path / "he.png")
    with pytest.raises(ValueError, match="fall outside the H&E"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the inverse direction squeezes the H&E into 12.5 x 12.5 um
        c3.io.read_xenium(
            tmp_path, hne=tmp_path / "he.png", hne_alignment=np.diag([0.25, 0.25, 1.0]), hne_alignment_units="um"
        )
    theta = np.deg2rad(10)
    rotated = np.array([[np.cos(theta), -np.sin(theta), 5], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    with pytest.warns(UserWarning, match="rotated, sheared or flipped"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Dropped")
        c3.io.read_xenium(tmp_path, hne=tmp_path / "he.png", hne_alignment=rotated, hne_alignment_units="um")


def test_read_xenium_missing_files(tmp_path):
    make_xenium(tmp_path)
    (tmp_path / "transcripts.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"transcripts \(or transcripts.csv.gz\) at .*transcripts.parquet"):
        c3.io.read_xenium(tmp_path)
    make_xenium(tmp_path / "b")
    (tmp_path / "b" / "cell_feature_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match="cells=False"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c3.io.read_xenium(tmp_path / "b")


def test_cells_from_arrays_lung_style(tmp_path):
    """Cells given as (row, col) pixels of a 2 um/px H&E, as the HEST/DeepSpot exports store them."""
    n = 4
    rows, cols = np.array([5, 10, 15, 20]), np.array([8, 30, 12, 25])
    adata = ad.AnnData(
        RNG.poisson(3.0, size=(n, 3)).astype(np.float32),
        obs=pd.DataFrame({"x_pixel": rows, "y_pixel": cols}, index=[f"c{i}" for i in range(n)]),
    )
    image = disc_image(30, 40, [(rows[2], cols[2])], radius=1.0)
    xy = adata.obs[["y_pixel", "x_pixel"]].to_numpy(float) * 2.0
    sdata = c3.io.cells_from_arrays(adata, spatial=xy, radius=5.0, image=image, image_pixel_size=2.0)
    table = sdata.tables[Key.CELL_TABLE.value]
    np.testing.assert_array_equal(counts_of(table), adata.X)
    np.testing.assert_array_equal(sdata.shapes[Key.CELLS.value].index, [1, 2, 3, 4])
    np.testing.assert_allclose(darkest_centre_um(sdata), xy[2], atol=0.5)
    with pytest.raises(ValueError, match="never guesses a pixel size"):
        c3.io.cells_from_arrays(adata, spatial=xy, radius=5.0, image=image)
    with pytest.raises(ValueError, match="fall outside the image"):
        c3.io.cells_from_arrays(adata, spatial=xy * 10, radius=5.0, image=image, image_pixel_size=2.0)
