"""The file checks every layer shares (lightning_rpn._files): what a saved torch file is, and
whether a folder can be written, decided without creating anything that stays."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_rpn._files import folder_write_problem, torch_file_kind


def test_torch_file_kinds_are_told_apart_by_their_contents(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.bin"  # the name says nothing: the contents decide
    torch.save({"w": torch.zeros(3)}, checkpoint)
    assert torch_file_kind(checkpoint) == "checkpoint"
    program = tmp_path / "program.zip"  # torch.export.save's layout: <name>/archive_format
    with zipfile.ZipFile(program, "w") as archive:
        archive.writestr("rpn/archive_format", "pt2")
    assert torch_file_kind(program) == "program"
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("notes.txt", "x")
    assert torch_file_kind(other) == "zip"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[:200])
    assert torch_file_kind(cut) == "truncated_zip"
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch_file_kind(legacy) == "other"
    (tmp_path / "empty").write_bytes(b"")
    assert torch_file_kind(tmp_path / "empty") == "empty"
    with pytest.raises(OSError):
        torch_file_kind(tmp_path / "missing")


def test_a_folder_to_create_is_checked_on_its_nearest_existing_parent_and_not_created(tmp_path: Path) -> None:
    assert folder_write_problem(tmp_path / "a" / "b") is None
    assert folder_write_problem(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_a_folder_under_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    assert folder_write_problem(tmp_path / "afile" / "out") == f"{tmp_path / 'afile'} is a file"
    assert folder_write_problem(tmp_path / "afile") == f"{tmp_path / 'afile'} is a file"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_a_folder_without_write_permission_gives_the_reason(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert folder_write_problem(locked / "out") == "Permission denied"
        assert folder_write_problem(locked) == "Permission denied"
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []
