"""An evaluation outside ``fit`` is dated by the epoch and step its weights were trained to, not
by a new trainer's 0; and what one evaluation or fit leaves behind does not leak into the next.

``validate`` / ``test`` / ``predict --ckpt_path P`` run in a trainer whose counters Lightning does
not restore outside ``fit``; the recall table, the metrics JSON, the recall-curve rows and the
logger's metrics must still name the step ``P`` was saved at (and a new ``Trainer`` testing a
fitted model, the fit's).
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

from helpers.cli import TINY_CONFIG, assert_ok, run_cli
from lightning_rpn.core.config import SettingError
from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.evaluated_weights import (
    TrainedCounters, counters_in_use, evaluated_counters, logged_as,
)
from lightning_rpn.training.module import RPNModule

STEPS = 3


def test_trained_counters_date_evaluations_but_not_a_fit() -> None:
    loaded = TrainedCounters.of_checkpoint({"epoch": 2, "global_step": 6})
    assert (loaded.epoch, loaded.step) == (2, 6)
    fitting = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    assert counters_in_use(fitting, loaded) is None
    for fn in (TrainerFn.VALIDATING, TrainerFn.TESTING, TrainerFn.PREDICTING):
        trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), current_epoch=0, global_step=0,
                                  lightning_module=SimpleNamespace(trained_counters=loaded))
        assert counters_in_use(trainer, loaded) is loaded
        assert evaluated_counters(trainer) == (2, 6)
    # a module of one's own without the attribute: the trainer's counters
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), current_epoch=1, global_step=4,
                              lightning_module=SimpleNamespace())
    assert evaluated_counters(trainer) == (1, 4)


def test_logged_as_puts_the_trainers_counts_back() -> None:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loop = trainer.fit_loop.epoch_loop
    loop._batches_that_stepped = 5
    try:
        with logged_as(trainer, TrainedCounters(3, 40)):
            assert (trainer.current_epoch, loop._batches_that_stepped) == (3, 40)
            raise RuntimeError("an evaluation that fails")
    except RuntimeError:
        pass
    assert (trainer.current_epoch, loop._batches_that_stepped) == (0, 5)


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
    assert {(row["epoch"], row["step"]) for row in _rows(metrics_csv)} == {(str(epoch), str(STEPS))}  # epoch was 0
    curve_rows = [row for path in (tmp_path / "run/lightning_logs").glob("version_*/recall_curves/val_recall_vs_iou.csv")
                  for row in _rows(path) if row["checkpoint"] == str(checkpoint.resolve())]
    assert curve_rows and {(row["epoch"], row["step"]) for row in curve_rows} == {(str(epoch), str(STEPS))}

    predicted = run_cli(["predict", "--config", "config.yaml", "--ckpt_path", str(checkpoint)], tmp_path)
    assert_ok(predicted)
    assert f"last.ckpt, epoch {epoch}, step {STEPS})" in " ".join(predicted.stdout.split())
    summary = json.loads((tmp_path / "run/metrics/predict-last.json").read_text())
    assert summary["step"] == STEPS


def _trainer(root: Path, max_steps: int, **settings: object) -> Trainer:
    defaults: dict[str, object] = dict(
        accelerator="cpu", max_steps=max_steps, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    return Trainer(**{**defaults, **settings})


def _model_and_data() -> tuple[RPNModule, RPNDataModule]:
    config = copy.deepcopy(TINY_CONFIG)
    return RPNModule(**config["model"]), RPNDataModule(**config["data"], test_split="val")


def test_weights_keep_their_step_in_other_trainers_until_they_are_fitted_again(tmp_path: Path) -> None:
    model, data = _model_and_data()
    fitting = _trainer(tmp_path, STEPS)
    fitting.fit(model, datamodule=data)
    assert model.trained_counters is not None and model.trained_counters.step == STEPS
    _trainer(tmp_path, 1).test(model, datamodule=data, verbose=False)  # a new trainer, as for a test set
    assert model.last_recall_step == STEPS
    path = tmp_path / "weights.ckpt"
    fitting.save_checkpoint(path)

    loaded = RPNModule.load_from_checkpoint(path)
    # stopped inside its second epoch: dated by that epoch, as its checkpoint is (Lightning's counter had left it)
    assert loaded.trained_counters == model.trained_counters == TrainedCounters(1, STEPS)
    evaluation = _trainer(tmp_path, STEPS)
    evaluation.validate(loaded, datamodule=data, verbose=False)
    assert loaded.last_recall_step == STEPS
    assert evaluation.fit_loop.epoch_loop._batches_that_stepped == 0  # put back after the validation

    # fitted from there by a new trainer: its weights are that fit's
    refit = _trainer(tmp_path, 2)
    refit.fit(loaded, datamodule=data)
    assert loaded.trained_counters is not None and loaded.trained_counters.step == 2
    _trainer(tmp_path, 1).validate(loaded, datamodule=data, verbose=False)
    assert loaded.last_recall_step == 2


class _FailingSecondBatch(RPNModule):
    fail = True
    boxes_counted = 0

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.fail and batch_idx == 1:
            raise RuntimeError("a validation that fails after its first batch")
        return super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.boxes_counted = int(self.val_recall.num_boxes[0])  # the gt boxes of every area
        super().on_validation_epoch_end()


def test_a_failed_validation_leaves_nothing_to_the_next(tmp_path: Path) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    model, data = _FailingSecondBatch(**config["model"]), RPNDataModule(**{**config["data"], "val_batch_size": 2})
    model.trained_counters = TrainedCounters(1, 5)  # as if loaded: the failed validation logs at step 5
    trainer = _trainer(tmp_path, 1, limit_val_batches=2)
    try:
        trainer.validate(model, datamodule=data, verbose=False)
    except RuntimeError:
        pass
    model.fail = False
    trainer.validate(model, datamodule=data, verbose=False)
    fresh = _FailingSecondBatch(**config["model"])
    fresh.load_state_dict(model.state_dict())
    fresh.fail = False
    _trainer(tmp_path, 1, limit_val_batches=2).validate(fresh, datamodule=data, verbose=False)
    assert model.boxes_counted == fresh.boxes_counted > 0 and model.last_recall == fresh.last_recall
    model.trained_counters = None  # the stale dating of the failed validation is closed, not carried on
    trainer.validate(model, datamodule=data, verbose=False)
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 0


def test_a_fit_reports_no_recall_of_its_sanity_check_or_of_an_earlier_predict(tmp_path: Path) -> None:
    model, data = _model_and_data()
    _trainer(tmp_path, 1).predict(model, datamodule=data)
    assert model.last_recall  # the predict split has boxes
    # a fit whose only validation is the sanity check (never logged)
    _trainer(tmp_path, 2, num_sanity_val_steps=1, check_val_every_n_epoch=100).fit(model, datamodule=data)
    assert model.last_recall == {} and model.last_recall_step is None


def test_a_model_can_be_saved_whole(tmp_path: Path) -> None:
    # torch.save pickles at protocol 2, where a torch.memory_format attribute cannot be pickled
    for channels_last in (True, False):
        model = RPNModule(**{**TINY_CONFIG["model"], "channels_last": channels_last})
        torch.save(model, tmp_path / "model.pt")
        restored = torch.load(tmp_path / "model.pt", weights_only=False)
        assert restored.memory_format == model.memory_format


def test_several_evaluation_dataloaders_are_refused_with_what_to_do(tmp_path: Path) -> None:
    model, data = _model_and_data()
    data.setup("validate")
    loaders = [data.val_dataloader(), data.val_dataloader()]
    for run, stage in ((Trainer.validate, "val"), (Trainer.test, "test"), (Trainer.predict, "predict")):
        with pytest.raises(SettingError, match=rf"2 {stage} dataloaders given; .*ConcatDataset.*{run.__name__}\("):
            run(_trainer(tmp_path, 1), model, dataloaders=loaders)
    _trainer(tmp_path, 1).validate(model, dataloaders=loaders[:1], verbose=False)  # one: as ever
    assert model.last_recall


def test_weights_of_a_fit_ended_at_an_epoch_end_keep_that_epochs_index(tmp_path: Path) -> None:
    # epochs 0 and 1, validated in epoch 1: the weights are epoch 1's everywhere, where Lightning's
    # counter (and a checkpoint's "epoch" saved at the end of fit) has moved on to 2
    model, data = _model_and_data()
    fitting = _trainer(tmp_path, -1, max_epochs=2, limit_train_batches=2)
    fitting.fit(model, datamodule=data)
    assert (model.last_recall_epoch, model.last_recall_step) == (1, 4)
    assert model.trained_counters == TrainedCounters(1, 4)
    _trainer(tmp_path, 1).validate(model, datamodule=data, verbose=False)
    assert (model.last_recall_epoch, model.last_recall_step) == (1, 4)
    path = tmp_path / "end.ckpt"
    fitting.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["epoch"] == 2
    assert RPNModule.load_from_checkpoint(path).trained_counters == TrainedCounters(1, 4)
