"""The real ``lightning-rpn`` console script for end-to-end tests: a tiny config and a runner."""

from __future__ import annotations

import os
import subprocess
import shutil
import sys
from pathlib import Path


PROBES = str(Path(__file__).resolve().parent)
"""The folder of the probe modules (``cli_probes``, ``backbone_probes``): ``PYTHONPATH`` of subprocess runs that name them."""

SCRIPT = shutil.which("lightning-rpn", path=str(Path(sys.executable).parent))


COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "lightning_rpn.cli"]


TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": "run",
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "lightning-rpn-tests", "save_dir": "run"},
        },
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": "run/checkpoints", "save_last": True,
                              "enable_version_counter": False},
            },
            {"class_path": "lightning_rpn.training.callbacks.RecallTable"},
            {"class_path": "lightning_rpn.training.proposal_writer.ProposalWriter",
             "init_args": {"output_dir": "run/proposals", "top_k": 50}},
        ],
    },
    "model": {
        "backbone": "tiny_fpn",
        "anchor_sizes": [[16], [32], [64], [128]],
        "optimizer": "adamw",
        "lr": 0.001,
        "warmup_steps": 1,
        "post_nms_top_n_train": 200,
        "pre_nms_top_n_test": 200,
        "post_nms_top_n_test": 100,
        "recall_max_proposals": [10, 100],
    },
    "data": {
        "dataset": "synthetic",
        "synthetic_train_images": 8,
        "synthetic_val_images": 4,
        "synthetic_min_size": 64,
        "synthetic_max_size": 96,
        "synthetic_max_shapes": 3,
        "batch_size": 4,
        "num_workers": 0,
        "resize": "fixed",
        "fixed_size": [64, 64],
    },
}


def run_cli(
    args: list[str], cwd: Path, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           **(env or {})}
    result = subprocess.run(
        [*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
