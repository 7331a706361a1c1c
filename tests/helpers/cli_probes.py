"""Callbacks that the subprocess CLI tests load by class_path (``PYTHONPATH`` = this folder, ``helpers.cli.PROBES``).

Not collected by pytest (no ``test_`` prefix); imported only inside ``lightning-rpn`` runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class PauseAtStep(pl.Callback):
    """At global step ``step``: write the process id to ``marker`` and wait to be killed."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(300)


class InjectNaN(pl.Callback):
    """Fill the box targets of training batch ``step`` on rank ``rank`` with NaN."""

    def __init__(self, step: int, rank: int) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch.positive_deltas.fill_(float("nan"))


class RecordImageIds(pl.Callback):
    """Write ``{prefix}.rank{R}.json``: the training image ids of every step and rank facts."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.steps: list[list] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append([trainer.current_epoch, list(batch.image_ids)])

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        sync_bn = any(type(m).__name__ == "SyncBatchNorm" for m in pl_module.modules())
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "find_unused_parameters": getattr(trainer.strategy, "_ddp_kwargs", {}).get(
                "find_unused_parameters", False
            ),
            "sync_batchnorm": sync_bn,
            "skipped_nonfinite_batches": getattr(pl_module, "skipped_nonfinite_batches", None),
            "draw_seed": getattr(trainer.datamodule, "_draw_seed", None),
            "steps": self.steps,
        }
        Path(f"{self.prefix}.rank{trainer.global_rank}.json").write_text(json.dumps(record))
