"""The proposal-recall table: ``ProposalRecall.compute()`` as a rich table, and the callback printing it.

The callback reads the LightningModule's ``last_recall`` (see :mod:`~lightning_rpn.training.callbacks`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table

from lightning_rpn.training.evaluated_weights import evaluated_counters
from lightning_rpn.training.log_targets import loaded_checkpoint, reporting

__all__ = ["RecallTable", "recall_table"]


def recall_table(
    recall: Mapping[str, float], recall_thresholds: Sequence[float] = (0.5, 0.7), title: str = ""
) -> Table:
    """A rich table of ``ProposalRecall.compute()`` values: one row per k, AR per area range
    and recall at ``recall_thresholds``. Ranges without gt boxes (value -1) show "-"."""
    budgets = sorted({int(m.group(1)) for key in recall if (m := re.fullmatch(r"AR@(\d+)", key))})
    areas = list(
        dict.fromkeys(m.group(1) for key in recall if (m := re.fullmatch(r"AR_(.+)@\d+", key)))
    )
    columns = ["AR", *(f"AR_{area}" for area in areas), *(f"R@{t:.2f}" for t in recall_thresholds)]
    table = Table(title=title or None)
    table.add_column("top-k", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for k in budgets:
        keys = [
            f"AR@{k}",
            *(f"AR_{area}@{k}" for area in areas),
            *(f"recall@{t:.2f}@{k}" for t in recall_thresholds),
        ]
        cells = [
            "-" if key not in recall or recall[key] < 0 else f"{recall[key]:.3f}" for key in keys
        ]
        table.add_row(str(k), *cells)
    return table


class RecallTable(Callback):
    """Prints the proposal-recall table (AR per k and area range, recall@t) with rich.

    Printed at the end of ``fit`` (when it validated) and of each ``validate`` / ``test`` run, from
    the module's ``last_recall``; with ``every_epoch=True`` also after every validation epoch during fit; at
    the end of ``predict`` when the module computed ``last_recall`` in it (``RPNModule``: the split
    has gt boxes). The title dates the weights by the module's ``last_recall_epoch`` /
    ``last_recall_step``, else by the epoch and step of the evaluation that gave ``last_recall``.

    Args:
        recall_thresholds: IoU thresholds whose recall gets a column (must be among the
            metric's ``iou_thresholds``; missing ones show "-").
        every_epoch: also print after each validation epoch of ``fit``.
    """

    def __init__(
        self, recall_thresholds: Sequence[float] = (0.5, 0.7), every_epoch: bool = False
    ) -> None:
        self.recall_thresholds = tuple(float(t) for t in recall_thresholds)
        self.every_epoch = every_epoch
        # last_recall (the object and a copy: it may be replaced or updated in place) when this fit /
        # predict / the fit's real validations began
        self._before: tuple[object, dict[str, float]] = (None, {})
        self._evaluated: tuple[int, int] | None = None  # (epoch, step) of the last evaluation

    def _print(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        if not reporting(trainer):
            return
        recall = getattr(pl_module, "last_recall", None)
        if not recall:
            rank_zero_warn(
                f"RecallTable: {type(pl_module).__name__}.last_recall is empty; no table"
            )
            return
        title = _title(trainer, pl_module, when, self._evaluated or evaluated_counters(trainer))
        Console().print(recall_table(recall, self.recall_thresholds, title))

    def _note_recall(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A run (or, after the sanity check, its real evaluations) starts: the ``last_recall`` the
        module has now, and the evaluation that gave it, are not this run's."""
        recall = getattr(pl_module, "last_recall", None)
        self._before = (recall, dict(recall or {}))
        self._evaluated = None

    def _recall_changed(self, pl_module: LightningModule) -> bool:
        """Whether the module computed a (non-empty) ``last_recall`` since :meth:`_note_recall`:
        a user's module may keep the previous evaluation's, which ``RPNModule`` forgets."""
        recall = getattr(pl_module, "last_recall", None)
        return bool(recall) and (recall is not self._before[0] or dict(recall) != self._before[1])

    on_fit_start = on_predict_start = on_sanity_check_end = _note_recall

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # the epoch and step the recall describes: at the end of fit the trainer's epoch has moved on
        self._evaluated = evaluated_counters(trainer)
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._print(trainer, pl_module, "validate")
        elif self.every_epoch:
            self._print(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluated = evaluated_counters(trainer)
        self._print(trainer, pl_module, "test")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._recall_changed(pl_module):  # unchanged: no gt boxes, or the module computes none in predict
            self._evaluated = evaluated_counters(trainer)
            self._print(trainer, pl_module, "predict, original-image pixels")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._recall_changed(pl_module):  # unchanged: no validation in this fit (the CLI then validates)
            self._print(trainer, pl_module, "end of fit")


def _title(trainer: Trainer, pl_module: LightningModule, when: str, evaluated: tuple[int, int]) -> str:
    """Which weights the table describes: the module's ``last_recall_epoch`` / ``last_recall_step``
    (a loaded checkpoint's own, :mod:`.evaluated_weights`), else ``evaluated`` (the epoch and step
    of the evaluation that gave the recall), and the checkpoint's file name; at the end of a fit
    that stopped between validations, the step reached and the one validated."""
    step = getattr(pl_module, "last_recall_step", None)
    epoch = getattr(pl_module, "last_recall_epoch", None)
    # at the end of fit Lightning's epoch counter already names the next epoch: use the validated one
    epoch = evaluated[0] if epoch is None else epoch
    step = evaluated[1] if step is None else step
    if trainer.state.fn == TrainerFn.FITTING and step != trainer.global_step:
        return f"Proposal recall ({when}, step {trainer.global_step}; last validated at step {step})"
    checkpoint = loaded_checkpoint(trainer)
    weights = "" if checkpoint is None else f"{Path(checkpoint).name}, "
    return f"Proposal recall ({when}, {weights}epoch {epoch}, step {step})"
