"""The shipped configs' progress bar: Lightning's ``RichProgressBar`` without its "Epoch 149/-2".

A run budgeted in steps (``max_steps: 300``, ``max_epochs: -1``, the dense-scene and COCO / VOC
configs) has no last epoch, yet Lightning's bar writes ``Epoch {e}/{max_epochs - 1}``, i.e.
``Epoch 149/-2``. :class:`RichProgress` writes ``Epoch 149 (max_steps 300)`` there and is
Lightning's bar everywhere else.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["RichProgress"]


class RichProgress(RichProgressBar):
    """``RichProgressBar`` that names the step budget instead of a negative last epoch."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs >= 0:
            return description
        return description.replace(f"Epoch {current_epoch}/{max_epochs - 1}",
                                   f"Epoch {current_epoch} (max_steps {self.trainer.max_steps})")
