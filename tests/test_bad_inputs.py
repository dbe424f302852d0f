"""Bad inputs give clear errors (type + the words that say what to fix) and change nothing on disk or in memory.

Each case is listed in docs/reliability.md with the test that covers it. Files are small and written into tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_io import make_legacy_st, make_visium, make_xenium
from toy_sections import make_toy_section

import c3diff as c3
from c3diff._constants import Key
from c3diff._validation import check_counts, scale0
from c3diff.cli import main


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders)."""
    files = []
    for path in paths:
        files.extend(sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)])
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def snapshot(sdata) -> dict:
    """Element names and every table's counts, to check that a failed call changed nothing."""
    names = {kind: sorted(getattr(sdata, kind)) for kind in ("images", "labels", "points", "shapes", "tables")}
    tables = {k: np.asarray(t.X.todense() if hasattr(t.X, "todense") else t.X).copy() for k, t in sdata.tables.items()}
    return {"names": names, "tables": tables, "attrs": json.dumps(sdata.attrs, default=str, sort_keys=True)}


def assert_unchanged(sdata, before: dict) -> None:
    after = snapshot(sdata)
    assert after["names"] == before["names"] and after["attrs"] == before["attrs"]
    for key, values in before["tables"].items():
        np.testing.assert_array_equal(after["tables"][key], values)


