"""A loaded checkpoint's evaluation is dated by the checkpoint's epoch and step, not the new trainer's 0.

``validate`` / ``test`` / ``predict --ckpt_path P`` run in a trainer whose counters Lightning does
not restore outside ``fit``; the recall table, the metrics JSON, the recall-curve rows and the
logger's metrics must still name the step ``P`` was saved at.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

from helpers.cli import TINY_CONFIG, assert_ok, run_cli
from lightning_rpn.training.evaluated_weights import (
    LoadedCounters, counters_in_use, evaluated_counters, logged_at_step,
)

STEPS = 3


def test_loaded_counters_date_evaluations_but_not_a_fit() -> None:
    loaded = LoadedCounters.of({"epoch": 2, "global_step": 6})
    assert (loaded.epoch, loaded.step) == (2, 6)
    fitting = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    assert counters_in_use(fitting, loaded) is None
    for fn in (TrainerFn.VALIDATING, TrainerFn.TESTING, TrainerFn.PREDICTING):
        trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), current_epoch=0, global_step=0,
                                  lightning_module=SimpleNamespace(loaded_counters=loaded))
        assert counters_in_use(trainer, loaded) is loaded
        assert evaluated_counters(trainer) == (2, 6)
    # a module of one's own without the attribute: the trainer's counters
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), current_epoch=1, global_step=4,
                              lightning_module=SimpleNamespace())
    assert evaluated_counters(trainer) == (1, 4)


def test_logged_at_step_puts_the_trainers_count_back() -> None:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loop = trainer.fit_loop.epoch_loop
    loop._batches_that_stepped = 5
    try:
        with logged_at_step(trainer, 40):
            assert loop._batches_that_stepped == 40
            raise RuntimeError("an evaluation that fails")
    except RuntimeError:
        pass
    assert loop._batches_that_stepped == 5


def _config(workdir: Path) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(
        max_steps=STEPS,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "run"}},
    )
    config["trainer"]["callbacks"].append({"class_path": "lightning_rpn.training.callbacks.RecallCurves"})
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_validate_and_predict_of_a_checkpoint_name_its_step(tmp_path: Path) -> None:
    _config(tmp_path)
    assert_ok(run_cli(["fit", "--config", "config.yaml"], tmp_path))
    checkpoint = tmp_path / "run/checkpoints/last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == STEPS
    epoch = saved["epoch"]

    validated = run_cli(["validate", "--config", "config.yaml", "--ckpt_path", str(checkpoint)], tmp_path)
    assert_ok(validated)
    out = " ".join(validated.stdout.split())
    assert f"Proposal recall (validate, last.ckpt, epoch {epoch}, step {STEPS})" in out
    summary = json.loads((tmp_path / "run/metrics/validate-last.json").read_text())
    assert (summary["epoch"], summary["step"]) == (epoch, STEPS)
    # the logger's metrics: a new CSVLogger version for the validate, its rows at the checkpoint's step
    (metrics_csv,) = [p for p in (tmp_path / "run/lightning_logs").glob("version_*/metrics.csv")
                      if any(row.get("val/AR@100") for row in _rows(p)) and "train/loss" not in _rows(p)[0]]
    assert {row["step"] for row in _rows(metrics_csv)} == {str(STEPS)}
    curve_rows = [row for path in (tmp_path / "run/lightning_logs").glob("version_*/recall_curves/val_recall_vs_iou.csv")
                  for row in _rows(path) if row["checkpoint"] == str(checkpoint.resolve())]
    assert curve_rows and {(row["epoch"], row["step"]) for row in curve_rows} == {(str(epoch), str(STEPS))}

    predicted = run_cli(["predict", "--config", "config.yaml", "--ckpt_path", str(checkpoint)], tmp_path)
    assert_ok(predicted)
    assert f"last.ckpt, epoch {epoch}, step {STEPS})" in " ".join(predicted.stdout.split())
    summary = json.loads((tmp_path / "run/metrics/predict-last.json").read_text())
    assert summary["step"] == STEPS


def test_a_module_loaded_from_a_checkpoint_keeps_its_step_until_it_is_fitted(tmp_path: Path) -> None:
    from lightning_rpn.training.datamodule import RPNDataModule
    from lightning_rpn.training.module import RPNModule

    config = copy.deepcopy(TINY_CONFIG)
    model = RPNModule(**config["model"])
    data = RPNDataModule(**config["data"])

    def trainer(max_steps: int) -> Trainer:
        return Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=1, num_sanity_val_steps=0,
                       logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path)

    fitting = trainer(STEPS)
    fitting.fit(model, datamodule=data)
    path = tmp_path / "weights.ckpt"
    fitting.save_checkpoint(path)

    loaded = RPNModule.load_from_checkpoint(path)
    evaluation = trainer(STEPS)
    evaluation.validate(loaded, datamodule=data, verbose=False)
    assert loaded.last_recall_step == STEPS
    assert evaluation.fit_loop.epoch_loop._batches_that_stepped == 0  # put back after the validation

    # fitted from there, its weights are the new fit's: dated by that trainer's counters
    refit = trainer(2)
    refit.fit(loaded, datamodule=data)
    assert loaded.loaded_counters is None
    refit.validate(loaded, datamodule=data, verbose=False)
    assert loaded.last_recall_step == 2
