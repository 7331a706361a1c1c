"""``last.ckpt``: the weights where ``fit`` stopped, whether or not the validation improved.

Two gaps of Lightning's own ``ModelCheckpoint`` leave ``last.ckpt`` behind the end of a run,
and ``--ckpt_path last`` then redoes the steps in between:

* since Lightning 2.6, ``save_last=True`` on a callback with a ``monitor`` writes ``last.ckpt``
  only at a step where the monitored metric improves;
* no ``ModelCheckpoint`` saves when fit stops between two of its saves: a ``max_steps`` off the
  validation cadence (``check_val_every_n_epoch: 75`` in ``scenes.yaml``), or a resumed run
  given a new budget.

:class:`LastCheckpoint` is a ``ModelCheckpoint`` without a monitor, named ``last``, so that
``--ckpt_path last`` finds it and Lightning's version counter keeps other runs' files: it saves
at Lightning's usual cadence (every epoch when the trainer validates every epoch, else at each
validation; ``every_n_train_steps`` etc. as documented there) and once more at the end of
``fit`` when its last steps were not saved.

``fit`` stopped by Ctrl-C (``KeyboardInterrupt``) or SIGTERM (Lightning's ``SIGTERMException``,
or a DataLoader worker killed by the same process-group SIGTERM) is saved too, at the step
reached: otherwise everything after the last validation is lost (an epoch of COCO, 75 epochs of
``scenes.yaml``). Lightning's loop state then resumes the interrupted epoch at its next batch (a
Ctrl-C inside a batch redoes that batch); a save made while a validation ran is marked, and the
resume runs that validation again from its start
(:func:`~lightning_rpn.training.resume_state.rerun_interrupted_validation`). Other exceptions
save nothing: they may leave broken weights. With several processes nothing is saved on an
interruption: the ranks stop at different points and a save needs them all. What was saved is attached to the exception
(:func:`interruption_of`), for the command line's one-line report.

Loggers that keep checkpoints (W&B's and MLflow's ``log_model``) see each save as the callback's
latest file, never as a best (:class:`_LatestFile`): Lightning's loggers call a callback's own
``best_model_path`` its best, which here is the last save, so ``last.ckpt``, logged after
``best.ckpt``, took W&B's ``best`` alias from it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
import torch

from lightning_rpn.training.best_record import derive_best
from lightning_rpn.training.moved_run import follow_moved_run
from lightning_rpn.training.resume_state import mark_validation_interrupted
from lightning_rpn.training.run_files import read_checkpoint

__all__ = ["Interruption", "LastCheckpoint", "interruption_of"]

_RECORD = "lightning_rpn_interruption"
"""The attribute of the exception that carries its :class:`Interruption`."""


@dataclass(frozen=True)
class Interruption:
    """A ``fit`` stopped by a signal: which, the step reached, the latest ``last.ckpt`` of this run
    with its step (``None``: nothing saved in this run), and whether that save holds a validation
    the resume runs again."""

    signal: signal.Signals
    step: int
    path: str | None
    saved_step: int | None
    in_validation: bool = False


def interruption_of(error: BaseException) -> Interruption | BaseException | None:
    """What stopped a command, read from ``error`` and the exceptions it was raised while handling
    (Lightning's ``sys.exit(1)`` after a Ctrl-C, a DataLoader worker's death during a SIGTERM's
    teardown): the :class:`Interruption` a :class:`LastCheckpoint` recorded, else the bare
    ``KeyboardInterrupt`` / ``SIGTERMException`` (no such callback, or not in ``fit``), else ``None``."""
    interrupt = None
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(getattr(seen, _RECORD, None), Interruption):
            return getattr(seen, _RECORD)
        if interrupt is None and isinstance(seen, (KeyboardInterrupt, SIGTERMException)):
            interrupt = seen
        seen = seen.__context__
    return interrupt


class LastCheckpoint(ModelCheckpoint):
    """The latest weights as ``{dirpath}/{filename}.ckpt``, also at the end of ``fit``.

    Args:
        dirpath: folder of the file (``None``: Lightning's default under the logger's folder).
        filename: its name without ``.ckpt``; one starting with ``last`` keeps it what
            ``--ckpt_path last`` resumes.
        every_n_train_steps / every_n_epochs / train_time_interval / save_on_train_epoch_end /
            save_weights_only / enable_version_counter / verbose: as ``ModelCheckpoint``'s.
    """

    def __init__(
        self,
        dirpath: _PATH | None = None,
        filename: str = ModelCheckpoint.CHECKPOINT_NAME_LAST,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: timedelta | None = None,
        save_on_train_epoch_end: bool | None = None,
        save_weights_only: bool = False,
        enable_version_counter: bool = True,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, save_last=False,
            every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
            train_time_interval=train_time_interval, save_on_train_epoch_end=save_on_train_epoch_end,
            save_weights_only=save_weights_only, enable_version_counter=enable_version_counter, verbose=verbose,
        )
        self._saving_in_validation = False
        self._as_latest = _LatestFile(self)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final weights unless the last save was at this step (Lightning's checks:
        not in ``fast_dev_run``, not after the sanity check only)."""
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """On Ctrl-C or SIGTERM, save the step reached unless it is saved already (one process
        only), and record on ``exception`` what ``last.ckpt`` now holds."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if isinstance(exception, KeyboardInterrupt):
            stop = signal.SIGINT
        elif isinstance(exception, SIGTERMException) or trainer.received_sigterm:
            stop = signal.SIGTERM
            _quiet_worker_deaths()
        else:
            return
        in_validation, marked = trainer.validating and not self.save_weights_only, False
        # a save at this step made before the validation began (every_n_train_steps) holds no mark
        saved_before = in_validation and self._last_global_step_saved == trainer.global_step
        if trainer.world_size == 1 and (saved_before or not self._should_skip_saving_checkpoint(trainer)):
            _match_best_records_to_files(trainer)
            _count_logged_steps_for_resume(trainer)
            self._saving_in_validation = in_validation
            try:
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            finally:
                self._saving_in_validation = False
            marked = in_validation
        saved = self._last_checkpoint_saved or None
        record = Interruption(stop, trainer.global_step, saved, self._last_global_step_saved if saved else None, marked)
        setattr(exception, _RECORD, record)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Lightning's save (2.6.0 to 2.6.6), except that loggers are shown :class:`_LatestFile`
        instead of this callback, whose ``best_model_path`` (the file just saved, and what the
        checkpoint records) they would log as a best."""
        trainer.save_checkpoint(filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self._as_latest))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resume a moved run folder with its own files, for modules that do not already
        (:func:`~lightning_rpn.training.moved_run.follow_moved_run`; ``RPNModule`` does)."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        follow_moved_run(trainer, checkpoint)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Mark the interruption's save of a running validation, which the resume runs again."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._saving_in_validation:
            mark_validation_interrupted(checkpoint)


