"""Resuming an epoch-budgeted run whose optimiser steps per epoch changed (batch size, devices,
``accumulate_grad_batches``, dataset size): the cosine schedule and ``TextProgress`` end at the
step the fit really ends at, not at ``max_epochs`` x today's steps per epoch.

A real ``Trainer`` fits the tiny model for 2 epochs of 2 batches, then resumes from its checkpoint
with ``max_epochs`` 3 or 4 over 4 batches an epoch (the same images in smaller batches, as a
smaller ``batch_size`` gives), from the end of an epoch (saved after its validation, as the CLI's
``last.ckpt``) or from inside one.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_rpn.training.last_checkpoint import LastCheckpoint
from lightning_rpn.training.module import RPNModule
from lightning_rpn.training.optim import RunLambdaLR
from lightning_rpn.training.text_progress import TextProgress

from helpers.model import quiet_trainer, tiny_model, training_batches

LR = 1e-3
MIN_FACTOR = 0.1  # the cosine's end: LR * MIN_FACTOR


def _model() -> RPNModule:
    return tiny_model(optimizer="adamw", lr=LR, warmup_steps=1, lr_schedule="cosine", min_lr_factor=MIN_FACTOR)


def _first_run(tmp_path: Path, checkpoint: ModelCheckpoint) -> Path:
    """2 epochs x 2 batches (steps 1-4), validated after each epoch; the checkpoint's path."""
    model = _model()
    batches = training_batches(model)[:2]
    trainer = quiet_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint],
                            limit_val_batches=1)
    trainer.fit(model, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    assert trainer.global_step == 4
    return Path(checkpoint.last_model_path or checkpoint.best_model_path)


@pytest.mark.parametrize(
    "saved, max_epochs, accumulate, resumed_at, end",
    [
        # after epoch 1's validation (step 4): epochs 2-3 of 4 steps
        ("epoch end", 4, 1, 4, 4 + 2 * 4),
        # at step 3, after batch 0 of epoch 1: its batches 1-3, then epoch 2 of 4 steps
        ("mid-epoch", 3, 1, 3, 3 + 3 + 4),
        # the same stepping every 2nd batch (at epoch batches 2 and 4): 2 steps, then epoch 2 of 2
        ("mid-epoch", 3, 2, 3, 3 + 2 + 2),
    ],
)
def test_a_resumed_epoch_budget_decays_to_the_step_the_fit_ends_at(
    tmp_path: Path, saved: str, max_epochs: int, accumulate: int, resumed_at: int, end: int
) -> None:
    if saved == "epoch end":
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    else:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1,
                                     filename="step3")
    path = _first_run(tmp_path, checkpoint)

    model = _model()
    out = io.StringIO()
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, accumulate_grad_batches=accumulate,
                            limit_val_batches=0, enable_progress_bar=True,
                            callbacks=[TextProgress(interval_s=3600, stream=out)])
    trainer.fit(model, DataLoader(training_batches(model), batch_size=None), ckpt_path=path)

    assert trainer.global_step == end
    (scheduler,) = [config.scheduler for config in trainer.lr_scheduler_configs]
    assert isinstance(scheduler, RunLambdaLR)
    assert scheduler.lr_lambdas[0].total_steps == end
    assert scheduler.last_epoch == end
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * MIN_FACTOR)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"train: from step {resumed_at} of {end},")
    steps = [line.split(" |")[0] for line in lines if line.startswith("train step")]
    assert steps[-1] == f"train step {end}/{end} (100%)"


def test_max_steps_still_caps_a_resumed_epoch_budget(tmp_path: Path) -> None:
    path = _first_run(tmp_path, ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True))
    model = _model()
    trainer = quiet_trainer(tmp_path, max_epochs=4, max_steps=7, limit_val_batches=0)
    trainer.fit(model, DataLoader(training_batches(model), batch_size=None), ckpt_path=path)
    assert trainer.global_step == 7
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 7
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * MIN_FACTOR)


@pytest.mark.parametrize("saved", ["epoch end", "end of fit"])
def test_a_run_extended_with_max_steps_trains_every_epoch_left(tmp_path: Path, saved: str) -> None:
    # the README's way of extending a finished run by steps sets max_epochs and max_steps; with
    # max_steps set Lightning replayed the saved epoch empty and counted it again (one epoch lost)
    from lightning_rpn.training.last_checkpoint import LastCheckpoint

    checkpoint = (ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True) if saved == "epoch end"
                  else LastCheckpoint(dirpath=tmp_path / "checkpoints", every_n_epochs=10))
    path = _first_run(tmp_path, checkpoint)
    model = _model()
    trainer = quiet_trainer(tmp_path, max_epochs=4, max_steps=100, limit_val_batches=0)
    trainer.fit(model, DataLoader(training_batches(model)[:2], batch_size=None), ckpt_path=path)
    assert trainer.global_step == 4 + 2 * 2 and trainer.current_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * MIN_FACTOR)


class BatchRecorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, batch_idx))


