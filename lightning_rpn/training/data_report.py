"""The data report of a run: boxes removed by transforms and load problems, counted per stage.

:class:`RunDataReport` counts every batch (``add_batch``), warns about each load problem the
first time it occurs (at most :data:`MAX_WARNED_PROBLEMS` in all), and prints the counts of the
whole run at its end (``report``), keeping them as metrics (``last``). Under DDP each process
counts the images it loads: the printed report is process 0's share and says so, and every
process warns about the load problems it meets (prefixed with its rank), so none goes unseen.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_info

from lightning_rpn.data.accounting import BoxAccounting
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.problems import Problem

__all__ = ["MAX_WARNED_PROBLEMS", "RunDataReport"]

MAX_WARNED_PROBLEMS = 20
"""Load problems printed as they first occur during a run (all are counted in the end-of-run report)."""


class RunDataReport:
    """Counts since the last report (see the module docstring); ``accounting`` holds them."""

    def __init__(self) -> None:
        self.accounting = BoxAccounting()
        self.last: dict[str, float] = {}
        self._epochs: tuple[int, int] | None = None  # first and last epoch counted since the last report
        self._seen_problems: set[Problem] = set()
        self._warned_problems = 0
        self.process = (0, 1)
        """This process's rank and the number of processes (set by the data module from its trainer)."""

    def add_batch(self, stage: str, epoch: int, batch: RPNBatch, counted: bool = True) -> None:
        """Count ``batch`` under ``stage`` (unless not ``counted``); warn about the load problems not
        seen before."""
        if counted:
            first, last = self._epochs or (epoch, epoch)
            self._epochs = (min(first, epoch), max(last, epoch))
            self.accounting.add_batch(stage, batch)
        self._warn_new_problems(stage, batch.problems)

    def _warn_new_problems(self, stage: str, problems: Sequence[Problem]) -> None:
        """One warning per batch that brings problems not seen before, up to :data:`MAX_WARNED_PROBLEMS` in all."""
        new = [p for p in dict.fromkeys(problems) if p not in self._seen_problems]
        self._seen_problems.update(new)
        shown = new[: max(0, MAX_WARNED_PROBLEMS - self._warned_problems)]
        self._warned_problems += len(shown)
        if shown:
            more = ("" if self._warned_problems < MAX_WARNED_PROBLEMS else
                    f"\n  (no more are printed as they occur: {MAX_WARNED_PROBLEMS} shown)")
            rank, world = self.process
            where = f"[rank {rank}] " if world > 1 else ""
            warnings.warn(f"{where}RPNDataModule: {stage}: load problems (each printed once, all counted in the "
                          "data report at the end of the run):\n" + "\n".join(f"  {p}" for p in shown) + more,
                          stacklevel=2)

    def report(self) -> str:
        """Print (rank zero) and return the counts since the last report, keep them in ``last``, reset them."""
        if not self.accounting.stages():
            return ""
        first, last = self._epochs or (0, 0)
        # the training epochs the data was loaded in; outside fit Lightning's counter dates nothing
        parts = []
        if "train" in self.accounting.stages():
            parts.append(f"epoch {first}" if first == last else f"epochs {first}-{last}")
        rank, world = self.process
        if world > 1:
            parts.append(f"process {rank} of {world}: the images it loaded")
        label = f" ({', '.join(parts)})" if parts else ""
        text = f"RPNDataModule data report{label}:\n" + self.accounting.summary()
        rank_zero_info(text)
        self.last = self.accounting.metrics()
        self.accounting.reset()
        self._epochs = None
        return text
