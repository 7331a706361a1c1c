"""Scale-out with Lightning's own DDP: two CPU processes (gloo) through the real CLI.

``fit`` and ``validate`` run with ``--trainer.devices 2 --trainer.strategy ddp``; the
validation recall of the two-process run equals a single-process ``validate`` of the same
checkpoint (7 validation images, batch 4: shares of 4 and 3 images, none repeated to even them out).
The fit also skips a NaN batch that only rank 0 sees (``model.nonfinite_loss: skip``): both
ranks skip it together and training goes on.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from helpers.builders import save_image
from helpers.cli import PROBES, TINY_CONFIG, assert_ok, run_cli
from helpers.model import collate_for, synthetic_samples, tiny_model
from lightning_rpn.data.draws import ShuffledEpochs

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

TRAIN_IMAGES, VAL_IMAGES, BATCH = 16, 7, 4
STEPS = 3  # two steps per epoch and rank: the third starts epoch 1
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def _config() -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(
        max_steps=STEPS,
        limit_val_batches=1.0,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "run", "name": "csv", "version": "fit"}},
        callbacks=[
            # no save on the way (every 3 epochs): last.ckpt is its save at the end of fit, on both ranks
            {"class_path": "lightning_rpn.training.callbacks.LastCheckpoint",
             "init_args": {"dirpath": "run/checkpoints", "every_n_epochs": 3, "enable_version_counter": False}},
            {"class_path": "cli_probes.RecordImageIds", "init_args": {"prefix": "seen"}},
            {"class_path": "cli_probes.InjectNaN", "init_args": {"step": 1, "rank": 0}},
            # left out of the fit (progress bar off), swapped for progress lines in the validate
            # with the bar on (stdout a pipe): each notice and line from rank 0 only
            {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
            {"class_path": "lightning_rpn.training.callbacks.ProposalImages", "init_args": {"num_images": VAL_IMAGES}},
        ],
    )
    config["model"]["objectness"] = "softmax"  # 2A logits per location: all must get gradients
    config["model"]["nonfinite_loss"] = "skip"
    config["data"].update(synthetic_train_images=TRAIN_IMAGES, synthetic_val_images=VAL_IMAGES,
                          batch_size=BATCH)
    return config


def _run(args: list[str], cwd: Path):
    pythonpath = os.pathsep.join([PROBES, os.environ.get("PYTHONPATH", "")])
    return run_cli(args, cwd, timeout=240, env={"PYTHONPATH": pythonpath})


def _metrics(workdir: Path, version: str) -> dict[str, float]:
    with open(workdir / "run/csv" / version / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: float(value) for row in rows for key, value in row.items() if value and "/" in key}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two-process fit, then validate the checkpoint with two processes and with one."""
    workdir = tmp_path_factory.mktemp("ddp")
    (workdir / "config.yaml").write_text(yaml.safe_dump(_config()))
    checkpoint = ["--ckpt_path", "run/checkpoints/last.ckpt", "--trainer.logger.init_args.version"]
    fit = _run(["fit", "--config", "config.yaml", *DDP, "--trainer.limit_val_batches", "0"], workdir)
    assert_ok(fit)
    (workdir / "fit_ddp.log").write_text(fit.stdout + fit.stderr)
    validate = _run(["validate", "--config", "config.yaml", *DDP, *checkpoint, "ddp",
                     "--trainer.enable_progress_bar", "true"], workdir)
    assert_ok(validate)
    (workdir / "validate_ddp.log").write_text(validate.stdout + validate.stderr)
    assert_ok(_run(["validate", "--config", "config.yaml", *checkpoint, "single"], workdir))
    return workdir


def test_the_cli_notices_and_progress_lines_come_once_not_once_per_process(ddp_run: Path) -> None:
    fit = (ddp_run / "fit_ddp.log").read_text()
    assert fit.count("lightning-rpn: enable_progress_bar is false, so the config's RichProgressBar is left out") == 1
    validate = (ddp_run / "validate_ddp.log").read_text()
    assert validate.count("lightning-rpn: stdout is not a terminal, so progress is printed as a line") == 1
    (line,) = [line for line in validate.splitlines() if line.startswith("validation")]
    assert line.startswith("validation: done in ")


