"""The ``c3diff`` command: help texts, predict on a zarr store, train from a config file, clear errors."""

from __future__ import annotations

import json

import pytest
from toy_sections import make_toy_section

from c3diff.cli import main


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("demo", "predict", "train"))
    for command, options in (
        ("demo", ["--output", "--seed", "--steps", "--samples", "--model"]),
        (
            "predict",
            [
                "--model",
                "--revision",
                "--table-key",
                "--points-key",
                "--scale",
                "--method",
                "--samples",
                "--celltypes",
                "--output",
            ],
        ),
        ("train", ["config", "--output-dir", "--epochs", "--max-time", "--resume"]),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(option in text for option in options), command
    assert main([]) == 2


@pytest.mark.slow
def test_predict_writes_new_layers_into_the_store(tmp_path, capsys):
    import spatialdata as sd

    path = tmp_path / "section.zarr"
    make_toy_section().write(path)
    assert main(["predict", str(path), "--method", "bicubic", "--table-key", "table", "--quiet"]) == 0
    assert "hne_bicubic_x10" in capsys.readouterr().out
    back = sd.read_zarr(path)
    assert "hne_bicubic_x10" in back.images
    assert back.attrs["c3diff"]["hne_bicubic_x10"]["params"]["method"] == "bicubic"
    # a copy elsewhere, leaving the input alone
    assert (
        main(
            [
                "predict",
                str(path),
                "--method",
                "bicubic",
                "--table-key",
                "table",
                "--scale",
                "5",
                "--output",
                str(tmp_path / "copy.zarr"),
                "--quiet",
            ]
        )
        == 0
    )
    assert "hne_bicubic_x5" in sd.read_zarr(tmp_path / "copy.zarr").images
    assert "hne_bicubic_x5" not in sd.read_zarr(path).images


def test_predict_errors_are_clear(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.zarr")]) == 1
    assert "does not exist" in capsys.readouterr().err
    path = tmp_path / "section.zarr"
    make_toy_section().write(path)
    assert main(["predict", str(path), "--table-key", "table", "--quiet"]) == 1
    assert "`model` is required" in capsys.readouterr().err
    assert main(["predict", str(path), "--method", "bicubic", "--table-key", "nope", "--quiet"]) == 1
    assert "table_key='nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_from_a_config_file(tmp_path, capsys):
    import yaml

    from c3diff.pp import make_patches

    for seed in range(2):
        section = make_toy_section(seed=seed, height=1400, width=1400, pixel_size=4.0, n_transcripts=30_000)
        make_patches(
            section,
            genes=["GENE_A", "GENE_B"],
            points_key="transcripts",
            patch_size=64,
            min_tissue=0.3,
            sample_id=f"s{seed}",
        ).save(tmp_path / f"p{seed}.npz")
    config = {
        "output_dir": "run",
        "model": "tiny",
        "genes": ["GENE_A", "GENE_B"],
        "data": [{"patches": "p0.npz"}],
        "val_data": [{"patches": "p1.npz"}],
        "batch_size": 4,
        "max_steps": 2,
        "backbone_steps": 2,
        "val_steps": 2,
        "val_max_patches": 1,
        "learning_rate": 1e-3,
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "train.yaml"), "--quiet"]) == 0
    assert "Trained" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["type"] == "epoch"
    assert (tmp_path / "run" / "checkpoints").is_dir()

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "data": [{"csv": "x.csv"}]}))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 1
    assert "unknown kind 'csv'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump({**config, "learning_rates": 1.0}))
    assert main(["train", str(tmp_path / "unknown.yaml"), "--quiet"]) == 1
    assert "learning_rates" in capsys.readouterr().err
