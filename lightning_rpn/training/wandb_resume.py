"""A resumed ``fit`` goes on logging to the W&B run it resumes, not to a new one.

Every checkpoint records the id of the W&B run that wrote it (:func:`record_wandb_run`). When
``fit`` resumes a checkpoint (``--ckpt_path last`` or a file) and the config names no run id
itself (``trainer.logger.init_args.id`` / ``version``), :func:`continue_wandb_run` gives that id
to the ``WandbLogger`` before W&B starts, and Lightning's ``resume="allow"`` continues the run:
one job's curves stay one run. A checkpoint from before this record, or one trained without
W&B, starts a new run as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_rpn.training.run_files import evaluation_checkpoint

__all__ = ["WANDB_RUN_KEY", "continue_wandb_run", "record_wandb_run"]

WANDB_RUN_KEY = "lightning_rpn_wandb_run"
"""Checkpoint key of the id of the W&B run that saved it."""


def _wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


def record_wandb_run(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Put the id of the trainer's W&B run (once started) into ``checkpoint``."""
    logger = _wandb_logger(trainer)
    run_id = None if logger is None else logger.version  # the run's id; no run is started for it
    if run_id:
        checkpoint[WANDB_RUN_KEY] = str(run_id)


def _resumed_file(trainer: pl.Trainer, ckpt_path: str | None) -> Path | None:
    """The checkpoint file ``fit --ckpt_path`` resumes: ``last`` / ``best`` found on disk (none:
    a fresh run), a path that exists, else ``None``."""
    if ckpt_path is None:
        return None
    try:
        found = evaluation_checkpoint(trainer, str(ckpt_path), "fit")
    except ValueError:  # no such checkpoint yet: Lightning starts afresh
        return None
    return Path(found) if found is not None and Path(found).is_file() else None


def continue_wandb_run(trainer: pl.Trainer, ckpt_path: str | None) -> str | None:
    """Give the trainer's ``WandbLogger`` the W&B run id recorded in the checkpoint ``fit`` resumes;
    the id, or ``None`` where nothing changes (no W&B logger, no checkpoint or no id in it, an id
    in the config, or a run already started)."""
    logger = _wandb_logger(trainer)
    path = None if logger is None else _resumed_file(trainer, ckpt_path)
    if logger is None or path is None:
        return None
    # Lightning keeps wandb.init's arguments until the run starts: the one place to give it an id
    init: dict[str, Any] | None = getattr(logger, "_wandb_init", None)
    if init is None or init.get("id") or getattr(logger, "_experiment", None) is not None:
        return None
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    run_id = checkpoint.get(WANDB_RUN_KEY)
    if not run_id:
        return None
    init["id"] = logger._id = str(run_id)
    return str(run_id)
