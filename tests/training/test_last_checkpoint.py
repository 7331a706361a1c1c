"""``LastCheckpoint``: ``last.ckpt`` holds where fit stopped, on and off the validation cadence."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_rpn.training.callbacks import LastCheckpoint
from lightning_rpn.training.last_checkpoint import Interruption, interruption_of
from lightning_rpn.training.resume_state import finish_saved_epoch, reopen_stopped_epoch


class FallingModel(BoringModel):
    """Logs ``score`` = the epoch, so a ``mode="max"`` best improves every validation and a
    ``mode="min"`` one never after the first."""

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.current_epoch))
        return super().validation_step(batch, batch_idx)


def _fit(tmp_path: Path, callbacks: list, max_steps: int, **trainer_args) -> dict[str, int]:
    """Fit 4 batches an epoch for ``max_steps``; the global step of each checkpoint in ``tmp_path``."""
    trainer = Trainer(default_root_dir=tmp_path, max_steps=max_steps, max_epochs=-1, limit_train_batches=4,
                      limit_val_batches=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **trainer_args)
    trainer.fit(FallingModel())
    return _steps(tmp_path)


def _steps(folder: Path) -> dict[str, int]:
    return {p.name: torch.load(p, weights_only=True)["global_step"] for p in sorted(folder.glob("*.ckpt"))}


def test_last_holds_the_final_step_when_the_best_stops_improving(tmp_path: Path) -> None:
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="score", mode="min")
    assert _fit(tmp_path, [best, LastCheckpoint(dirpath=tmp_path)], max_steps=12) == {"best.ckpt": 4, "last.ckpt": 12}


@pytest.mark.parametrize("max_steps", [10, 14])
def test_last_is_saved_at_the_end_of_a_fit_between_validations(tmp_path: Path, max_steps: int) -> None:
    """Validation every 3 epochs (12 steps): a fit of 10 or 14 steps ends between two; Lightning's
    own monitor-less ModelCheckpoint(save_last=True) then keeps its step-12 files."""
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True)
    steps = _fit(tmp_path, [LastCheckpoint(dirpath=tmp_path), plain], max_steps=max_steps, check_val_every_n_epoch=3)
    assert steps == {"last.ckpt": max_steps}
    if max_steps > 12:
        assert _steps(tmp_path / "plain") == {"epoch=2-step=12.ckpt": 12, "last.ckpt": 12}


def test_last_keeps_other_runs_files(tmp_path: Path) -> None:
    earlier = tmp_path / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier run's")
    last = LastCheckpoint(dirpath=earlier.parent)
    _fit(tmp_path, [last], max_steps=8)
    assert earlier.read_bytes() == b"an earlier run's"
    assert last.monitor is None and last.save_top_k == 1 and not last.save_last
    (earlier.parent / "last.ckpt").unlink()
    assert _steps(earlier.parent) == {"last-v1.ckpt": 8}


# ---------------------------------------------------------------- Ctrl-C and SIGTERM during fit
class StopAt(Callback):
    """Raises ``stop()`` (or sets Lightning's SIGTERM flag) at the end of batch ``step``, and
    counts the training batches run."""

    def __init__(self, step: int, stop: type[BaseException] | None) -> None:
        self.step, self.stop, self.batches = step, stop, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if trainer.global_step == self.step:
            if self.stop is None:
                trainer._signal_connector.received_sigterm = True  # as Lightning's SIGTERM handler does
            else:
                raise self.stop()


def _interrupted_fit(tmp_path: Path, stop: type[BaseException] | None, step: int = 6):
    """Fit 4 batches an epoch, validating every 2 epochs, stopped at ``step`` (mid-epoch); the
    exception that left ``fit`` and the LastCheckpoint."""
    last = LastCheckpoint(dirpath=tmp_path)
    with pytest.raises(BaseException) as raised:
        _fit(tmp_path, [last, StopAt(step, stop)], max_steps=20, check_val_every_n_epoch=2)
    return raised.value, last


@pytest.mark.parametrize("stop, signum", [(KeyboardInterrupt, signal.SIGINT), (None, signal.SIGTERM)])
def test_an_interrupted_fit_saves_the_step_reached(tmp_path: Path, stop, signum) -> None:
    """Ctrl-C (Lightning then calls sys.exit(1)) and SIGTERM (SIGTERMException) at step 6, before
    the first validation (step 8): last.ckpt is step 6, which resume_state leaves to Lightning."""
    error, last = _interrupted_fit(tmp_path, stop)
    assert isinstance(error, SystemExit)  # both: a bare SIGTERMException exits 0 without main()'s handling
    assert _steps(tmp_path) == {"last.ckpt": 6}
    assert interruption_of(error) == Interruption(signum, 6, str(tmp_path / "last.ckpt"), 6)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not finish_saved_epoch(checkpoint) and not reopen_stopped_epoch(checkpoint)


def test_other_errors_save_nothing_more(tmp_path: Path) -> None:
    error, _ = _interrupted_fit(tmp_path, ZeroDivisionError, step=10)
    assert isinstance(error, ZeroDivisionError) and interruption_of(error) is None
    assert _steps(tmp_path) == {"last.ckpt": 8}  # the validation of epoch 2, not step 10


def test_an_interruption_at_a_saved_step_writes_nothing_new(tmp_path: Path) -> None:
    error, _ = _interrupted_fit(tmp_path, KeyboardInterrupt, step=8)  # the end of epoch 2's validation save
    record = interruption_of(error)
    assert (record.step, record.saved_step) == (8, 8) and _steps(tmp_path) == {"last.ckpt": 8}


@pytest.mark.parametrize("stop", [KeyboardInterrupt, None])
def test_an_interrupted_fit_resumes_at_the_next_batch(tmp_path: Path, stop) -> None:
    """Resumed with ``ckpt_path`` to 12 steps, the run trains the 6 batches left (the rest of the
    interrupted epoch, one more), ends at step 12 with the same learning-rate schedule position."""
    _interrupted_fit(tmp_path, stop)
    counter = StopAt(step=-1, stop=None)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=12, max_epochs=-1, limit_train_batches=4,
                      limit_val_batches=1, callbacks=[counter], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=2)
    trainer.fit(FallingModel(), ckpt_path=tmp_path / "last.ckpt")
    assert (counter.batches, trainer.global_step, trainer.current_epoch) == (6, 12, 3)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # BoringModel's StepLR: once an epoch
