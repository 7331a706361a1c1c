"""Checkpoints saved where an epoch ends, or where ``fit`` stopped inside one, resumed where they stand.

Lightning (2.6) resumes such a checkpoint by replaying the finished epoch with no batches when
``trainer.max_steps`` is set (it then always "restarts" the loops, and the replay counts the epoch
as processed a second time): ``--ckpt_path last --trainer.max_epochs 3 --trainer.max_steps 100``
after a 1-epoch run trained one epoch instead of two, and with ``max_epochs 2`` none (Lightning
issue 19617 is of the same family). Without ``max_steps`` it starts the next epoch. Every
``last.ckpt`` the configs write at the end of an epoch has that state, and the README's way of
extending a run by steps sets ``max_steps``. :func:`finish_saved_epoch` writes the loop state
of such a checkpoint as Lightning's own state between two epochs, which resumes the same way
with and without ``max_steps``; one saved in the epoch's last validation (a monitored
``ModelCheckpoint``, ``check_val_every_n_epoch`` above 1) also gets the loggers' step that
Lightning would count after it, or every metric of the resumed run is logged one step early.

A ``fit`` stopped by ``max_steps`` inside an epoch counts that epoch as processed before the
epoch-end and end-of-fit saves (``last.ckpt``), so such a checkpoint resumed at the next epoch
and the rest of the stopped one was never trained. :func:`reopen_stopped_epoch` writes it as
Lightning's own checkpoint at the end of that batch (the epoch begun, the batch processed), which
Lightning resumes with the epoch's next batch.

A validation inside ``fit`` stopped by Ctrl-C or SIGTERM was never run again: saved at an epoch's
end, the resume started the next epoch (and Lightning itself, whose loop state cannot tell an
interrupted validation from a finished one, does the same); inside an epoch, Lightning skips a
validation that had not finished a batch. That validation's metrics and its best-checkpoint
candidate were lost, on COCO an hour's validation. :class:`~.last_checkpoint.LastCheckpoint`
marks its interruption save (:func:`mark_validation_interrupted`), and
:func:`rerun_interrupted_validation` writes such a checkpoint's validation as Lightning's own
validation stopped before its first batch finished, which Lightning runs again from its start
before training on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "epoch_batches_trained",
    "finish_saved_epoch",
    "holds_interrupted_validation",
    "mark_validation_interrupted",
    "reopen_stopped_epoch",
    "rerun_interrupted_validation",
    "resume_where_saved",
]

_INTERRUPTED_VALIDATION = "lightning_rpn_interrupted_validation"
"""The checkpoint key that marks a save made while fit's validation ran."""


def epoch_batches_trained(batch_progress: Any) -> bool:
    """Whether the running epoch's last batch is trained, from a training epoch loop's ``batch_progress``.

    Lightning sets ``is_last_batch`` as it fetches that batch, before training it: a Ctrl-C inside
    it leaves the flag set with the batch not processed, and Lightning resumes by training it again."""
    return bool(batch_progress.is_last_batch) and batch_progress.current.processed >= batch_progress.current.ready


def resume_where_saved(checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint``'s loop state, in place, as the state that resumes it where it was saved:
    :func:`rerun_interrupted_validation`, else :func:`finish_saved_epoch`, else
    :func:`reopen_stopped_epoch`. Called before Lightning restores its loops from it, and wherever
    a checkpoint's training progress is counted as a resume counts it."""
    rerun_interrupted_validation(checkpoint) or finish_saved_epoch(checkpoint) or reopen_stopped_epoch(checkpoint)


def mark_validation_interrupted(checkpoint: dict[str, Any]) -> None:
    """Mark ``checkpoint``, saved while fit's validation ran, as holding an unfinished validation."""
    checkpoint[_INTERRUPTED_VALIDATION] = True


def holds_interrupted_validation(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` was saved while fit's validation ran (:func:`mark_validation_interrupted`)."""
    return bool(checkpoint.get(_INTERRUPTED_VALIDATION))


def rerun_interrupted_validation(checkpoint: dict[str, Any]) -> bool:
    """When ``checkpoint`` holds an unfinished validation (:func:`mark_validation_interrupted`),
    write the validation loop's progress as that of a validation whose first batch was fetched and
    not processed, in place, which Lightning resumes by running the whole validation again before it
    trains on; whether it did. The training loops are left as saved (the batch before the
    validation completed), so the loggers' step and the epoch's end come as in an uninterrupted run."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not holds_interrupted_validation(checkpoint) or not loop or "epoch_loop.val_loop.batch_progress" not in loop:
        return False
    progress = loop["epoch_loop.val_loop.batch_progress"]
    done = progress["total"]["completed"]
    progress["total"] = {"ready": done + 1, "started": done + 1, "processed": done, "completed": done}
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["is_last_batch"] = False
    return True


def finish_saved_epoch(checkpoint: dict[str, Any]) -> bool:
    """When ``checkpoint`` was saved after the last batch of an epoch (at its validation, at the
    epoch's end or at the end of fit), mark that epoch finished and the next one not begun, in
    place, with the loggers' step past that batch; whether it did. Called before Lightning
    restores its loops from the checkpoint."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_progress" not in loop or "epoch_loop.batch_progress" not in loop:
        return False
    batches = loop["epoch_loop.batch_progress"]
    if not batches.get("is_last_batch") or batches["current"]["completed"] != batches["current"]["ready"]:
        return False  # saved inside an epoch: Lightning resumes those itself
    epoch = loop["epoch_progress"]["current"]
    stepped = loop.get("epoch_loop.state_dict", {})
    if epoch["processed"] < epoch["started"] and "_batches_that_stepped" in stepped:
        # saved in the last batch's validation, before the loggers' step counted that batch:
        # Lightning adds it back only when it resumes inside the epoch
        stepped["_batches_that_stepped"] += 1
    for counts in loop["epoch_progress"].values():
        counts.update({"processed": counts["started"], "completed": counts["started"]})
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False
    return True


def reopen_stopped_epoch(checkpoint: dict[str, Any]) -> bool:
    """When ``checkpoint`` was saved after ``fit`` stopped inside an epoch (``max_steps``) and
    Lightning had counted that epoch as ended (its epoch-end or end-of-fit saves), write it as
    Lightning's own checkpoint at the end of that batch, in place: the epoch begun, not processed;
    the batch processed, not completed; its optimiser step not yet counted for the loggers.
    Whether it did. Called before Lightning restores its loops from the checkpoint."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_progress" not in loop or "epoch_loop.batch_progress" not in loop:
        return False
    batches, epoch = loop["epoch_loop.batch_progress"], loop["epoch_progress"]["current"]
    done = batches["current"]
    if batches.get("is_last_batch") or not 0 < done["completed"] == done["processed"]:
        return False  # at an epoch's end, or saved inside it by Lightning itself
    if epoch["processed"] != epoch["started"]:
        return False  # the epoch goes on: a checkpoint Lightning resumes itself
    for counts in loop["epoch_progress"].values():
        counts["processed"] -= 1
        counts["completed"] = min(counts["completed"], counts["processed"])
    for counts in (batches["current"], batches["total"]):
        counts["completed"] -= 1
    stepped = loop.get("epoch_loop.state_dict", {})
    if "_batches_that_stepped" in stepped:
        stepped["_batches_that_stepped"] -= 1
    checkpoint["epoch"] = epoch["completed"]
    return True
