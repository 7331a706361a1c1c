"""``LastCheckpoint``: ``last.ckpt`` holds where fit stopped, on and off the validation cadence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_rpn.training.callbacks import LastCheckpoint


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
