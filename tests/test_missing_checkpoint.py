"""A ``--ckpt_path`` naming no file is one line before anything is built, not Lightning's traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.cli import run_cli

from lightning_rpn.training.run_files import check_checkpoint_file


def test_only_a_local_path_that_is_no_file_is_refused(tmp_path: Path) -> None:
    saved = tmp_path / "last.ckpt"
    saved.write_bytes(b"")
    for left_to_lightning in (None, "last", "best", "hpc", "registry", "registry:model:latest", "s3://bucket/x.ckpt",
                              str(saved), saved):
        check_checkpoint_file(left_to_lightning, "validate")
    with pytest.raises(ValueError, match=r"lightning-rpn predict --ckpt_path .*nope.ckpt: no such file \(.*nope.ckpt\); "
                                         r"--ckpt_path last / best take the newest"):
        check_checkpoint_file(str(tmp_path / "nope.ckpt"), "predict")
    with pytest.raises(ValueError, match=r"fit --ckpt_path .*: a folder, not a checkpoint file .*--ckpt_path last resumes"):
        check_checkpoint_file(tmp_path, "fit")


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["fit", "--config", "shapes", "--trainer.max_steps", "1"],
    ["validate", "--config", "shapes"],
    ["predict", "--data.predict_images", "."],
])
def test_a_mistyped_checkpoint_path_is_one_line_and_exit_2(tmp_path: Path, command: list[str]) -> None:
    done = run_cli([*command, "--ckpt_path", "runs/shapes/checkpoints/lats.ckpt", "--trainer.logger", "false"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"lightning-rpn {command[0]} --ckpt_path runs/shapes/checkpoints/lats.ckpt: no such file" in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made
