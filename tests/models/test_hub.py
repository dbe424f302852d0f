"""Persistence: save/load, Hub code path, offline errors, strict weights, model card, from_ldm, push_to_hub."""

from __future__ import annotations

import importlib.util
import json
import re

import huggingface_hub
import pytest
import torch
import yaml
from diffusers import UNet2DModel, VQModel
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

import c3diff
from c3diff.models import C3DiffModel
from c3diff.models import _hub as hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def saved(tiny, make_batch, perturb_zero_convs, tmp_path):
    perturb_zero_convs(tiny)
    tiny.train()
    tiny.compute_losses(make_batch(tiny, 4), generator=torch.Generator().manual_seed(0))  # fills the memory bank
    tiny.eval()
    folder = tmp_path / "model"
    tiny.save_pretrained(folder, training_data="simulated sections, seeds 0-3")
    return tiny, folder


def _predict(model):
    g = torch.Generator().manual_seed(1)
    histology, lr = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 2, 7, 7, generator=g)
    return model.predict(histology, lr, gene_indices=[1, 3], num_inference_steps=2)[0]


def test_round_trip_gives_identical_outputs(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "scheduler_config.json",
    ]
    loaded = c3diff.models.from_pretrained(folder)
    assert isinstance(loaded, C3DiffModel) and loaded.training is False
    assert loaded.genes == model.genes and loaded.config.scale == 10
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(_predict(model), _predict(loaded))
    # no-LR inference uses the saved memory bank
    assert int(loaded.imputer.bank_count) == 4
    assert all(not p.requires_grad for p in loaded.unet.down_blocks.parameters())
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "C3DiffModel" and config["_module"] == "c3diff.models"
    assert config["training_data"] == "simulated sections, seeds 0-3"


def test_model_card_records_what_users_need(saved):
    model, folder = saved
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "c3diff"
    block = meta["c3diff"]
    assert block["genes"] == model.genes  # in gene-index order
    assert block["scale"] == 10 and block["normalization"] == "minmax"
    assert block["histology_pixel_size_um"] == 10.0 and block["lr_pixel_size_um"] == 100.0
    assert block["training_data"] == "simulated sections, seeds 0-3"
    assert block["c3diff_version"] == c3diff.__version__
    card = huggingface_hub.ModelCard.load(folder / "README.md")
    assert card.data.to_dict()["c3diff"]["genes"] == model.genes


def test_repo_id_goes_through_snapshot_download(saved, monkeypatch):
    _, folder = saved
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "_check_hub_reachable", lambda *args, **kwargs: None)  # (no network in tests)
    model = c3diff.models.from_pretrained("someone/c3diff-tiny", revision=COMMIT, cache_dir="/nowhere", token="t")
    assert model.genes == saved[0].genes
    ((repo_id, kwargs),) = calls
    assert repo_id == "someone/c3diff-tiny"
    assert kwargs["revision"] == COMMIT and kwargs["cache_dir"] == "/nowhere" and kwargs["token"] == "t"
    assert kwargs["local_files_only"] is False and "model.safetensors" in kwargs["allow_patterns"]
    with pytest.warns(UserWarning, match="Pin the commit"):
        C3DiffModel.from_pretrained("someone/c3diff-tiny")
    with pytest.warns(UserWarning, match="'main'"):
        c3diff.models.from_pretrained("someone/c3diff-tiny", revision="main")


def test_offline_and_not_cached_gives_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(OSError, match="huggingface-cli download someone/absent") as info:
        c3diff.models.from_pretrained("someone/absent", revision=COMMIT, local_files_only=True, cache_dir=tmp_path)
    assert "local folder" in str(info.value) or "pass that folder" in str(info.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="not in the local Hugging Face cache"):
        c3diff.models.from_pretrained("someone/absent", revision=COMMIT, cache_dir=tmp_path)

    def raise_not_cached(repo_id, **kwargs):
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(hub, "snapshot_download", raise_not_cached)
    monkeypatch.setattr(hub, "_check_hub_reachable", lambda *args, **kwargs: None)  # (no network in tests)
    with pytest.raises(OSError, match="snapshot_download"):
        c3diff.models.from_pretrained("someone/absent", revision=COMMIT)


