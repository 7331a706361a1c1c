"""check_checkpoint_dirs checks before training that checkpoints can be written in each folder: a
folder that cannot be is a ValueError naming the callback and dirpath, not an OSError at the first
save; the check creates nothing, so a fit that stops before its first save leaves no empty folder."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rpn.training.last_checkpoint import LastCheckpoint
from lightning_rpn.training.run_files import check_checkpoint_dirs


def _trainer(*callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(callbacks=list(callbacks), logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_a_checkpoint_folder_under_a_file_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    folder = tmp_path / "afile" / "ckpts"
    best = ModelCheckpoint(dirpath=folder, monitor="val/AR@100", mode="max")
    trainer = _trainer(best, LastCheckpoint(dirpath=folder))
    with pytest.raises(ValueError, match="cannot be created") as refused:
        check_checkpoint_dirs(trainer)
    message = str(refused.value)
    assert f"{folder} (LastCheckpoint, ModelCheckpoint dirpath)" in message
    assert f"{tmp_path / 'afile'} is a file" in message and "choose another dirpath" in message
    assert (tmp_path / "afile").read_text() == "x"


def test_a_missing_checkpoint_folder_is_checked_and_not_created(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "x" / "checkpoints"
    check_checkpoint_dirs(_trainer(ModelCheckpoint(dirpath=folder)))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_checkpoint_folder_is_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").write_bytes(b"x")
    check_checkpoint_dirs(_trainer(ModelCheckpoint(dirpath=tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