@pytest.mark.parametrize("max_steps, validate_every_batches", [(6, None), (7, 2)])
def test_a_fit_stopped_inside_an_epoch_resumes_with_the_epochs_next_batch(
    tmp_path: Path, max_steps: int, validate_every_batches: int | None
) -> None:
    # max_steps 6 (7) of 4-batch epochs stops inside epoch 1; Lightning has counted that epoch as ended
    # when its epoch-end save (validating every 2 batches: LastCheckpoint's end-of-fit save) writes
    # last.ckpt, so the resume began epoch 2 and the rest of epoch 1 never trained
    model = _model()
    batches = training_batches(model)
    loaders = DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None)
    last = LastCheckpoint(dirpath=tmp_path / "checkpoints")
    quiet_trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True, callbacks=[last], limit_val_batches=1,
                  val_check_interval=validate_every_batches).fit(model, *loaders)
    recorder = BatchRecorder()
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[recorder], limit_val_batches=1,
                            val_check_interval=validate_every_batches)
    trainer.fit(_model(), *loaders, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    rest_of_epoch_1 = [(1, batch) for batch in range(max_steps - 4, 4)]
    assert recorder.batches == [*rest_of_epoch_1, (2, 0), (2, 1), (2, 2), (2, 3)] and trainer.global_step == 12


class LoggedSteps(pl.Callback):
    """The step loggers are given for each training batch (Lightning's ``_batches_that_stepped``)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(trainer.fit_loop.epoch_loop._batches_that_stepped)


@pytest.mark.parametrize("saved", ["at validation", "at epoch end", "end of fit"])
def test_a_run_resumed_at_an_epoch_end_logs_at_the_next_step(tmp_path: Path, saved: str) -> None:
    # a checkpoint saved in the epoch's last validation holds the logger step before that batch's
    # count: resumed between epochs it logged every later metric one step early (step 3 twice,
    # Lightning corrects it only for a resume inside an epoch)
    checkpoint = {
        # as with check_val_every_n_epoch > 1 (scenes.yaml), or a monitored metric
        "at validation": ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True,
                                         save_on_train_epoch_end=False),
        "at epoch end": ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True,
                                        save_on_train_epoch_end=True),
        "end of fit": LastCheckpoint(dirpath=tmp_path / "checkpoints", every_n_epochs=10),
    }[saved]
    first = LoggedSteps()
    model = _model()
    batches = training_batches(model)[:2]
    quiet_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[checkpoint, first],
                  limit_val_batches=1).fit(model, DataLoader(batches, batch_size=None),
                                           DataLoader(batches[:1], batch_size=None))
    resumed = LoggedSteps()
    model = _model()
    quiet_trainer(tmp_path, max_epochs=3, callbacks=[resumed], limit_val_batches=0).fit(
        model, DataLoader(training_batches(model)[:2], batch_size=None),
        ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert first.steps == [0, 1, 2, 3] and resumed.steps == [4, 5]


class Validations(pl.Callback):
    """Each validation's step and the recall it logged; raises ``KeyboardInterrupt`` after the
    first batch of the validation at step ``stop_at``."""

    def __init__(self, stop_at: int = -1) -> None:
        self.stop_at, self.steps, self.recalls = stop_at, [], []

    def on_validation_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.stop_at:
            raise KeyboardInterrupt

    def on_validation_end(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)
        self.recalls.append(float(trainer.callback_metrics["val/AR@100"]))


def test_a_validation_interrupted_at_an_epoch_end_runs_again_when_resumed(tmp_path: Path) -> None:
    # RPNModule resumes the interruption's save with that validation (resume_state): it began the
    # next epoch, and step 4's recall and best candidate were never made
    batches = training_batches(_model())
    loaders = DataLoader(batches[:2], batch_size=None), DataLoader(batches[:2], batch_size=None)
    reference = Validations()
    torch.manual_seed(0)
    quiet_trainer(tmp_path / "reference", max_epochs=3, limit_val_batches=2, check_val_every_n_epoch=2,
                  callbacks=[reference]).fit(_model(), *loaders)
    last = LastCheckpoint(dirpath=tmp_path / "checkpoints")
    torch.manual_seed(0)
    with pytest.raises(SystemExit):
        quiet_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, limit_val_batches=2,
                      check_val_every_n_epoch=2, callbacks=[last, Validations(stop_at=4)]).fit(_model(), *loaders)
    resumed = Validations()
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_val_batches=2, check_val_every_n_epoch=2,
                            callbacks=[resumed])
    trainer.fit(_model(), *loaders, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert reference.steps == resumed.steps == [4] and trainer.global_step == 6
    assert resumed.recalls == pytest.approx(reference.recalls)  # over both batches, the same weights


def test_a_resumed_run_warns_of_its_warm_up_against_the_step_it_ends_at(tmp_path: Path) -> None:
    # 2 epochs of 2 batches (steps 1-4), resumed to max_epochs 3 over 4 batches an epoch: it ends at
    # step 8; the warning, made before Lightning restored the loops, said 12 (3 epochs x 4)
    path = _first_run(tmp_path, ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True))
    model = tiny_model(optimizer="adamw", lr=LR, warmup_steps=100, lr_schedule="cosine", min_lr_factor=MIN_FACTOR)
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"model\.warmup_steps=100 is not shorter than this run, which ends at "
                                         r"optimizer step 8 ") as warned:
        trainer.fit(model, DataLoader(training_batches(model), batch_size=None), ckpt_path=path)
    assert trainer.global_step == 8
    assert [str(w.message) for w in warned if "warmup_steps" in str(w.message)] and not [
        w for w in warned if "ends at optimizer step 12" in str(w.message)]
