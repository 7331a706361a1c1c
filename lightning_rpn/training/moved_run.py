"""A ``fit`` resumed in a moved or copied run folder goes on with that run's checkpoint files.

Every ``ModelCheckpoint`` (Lightning's ``best``, :class:`~.last_checkpoint.LastCheckpoint`)
saves its folder (``dirpath``) and its files (best scores, ``best_model_path``, ...) as absolute
paths. When the run's folder has since been moved or copied (cluster scratch to home; the
config's relative paths then name the new place), Lightning's ``load_state_dict`` finds another
``dirpath`` and drops that record but its old ``best_model_path``: the resumed run took its next
validation as a new best whatever its score, wrote it and its ``last.ckpt`` beside the run's own
files as ``best-v1.ckpt`` / ``last-v1.ckpt`` (the version counter keeps files it does not
recognise as its own), and ``--ckpt_path best`` then took that newest, maybe worse, file.

:func:`follow_moved_folders` rewrites the checkpoint's records, before they are restored, to the
files of the same name in the callbacks' new folders; :func:`follow_moved_run` does it for a
trainer loading a checkpoint from one of those folders (``RPNModule.on_load_checkpoint`` and
``LastCheckpoint.on_load_checkpoint`` call it, so a module of one's own with a ``LastCheckpoint``
is covered too), with one notice in ``fit`` for records whose files are not there, which are
dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lightning_rpn.training.best_record import derive_best
from lightning_rpn.training.run_files import continued_folders

__all__ = ["follow_moved_folders", "follow_moved_run"]

_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")
"""The single file paths of a ``ModelCheckpoint`` state (``best_k_models`` holds the others)."""


def follow_moved_run(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """:func:`follow_moved_folders` for ``trainer``'s checkpoint callbacks when the file it loads
    (``trainer.ckpt_path``) lies in one of their folders, and, in ``fit``, one notice naming the
    recorded files not found there. A checkpoint from elsewhere is no moved run: Lightning's rule
    (records dropped, files of the same name kept by the version counter) stands, and so does it
    for a fit that starts a new run from the folder's ``best.ckpt`` (:func:`~.run_files.continued_folders`,
    whose records :func:`~.run_files.start_new_run_files` forgets). An evaluation
    restores the records too, unused: rewritten, Lightning does not warn of the changed folder.
    Call it from an ``on_load_checkpoint`` hook, which Lightning runs before the callbacks load
    their state; a second call finds nothing left to do."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    loaded = trainer.ckpt_path
    if loaded is None or "://" in str(loaded) or Path(os.path.realpath(loaded)).parent not in {
            Path(os.path.realpath(c.dirpath)) for c in callbacks if "://" not in str(c.dirpath)}:
        return
    fitting = trainer.state.fn == TrainerFn.FITTING
    if fitting and not continued_folders(trainer, checkpoint, loaded):
        return  # a fit from best.ckpt or an older file starts a new run, which forgets the records
    forgotten = follow_moved_folders(checkpoint, callbacks)
    if forgotten and fitting:
        by_folder: dict[tuple[Path, Path], list[str]] = {}
        for old, new in forgotten:
            by_folder.setdefault((old.parent, new.parent), []).append(old.name)
        lines = [f"{', '.join(names)} (recorded in {old}) {'is' if len(names) == 1 else 'are'} not in {new}"
                 for (old, new), names in by_folder.items()]
        rank_zero_warn(f"lightning-rpn: resuming a moved or copied run folder; {'; '.join(lines)}: dropped from the "
                       f"run's record of its files")


def follow_moved_folders(checkpoint: dict[str, Any], callbacks: Iterable[object]) -> list[tuple[Path, Path]]:
    """Write ``checkpoint``'s records of each ``ModelCheckpoint`` among ``callbacks`` whose folder
    has changed as if the run had saved them in the callback's ``dirpath``, in place.

    A recorded file under the recorded ``dirpath`` becomes the file at the same relative path
    under the new one, with its score, when that file is there; other records are dropped and the
    best and k-th best then recounted from the scores left, as Lightning derives them. Lightning
    then restores the record in full (its ``dirpath`` is the callback's), keeps the best score, and
    writes over the run's own files, not beside them. Remote folders (``s3://...``), callbacks the
    checkpoint holds no state of and unchanged folders are left alone. Returns ``(recorded path,
    where it was looked for)`` of each record dropped.
    """
    states = checkpoint.get("callbacks") or {}
    forgotten: list[tuple[Path, Path]] = []
    for callback in callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        state = states.get(callback.state_key)
        if not isinstance(state, dict):
            continue
        old, new = state.get("dirpath"), callback.dirpath
        if not old or not new or old == new or "://" in str(old) or "://" in str(new):
            continue
        forgotten += _rebase(state, callback, Path(old), Path(new))
    return forgotten


def _rebase(state: dict[str, Any], callback: ModelCheckpoint, old: Path, new: Path) -> list[tuple[Path, Path]]:
    """:func:`follow_moved_folders` of one callback's ``state``, from folder ``old`` to ``new``."""
    forgotten: dict[Path, Path] = {}

    def follow(path: str) -> str:
        recorded = Path(path)
        inside = recorded.is_relative_to(old)
        target = new / (recorded.relative_to(old) if inside else recorded.name)
        if inside and target.is_file():
            return str(target)
        forgotten[recorded] = target
        return ""

    recorded_scores = state.get("best_k_models") or {}
    scores = {target: score for path, score in recorded_scores.items() if (target := follow(path))}
    for key in _PATH_KEYS:
        if state.get(key):
            state[key] = follow(state[key])
    state["best_k_models"] = scores
    state["dirpath"] = callback.dirpath
    if len(scores) < len(recorded_scores):
        state.update(derive_best(scores, callback.mode, callback.save_top_k))
    return list(forgotten.items())
