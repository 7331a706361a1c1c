"""Resuming a run: the learning-rate schedule follows the resumed run, not the checkpoint's.

Each case trains 1 epoch (2 steps of the tiny synthetic set), then resumes with
``--ckpt_path last --trainer.max_epochs 3`` and reads the learning rate that
``LearningRateMonitor`` logged (CSV) for every resumed step.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import yaml

from helpers.cli import TINY_CONFIG, assert_ok, run_cli

LR = 0.001
STEPS_PER_EPOCH = 2  # 8 training images, batch 4


def _write_config(workdir: Path, schedule: dict) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(
        max_steps=-1,
        max_epochs=1,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "run"}},
        callbacks=[
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": "run/checkpoints", "save_last": True}},
            {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
             "init_args": {"logging_interval": "step"}},
        ],
    )
    config["model"].update(optimizer="adamw", lr=LR, warmup_steps=0, **schedule)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def _logged_lrs(csv_file: Path) -> dict[int, float]:
    """Step -> learning rate of the first parameter group, as LearningRateMonitor logged it."""
    with csv_file.open() as f:
        rows = list(csv.DictReader(f))
    (column,) = [name for name in rows[0] if name.startswith("lr-") and name.endswith("pg1")]
    return {int(row["step"]): float(row[column]) for row in rows if row[column]}


def _fit_then_extend(workdir: Path, schedule: dict, *resume_overrides: str) -> tuple[dict[int, float], str]:
    _write_config(workdir, schedule)
    assert_ok(run_cli(["fit", "--config", "config.yaml"], workdir))
    resumed = run_cli(["fit", "--config", "config.yaml", "--ckpt_path", "last",
                       "--trainer.max_epochs", "3", *resume_overrides], workdir)
    assert_ok(resumed)
    return _logged_lrs(workdir / "run/lightning_logs/version_1/metrics.csv"), resumed.stderr


def test_extending_a_cosine_run_decays_over_the_new_length(tmp_path: Path) -> None:
    lrs, log = _fit_then_extend(tmp_path, {"lr_schedule": "cosine"})
    total = 3 * STEPS_PER_EPOCH
    resumed_steps = range(STEPS_PER_EPOCH, total)
    assert sorted(lrs) == list(resumed_steps)
    expected = {step: LR * 0.5 * (1 + math.cos(math.pi * step / total)) for step in resumed_steps}
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert f"total_steps {STEPS_PER_EPOCH} -> {total}" in " ".join(log.split())


def test_a_resumed_multistep_run_takes_its_own_milestones(tmp_path: Path) -> None:
    lrs, log = _fit_then_extend(tmp_path, {"lr_schedule": "multistep", "milestones": [100]},
                                "--model.milestones", "[3]")
    assert lrs == pytest.approx({2: LR, 3: LR * 0.1, 4: LR * 0.1, 5: LR * 0.1}, rel=1e-6)
    assert "milestones (100,) -> (3,)" in " ".join(log.split())