def test_strict_loading(saved, tmp_path):
    _, folder = saved
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    # a missing tensor
    del state["imputer.alpha"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing \['imputer.alpha'\]"):
        c3diff.models.from_pretrained(folder)
    # an unexpected tensor
    state["imputer.alpha"] = torch.ones(())
    state["extra.weight"] = torch.ones(2)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        c3diff.models.from_pretrained(folder)
    # a mis-shaped tensor
    del state["extra.weight"]
    state["imputer.alpha"] = torch.ones(2)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="wrong shape"):
        c3diff.models.from_pretrained(folder)
    # a corrupted (truncated) file
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OSError, match="corrupted or incomplete"):
        c3diff.models.from_pretrained(folder)
    # not a model folder / not a repo id
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        c3diff.models.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a valid Hub repo id"):
        c3diff.models.from_pretrained(str(tmp_path / "absent" / "deeper" / "model"))


def test_from_ldm_builds_on_a_backbone(tmp_path):
    torch.manual_seed(0)
    vqvae = VQModel(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        latent_channels=3,
        num_vq_embeddings=16,
        scaling_factor=1.0,
    )
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    vqvae.save_pretrained(tmp_path / "ldm" / "vqvae")
    unet.save_pretrained(tmp_path / "ldm" / "unet")
    model = c3diff.models.from_ldm(
        tmp_path / "ldm", genes=["A", "B", "C"], hint_channels=7, hint_encoder_channels=[8, 8, 8]
    )
    assert model.config.image_size == 64 and model.latent_size == 32
    for name, p in unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[name], p)
    assert torch.equal(model.controlnet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(model.vqvae.decoder.conv_out.weight, vqvae.decoder.conv_out.weight)
    x, hint = torch.randn(2, 3, 32, 32), torch.randn(2, model.hint_encoders.hint_channels, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.denoise(x, torch.tensor([3, 30]), hint), unet(x, torch.tensor([3, 30])).sample)
    model.compute_losses(
        {
            "histology": torch.rand(2, 3, 64, 64),
            "lr": torch.rand(2, 1, 7, 7),
            "hr": torch.rand(2, 1, 64, 64) * 2 - 1,
            "gene_index": torch.tensor([0, 2]),
        }
    ).total.backward()
    with pytest.raises(FileNotFoundError, match="vqvae"):
        c3diff.models.from_ldm(tmp_path / "ldm" / "unet", genes=["A"])


def test_push_to_hub_uploads_the_saved_folder(tiny, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, **kwargs):
            uploaded["created"] = repo_id

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            from pathlib import Path

            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded["card"] = (Path(folder_path) / "README.md").read_text()
            return "commit-info"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    assert tiny.push_to_hub("someone/c3diff-tiny", token="w", training_data="demo") == "commit-info"
    assert uploaded["created"] == "someone/c3diff-tiny" and uploaded["token"] == "w"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors", "scheduler_config.json"]
    assert 'from_pretrained("someone/c3diff-tiny"' in uploaded["card"]


def test_a_swapped_scheduler_round_trips_and_samples(tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    model = c3diff.models.build_model("tiny", genes=["A", "B"]).eval()
    model.set_scheduler(DPMSolverMultistepScheduler.from_config(model.noise_scheduler.config))
    model.save_pretrained(str(tmp_path / "dpm"))
    assert json.loads((tmp_path / "dpm" / "scheduler_config.json").read_text())["_class_name"] == (
        "DPMSolverMultistepScheduler"
    )
    loaded = c3diff.models.from_pretrained(tmp_path / "dpm")
    assert isinstance(loaded.noise_scheduler, DPMSolverMultistepScheduler)
    histology, lr = torch.rand(1, 3, 64, 64), torch.rand(1, 2, 7, 7)
    _, std = loaded.predict(histology, lr, mode="sample", n_samples=2, num_inference_steps=3)
    assert torch.isfinite(std).all() and float(std.max()) > 0
    # DDIM and DPM-Solver draw different samples from the same noise
    ddim = c3diff.models.build_model("tiny", genes=["A", "B"]).eval()
    ddim.load_state_dict(model.state_dict())
    assert isinstance(ddim.noise_scheduler, DDIMScheduler)
    assert not torch.equal(ddim.predict(histology, lr, mode="sample", n_samples=2, num_inference_steps=3)[1], std)
    with pytest.raises(ValueError, match="trained with 0.00085"):
        model.set_scheduler(EulerDiscreteScheduler())  # diffusers' default betas, not the model's
    with pytest.raises(TypeError, match="diffusers scheduler"):
        model.set_scheduler("ddim")
    # the scheduler is a component of the sampling call too: the same samples, the model's own left as it is
    dpm = DPMSolverMultistepScheduler.from_config(ddim.noise_scheduler.config)
    given = ddim.predict(histology, lr, mode="sample", n_samples=2, num_inference_steps=3, scheduler=dpm)[1]
    assert torch.equal(given, std) and isinstance(ddim.noise_scheduler, DDIMScheduler)
    with pytest.raises(ValueError, match="trained with 0.00085"):
        ddim.predict(histology, lr, mode="sample", num_inference_steps=2, scheduler=EulerDiscreteScheduler())


def test_model_mixin_keywords(tmp_path):
    model = c3diff.models.build_model("tiny", genes=["A"]).eval()
    model.save_pretrained(str(tmp_path / "f"), variant="fp16")
    assert (tmp_path / "f" / "model.fp16.safetensors").is_file() and not (tmp_path / "f" / "model.safetensors").exists()
    half = c3diff.models.from_pretrained(tmp_path / "f", variant="fp16", torch_dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        c3diff.models.from_pretrained(tmp_path / "f")  # the variant has to be asked for
    model.save_pretrained(str(tmp_path / "pickled"), safe_serialization=False)
    assert (tmp_path / "pickled" / "model.bin").is_file()
    loaded = c3diff.models.from_pretrained(tmp_path / "pickled")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_a_folder_of_c3diff_0_1_loads_with_its_recipe_mapped(tmp_path):
    """config.json of c3diff <= 0.1 held the training recipe and the fitted-stage flags; the weights had no
    fitted-stage buffer. Such a folder loads with the same outputs, the recipe as `training_config` and the flags
    as the fitted-stage state; an option the network cannot honour is a clear error."""
    from safetensors.torch import load_file, save_file

    model = c3diff.models.build_model("tiny", genes=["A", "B", "C", "D"]).eval()
    model.save_pretrained(str(tmp_path / "old"))
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert not {"lambda_mse", "st_noise_sigma", "normalization", "mean_fitted"} & set(config)  # the new layout
    config.update(
        lambda_mse=3.0, lambda_modal=0.5, lambda_content=1.0, lambda_inter_sphere=1.0, st_noise_sigma=0.05,
        min_snr_gamma=None, latent_scaling="range", normalization="minmax", train_unet_encoder=False,
        first_stage_fitted=True, backbone_fitted=True, mean_fitted=False,
    )  # fmt: skip
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    state = load_file(str(tmp_path / "old" / "model.safetensors"))
    del state["fitted_stages"]
    save_file(state, str(tmp_path / "old" / "model.safetensors"))
    loaded = c3diff.models.from_pretrained(tmp_path / "old")
    assert loaded.is_fitted("first_stage") and loaded.is_fitted("backbone") and not loaded.is_fitted("mean")
    recipe = loaded.training_config
    assert (recipe.lambda_mse, recipe.lambda_modal, recipe.st_noise_sigma, recipe.latent_scaling) == (
        3.0,
        0.5,
        0.05,
        "range",
    )
    assert "lambda_mse" not in loaded.config and "normalization" not in loaded.config
    assert torch.equal(_predict(loaded), _predict(model))
    config["normalization"] = "zscore"
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="normalization='zscore'"):
        c3diff.models.from_pretrained(tmp_path / "old")


def test_training_config_round_trips_beside_the_model(tmp_path):
    model = c3diff.models.build_model("tiny", genes=["A"])
    model.training_config = c3diff.models.TrainingConfig(lambda_modal=0.0, min_snr_gamma=5.0, seed=3)
    model.save_pretrained(str(tmp_path / "m"), training_data="toy")
    assert model.config.training_data is None  # saving does not change the caller's config
    assert (tmp_path / "m" / "training_config.json").is_file()
    loaded = c3diff.models.from_pretrained(tmp_path / "m")
    assert loaded.training_config == model.training_config and loaded.config.training_data == "toy"
    with pytest.raises(ValueError, match="Unknown training-config entries"):
        c3diff.models.TrainingConfig.from_dict({"lambda_msee": 1.0})
    # a recipe this version cannot read (a newer c3diff's) is provenance only: the model still loads
    (tmp_path / "m" / "training_config.json").write_text(json.dumps({"lambda_mse": 2.0, "ema_decay": 0.999}))
    with pytest.warns(UserWarning, match="ema_decay"):
        assert c3diff.models.from_pretrained(tmp_path / "m").training_config is None


def test_the_bundled_demo_model_is_a_tiny_preset_trained():
    """The presets are what is trained: the demo model's network is `tiny-texture` (or `tiny`, without texture)
    exactly; only the first stage's fitted statistics and the description of its training data differ."""
    demo = c3diff.models.load_demo_model()
    preset = c3diff.models.build_model("tiny-texture" if demo.texture_channels else "tiny", genes=demo.genes)
    keys = {k for k in set(demo.config) | set(preset.config) if not k.startswith("_")}
    differ = {k for k in keys if demo.config.get(k) != preset.config.get(k)}
    assert differ == {"latent_shift", "latent_scale", "training_data"}
    assert all(demo.is_fitted(stage) for stage in ("first_stage", "backbone", "mean"))
    assert {k: v.shape for k, v in demo.state_dict().items()} == {k: v.shape for k, v in preset.state_dict().items()}


def test_folders_naming_the_old_public_module_paths_load(tmp_path):
    """config.json records `_module` (c3diff writes the package, `c3diff.models`); a folder saved before the modules
    became private, or edited to name the module that defined the class then, loads by the registry - the bundled
    demo model included - and nothing is imported by the name in the file."""
    import shutil

    demo_folder = c3diff.models.demo_model_path()
    assert json.loads((demo_folder / "config.json").read_text())["_module"] == "c3diff.models"
    demo = c3diff.models.from_pretrained(demo_folder)
    assert type(demo) is C3DiffModel and demo.is_fitted("mean")

    old = shutil.copytree(demo_folder, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    for module in ("c3diff.models.c3diff", None):  # None: a config without `_module` (diffusers writes none)
        changed = {k: v for k, v in config.items() if k != "_module"}
        if module is not None:
            changed["_module"] = module
        (old / "config.json").write_text(json.dumps(changed))
        loaded = c3diff.models.from_pretrained(old)
        assert type(loaded) is C3DiffModel, module
        for (k, a), (_, b) in zip(demo.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), (module, k)
    # every old public module path is mapped to the private module now at its place; the old paths are gone
    assert hub.MODEL_MODULES["c3diff.models"] == "c3diff.models"
    assert hub.MODEL_MODULES["c3diff.models.c3diff"] == C3DiffModel.__module__ == "c3diff.models._c3diff"
    for old_path, new_path in hub.MODEL_MODULES.items():
        if old_path != "c3diff.models":
            assert importlib.util.find_spec(new_path) is not None, new_path
            assert importlib.util.find_spec(old_path) is None, old_path
    # new saves name the package and the bare class name, never the private module that defines the class
    model = c3diff.models.build_model("tiny", genes=["A"])
    model.save_pretrained(str(tmp_path / "new"))
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert (saved["_module"], saved["_class_name"]) == ("c3diff.models", "C3DiffModel")
    assert "_diffusers_version" in saved and not any("._" in str(v) for k, v in saved.items() if k.startswith("_"))


@pytest.mark.parametrize(
    ("class_name", "module"),
    [
        ("C3DiffModelV2", "c3diff.models"),  # a class this version does not have
        ("C3DiffModelV2", "c3diff.models.c3diff"),
        ("UNet2DControlNetModel", "c3diff.models.controlnet"),  # a c3diff class, but no model class
        ("C3DiffModel", "c3diff.models.losses"),  # the module never defined the class
        ("C3DiffModel", "c3diff.models.nonexistent"),
    ],
)
def test_a_config_naming_an_unknown_class_is_refused(tmp_path, class_name, module):
    model = c3diff.models.build_model("tiny", genes=["A"])
    model.save_pretrained(str(tmp_path / "m"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "_class_name": class_name, "_module": module}))
    named = rf"names the class {re.escape(module)}\.{class_name}, .*the model classes are c3diff\.models\.C3DiffModel"
    with pytest.raises(ValueError, match=named):
        c3diff.models.from_pretrained(tmp_path / "m")
    # the caller may name the class: the registry is only for what a file names
    assert type(C3DiffModel.from_pretrained(tmp_path / "m")) is C3DiffModel
