"""Checkpoint and early-stopping monitors that validation does not log are refused at the sanity
check, before the first training step, not at the end of training's first validation."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_rpn.core.config import SettingError
from lightning_rpn.training.datamodule import RPNDataModule
from helpers.model import quiet_trainer, tiny_model


def _fit(tmp_path, callbacks: list, **trainer_args):
    data = RPNDataModule(synthetic_train_images=4, synthetic_val_images=2, synthetic_min_size=64,
                         synthetic_max_size=64, batch_size=2, num_workers=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=callbacks, limit_val_batches=1, enable_checkpointing=True,
                            **{"num_sanity_val_steps": 1, **trainer_args})
    trainer.fit(tiny_model(), datamodule=data)
    return trainer


def test_a_mistyped_monitor_is_refused_before_training(tmp_path) -> None:
    best = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor="val/AR@10O", mode="max")
    stop = EarlyStopping(monitor="val/recal@0.5", mode="max")
    with pytest.raises(SettingError) as refused:
        _fit(tmp_path, [best, stop])
    message = str(refused.value)
    assert "ModelCheckpoint(monitor='val/AR@10O'), did you mean 'val/AR@10' or 'val/AR@100'?" in message
    assert "EarlyStopping(monitor='val/recal@0.5')" in message
    assert "validation logs no such metric" in message
    logged = message.split("Validation logs ")[1]
    assert "val/AR@100" in logged and "val/loss" in logged and "val/recall@IoU@proposals (e.g. val/recall@0.50@10)" in logged
    assert best.best_model_path == "" and not (tmp_path / "checkpoints").exists()  # nothing trained, nothing saved


def test_logged_training_and_lenient_monitors_pass(tmp_path) -> None:
    best = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor="val/AR@100", mode="max")
    on_loss = ModelCheckpoint(dirpath=tmp_path / "loss", monitor="train/loss")  # logged in training: not checked
    lenient = EarlyStopping(monitor="val/not_logged", strict=False)  # accepts a missing metric by design
    trainer = _fit(tmp_path, [best, on_loss, lenient])
    assert trainer.global_step == 2 and (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_without_a_sanity_check_lightning_decides(tmp_path) -> None:
    """No sanity check, no early refusal: Lightning's own error at training's first validation."""
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/AR@10O", mode="max")
    with pytest.raises(Exception, match="could not find the monitored key") as raised:
        _fit(tmp_path, [best], num_sanity_val_steps=0)
    assert not isinstance(raised.value, SettingError)
