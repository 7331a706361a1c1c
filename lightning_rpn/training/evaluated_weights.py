"""Which weights an evaluation describes: the epoch and global step they were trained to.

Lightning dates an evaluation by its trainer's loop counters, which it restores from a checkpoint
only in ``fit``: ``validate`` / ``test`` / ``predict --ckpt_path P`` in a new process, or a new
``Trainer`` evaluating a model fitted by another, run at epoch 0, step 0 whatever the weights'
training, and a recall table, a recall-curve row or a W&B point would say step 0.
:class:`TrainedCounters` are what a module keeps instead (a loaded checkpoint's counters, or its
fit's at the end); :func:`evaluated_counters` gives the running evaluation's epoch and step;
:func:`logged_as` makes Lightning's own metric logging use that epoch and step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from lightning_rpn.training.resume_state import resume_where_saved

__all__ = ["TrainedCounters", "counters_in_use", "evaluated_counters", "logged_as"]


@dataclass(frozen=True)
class TrainedCounters:
    """The ``epoch`` and global ``step`` a module's weights were trained to, as a checkpoint of
    them stores these (Lightning's ``"epoch"`` and ``"global_step"`` keys)."""

    epoch: int
    step: int

    @classmethod
    def of_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainedCounters:
        """The checkpoint's counters, its epoch as the index of the epoch that trained the last
        batch, as the fit's own validations name it: a save after every begun epoch ended (the
        end of a fit at an epoch's end) holds Lightning's count of finished epochs, one more."""
        epoch, step = int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0))
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        if step > 0 and epoch > 0 and progress.get("started") == progress.get("completed") == epoch:
            epoch -= 1
        return cls(epoch, step)

    @classmethod
    def of_trainer(cls, trainer: pl.Trainer) -> TrainedCounters:
        """The counters of a fit's weights at its end, as a checkpoint saved there gives them when
        loaded: a fit stopped inside an epoch (``max_steps``) is dated by that epoch, which
        Lightning's counter has already left (:func:`~.resume_state.reopen_stopped_epoch`)."""
        saved = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                 "loops": {"fit_loop": deepcopy(trainer.fit_loop.state_dict())}}
        resume_where_saved(saved)
        return cls.of_checkpoint(saved)


def counters_in_use(trainer: pl.Trainer, trained: TrainedCounters | None) -> TrainedCounters | None:
    """``trained`` outside ``fit``, else ``None`` (during a fit its trainer's counters date the
    weights). A module keeps ``trained`` from a checkpoint's load (``--ckpt_path``,
    ``load_from_checkpoint``) or a fit's end until the next ``fit`` starts."""
    return None if trainer.state.fn == TrainerFn.FITTING else trained


def evaluated_counters(trainer: pl.Trainer) -> tuple[int, int]:
    """``(epoch, global step)`` of the weights the running evaluation uses: the module's
    ``trained_counters`` (which ``RPNModule`` keeps; see :func:`counters_in_use`), else the
    trainer's."""
    trained = counters_in_use(trainer, getattr(trainer.lightning_module, "trained_counters", None))
    return (trainer.current_epoch, trainer.global_step) if trained is None else (trained.epoch, trained.step)


@contextmanager
def logged_as(trainer: pl.Trainer, counters: TrainedCounters) -> Iterator[None]:
    """Within the block, Lightning logs metrics at ``counters``' step and epoch: its logger
    connector dates them by the fit loop's count of optimiser steps (``_batches_that_stepped``)
    and by ``trainer.current_epoch`` (the logged ``epoch``), which only ``fit`` restores from a
    checkpoint. Both are put back afterwards, so a later ``fit`` with the same trainer logs where
    it would have."""
    loop = trainer.fit_loop.epoch_loop
    before = getattr(loop, "_batches_that_stepped", None)
    if before is None:  # a Lightning without this counter: leave its logging as it is
        yield
        return
    epochs = trainer.fit_loop.epoch_progress.current
    epoch_before = epochs.completed
    loop._batches_that_stepped, epochs.completed = counters.step, counters.epoch
    try:
        yield
    finally:
        loop._batches_that_stepped, epochs.completed = before, epoch_before
