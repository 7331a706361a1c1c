"""``validate`` / ``test`` / ``predict --ckpt_path best | last`` in a new process: found on disk or refused."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rpn.training.last_checkpoint import LastCheckpoint
from lightning_rpn.training.run_files import evaluation_checkpoint


def trainer_with(folder: Path) -> SimpleNamespace:
    """The shipped configs' two checkpoint callbacks, both writing to ``folder``."""
    return SimpleNamespace(checkpoint_callbacks=[
        ModelCheckpoint(dirpath=folder, filename="best", monitor="val/AR@100", mode="max"),
        LastCheckpoint(dirpath=folder),
    ])


def touch(path: Path, mtime: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_best_and_last_are_the_newest_files_of_their_callbacks(tmp_path: Path) -> None:
    trainer = trainer_with(tmp_path)
    for name, mtime in (("best.ckpt", 1), ("best-v1.ckpt", 3), ("best_old.ckpt", 9), ("last.ckpt", 4),
                        ("last-v1.ckpt", 2)):
        touch(tmp_path / name, mtime)
    assert evaluation_checkpoint(trainer, "best", "validate") == str(tmp_path / "best-v1.ckpt")
    assert evaluation_checkpoint(trainer, "last", "test") == str(tmp_path / "last.ckpt")
    assert evaluation_checkpoint(trainer, str(tmp_path / "best_old.ckpt"), "predict") == str(tmp_path / "best_old.ckpt")
    with pytest.raises(ValueError, match=r"predict --ckpt_path runs/x.ckpt: no such file"):
        evaluation_checkpoint(trainer, "runs/x.ckpt", "predict")
    assert evaluation_checkpoint(trainer, None, "predict") is None


@pytest.mark.parametrize("keyword", ["best", "last"])
def test_no_checkpoint_on_disk_is_an_error_not_untrained_weights(tmp_path: Path, keyword: str) -> None:
    with pytest.raises(ValueError, match=rf"validate --ckpt_path {keyword}: no {keyword}\*\.ckpt in .*"
                                         r"train first \(fit\) or pass a checkpoint path"):
        evaluation_checkpoint(trainer_with(tmp_path / "none"), keyword, "validate")


def test_best_needs_a_monitored_checkpoint_with_a_plain_name(tmp_path: Path) -> None:
    trainer = SimpleNamespace(checkpoint_callbacks=[
        ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}", monitor="val/AR@100"), LastCheckpoint(tmp_path)])
    with pytest.raises(ValueError, match="no ModelCheckpoint with a monitor, a dirpath and a plain filename"):
        evaluation_checkpoint(trainer, "best", "test")
