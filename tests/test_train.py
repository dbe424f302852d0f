"""c3.tl.train: the recipe, optimisation, resume, imputation path and bad inputs (tiny preset, CPU)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from toy_sections import make_toy_section

import c3diff as c3
from c3diff.tl._train import PAPER_RECIPE, PatchBatchSampler, make_optimizer, train, validation_scores

GENES = ["GENE_A", "GENE_B", "GENE_C"]


@pytest.fixture(scope="module")
def patchsets():
    sections = [
        make_toy_section(seed=s, height=1400, width=1400, pixel_size=4.0, n_transcripts=40_000) for s in range(3)
    ]
    return [
        c3.pp.make_patches(s, genes=GENES, points_key="transcripts", patch_size=64, min_tissue=0.3) for s in sections
    ]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_step_on_a_fixed_batch_lowers_the_loss(patchsets):
    model = c3.models.build_model("tiny", genes=GENES)
    loader = torch.utils.data.DataLoader(patchsets[0].dataset(), batch_size=8, shuffle=False)
    batch = next(iter(loader))
    optimizer = make_optimizer(model, learning_rate=1e-3)

    def loss():
        return model.compute_losses(batch, generator=torch.Generator().manual_seed(0)).total

    model.train()
    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert float(loss().detach()) < float(before.detach())


def test_optimiser_defaults_are_table_1(patchsets, tmp_path):
    optimizer = make_optimizer(c3.models.build_model("tiny", genes=GENES))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-5, (0.9, 0.999), 1e-8, 1e-5)
    # a train() call without overrides follows Table 1 (batch size 16, 50 epochs)
    defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    assert (defaults["batch_size"], defaults["epochs"]) == (16, 50)
    assert {k: defaults[k] for k in ("learning_rate", "betas", "eps", "weight_decay")} == {
        k: PAPER_RECIPE[k] for k in ("learning_rate", "betas", "eps", "weight_decay")
    }
    # train() uses them unless overridden, and the overrides reach the optimiser
    train(
        patchsets,
        model="tiny",
        genes=GENES,
        output_dir=tmp_path,
        max_steps=1,
        batch_size=4,
        weight_decay=0.5,
        backbone_steps=2,
        val_fraction=0,
        progress=False,
    )
    state = torch.load(next((tmp_path / "checkpoints").glob("step-*")) / "optimizer.pt", weights_only=True)
    group = state["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (1e-5, (0.9, 0.999), 1e-8, 0.5)


def test_resume_reproduces_the_uninterrupted_run(one_torch_thread, patchsets, tmp_path):
    common = dict(
        model="tiny",
        genes=GENES,
        batch_size=4,
        val_fraction=0,
        progress=False,
        seed=3,
        backbone_steps=2,
        lr_missing_fraction=0.25,
        learning_rate=1e-3,
    )
    full = train(patchsets, output_dir=tmp_path / "full", max_steps=3, **common)
    train(patchsets, output_dir=tmp_path / "split", max_steps=2, **common)
    resumed = train(patchsets, output_dir=tmp_path / "split", max_steps=3, resume="latest", **common)
    a, b = _weights(full.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_modality_incomplete_samples_train_the_imputation(patchsets, tmp_path):
    result = train(
        patchsets,
        model="tiny",
        genes=GENES,
        output_dir=tmp_path,
        max_steps=3,
        batch_size=8,
        lr_missing_fraction=0.5,
        learning_rate=1e-2,
        val_fraction=0,
        progress=False,
        backbone_steps=2,
    )
    imputer = result.model.imputer
    assert float(imputer.alpha) != 1.0 or float(imputer.beta) != 1.0  # only imputed samples give them gradients
    untouched = train(
        patchsets,
        model="tiny",
        genes=GENES,
        output_dir=tmp_path / "none",
        max_steps=3,
        batch_size=8,
        lr_missing_fraction=0.0,
        learning_rate=1e-2,
        val_fraction=0,
        progress=False,
        backbone_steps=2,
    )
    assert float(untouched.model.imputer.alpha) == 1.0 and float(untouched.model.imputer.beta) == 1.0


def test_validation_keeps_the_best_model_and_logs(patchsets, tmp_path):
    result = train(
        patchsets[:2],
        model="tiny",
        genes=GENES,
        output_dir=tmp_path,
        epochs=1,
        batch_size=8,
        val_data=patchsets[2],
        val_steps=2,
        val_max_patches=2,
        progress=False,
        log_every=1,
        backbone_steps=2,
    )
    assert result.model.is_fitted("first_stage") and result.model.is_fitted("backbone")
    assert result.best_checkpoint == tmp_path / "best"
    # the recipe lives beside the network, never in its config
    recipe = c3.models.TrainingConfig.from_pretrained(tmp_path / "best")
    assert recipe == result.model.training_config and (recipe.batch_size, recipe.backbone_steps) == (8, 2)
    assert not {"lambda_mse", "st_noise_sigma", "min_snr_gamma", "mean_fitted"} & set(result.model.config)
    assert result.model.config.latent_scale != 1.0  # the first stage's statistics, written at construction
    assert {"val_mse", "val_content", "val_pcc", "val_rmse"} <= set(result.history.columns)
    # the logged PCC is that of the returned model's maps on the validation patches (the residual stage leaves the
    # conditional mean, which a residual model's validation maps are, as the mean stage left it)
    logged = result.history["val_pcc"].dropna()
    assert len(logged) >= 1
    again = validation_scores(result.model, patchsets[2], steps=2, max_patches=2, seed=0)
    assert again["val_pcc"] == pytest.approx(float(logged.iloc[-1]), rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["type"] for r in rows} == {"step", "epoch", "validation"}  # (the backbone's validation)
    assert {"total", "mse", "content", "modal", "inter_sphere"} <= set(rows[0])
    assert result.model.genes == GENES


def test_bad_inputs_fail_before_any_work(patchsets, tmp_path):
    with pytest.raises(ValueError, match="`data` is empty"):
        train([], model="tiny", genes=GENES, output_dir=tmp_path)
    with pytest.raises(ValueError, match="lacks 1 of the model's genes: \\['GENE_D'\\]"):
        train(patchsets, model="tiny", genes=[*GENES, "GENE_D"], output_dir=tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        train(patchsets, model="tiny", genes=GENES, output_dir=blocker / "run")
    with pytest.raises(ValueError, match="loss_weights"):
        train(patchsets, model="tiny", genes=GENES, output_dir=tmp_path, loss_weights={"contrast": 1.0})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(patchsets, model="tiny", genes=GENES, output_dir=tmp_path / "fresh", resume="latest")
    assert not (tmp_path / "checkpoints").exists()


def test_batches_hold_distinct_patches_and_are_reproducible():
    patch_of_item = np.repeat(np.arange(20), 5)  # 20 patches x 5 genes
    sampler = PatchBatchSampler(patch_of_item, batch_size=8, seed=1)
    batches = list(sampler)
    assert len(batches) >= 10 and all(len(b) == 8 for b in batches)
    assert all(len(set(patch_of_item[b])) == 8 for b in batches)
    assert len({i for b in batches for i in b}) == sum(len(b) for b in batches)  # no item twice in an epoch
    assert batches == list(PatchBatchSampler(patch_of_item, batch_size=8, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    few = PatchBatchSampler(np.repeat(np.arange(3), 10), batch_size=8, seed=0)  # fewer patches than a batch
    assert len(few) == 3 and all(len(b) == 8 for b in few)


def test_batches_of_several_genes_per_patch():
    patch_of_item = np.repeat(np.arange(12), 5)  # 12 patches x 5 genes
    sampler = PatchBatchSampler(patch_of_item, batch_size=4, seed=0, genes_per_patch=3)
    batches = list(sampler)
    for batch in batches:
        patches, counts = np.unique(patch_of_item[batch], return_counts=True)
        assert len(patches) == 4 and counts.max() <= 3
    assert len({i for b in batches for i in b}) == sum(len(b) for b in batches)
    assert sum(len(b) for b in batches) >= 48  # few items are left for the next epoch
    with pytest.raises(ValueError, match="genes_per_patch"):
        PatchBatchSampler(patch_of_item, batch_size=4, seed=0, genes_per_patch=0)


def test_residual_training_runs_its_stages_and_resumes_exactly(one_torch_thread, patchsets, tmp_path):
    common = dict(
        model="tiny",
        genes=GENES,
        batch_size=4,
        val_fraction=0,
        progress=False,
        seed=2,
        backbone_steps=2,
        learning_rate=1e-3,
        mean_max_steps=2,
        mean_genes_per_patch=2,
    )
    full = train(patchsets, output_dir=tmp_path / "full", max_steps=4, **common)
    assert full.model.is_fitted("first_stage") and full.model.is_fitted("backbone")
    stages = [json.loads(line)["stage"] for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert stages[0] == "mean" and stages[-1] == "residual"
    train(patchsets, output_dir=tmp_path / "split", max_steps=3, **common)  # stops inside the residual stage
    resumed = train(patchsets, output_dir=tmp_path / "split", max_steps=4, resume="latest", **common)
    a, b = _weights(full.model), _weights(resumed.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    # the recipe saved beside a model trains the same model again
    # (step 6: max_steps counts the 4 steps of the mean and residual stages, the backbone's 2 come on top)
    saved = c3.models.TrainingConfig.from_pretrained(tmp_path / "full" / "checkpoints" / "step-6" / "model")
    assert saved == full.model.training_config and saved.max_steps == 4 and saved.mean_genes_per_patch == 2
    again = train(
        patchsets, output_dir=tmp_path / "again", model="tiny", genes=GENES, val_fraction=0, progress=False,
        training_config=saved.to_dict(),
    )  # fmt: skip
    c = _weights(again.model)
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match=r"\['batch_size'\] were passed as well"):
        train(patchsets, output_dir=tmp_path / "bad", model="tiny", genes=GENES, batch_size=8, training_config=saved)
    with pytest.raises(ValueError, match="mean_loss"):
        train(patchsets, model="tiny", genes=GENES, output_dir=tmp_path / "bad", mean_loss="gaussian")


def test_patches_at_other_pixel_sizes_than_the_models_are_refused(patchsets, tmp_path):
    with pytest.raises(ValueError, match=r"pixel sizes \[\(10.0, 100.0\)\] um, the model's are \(20, 200\) um"):
        train(
            patchsets,
            model="tiny",
            genes=GENES,
            output_dir=tmp_path,
            model_overrides={"histology_pixel_size": 20.0, "hr_pixel_size": 20.0, "lr_pixel_size": 200.0},
        )
    assert not (tmp_path / "checkpoints").exists()