def quiet(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------- counts
def test_check_counts_names_the_offending_rows():
    counts = np.array([[1, 2], [np.nan, 0], [3, -1], [np.inf, 4]], dtype=float)
    with pytest.raises(ValueError, match="finite, non-negative") as info:
        check_counts(counts, ids=np.array(["s0", "s1", "s2", "s3"]), arg="counts")
    message = str(info.value)
    assert "2 spot(s) with NaN or infinite counts: ['s1', 's3']" in message
    assert "1 spot(s) with negative counts: ['s2']" in message and "s0" not in message
    from scipy import sparse

    with pytest.raises(ValueError, match=r"negative counts: \['c2'\]"):
        check_counts(sparse.csr_matrix(counts[[0, 2]]), ids=["c1", "c2"], what="cell")
    with pytest.raises(TypeError, match="must hold numbers"):
        check_counts(np.array([["a", "b"]], dtype=object), ids=["s0"])
    check_counts(np.array([[0, 5]], dtype=np.uint16), ids=["s0"])  # integers pass silently


def test_fractional_counts_warn_once_in_one_line():
    with pytest.warns(UserWarning, match="not whole numbers") as record:
        check_counts(np.array([[0.5, 1.2], [2.0, 0.3], [1.0, 1.0]]), ids=["a", "b", "c"], arg="adata.X")
    relevant = [w for w in record if "whole numbers" in str(w.message)]
    assert len(relevant) == 1 and "\n" not in str(relevant[0].message)
    assert "['a', 'b']" in str(relevant[0].message)


def test_legacy_st_nan_counts_name_the_spot(tmp_path):
    truth = make_legacy_st(tmp_path)
    counts_path, spots, image = truth["paths"]
    frame = truth["counts"].astype(float)
    frame.iloc[4, 2] = np.nan
    frame.to_csv(tmp_path / "nan.tsv", sep="\t")
    before = digest(tmp_path)
    with pytest.raises(ValueError, match="NaN or infinite counts") as info:
        c3.io.read_legacy_st(tmp_path / "nan.tsv", spots, image)
    assert frame.index[4] in str(info.value) and "nan.tsv" in str(info.value)
    assert digest(tmp_path) == before


def test_visium_negative_and_cells_infinite_counts(tmp_path):
    import anndata as ad

    counts = np.arange(12, dtype=np.float32).reshape(4, 3)
    counts[2, 1] = -3
    adata = ad.AnnData(counts.copy(), obs=pd.DataFrame(index=["AAA-1", "CCC-1", "GGG-1", "TTT-1"]))
    xy = np.array([[0, 0], [20, 0], [10, 17.32], [30, 17.32]]) * 1.0
    with pytest.raises(ValueError, match=r"negative counts: \['GGG-1'\]"):
        c3.io.visium_from_arrays(adata, spatial=xy, spot_diameter_fullres=13.0)
    np.testing.assert_array_equal(adata.X, counts)  # the user's AnnData is untouched
    adata.X[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN or infinite counts: \['GGG-1'\]"):
        c3.io.cells_from_arrays(adata, spatial=xy, radius=5.0)


def test_float_counts_in_a_reader_warn_once(tmp_path):
    truth = make_legacy_st(tmp_path)
    _, spots, image = truth["paths"]
    (truth["counts"] / 3.0).to_csv(tmp_path / "float.tsv", sep="\t")
    with pytest.warns(UserWarning) as record:
        sdata = c3.io.read_legacy_st(tmp_path / "float.tsv", spots, image)
    assert sum("not whole numbers" in str(w.message) for w in record) == 1
    assert Key.SPOT_TABLE.value in sdata.tables


def test_spots_to_grid_refuses_nan_counts_and_changes_nothing():
    sdata = make_toy_section()
    table = sdata.tables["table"]
    dense = np.asarray(table.X.todense(), dtype=np.float32)
    under, off = np.flatnonzero(table.obs["in_tissue"]), np.flatnonzero(~table.obs["in_tissue"])
    dense[under[2], 0] = np.nan
    dense[under[4], 1] = -2
    dense[off[0], 1] = np.nan  # a spot off the tissue is not used, not reported
    from scipy import sparse

    table.X = sparse.csr_matrix(dense)
    before = snapshot(sdata)
    with pytest.raises(ValueError, match="finite, non-negative") as info:
        c3.pp.spots_to_grid(sdata, table_key="table", image_key="hne")
    message = str(info.value)
    assert "table_key='table'" in message and str(table.obs_names[under[2]]) in message
    assert str(table.obs_names[under[4]]) in message and f"'{table.obs_names[off[0]]}'" not in message
    assert_unchanged(sdata, before)


def test_bin_transcripts_refuses_transcripts_without_position():
    from spatialdata.models import PointsModel
    from spatialdata.transformations import get_transformation

    sdata = make_toy_section(n_transcripts=2000)
    frame = sdata.points["transcripts"].compute()
    frame.loc[frame.index[3], "x"] = np.nan
    sdata.points["transcripts"] = PointsModel.parse(
        frame, feature_key="gene", transformations=get_transformation(sdata.points["transcripts"], get_all=True)
    )
    before = snapshot(sdata)
    with pytest.raises(ValueError, match="no finite x/y position"):
        c3.pp.bin_transcripts(sdata, bin_size=100, image_key="hne")
    assert_unchanged(sdata, before)


# --------------------------------------------------------------------------------------------- H&E pixel types
def with_hne(sdata, values: np.ndarray, key: str = "hne2"):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    element = scale0(sdata.images["hne"])
    sdata.images[key] = Image2DModel.parse(
        values,
        dims=("c", "y", "x"),
        c_coords=list(element.c.values),
        transformations=get_transformation(element, get_all=True),
    )
    return key


def test_histology_raster_reads_uint16_and_float_hne():
    sdata = make_toy_section()
    reference, _ = c3.pp.histology_raster(sdata, "hne")
    rgb = np.asarray(scale0(sdata.images["hne"]).values)
    for values in (rgb.astype(np.uint16) * 257, rgb.astype(np.uint16), rgb / 255.0, rgb.astype(np.float32)):
        out, _ = c3.pp.histology_raster(sdata, with_hne(sdata, values))
        assert out.dtype == np.uint8
        assert np.abs(out.astype(int) - reference).max() <= 1, values.dtype
    # a uint16 H&E used to be read as white everywhere: it now finds the same tissue
    tissue = c3.pp.detect_tissue(
        c3.pp.histology_raster(sdata, with_hne(sdata, rgb.astype(np.uint16) * 257))[0], pixel_size=10.0
    )
    np.testing.assert_array_equal(tissue, c3.pp.detect_tissue(reference, pixel_size=10.0))


def test_histology_raster_refuses_other_pixel_types_by_name():
    sdata = make_toy_section()
    rgb = np.asarray(scale0(sdata.images["hne"]).values)
    key = with_hne(sdata, rgb.astype(np.int32) * 1000)
    before = snapshot(sdata)
    with pytest.raises(TypeError, match="pixel type int32 with values in .*Convert it to uint8"):
        c3.pp.histology_raster(sdata, key)
    with pytest.raises(TypeError, match="pixel type bool"):
        c3.pp.histology_raster(sdata, with_hne(sdata, rgb > 128, key="mask"))
    nan = rgb.astype(np.float32)
    nan[0, :5, :5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite pixels"):
        c3.pp.histology_raster(sdata, with_hne(sdata, nan, key="nan"))
    with pytest.raises(ValueError, match=r"float64 H&E has values in .* images in \[0, 1\] or \[0, 255\]"):
        c3.pp.histology_raster(sdata, with_hne(sdata, rgb * 10.0, key="big"))
    assert snapshot(sdata)["names"]["images"] == sorted([*before["names"]["images"], "mask", "nan", "big"])


def test_reader_reads_a_16_bit_image(tmp_path):
    truth = make_legacy_st(tmp_path)
    counts, spots, image = truth["paths"]
    grey = np.asarray(Image.open(image).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(tmp_path / "he16.png")  # mode I;16
    sdata = quiet(c3.io.read_legacy_st, counts, spots, tmp_path / "he16.png")
    pixels = np.asarray(scale0(sdata.images[Key.HNE.value]).values)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[0], (grey / 257).round().astype(np.uint8))


# --------------------------------------------------------------------------------------------- truncated files
def test_tsv_cut_mid_row_names_the_file(tmp_path):
    truth = make_legacy_st(tmp_path)
    _, spots, image = truth["paths"]
    text = truth["counts"].to_csv(sep="\t")
    (tmp_path / "cut.tsv").write_text(text[: text.rstrip("\n").rfind("\t") - 1])  # cut inside the last row
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=r"cut\.tsv' is truncated.*cut mid-row.*download it again"):
        c3.io.read_legacy_st(tmp_path / "cut.tsv", spots, image)
    assert digest(tmp_path) == before
    complete = tmp_path / "complete.tsv"  # a complete file without a final newline is fine
    complete.write_text(text.rstrip("\n"))
    quiet(c3.io.read_legacy_st, complete, spots, image)


def test_truncated_gzip_names_the_file(tmp_path):
    truth = make_legacy_st(tmp_path)
    counts, spots, image = truth["paths"]
    data = counts.read_bytes()
    (tmp_path / "cut.tsv.gz").write_bytes(data[: len(data) // 2])
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=r"cut\.tsv\.gz' is truncated or corrupt"):
        c3.io.read_legacy_st(tmp_path / "cut.tsv.gz", spots, image)
    (tmp_path / "S_sel.tsv.gz").write_bytes(gzip.compress(spots.read_bytes())[:-30])
    with pytest.raises(ValueError, match=r"`spots`: .*S_sel\.tsv\.gz' is truncated"):
        c3.io.read_legacy_st(counts, tmp_path / "S_sel.tsv.gz", image)
    assert digest(tmp_path) == {**before, **digest(tmp_path / "S_sel.tsv.gz")}


def test_truncated_jpeg_names_the_file(tmp_path):
    truth = make_legacy_st(tmp_path)
    counts, spots, image = truth["paths"]
    data = image.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=r"`image`: .*cut\.jpg' is truncated or not a readable image"):
        quiet(c3.io.read_legacy_st, counts, spots, tmp_path / "cut.jpg")
    assert digest(tmp_path) == before


def test_truncated_tiff_names_the_file(tmp_path):
    import tifffile

    truth = make_legacy_st(tmp_path)
    counts, spots, image = truth["paths"]
    tifffile.imwrite(tmp_path / "he.tif", np.asarray(Image.open(image)), tile=(64, 64))
    quiet(c3.io.read_legacy_st, counts, spots, tmp_path / "he.tif")  # the complete TIFF reads
    data = (tmp_path / "he.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"`image`: .*cut\.tif' is truncated"):
        quiet(c3.io.read_legacy_st, counts, spots, tmp_path / "cut.tif")


def test_truncated_h5_names_the_file(tmp_path):
    make_visium(tmp_path)
    h5 = tmp_path / "filtered_feature_bc_matrix.h5"
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 2])
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=r"`counts_file`: .*filtered_feature_bc_matrix\.h5' is truncated"):
        c3.io.read_visium(tmp_path)
    assert digest(tmp_path) == before


