"""Where the reporting callbacks write, and when: rank 0 outside the sanity check, per logger.

``WandbLogger`` and ``TensorBoardLogger`` take logger-native media; every other logger (CSV,
...), or no logger at all, gets files under its log directory (:func:`file_loggers`,
:func:`log_dir`), named after the evaluation (:func:`evaluation_name`) and never replacing an
earlier file (:func:`evaluation_files`); each folder is announced once (:func:`announce_folder`).
Shared by :mod:`~lightning_rpn.training.recall_curves` and
:mod:`~lightning_rpn.training.proposal_images`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from lightning_rpn.training.evaluated_weights import evaluated_counters
from lightning_rpn.training.run_files import checkpoint_stem, output_repeat, repeated_name

__all__ = [
    "announce_folder", "evaluated_counters", "evaluation_files", "evaluation_name", "evaluation_stage", "file_loggers",
    "loaded_checkpoint", "log_dir", "reporting",
]


def reporting(trainer: Trainer) -> bool:
    """Whether this process reports: global rank 0, and not the sanity check."""
    return trainer.is_global_zero and not trainer.sanity_checking


def evaluation_stage(trainer: Trainer) -> str:
    """The key prefix of the running evaluation: ``"test"``, ``"predict"`` or ``"val"``."""
    return {TrainerFn.TESTING: "test", TrainerFn.PREDICTING: "predict"}.get(trainer.state.fn, "val")


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


def loaded_checkpoint(trainer: Trainer) -> str | None:
    """The checkpoint (resolved path) a ``validate`` / ``test`` / ``predict`` took its weights from.

    ``None`` during ``fit`` and for weights already in the process (``trainer.validate(model)``),
    which their epoch and step name (:func:`~lightning_rpn.training.evaluated_weights.evaluated_counters`).
    """
    if trainer.state.fn == TrainerFn.FITTING or not trainer.ckpt_path:
        return None
    return str(Path(trainer.ckpt_path).resolve())


def evaluation_name(trainer: Trainer) -> str:
    """The stem of the running evaluation's files: ``val_epoch003_step500`` for the weights in the
    process, ``val-<checkpoint stem>`` (``test-best``, ...) for a loaded checkpoint."""
    stage, checkpoint = evaluation_stage(trainer), loaded_checkpoint(trainer)
    if checkpoint is not None:
        return f"{stage}-{checkpoint_stem(checkpoint)}"
    epoch, step = evaluated_counters(trainer)
    return f"{stage}_epoch{epoch:03d}_step{step}"


def evaluation_files(trainer: Trainer, paths: Callable[[str], list[Path]]) -> tuple[str, list[Path]]:
    """The running evaluation's file stem and ``paths(stem)``, none of which exists yet.

    The stem is :func:`evaluation_name`, with ``.2``, ``.3``, ... when an earlier run left a file of
    the evaluation's outputs under that number (another run in the same folder, the same
    checkpoint evaluated again; not ``-v1``, which checkpoint names carry): the number every output
    of the evaluation takes, its metrics summary and proposal files included
    (:func:`~lightning_rpn.training.run_files.output_repeat`), and an earlier one's files stay.
    """
    name = evaluation_name(trainer)
    repeat, _ = output_repeat(trainer, lambda r: paths(repeated_name(name, r)))
    return repeated_name(name, repeat), paths(repeated_name(name, repeat))


def announce_folder(announced: set[Path], folder: Path, message: str) -> None:
    """Print ``message`` on stderr the first time ``folder`` is written (``announced`` remembers), so
    a command names where its files went once, as it names its metrics file."""
    if folder not in announced:
        announced.add(folder)
        print(message, file=sys.stderr)
