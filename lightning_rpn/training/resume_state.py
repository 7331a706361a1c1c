"""A checkpoint saved at the end of a training epoch resumed as the start of the next one.

Lightning (2.6) resumes such a checkpoint by replaying the finished epoch with no batches when
``trainer.max_steps`` is set (it then always "restarts" the loops, and the replay counts the epoch
as processed a second time): ``--ckpt_path last --trainer.max_epochs 3 --trainer.max_steps 100``
after a 1-epoch run trained one epoch instead of two, and with ``max_epochs 2`` none (Lightning
issue 19617 is of the same family). Without ``max_steps`` it starts the next epoch. Every
``last.ckpt`` the configs write at the end of an epoch has that state, and the README's way of
extending a run by steps sets ``max_steps``. :func:`finish_saved_epoch` writes the loop state
of such a checkpoint as Lightning's own state between two epochs, which resumes the same way
with and without ``max_steps``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["finish_saved_epoch"]


def finish_saved_epoch(checkpoint: dict[str, Any]) -> bool:
    """When ``checkpoint`` was saved after the last batch of an epoch (at its validation, at the
    epoch's end or at the end of fit), mark that epoch finished and the next one not begun, in
    place; whether it did. Called before Lightning restores its loops from the checkpoint."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_progress" not in loop or "epoch_loop.batch_progress" not in loop:
        return False
    batches = loop["epoch_loop.batch_progress"]
    if not batches.get("is_last_batch") or batches["current"]["completed"] != batches["current"]["ready"]:
        return False  # saved inside an epoch: Lightning resumes those itself
    for counts in loop["epoch_progress"].values():
        counts.update({"processed": counts["started"], "completed": counts["started"]})
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False
    return True
