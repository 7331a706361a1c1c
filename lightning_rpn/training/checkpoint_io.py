"""Checkpoints written whole or not at all: a temporary file in the checkpoint's own folder, renamed.

Lightning's ``TorchCheckpointIO`` writes a checkpoint to a temporary file in the system's temporary
folder and moves it into place. When that folder is on another file system than the run folder
(``/tmp`` in memory, a container's overlay, a cluster's scratch disk), the move is a copy over the
existing file: a full disk, or a process killed during the copy, leaves a truncated ``last.ckpt``
where a good one was. :class:`AtomicCheckpointIO` writes next to the file instead, so the rename
is atomic and a failed write leaves the previous checkpoint as it was.

The command line installs it (:func:`use_atomic_checkpoints`); in a project of one's own, give it to
the trainer: ``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
import torch

from lightning_rpn._files import atomic_write

__all__ = ["AtomicCheckpointIO", "use_atomic_checkpoints"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through a temporary file beside the checkpoint
    (removed when the write fails); remote paths (``s3://...``) are saved as Lightning saves them."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        # serialised first, as Lightning does: torch.save into a file that fills up raises its zip
        # writer's RuntimeError, a plain write the OSError that says why
        serialised = io.BytesIO()
        torch.save(checkpoint, serialised)
        try:
            with atomic_write(target, "wb") as file:
                file.write(serialised.getbuffer())
        except OSError as error:  # a full disk, a quota: name the file, and that it is intact
            raise OSError(error.errno, f"{error.strerror or error}: the checkpoint {target} was not written "
                                       "(the file there, if any, is as it was)") from error


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` when it has Lightning's default
    ``TorchCheckpointIO``; a checkpoint plugin of the user's own (async, cloud) is left in place."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
