"""AtomicCheckpointIO: a checkpoint is written whole beside its file and renamed, or not at all; the
command line uses it, and a full disk is one line naming the checkpoint it kept."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import TINY_CONFIG

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
    monkeypatch.setattr(checkpoint_io.os, "fsync", _disk_full)  # the disk fills up as the new file is flushed
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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    used = []

    def full(self: AtomicCheckpointIO, checkpoint: dict, path: object, storage_options: object = None) -> None:
        used.append(type(self))
        raise OSError(errno.ENOSPC, f"No space left on device: the checkpoint {path} was not written")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full)
    code = cli.main(["fit", "--config", "tiny.yaml", "--trainer.logger", "false"])
    assert code == 1 and used == [AtomicCheckpointIO]
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lightning-rpn: No space left on device: the checkpoint ")
    assert "free some space, or write the run to another folder" in error
