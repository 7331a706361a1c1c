"""End to end through the real ``lightning-rpn`` command: what a new user hits (issue #13).

Tiny budgets on the synthetic set (``test_cli.TINY_CONFIG``), each test in its own folder.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import yaml

from lightning_rpn.module import RPNModule
from test_cli import TINY_CONFIG, assert_ok, run_cli

TESTS = Path(__file__).resolve().parent
# backbone_probes.ProbeFPN by class_path, ahead of any PYTHONPATH already set
PROBES = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def write_config(workdir: Path, **sections: dict) -> dict:
    """TINY_CONFIG with ``sections`` merged into its top-level sections, saved as config.yaml."""
    config = copy.deepcopy(TINY_CONFIG)
    for name, values in sections.items():
        config[name].update(values)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def test_load_from_checkpoint_rebuilds_a_class_path_backbone(tmp_path: Path) -> None:
    backbone = {"class_path": "backbone_probes.ProbeFPN", "init_args": {"width": 6}}
    write_config(tmp_path, model={"backbone": backbone})
    assert_ok(run_cli(["fit", "--config", "config.yaml", "--trainer.logger", "false"], tmp_path, env=PROBES))
    path = tmp_path / "run/checkpoints/last.ckpt"
    model = RPNModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert type(model.backbone).__name__ == "ProbeFPN" and model.backbone.out_channels == 6
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.state_dict(), checkpoint["state_dict"])
