"""Where the reporting callbacks write, and when: rank 0 outside the sanity check, per logger.

``WandbLogger`` and ``TensorBoardLogger`` take logger-native media; every other logger (CSV,
...), or no logger at all, gets files under its log directory (:func:`file_loggers`,
:func:`log_dir`). Shared by :mod:`~lightning_rpn.training.recall_curves` and
:mod:`~lightning_rpn.training.proposal_images`.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["evaluation_stage", "file_loggers", "log_dir", "reporting"]


def reporting(trainer: Trainer) -> bool:
    """Whether this process reports: global rank 0, and not the sanity check."""
    return trainer.is_global_zero and not trainer.sanity_checking


def evaluation_stage(trainer: Trainer) -> str:
    """The key prefix of the running evaluation: ``"test"`` or ``"val"``."""
    return "test" if trainer.state.fn == TrainerFn.TESTING else "val"


def log_dir(trainer: Trainer, logger: Logger | None) -> Path:
    """Where files for ``logger`` go: its ``log_dir`` / ``save_dir``, else the trainer's root."""
    for attr in ("log_dir", "save_dir"):
        value = getattr(logger, attr, None) if logger is not None else None
        if value:
            return Path(value)
    return Path(trainer.default_root_dir)


def file_loggers(trainer: Trainer) -> list[Logger | None]:
    """The loggers that get files rather than logger-native media (``[None]`` without loggers)."""
    if not trainer.loggers:
        return [None]
    return [lg for lg in trainer.loggers if not isinstance(lg, (WandbLogger, TensorBoardLogger))]
