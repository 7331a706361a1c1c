"""A command refused before its run starts (a COCO / VOC data.root that lacks the dataset, found by
``prepare_data``) leaves no new folder or file behind, and leaves an earlier run's folder as it was.

The W&B logger's folder (``runs/<job>/``, made for wandb before Lightning starts its run) stayed,
empty, after the refusal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.cli import run_cli

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = ["--model.backbone", "tiny_fpn", "--model.weights", "null", "--model.trainable_layers", "null",
         "--model.anchor_sizes", "[[32], [64], [128], [256]]", "--trainer.accelerator", "cpu",
         "--data.num_workers", "0"]
"""The shipped configs on a small backbone without pretrained weights (nothing to download)."""


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (``None`` for a folder)."""
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes() for path in root.rglob("*")}


def _refused(command: str, config: str, workdir: Path) -> None:
    extra = ["--model.aspect_ratios", "[[0.5, 1.0, 2.0]]"] if config.startswith("voc") else []
    result = run_cli([command, "--config", str(CONFIGS / config), *SMALL, *extra, "--data.root", "data"], workdir)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "lightning-rpn: data/" in result.stderr and "--data.root 'data'" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("command, config", [("fit", "coco_r50_fpn_1x.yaml"), ("validate", "voc_vgg16_c4.yaml")])
def test_a_refused_command_leaves_no_folder_behind(tmp_path: Path, command: str, config: str) -> None:
    (tmp_path / "data").mkdir()  # exists, but holds no dataset
    _refused(command, config, tmp_path)
    assert _tree(tmp_path) == {"data": None}  # was also runs/ and runs/<job>/, empty


def test_an_earlier_runs_folder_stays_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    job = tmp_path / "runs" / "coco_r50_fpn_1x"
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    (job / "wandb" / "offline-run-1").mkdir(parents=True)
    (job / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"an earlier run's log")
    (job / "empty_of_an_earlier_run").mkdir()
    before = _tree(tmp_path)
    _refused("fit", "coco_r50_fpn_1x.yaml", tmp_path)
    assert _tree(tmp_path) == before


def test_an_empty_folder_that_was_there_before_stays(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "runs" / "coco_r50_fpn_1x").mkdir(parents=True)  # made by hand, or left by an earlier version
    _refused("fit", "coco_r50_fpn_1x.yaml", tmp_path)
    assert _tree(tmp_path) == {"data": None, "runs": None, "runs/coco_r50_fpn_1x": None}
