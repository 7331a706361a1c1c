"""Which weights an evaluation describes: a loaded checkpoint's epoch and global step.

Lightning restores a checkpoint's loop counters only in ``fit``. ``validate`` / ``test`` /
``predict --ckpt_path P`` in a new process therefore run at epoch 0, step 0 whatever ``P`` was
trained for, and a recall table, a recall-curve row or a W&B point dated by the trainer would say
step 0. :class:`LoadedCounters` keeps the counters a module read from the checkpoint it loaded;
:func:`evaluated_counters` gives the running evaluation's epoch and step; :func:`logged_at_step` makes
Lightning's own metric logging use that step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["LoadedCounters", "counters_in_use", "evaluated_counters", "logged_at_step"]


@dataclass(frozen=True)
class LoadedCounters:
    """``epoch`` and ``global_step`` as a checkpoint stores them (Lightning's ``"epoch"`` and
    ``"global_step"`` keys), read when it was loaded outside ``fit``."""

    epoch: int
    step: int

    @classmethod
    def of(cls, checkpoint: dict[str, Any]) -> LoadedCounters:
        return cls(int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))


def counters_in_use(trainer: pl.Trainer, loaded: LoadedCounters | None) -> LoadedCounters | None:
    """``loaded`` outside ``fit``, else ``None`` (the trainer's counters date the weights). A
    module keeps ``loaded`` from a checkpoint's load (``--ckpt_path``, ``load_from_checkpoint``)
    until a ``fit`` starts, after which its weights are the fit's."""
    return None if trainer.state.fn == TrainerFn.FITTING else loaded


def evaluated_counters(trainer: pl.Trainer) -> tuple[int, int]:
    """``(epoch, global step)`` of the weights the running evaluation uses: those of the checkpoint
    the module loaded (its ``loaded_counters``, which ``RPNModule`` keeps; see
    :func:`counters_in_use`), else the trainer's."""
    loaded = counters_in_use(trainer, getattr(trainer.lightning_module, "loaded_counters", None))
    return (trainer.current_epoch, trainer.global_step) if loaded is None else (loaded.epoch, loaded.step)


@contextmanager
def logged_at_step(trainer: pl.Trainer, step: int) -> Iterator[None]:
    """Within the block, Lightning logs metrics at ``step``: its logger connector dates them by
    the fit loop's count of optimiser steps (``_batches_that_stepped``), which only ``fit``
    restores from a checkpoint. The count is put back afterwards, so a later ``fit`` with the
    same trainer logs where it would have."""
    loop = trainer.fit_loop.epoch_loop
    before = getattr(loop, "_batches_that_stepped", None)
    if before is None:  # a Lightning without this counter: leave its logging as it is
        yield
        return
    loop._batches_that_stepped = step
    try:
        yield
    finally:
        loop._batches_that_stepped = before
