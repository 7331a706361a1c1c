"""A COCO / VOC config whose data.root holds no dataset stops before its W&B run starts.

Lightning starts every logger's run (a ``wandb/`` folder offline, a failed run in the W&B project
online) just before the data module's ``setup``, which reads the splits; ``prepare_data`` comes
before that and checks the splits' paths.
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


@pytest.mark.parametrize("command, config, missing", [
    ("fit", "coco_r50_fpn_1x.yaml", "annotations/instances_train2017.json"),
    ("validate", "voc_vgg16_c4.yaml", "ImageSets/Main/test.txt"),
])
def test_a_data_root_without_the_dataset_stops_before_the_wandb_run(
    tmp_path: Path, command: str, config: str, missing: str
) -> None:
    (tmp_path / "data").mkdir()  # exists, but holds no dataset
    extra = ["--model.aspect_ratios", "[[0.5, 1.0, 2.0]]"] if config.startswith("voc") else []
    result = run_cli([command, "--config", str(CONFIGS / config), *SMALL, *extra, "--data.root", "data"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not list(tmp_path.rglob("wandb")), sorted(map(str, tmp_path.rglob("*")))
    message = " ".join(result.stderr.split())
    assert f"lightning-rpn: data/{missing}: split " in message and "--data.root 'data'" in message