class _LatestFile:
    """A :class:`LastCheckpoint` as loggers see it: its latest save as ``last_model_path`` and no
    ``best_model_path``, so that W&B and MLflow log the file with the alias ``latest`` only.

    Every other attribute is the callback's, read when asked: ``log_model=True`` keeps this object
    and logs the file at the end of ``fit``. It reports the callback's class, which W&B names in
    the artifact's metadata, and so pickles and copies through :meth:`__reduce__`."""

    best_model_path = ""

    def __init__(self, callback: LastCheckpoint) -> None:
        self._callback = callback

    @property
    def last_model_path(self) -> str:
        return self._callback._last_checkpoint_saved

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._callback)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._callback, name)

    def __reduce__(self) -> tuple[type, tuple[LastCheckpoint]]:
        return _LatestFile, (self._callback,)


def _match_best_records_to_files(trainer: pl.Trainer) -> None:
    """Make each monitored ``ModelCheckpoint``'s record of its best files say what is on disk.

    Lightning records a new best before it writes it, so a Ctrl-C during that write (right after a
    validation line) left a record the interruption's ``last.ckpt`` kept: of a ``best.ckpt`` on no
    disk (the first best), or of a score the file there does not hold (``filename: best`` writes
    each new best over the last, and the interrupted write leaves the old file). ``--ckpt_path
    best`` then found none or older weights than recorded, and the resumed run saved no best until
    a validation beat the lost score. A record of a missing file is dropped; one of a file holding
    another score takes the file's (the ``current_score`` the callback saved into it)."""
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or callback.monitor is None:
            continue
        scores = callback.best_k_models
        changed = False
        for path in [p for p in scores if "://" not in str(p)]:  # remote files are left as recorded
            written = _written_score(path, callback.state_key)
            if written is _MISSING:
                del scores[path]
            elif written is not None and not torch.equal(torch.as_tensor(written), torch.as_tensor(scores[path])):
                scores[path] = torch.as_tensor(written)
            else:
                continue
            changed = True
        if changed:
            for name, value in derive_best(scores, callback.mode, callback.save_top_k).items():
                setattr(callback, name, value)


_MISSING = object()
"""What :func:`_written_score` returns for a file that is not there."""


def _written_score(path: str, state_key: str) -> Any:
    """The monitored score the checkpoint file ``path`` was saved with (``None`` when it cannot be
    read or records none), or :data:`_MISSING` when there is no such file."""
    if not os.path.isfile(path):
        return _MISSING
    try:
        saved = read_checkpoint(path, "fit")
    except ValueError:  # an unreadable or foreign file: keep the record as it is
        return None
    return saved.get("callbacks", {}).get(state_key, {}).get("current_score")


def _count_logged_steps_for_resume(trainer: pl.Trainer) -> None:
    """Set the loggers' step counter (``_batches_that_stepped``) to what a resume of this save adds
    up to the optimiser steps taken. Lightning counts a batch there after its validation and, when
    it resumes inside an epoch, adds the batch back unless the save came after the batch completed:
    right for its own saves, not for an interruption, which lands anywhere. A Ctrl-C in a forward
    pass resumed one step ahead, one after a completed batch one step behind,
    and every metric of the resumed run was logged at that offset (W&B: a step logged twice). Left
    as they are: an interrupted validation (Lightning reruns it and then counts the batch), an
    epoch's last batch (:func:`~lightning_rpn.training.resume_state.finish_saved_epoch`), and
    accumulated gradients or manual optimisation, whose steps count otherwise."""
    loop = trainer.fit_loop.epoch_loop
    if (trainer.validating or trainer.accumulate_grad_batches != 1
            or not trainer.lightning_module.automatic_optimization or loop.batch_progress.is_last_batch):
        return
    total = loop.batch_progress.total
    completed = total.started == total.ready and total.processed == total.started and total.completed == total.processed
    loop._batches_that_stepped = trainer.global_step - (0 if completed else 1)


def _quiet_worker_deaths() -> None:
    """Stop PyTorch's SIGCHLD handler from raising ``DataLoader worker ... killed by signal`` for
    the rest of the process: a SIGTERM to the process group (SLURM's ``scancel``) kills the
    workers too, and each death would otherwise interrupt the save and the shutdown with
    another traceback. The shutdown still joins them."""
    if hasattr(signal, "SIGCHLD"):  # not on Windows
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
