"""Progress as plain lines, for output that goes to a file rather than a terminal.

``RichProgressBar`` (the shipped configs' bar) redraws one live line; when stdout is a file (a
job log under ``nohup`` or a cluster scheduler, ``| tee``, CI) rich draws it once, when training
ends, so a run of half an hour shows nothing until it is over. :class:`TextProgress` prints a
line at the first step, then at most every ``interval_s`` seconds, and at the last step (a line
of ``make fit``)::

    train step 444/1000 (44%) | epoch 3 | 0.129 s/step | elapsed 1m 9s | eta 1m 12s | train/loss 0.08377

and for a validation (test, predict) loop a line at most every ``interval_s`` inside it and one
when it ends, with the module's ``last_recall`` AR values where it has them (``RPNModule``
does). A batch of sliding-window evaluation (``model.sliding_window``: one 6000 x 4000 image is
minutes of windows) prints at most every ``interval_s`` inside the batch too, with its windows
done (the :class:`~lightning_rpn.training.windowed.WindowProgress` hook)::

    validation: batch 3/3, windows 120/468 | elapsed 1m 2s

Step times are the mean since the previous line, so the ETA follows the recent pace
(validations excluded; none on the first line, whose step includes the start-up). The CLI puts
it in place of ``RichProgressBar`` when stdout is not a terminal (:mod:`lightning_rpn.cli`);
elsewhere it is an ordinary callback.
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import Any, TextIO

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from lightning_rpn.training.optim import fit_total_steps

__all__ = ["TextProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``3725.4`` -> ``"1h 2m 5s"``; under a minute with one decimal (``"4.2s"``)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s"


class TextProgress(ProgressBar):
    """A progress line every ``interval_s`` seconds (and at a loop's first and last step) on ``stream``.

    ``stream`` defaults to ``sys.stdout`` at print time (so pytest's and a user's redirections
    apply). Metrics shown are the module's progress-bar metrics (``self.log(..., prog_bar=True)``).
    """

    def __init__(self, interval_s: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        if interval_s < 0:
            raise ValueError(f"TextProgress: interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._stream = stream
        self._enabled = True
        self._fit_started = 0.0
        self._last_line_time = 0.0
        self._last_line_step = 0
        self._total: int | None = None  # the fit's last step, set when training starts
        self._printed_first = False
        self._eval_started = 0.0
        self._eval_last_line = 0.0
        self._eval_name = ""
        self._eval_batch_label: str | None = None  # "batch 3/3" while inside an evaluation batch

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            kwargs.setdefault("file", self._stream or sys.stdout)
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def _metrics_text(self, trainer: Trainer, pl_module: LightningModule, prefix: str) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        shown = [f"{key} {value:.4g}" for key, value in metrics.items()
                 if key.startswith(prefix) and isinstance(value, (int, float))]
        return " | ".join(shown)

    @staticmethod
    def _total_steps(trainer: Trainer) -> int | None:
        """The fit's last step, as the cosine schedule counts it (:func:`fit_total_steps`, also
        after a resume that changed the steps per epoch); ``None`` when unbounded."""
        total = fit_total_steps(trainer)
        return int(total) if math.isfinite(total) else None

    # training
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = self._last_line_time = time.monotonic()
        self._last_line_step = trainer.global_step
        self._printed_first = False
        self._total = total = self._total_steps(trainer)
        of = f" of {total}" if total is not None else ""
        self.print(f"train: from step {trainer.global_step}{of}, a line every {format_duration(self.interval_s)}")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        step = trainer.global_step
        if step <= self._last_line_step:  # no optimiser step yet (gradient accumulation)
            return
        total = self._total
        last = total is not None and step >= total
        if self._printed_first and not last and now - self._last_line_time < self.interval_s:
            return
        seconds_per_step = (now - self._last_line_time) / (step - self._last_line_step)
        parts = [f"train step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total else "")]
        parts.append(f"epoch {trainer.current_epoch}")
        parts.append(f"{seconds_per_step:.3g} s/step")
        parts.append(f"elapsed {format_duration(now - self._fit_started)}")
        if total is not None and not last and self._printed_first:
            parts.append(f"eta {format_duration((total - step) * seconds_per_step)}")
        metrics = self._metrics_text(trainer, pl_module, "train/")
        self.print(" | ".join(parts + ([metrics] if metrics else [])))
        self._last_line_time, self._last_line_step, self._printed_first = now, step, True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        took = format_duration(time.monotonic() - self._fit_started)
        self.print(f"train: ended at step {trainer.global_step} after {took}")

    # validation, test, predict
    def _eval_start(self, name: str, trainer: Trainer) -> None:
        self._eval_started = self._eval_last_line = time.monotonic()
        self._eval_name = name + (f" at step {trainer.global_step}" if trainer.state.fn == TrainerFn.FITTING else "")
        self._eval_batch_label = None

    @staticmethod
    def _batch_label(batch_idx: int, total: float) -> str:
        return f"batch {batch_idx + 1}" + (f"/{int(total)}" if math.isfinite(total) else "")

    def _eval_line(self, progress: str) -> None:
        """``"<loop>: <progress> | elapsed ..."``, at most every ``interval_s``."""
        now = time.monotonic()
        if now - self._eval_last_line < self.interval_s:
            return
        self.print(f"{self._eval_name}: {progress} | elapsed {format_duration(now - self._eval_started)}")
        self._eval_last_line = now

    def _eval_batch_start(self, batch_idx: int, total: float) -> None:
        self._eval_batch_label = self._batch_label(batch_idx, total)

    def _eval_batch(self, batch_idx: int, total: float) -> None:
        self._eval_batch_label = None
        self._eval_line(self._batch_label(batch_idx, total))

    def on_sliding_windows(self, trainer: Trainer, pl_module: LightningModule, done: int, total: int) -> None:
        """Inside an evaluation batch, a line with its sliding windows done (``WindowProgress``)."""
        if self._eval_batch_label is not None:
            self._eval_line(f"{self._eval_batch_label}, windows {done}/{total}")

    def _eval_end(self, trainer: Trainer, pl_module: LightningModule, prefix: str) -> None:
        took = time.monotonic() - self._eval_started
        if trainer.state.fn == TrainerFn.FITTING:  # keep a validation out of the training pace
            self._last_line_time += took
        parts = [f"{self._eval_name}: done in {format_duration(took)}"]
        # the module's recall of this loop (``last_recall``, see callbacks), AR at each budget
        recall = getattr(pl_module, "last_recall", None) or {}
        parts += [f"{key} {value:.3f}" for key, value in recall.items() if re.fullmatch(r"AR@\d+", key)]
        if prefix and (metrics := self._metrics_text(trainer, pl_module, prefix)):
            parts.append(metrics)
        self.print(" | ".join(parts))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_start("validation", trainer)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._eval_batch_start(batch_idx, trainer.num_val_batches[dataloader_idx])

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._eval_batch(batch_idx, trainer.num_val_batches[dataloader_idx])

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_end(trainer, pl_module, "val/")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start("test", trainer)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._eval_batch_start(batch_idx, trainer.num_test_batches[dataloader_idx])

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(batch_idx, trainer.num_test_batches[dataloader_idx])

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module, "test/")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start("predict", trainer)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._eval_batch_start(batch_idx, trainer.num_predict_batches[dataloader_idx])

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(batch_idx, trainer.num_predict_batches[dataloader_idx])

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module, "")