def test_truncated_parquet_names_the_file(tmp_path):
    make_xenium(tmp_path)
    parquet = tmp_path / "transcripts.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-40])
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=r"transcripts\.parquet' is truncated or not a Parquet file"):
        c3.io.read_xenium(tmp_path)
    assert digest(tmp_path) == before


# --------------------------------------------------------------------------------------------- spot pitch
def test_spot_file_missing_every_second_row_is_refused(tmp_path):
    truth = make_legacy_st(tmp_path)  # 5 x 5 array, listed column by column: every second row is a checkerboard
    counts, spots, image = truth["paths"]
    pd.read_csv(spots, sep="\t").iloc[::2].to_csv(tmp_path / "half.tsv", sep="\t", index=False)
    before = digest(tmp_path)
    with pytest.raises(ValueError, match="rows are missing") as info:
        quiet(c3.io.read_legacy_st, counts, tmp_path / "half.tsv", image)
    message = str(info.value)
    assert "5.000 um/px" in message and "10.000 um/px" in message  # the wrong and the right pixel size
    assert digest(tmp_path) == before
    # every second row of each column gone: steps of 1 along x and 2 along y match no ST array
    frame = pd.read_csv(spots, sep="\t")
    frame[frame["y"] % 2 == 1].to_csv(tmp_path / "odd.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="step by 1 along x and 2 along y.*Rows are missing from the spot file"):
        quiet(c3.io.read_legacy_st, counts, tmp_path / "odd.tsv", image)


def test_genuine_staggered_array_still_reads(tmp_path):
    truth = make_legacy_st(tmp_path, staggered=True)
    sdata = quiet(c3.io.read_legacy_st, *truth["paths"])
    assert sdata.attrs["c3diff"]["reader"]["array_step"] == [2, 2]


# --------------------------------------------------------------------------------------------- models
@pytest.fixture
def model_folder(tmp_path):
    from c3diff.models import build_model, save_pretrained

    return save_pretrained(build_model("tiny", genes=["GENE_A", "GENE_B"]), tmp_path / "model")


def test_config_with_wrong_type_is_a_clear_error(model_folder):
    from c3diff.models import from_pretrained

    config = json.loads((model_folder / "config.json").read_text())
    config["image_size"] = "sixty-four"
    (model_folder / "config.json").write_text(json.dumps(config))
    before = digest(model_folder)
    with pytest.raises(
        ValueError,
        match=r"not a valid C3DiffModel config: `image_size` should be int, found "
        r"'sixty-four' \(str\)",
    ):
        from_pretrained(model_folder)
    assert digest(model_folder) == before


def test_weights_with_nan_are_refused(model_folder):
    from c3diff.models import from_pretrained

    weights = model_folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after the safetensors header
    data[start + 64 : start + 64 + 4096] = b"\xff" * 4096  # 0xFFFFFFFF is a float32 NaN
    weights.write_bytes(bytes(data))
    before = digest(model_folder)
    with pytest.raises(ValueError, match="NaN or infinite values in .*Download or save the model again"):
        from_pretrained(model_folder)
    assert digest(model_folder) == before


def test_revision_with_a_local_folder_warns(model_folder):
    from c3diff.models import from_pretrained

    with pytest.warns(UserWarning, match="`revision='v1'` is ignored: .* a local folder"):
        from_pretrained(model_folder, revision="v1")


def test_pinned_revision_offline_fails_fast_and_names_the_revision(tmp_path, monkeypatch):
    import socket
    import time

    import huggingface_hub

    from c3diff.models import from_pretrained

    def no_dns(*args, **kwargs):  # a machine without network: no host name resolves
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # (conftest sets it for other tests)
    commit = "0123456789abcdef0123456789abcdef01234567"
    start = time.perf_counter()
    with pytest.raises(OSError, match="not in the local Hugging Face cache and the Hub cannot be reached") as info:
        from_pretrained("someone/c3diff-absent", revision=commit, cache_dir=tmp_path)
    assert time.perf_counter() - start < 5  # was ~25 s of retries
    message = str(info.value)
    assert f"--revision {commit}" in message
    assert f"snapshot_download('someone/c3diff-absent', revision={commit!r})" in message


# ----------------------------------------------------------------------------------------- no silent overwrite
def test_key_added_never_replaces_an_element_without_overwrite_nor_the_input():
    sdata = make_toy_section()
    hne, attrs = sdata.images["hne"], json.dumps(sdata.attrs, default=str)
    for overwrite in (False, True):  # the input H&E (or the counts) never, even with overwrite=True
        for key in ("hne", "table"):
            with pytest.raises(ValueError, match=f"`key_added` would write '{key}', which is an input of this call"):
                c3.tl.super_resolve(
                    sdata,
                    "hne",
                    table_key="table",
                    method="bicubic",
                    key_added=key,
                    overwrite=overwrite,
                    progress=False,
                )
    assert sdata.images["hne"] is hne and json.dumps(sdata.attrs, default=str) == attrs
    c3.tl.super_resolve(sdata, "hne", table_key="table", method="bicubic", key_added="sr", progress=False)
    layer, entry = sdata.images["sr"], json.dumps(sdata.attrs["c3diff"]["sr"])
    with pytest.raises(
        ValueError,
        match=r"`key_added`: sdata.images\['sr'\] already exists; nothing was changed. "
        r"Pass another `key_added`, or overwrite=True to replace it.",
    ):
        c3.tl.super_resolve(
            sdata, "hne", table_key="table", method="bicubic", key_added="sr", genes=["GENE_A"], progress=False
        )
    assert sdata.images["sr"] is layer and json.dumps(sdata.attrs["c3diff"]["sr"]) == entry
    c3.tl.super_resolve(
        sdata,
        "hne",
        table_key="table",
        method="bicubic",
        key_added="sr",
        genes=["GENE_A"],
        overwrite=True,
        progress=False,
    )
    assert list(scale0(sdata.images["sr"]).coords["c"].values) == ["GENE_A"]
    assert sdata.attrs["c3diff"]["sr"]["params"]["genes"] == ["GENE_A"]  # provenance = the data written
    with pytest.raises(TypeError, match="`overwrite` must be True or False"):
        c3.tl.super_resolve(
            sdata, "hne", table_key="table", method="bicubic", key_added="sr", overwrite="yes", progress=False
        )


def _store_with_a_layer(tmp_path: Path, capsys) -> tuple[Path, list[str]]:
    """A toy section's store that `c3diff predict` (bicubic) has written ``hne_bicubic_x10`` into, and the argv."""
    store = tmp_path / "section.zarr"
    make_toy_section().write(store)
    argv = ["predict", str(store), "--method", "bicubic", "--table-key", "table", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    return store, argv


def test_cli_predict_on_a_store_with_the_layer_needs_overwrite(tmp_path, capsys):
    import spatialdata as sd

    store, argv = _store_with_a_layer(tmp_path, capsys)
    before = digest(store)
    assert main([*argv, "--genes", "GENE_A"]) == 1  # was: "Added []", exit 0, and provenance of 1 gene
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already has the layer 'hne_bicubic_x10'; nothing was changed" in err
    assert "--overwrite" in err
    assert digest(store) == before
    assert main([*argv, "--genes", "GENE_A", "--overwrite"]) == 0
    assert "replaced ['hne_bicubic_x10']" in capsys.readouterr().out
    back = sd.read_zarr(store)
    assert list(scale0(back.images["hne_bicubic_x10"]).coords["c"].values) == ["GENE_A"]
    assert back.attrs["c3diff"]["hne_bicubic_x10"]["params"]["genes"] == ["GENE_A"]
    assert main([*argv, "--key-added", "hne", "--overwrite"]) == 1  # the input image: never
    assert "input of this call" in capsys.readouterr().err


def test_cli_predict_overwrite_that_fails_keeps_the_old_layer_in_the_store(tmp_path, capsys, monkeypatch):
    """`c3diff predict --overwrite` moves the old layer aside instead of deleting it before the new one is written: a
    failed write (or, after a kill, the next predict on the store) puts the store back as it was, byte for byte."""
    import spatialdata as sd

    from c3diff import cli

    store, argv = _store_with_a_layer(tmp_path, capsys)
    before = digest(store)
    old = np.asarray(scale0(sd.read_zarr(store).images["hne_bicubic_x10"]).values)
    write = sd.SpatialData.write_element

    def write_then_fail(self, name, **kwargs):
        write(self, name, **kwargs)  # the new layer is on disk ...
        raise OSError("No space left on device (injected)")  # ... and the metadata write fails

    monkeypatch.setattr(sd.SpatialData, "write_element", write_then_fail)
    assert main([*argv, "--genes", "GENE_A", "--overwrite"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert digest(store) == before and sorted(p.name for p in tmp_path.iterdir()) == ["section.zarr"]
    back = sd.read_zarr(store)
    np.testing.assert_array_equal(np.asarray(scale0(back.images["hne_bicubic_x10"]).values), old)
    assert back.attrs["c3diff"]["hne_bicubic_x10"]["params"]["genes"] == ["GENE_A", "GENE_B", "GENE_C"]

    # killed half-way (nothing rolled back in that process): the next predict on the store restores it first
    monkeypatch.setattr(cli, "_roll_back", lambda source, undo: None)
    assert main([*argv, "--genes", "GENE_A", "--overwrite"]) == 1
    assert digest(store) != before and len(list(tmp_path.glob(".section.zarr.c3diff-undo-*"))) == 1
    monkeypatch.undo()
    cli._recover_store(store)
    assert digest(store) == before and sorted(p.name for p in tmp_path.iterdir()) == ["section.zarr"]
    assert main([*argv, "--genes", "GENE_A", "--overwrite"]) == 0  # and an overwrite that succeeds replaces it
    assert list(scale0(sd.read_zarr(store).images["hne_bicubic_x10"]).coords["c"].values) == ["GENE_A"]


# --------------------------------------------------------------------------------------------- command line
def test_cli_corrupt_model_is_one_line_and_the_store_is_unchanged(tmp_path, model_folder, capsys):
    store = tmp_path / "section.zarr"
    make_toy_section().write(store)
    (model_folder / "model.safetensors").write_bytes(b"\x00" * 100)
    before = digest(store)
    code = main(
        ["predict", str(store), "--table-key", "table", "--model", str(model_folder), "--revision", "v1", "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("c3diff predict: error: Cannot read the weights") and "model.safetensors" in lines[-1]
    assert "Traceback" not in err and "warnings.warn" not in err and "UserWarning" not in err
    assert any(line.startswith("c3diff: warning: `revision='v1'` is ignored") for line in lines)
    assert digest(store) == before


def test_cli_malformed_yaml_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("output_dir: run\ndata: [\n  - zarr: x\n model: tiny\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "bad.yaml' is not valid YAML" in err and "line 3, column 3" in err
    # --verbose adds the traceback, before or after the command
    for argv in (["--verbose", "train", str(tmp_path / "bad.yaml")], ["train", str(tmp_path / "bad.yaml"), "-v"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("c3diff train: error:")


def test_cli_missing_files_are_one_line(tmp_path, capsys):
    for argv in (["train", str(tmp_path / "nope.yaml")], ["predict", str(tmp_path / "nope.zarr")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty.zarr").mkdir()
    assert main(["predict", str(tmp_path / "empty.zarr"), "--method", "bicubic"]) == 1
    assert "is not a readable SpatialData zarr store" in capsys.readouterr().err


def test_cli_warnings_are_one_line(capsys, monkeypatch):
    import c3diff.cli as cli

    def warn_twice(args):
        warnings.warn("first line\n  second line", UserWarning, stacklevel=1)
        warnings.warn("first line\n  second line", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_run_demo", warn_twice)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["demo"]) == 0
    assert capsys.readouterr().err == "c3diff: warning: first line second line\n"


# --------------------------------------------------------------------------------------------- reader pyramids
def test_readers_build_pyramids_that_plots_and_tiling_use(tmp_path, monkeypatch):
    import c3diff.io._common as common
    from c3diff.pl._render import pick_level

    monkeypatch.setattr(common, "PYRAMID_TOP_SIZE", 48)
    truth = make_legacy_st(tmp_path, image_size=200)
    sdata = quiet(c3.io.read_legacy_st, *truth["paths"])
    hne = sdata.images[Key.HNE.value]
    sizes = [int(hne[name].ds.sizes["y"]) for name in sorted(hne.children)]
    assert sizes == [200, 100, 50, 25]
    # plots read the coarsest level that still has max_pixels across the view (10 um/px: 2 mm = 200 px)
    _, level = pick_level(hne, (0.0, 0.0, 2000.0, 2000.0), max_pixels=40, arg="image")
    assert level.height == 50 and level.sy == pytest.approx(40.0)
    # tiling reads the level closest to its grid, and gives what level 0 gives
    coarse, _ = c3.pp.histology_raster(sdata, Key.HNE.value, pixel_size=40.0)
    single = sdata.images[Key.HNE.value]["scale0"].ds["image"]
    sdata.images["single"] = single
    reference, _ = c3.pp.histology_raster(sdata, "single", pixel_size=40.0)
    assert coarse.dtype == np.uint8 and coarse.shape == (3, 50, 50)
    assert np.abs(coarse.astype(int) - reference).max() <= 2
