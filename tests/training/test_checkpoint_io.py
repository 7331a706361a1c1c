"""AtomicCheckpointIO: a checkpoint is written whole beside its file and renamed, or not at all; the
command line uses it, and a full disk is one line naming the checkpoint it kept."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from lightning_rpn import cli
from lightning_rpn.training import checkpoint_io
from lightning_rpn.training.checkpoint_io import AtomicCheckpointIO


def _disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(os, "fsync", _disk_full)  # the disk fills up as the new file is flushed
    with pytest.raises(OSError, match=r"No space left on device: the checkpoint .*last\.ckpt was not written") as raised:
        io.save_checkpoint({"step": 2}, path)
    assert raised.value.errno == errno.ENOSPC
    assert io.load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_a_checkpoint_is_written_in_a_new_folder_with_the_users_permissions(tmp_path: Path) -> None:
    path = tmp_path / "run" / "checkpoints" / "best.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["weights"], torch.arange(3))
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_the_command_line_writes_checkpoints_atomically_and_says_a_full_disk_in_one_line(
    tiny_cli_config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    used = []

    def full(self: AtomicCheckpointIO, checkpoint: dict, path: object, storage_options: object = None) -> None:
        used.append(type(self))
        raise OSError(errno.ENOSPC, f"No space left on device: the checkpoint {path} was not written")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full)
    code = cli.main(["fit", "--config", tiny_cli_config, "--trainer.logger", "false"])
    assert code == 1 and used == [AtomicCheckpointIO]
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lightning-rpn: No space left on device: the checkpoint ")
    assert "; free some space, or write the run to another folder" in error


def test_a_run_folder_that_cannot_be_written_is_one_line(
    tiny_cli_config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # a read-only run folder: jsonargparse's "config.yaml not creatable" ended validate in a 45-line traceback
    monkeypatch.setattr(cli, "folder_write_problem", lambda folder: "a read-only file system")
    code = cli.main(["fit", "--config", tiny_cli_config, "--trainer.logger", "false"])
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lightning-rpn: the run's folder cannot be written: ") and error.count("config.yaml") == 1
    assert "; check the file's and its folder's permissions, or write the run to another folder" in error


def test_a_trainer_of_ones_own_takes_it_as_a_plugin(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    own = AtomicCheckpointIO()
    trainer = pl.Trainer(plugins=[own], logger=False, default_root_dir=tmp_path)
    checkpoint_io.use_atomic_checkpoints(trainer)  # a plugin of the user's own is kept
    assert trainer.strategy.checkpoint_io is own
    plain = pl.Trainer(logger=False, default_root_dir=tmp_path)
    checkpoint_io.use_atomic_checkpoints(plain)
    assert type(plain.strategy.checkpoint_io) is AtomicCheckpointIO