def test_fit_runs_two_ddp_processes_without_unused_parameters(ddp_run: Path) -> None:
    records = [json.loads((ddp_run / f"seen.rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == 2
        assert record["strategy"] == "DDPStrategy"
        assert record["find_unused_parameters"] is False  # yet every step went through
        assert len(record["steps"]) == STEPS
        assert record["skipped_nonfinite_batches"] == 1  # rank 1's batch was fine: skipped too
        assert record["draw_seed"] == 0  # seed_everything's, on every rank: one order, split by stride
    checkpoint = torch.load(ddp_run / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS and checkpoint["skipped_nonfinite_batches"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_each_rank_trains_on_different_seeded_images(ddp_run: Path) -> None:
    for epoch in (0, 1):
        seen = {}
        for rank in (0, 1):
            record = json.loads((ddp_run / f"seen.rank{rank}.json").read_text())
            seen[rank] = [i for step_epoch, ids in record["steps"] if step_epoch == epoch for i in ids]
            order = ShuffledEpochs(range(TRAIN_IMAGES), seed=0).order(epoch).tolist()  # seed_everything's seed
            assert seen[rank] == order[rank::2][: len(seen[rank])]
        assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) != list(range(TRAIN_IMAGES))  # epoch 1: first batch only
    first = [json.loads((ddp_run / f"seen.rank{r}.json").read_text())["steps"] for r in (0, 1)]
    assert sorted(i for steps in first for e, ids in steps if e == 0 for i in ids) == list(range(TRAIN_IMAGES))


def test_predict_on_more_processes_than_images_names_the_fix(ddp_run: Path, tmp_path: Path) -> None:
    # Lightning's predict sampler died with a bare AssertionError on the process left without an image
    save_image(tmp_path / "images/0.png", 70, 90)
    result = _run(["predict", "--config", "config.yaml", *DDP, "--ckpt_path", "run/checkpoints/last.ckpt",
                   "--trainer.logger", "false", "--data.predict_images", str(tmp_path / "images")], ddp_run)
    assert result.returncode != 0 and "AssertionError" not in result.stderr
    assert (f"predict runs on 2 processes but the folder {str(tmp_path / 'images')!r} holds 1 image(s), and each "
            "process needs one: run it with --trainer.devices 1") in " ".join(result.stderr.split())


def test_ddp_validation_recall_equals_the_single_process_value(ddp_run: Path) -> None:
    ddp, single = _metrics(ddp_run, "ddp"), _metrics(ddp_run, "single")
    for key in ("val/AR@10", "val/AR@100", "val/AR_small@100"):
        assert key in ddp and key in single, sorted(ddp)
        assert ddp[key] == pytest.approx(single[key], abs=1e-5), key
    # a batch's loss is normalised by the anchors sampled in it, so batches of other images give
    # another mean; Lightning's own mean over the two shares of 4 and 3 images was 7/6 of it
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-3)
    assert single["val/AR@100"] > 0


def test_ddp_validation_draws_the_images_one_process_draws(ddp_run: Path) -> None:
    # each process evaluates half of the split: rank 0 alone drew 4 of the 8 asked for
    drawn = {version: sorted(p.name for p in (ddp_run / "run/csv" / version / "proposal_images").glob("*.png"))
             for version in ("ddp", "single")}
    # the second validate's outputs of last.ckpt take the repeat number .2 (its metrics summary's)
    assert len(drawn["single"]) == VAL_IMAGES
    assert drawn["ddp"] == [name.replace("val-last.2_", "val-last_") for name in drawn["single"]]


def test_ddp_validation_logs_the_synchronised_metrics_without_sync_dist_warnings(ddp_run: Path) -> None:
    """It printed ~42 ``It is recommended to use `self.log('val/AR@100', ..., sync_dist=True)```
    warnings per epoch, one per recall key, though the metric had synchronised its states."""
    log = (ddp_run / "validate_ddp.log").read_text()
    assert "val/AR@100" in log  # the recall table
    assert "sync_dist=True" not in log, [line for line in log.splitlines() if "sync_dist" in line][:3]


@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
def test_every_trainable_parameter_gets_a_gradient(objectness: str) -> None:
    """What DDP with find_unused_parameters=False needs: no parameter left out of the loss."""
    model = tiny_model(objectness=objectness).train()
    loss = model.training_step(collate_for(model)(synthetic_samples(2)), 0)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


@pytest.mark.parametrize("backbone", ["tiny_fpn", "resnet18_fpn"])
def test_sync_batchnorm_converts_trainable_batchnorm_only(backbone: str) -> None:
    """What ``--trainer.sync_batchnorm true`` does to our backbones (in a DDP run, on GPUs)."""
    frozen = backbone != "tiny_fpn"  # resnet18_fpn with FrozenBatchNorm2d (the pretrained recipe)
    if frozen:
        sizes = ((32,), (64,), (128,), (256,), (512,))
        model = tiny_model(backbone=backbone, frozen_bn=True, anchor_sizes=sizes)
    else:
        model = tiny_model()
    norms = [type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__]
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    after = [type(m).__name__ for m in converted.modules() if "BatchNorm" in type(m).__name__]
    expected = ["SyncBatchNorm" if name == "BatchNorm2d" else name for name in norms]
    assert after == expected and norms
    assert ("FrozenBatchNorm2d" in after) == frozen
    _, losses = converted(collate_for(converted)(synthetic_samples(2)), need_proposals=False)
    assert torch.isfinite(sum(losses.values()))  # unsynchronised outside a process group
