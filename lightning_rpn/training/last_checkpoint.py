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
"""

from __future__ import annotations

from datetime import timedelta

import lightning.pytorch as pl
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final weights unless the last save was at this step (Lightning's checks:
        not in ``fast_dev_run``, not after the sanity check only)."""
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
