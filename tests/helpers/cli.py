"""The real ``lightning-rpn`` console script for end-to-end tests: a tiny config and runners.

Each run is a new process whose imports (torch, Lightning) alone take seconds of CPU at one
thread, so runs that do not depend on each other go side by side (``start_cli``) while the test
process only waits.
"""

from __future__ import annotations

import copy
import os
import subprocess
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")


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


def cli_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run: W&B offline and quiet, one thread, as a user's shell has it.

    Without ``WANDB_SERVICE``: once a test in this process has started W&B, wandb puts its
    service's address there, and a child that inherits it logs through that service, which
    resolves the run's relative paths (``save_dir: run``) from this process's working
    directory, the checkout, instead of the run's ``cwd``. Without rich's overrides of its
    terminal test (``FORCE_COLOR``, ``TTY_COMPATIBLE``, ``TTY_INTERACTIVE``): stdout is a pipe,
    and a CI machine that sets one would otherwise get the rich bar instead of progress lines.
    """
    left_out = {"WANDB_SERVICE", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"}
    inherited = {key: value for key, value in os.environ.items() if key not in left_out}
    return {**inherited, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **(extra or {})}


def run_cli(
    args: list[str], cwd: Path, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = cli_environment(env)
    result = subprocess.run(
        [*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
PARALLEL_RUNS = max(1, min(2, len(os.sched_getaffinity(0)) // _WORKERS))
"""How many background runs go at once: one per core, at most two (the suite's machine), shared
among the pytest-xdist workers (``make test`` runs two)."""

_RUNNER = ThreadPoolExecutor(max_workers=PARALLEL_RUNS, thread_name_prefix="background-run")


def in_background(function: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """``function(*args, **kwargs)`` (a subprocess run) on the shared pool of ``PARALLEL_RUNS``
    threads; ``.result()`` waits for it and raises what it raised."""
    return _RUNNER.submit(function, *args, **kwargs)


def start_cli(
    args: list[str], cwd: Path, timeout: float = 180, env: dict[str, str] | None = None
) -> Future[subprocess.CompletedProcess]:
    """``run_cli`` in the background (``in_background``)."""
    return in_background(run_cli, args, cwd, timeout, env)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


SECRET = "secret-xyz-0123456789abcdef0123456789abcdef0123"
"""The ``WANDB_API_KEY`` of the shared fit (W&B keys are 40+ characters): it must reach no file or output."""


@dataclass(frozen=True)
class FitRun:
    """A finished ``lightning-rpn fit`` in ``workdir`` (``config.yaml``, ``run/``) and what it printed."""

    workdir: Path
    output: str


def fit_tiny_run(workdir: Path) -> FitRun:
    """The suite's shared fit: ``TINY_CONFIG`` for 2 steps, W&B offline with ``WANDB_API_KEY=SECRET``.

    The ProposalWriter keeps every proposal (100, as many as AR@100 sees) and a test split is
    named, so ``validate``, ``test`` and ``predict`` all read this one checkpoint.
    """
    config = copy.deepcopy(TINY_CONFIG)
    (writer,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ProposalWriter")]
    writer["init_args"]["top_k"] = 100
    config["data"]["test_split"] = "test"
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(["fit", "--config", "config.yaml"], workdir, env={"WANDB_API_KEY": SECRET})
    assert_ok(result)
    return FitRun(workdir, result.stdout + result.stderr)


def selected_params(request: Any, test_name: str, param: str) -> list[Any]:
    """The values of ``param`` that the selected items of ``test_name`` in the requesting module
    take: a fixture that starts their runs up front starts only those a test will read."""
    return sorted({item.callspec.params[param] for item in request.session.items
                   if getattr(item, "originalname", None) == test_name and item.module is request.module})
