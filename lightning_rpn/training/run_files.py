"""The files of a ``lightning-rpn`` run: earlier runs' checkpoints kept, the final metrics written.

A new ``fit`` never overwrites the checkpoints another run left in its folder, and finds out
before training, not at its first save, that a folder cannot be written
(:func:`check_checkpoint_dirs`); a ``fit`` from a checkpoint that is not the latest of its run
(``best.ckpt``, a copy) is such a new run too (:func:`continued_folders`, :func:`start_new_run_files`).
It is told when its ``last.ckpt`` would lag behind its end (:func:`warn_if_last_waits_for_best`)
and when the checkpoint it resumes has already reached its budget (:func:`warn_if_budget_reached`).
``validate`` / ``test`` / ``predict`` write their final recall
and losses as JSON (:func:`write_metrics_summary`), named after the checkpoint as ``predict``'s
proposal files are (:func:`checkpoint_stem`), and like them never replacing an earlier file: every
output an evaluation names after its checkpoint or weights (summary, proposal files, recall-curve
PNG, proposal images) takes the one repeat number :func:`output_repeat` chooses for it
(:func:`repeated`); a predict's summary lists its proposal files.
Every command's ``--ckpt_path best`` / ``last`` / ``hpc`` is found on disk or refused
(:func:`evaluation_checkpoint`), and a file that is no Lightning checkpoint is refused in one line
naming what it is (:func:`read_checkpoint`).
The resolved config, the third file a run leaves, is saved by the CLI's own
``ResolvedConfigCallback`` (:mod:`lightning_rpn.cli`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint

from lightning_rpn._files import ZIP_START, folder_write_problem, torch_file_kind
from lightning_rpn.core.config import SettingError
from lightning_rpn.training.resume_state import holds_interrupted_validation, resume_where_saved

__all__ = [
    "EVALUATION_ROLES", "check_checkpoint_dirs", "check_checkpoint_file", "checkpoint_stem", "continued_folders",
    "evaluation_checkpoint", "evaluation_command", "first_line", "free_version", "listed_paths",
    "metrics_summary_path", "newest_checkpoint", "output_repeat", "read_checkpoint", "repeated", "repeated_name",
    "start_new_run_files", "versioned", "warn_if_budget_reached", "warn_if_last_waits_for_best",
    "write_metrics_summary",
]


def check_checkpoint_dirs(trainer: pl.Trainer, continued: Collection[Path] = ()) -> None:
    """Keep a new ``fit`` from overwriting the checkpoints another run left in its folder.

    The configs fix each ``ModelCheckpoint.dirpath``, so a second run of the same config finds
    the first run's files there. Unless the fit continues the run that wrote a folder
    (``continued``: :func:`continued_folders` of the checkpoint it resumes), Lightning's version
    counter gives the new run's files a ``-v1``, ``-v2``, ... suffix, which is announced once a
    folder; with ``enable_version_counter: false`` on any of the folder's callbacks they would
    replace the earlier ones, which is a ``ValueError`` naming the folder and files. Each local
    folder is also checked here (:func:`_check_writable`), so that one that cannot be written is a
    ``ValueError`` before training rather than an ``OSError`` at the first save, after a whole
    epoch.
    """
    callbacks_by_folder: dict[Path, list[ModelCheckpoint]] = {}
    for callback in trainer.checkpoint_callbacks:
        # without a fixed folder Lightning writes to the logger's new version folder: nothing to keep
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            callbacks_by_folder.setdefault(Path(callback.dirpath), []).append(callback)
    for folder, callbacks in callbacks_by_folder.items():
        _check_writable(folder, callbacks)
        earlier = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if Path(os.path.realpath(folder)) in {Path(os.path.realpath(path)) for path in continued} or not earlier:
            continue
        # the constructor argument enable_version_counter (ModelCheckpoint has no public getter)
        if not all(getattr(callback, "_enable_version_counter", True) for callback in callbacks):
            raise ValueError(
                f"lightning-rpn fit: the ModelCheckpoint folder {folder} (dirpath) holds "
                f"checkpoints of an earlier run ({', '.join(earlier)}) and its "
                f"enable_version_counter: false would overwrite them. Resume that run with "
                f"--ckpt_path last, or drop enable_version_counter: false (this run's files then "
                f"get a -v1 suffix), or choose another dirpath, or move those files away"
            )
        if trainer.is_global_zero:
            print(
                f"lightning-rpn: {folder} holds checkpoints of an earlier run ({', '.join(earlier)}); "
                f"they stay, this run's files get the next free version suffix (-v1, -v2, ...), and "
                f"--ckpt_path last resumes the newest last*.ckpt",
                file=sys.stderr,
            )


EVALUATION_ROLES = {"validate": "val", "test": "test", "predict": "predict"}
"""The split role each evaluation command runs on (its Lightning stage name too)."""


def _evaluation_limit(trainer: pl.Trainer, stage: str) -> str | None:
    """What made the evaluation of ``stage`` (``"val"``, ``"test"``, ``"predict"``) cover part of its
    split (``"fast_dev_run"``, ``"limit_val_batches=0.25"``), or ``None`` for the whole split: a
    summary of a partial evaluation must not read as a full one."""
    if getattr(trainer, "fast_dev_run", False):
        return "fast_dev_run"
    name = f"limit_{stage}_batches"
    limit = getattr(trainer, name, 1.0)
    whole = limit is None or (isinstance(limit, float) and limit == 1.0)  # an int 1 is one batch
    if not whole and isinstance(limit, int):  # as many batches as the loader has, or more: all of them
        try:
            whole = limit >= len(getattr(trainer, f"{stage}_dataloaders"))
        except (AttributeError, TypeError):  # no loader recorded, or one without a length
            pass
    return None if whole else f"{name}={limit}"


def _check_writable(folder: Path, callbacks: Sequence[ModelCheckpoint]) -> None:
    """A ``ValueError`` naming the callbacks, their ``dirpath`` and the reason when checkpoints
    could not be written in ``folder`` (:func:`~lightning_rpn._files.folder_write_problem`, which
    creates nothing), where Lightning would first find out at the end of the first epoch. Remote
    folders (``s3://...``) are left to Lightning.
    """
    if "://" in str(callbacks[0].dirpath):
        return
    problem = folder_write_problem(folder)
    if problem is not None:
        names = ", ".join(sorted({type(callback).__name__ for callback in callbacks}))
        raise ValueError(
            f"lightning-rpn fit: the checkpoint folder {folder} ({names} dirpath) cannot be created and "
            f"written to ({problem}); choose another dirpath, or make that folder writable, and run again"
        )


_HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
"""Lightning's saves when SLURM requeues a job, in ``trainer.default_root_dir``; ``--ckpt_path hpc``
takes the highest number."""


def continued_folders(trainer: pl.Trainer, checkpoint: Mapping[str, Any], path: str | Path) -> set[Path]:
    """The checkpoint folders whose run a ``fit`` from the file ``path`` (holding ``checkpoint``)
    continues: its own folder and those of the checkpoint callbacks that saved it, when ``path`` is
    the latest file of that run; else none.

    The latest file is the one a callback of the run wrote as its newest weights
    (``LastCheckpoint``'s ``last.ckpt``, a ``save_last`` file, a callback without ``monitor``'s
    newest file), as the callback states in ``checkpoint`` record it, under that name in one of
    ``trainer``'s checkpoint folders (the run's folder may have been moved or copied since), or
    one of Lightning's SLURM requeue saves (``hpc_ckpt_N.ckpt``). Lightning restores those records
    from any checkpoint it resumes, so a fit from ``best.ckpt``, an older file or a copy elsewhere
    would write on into that run's ``last.ckpt`` and ``best.ckpt``, replacing newer weights: such
    a fit starts a new run (:func:`start_new_run_files`) whose files get a version suffix.
    """
    states = [state for state in (checkpoint.get("callbacks") or {}).values()
              if isinstance(state, Mapping) and state.get("dirpath")]
    latest = {Path(state[key]).name for state in states for key in ("last_model_path", "best_model_path")
              if state.get(key) and (key == "last_model_path" or state.get("monitor") is None)}
    folder = Path(os.path.realpath(Path(path).parent))
    in_a_checkpoint_folder = folder in {Path(os.path.realpath(c.dirpath)) for c in _checkpoints_with_folder(trainer)}
    if not (in_a_checkpoint_folder and Path(path).name in latest) and not _HPC_CHECKPOINT.fullmatch(Path(path).name):
        return set()
    return {folder, *(Path(os.path.realpath(state["dirpath"])) for state in states)}


def start_new_run_files(trainer: pl.Trainer) -> None:
    """Make a ``fit`` that resumes a checkpoint without continuing its run (:func:`continued_folders`)
    name its checkpoint files as a new run does, leaving that run's files alone.

    Lightning restores the checkpoint callbacks' record of the resumed run's files (best and last
    paths, best scores) with the rest of the state, and they would then save over those files;
    here they forget it again once restored. Weights, optimiser and loop state are resumed as
    usual; the new run's best is the best of its own validations.
    """
    callbacks = [callback for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)]
    trainer.callbacks.append(_ForgetRestoredFiles(callbacks))


class _ForgetRestoredFiles(Callback):
    """Puts checkpoint callbacks' file record (``state_dict``) back as it was before the fit, after
    Lightning restored it from the checkpoint: at ``on_fit_start``, which follows the restore, and
    again at ``on_train_start`` for strategies that restore after their setup (DeepSpeed); no
    checkpoint is saved in between."""

    def __init__(self, callbacks: Sequence[ModelCheckpoint]) -> None:
        self._fresh = [(callback, deepcopy(callback.state_dict())) for callback in callbacks]

    def _forget(self) -> None:
        for callback, state in self._fresh:
            callback.load_state_dict(deepcopy(state))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forget()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forget()


def warn_if_last_waits_for_best(trainer: pl.Trainer) -> None:
    """Say when ``last.ckpt`` would wait for a new best.

    Since Lightning 2.6 (the oldest this package supports) a ``ModelCheckpoint`` with a
    ``monitor`` writes its ``save_last`` file only at a step where it also writes a top-k file,
    i.e. when the monitored metric improves; a run whose last epochs do not improve it ends
    with a ``last.ckpt`` from an earlier step, which ``--ckpt_path last`` then resumes, redoing
    those epochs. The shipped configs save ``last.ckpt`` with
    :class:`~lightning_rpn.training.last_checkpoint.LastCheckpoint` instead.
    """
    if not trainer.is_global_zero:
        return
    for callback in trainer.checkpoint_callbacks:
        if (isinstance(callback, ModelCheckpoint) and callback.monitor is not None and callback.save_last
                and callback.save_top_k != -1):
            print(
                f"lightning-rpn: ModelCheckpoint(monitor={callback.monitor!r}, save_last={callback.save_last!r}) "
                f"writes last.ckpt only when {callback.monitor} improves (Lightning >= 2.6), so it can hold "
                f"an earlier step than the end of the run; drop save_last and add "
                f"lightning_rpn.training.callbacks.LastCheckpoint with the same dirpath, as the shipped "
                f"configs do (it saves the latest weights with each validation and at the end of fit)",
                file=sys.stderr,
            )


def warn_if_budget_reached(trainer: pl.Trainer, checkpoint: Mapping[str, Any], path: str) -> None:
    """Say before training when the checkpoint ``path`` that ``fit`` resumes has already reached the
    trainer's ``max_epochs`` or ``max_steps``.

    Lightning then trains nothing, validates the weights again and says only, at the end, that
    the limit was reached. Extending a config that sets ``max_epochs`` with ``--trainer.max_steps``
    alone is such a run (Lightning stops at the first limit reached), and the line says which
    limit to raise. The epochs are counted as the resumed fit counts them (a checkpoint saved at
    an epoch's end has finished it: :mod:`~lightning_rpn.training.resume_state`). A ``max_epochs``
    below the epochs trained, which Lightning refuses with a traceback after the data were set up,
    is a :class:`~lightning_rpn.core.config.SettingError` saying what to do.
    """
    epochs, steps = _trained(checkpoint)
    limits = {"max_epochs": _epoch_limit(trainer), "max_steps": trainer.max_steps}
    if limits["max_epochs"] != -1 and epochs > limits["max_epochs"]:  # Lightning refuses it with a traceback
        forced = " (--trainer.fast_dev_run runs one)" if trainer.fast_dev_run else ""
        raise SettingError(
            f"fit: {path} has already trained {epochs} epoch(s), more than this fit's "
            f"max_epochs={limits['max_epochs']}{forced}, which Lightning cannot resume; to train on, raise "
            f"--trainer.max_epochs above {epochs}; to evaluate those weights, `lightning-rpn validate --ckpt_path {path}`"
        )
    trained = {"max_epochs": epochs, "max_steps": steps}
    reached = [name for name, limit in limits.items() if limit != -1 and trained[name] >= limit]
    if not reached or not trainer.is_global_zero:
        return
    flags = " and ".join(f"--trainer.{name}" for name in reached)
    others = [f"; {name}={limits[name]} is not" for name in limits if name not in reached and limits[name] != -1]
    print(
        f"lightning-rpn fit: {path} has already trained {epochs} epoch(s), {steps} step(s): "
        f"{' and '.join(f'{name}={limits[name]}' for name in reached)} reached, so this fit trains nothing "
        f"(it validates those weights and ends); to train on, raise {flags} (Lightning stops at the first "
        f"limit reached{''.join(others)}){_unfinished_validation(checkpoint, path, reached)}",
        file=sys.stderr,
    )


def _unfinished_validation(checkpoint: Mapping[str, Any], path: str, reached: list[str]) -> str:
    """The budget line's clause for a checkpoint saved in an interrupted validation when its
    ``max_steps`` is ``reached``: Lightning checks that limit before it runs anything, so the
    validation runs again only in a fit that trains on (at ``max_epochs`` it finishes the epoch,
    validation included)."""
    if "max_steps" not in reached or not holds_interrupted_validation(checkpoint):
        return ""
    return (f"; its validation at step {int(checkpoint.get('global_step', 0))} was interrupted and runs again "
            f"only in a fit that trains on: `lightning-rpn validate --ckpt_path {path}` evaluates those weights")


def _trained(checkpoint: Mapping[str, Any]) -> tuple[int, int]:
    """``(epochs, global steps)`` a checkpoint has trained, as a ``fit`` resuming it counts them."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop")
    saved = {"epoch": int(checkpoint.get("epoch", 0)), "global_step": int(checkpoint.get("global_step", 0)),
             "loops": {"fit_loop": deepcopy(loop)} if loop else {}}
    resume_where_saved(saved)
    progress = saved["loops"].get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", saved["epoch"])), saved["global_step"]


def _epoch_limit(trainer: pl.Trainer) -> int:
    """The trainer's ``max_epochs`` with Lightning's defaults: 1000 without any limit, none (-1) with
    only ``max_steps``."""
    if trainer.max_epochs is not None:
        return trainer.max_epochs
    return 1000 if trainer.max_steps == -1 else -1


_LIGHTNING_KEYWORDS = ("best", "last", "hpc", "registry")
"""``ckpt_path`` values Lightning resolves itself (``registry:...`` included), not file paths."""


def check_checkpoint_file(ckpt_path: str | Path | None, command: str) -> None:
    """A ``ValueError`` when ``ckpt_path`` names a local file that does not exist, before the model
    and the data are set up (Lightning's ``FileNotFoundError`` comes as a 40-line traceback after
    them). Keywords (``last``, ``best``, ...) and remote URLs (``s3://...``) are left to Lightning."""
    if ckpt_path is None:
        return
    text = str(ckpt_path)
    if text.split(":", 1)[0] in _LIGHTNING_KEYWORDS or "://" in text or Path(text).is_file():
        return
    found = "a folder, not a checkpoint file" if Path(text).is_dir() else "no such file"
    keywords = ("--ckpt_path last resumes the newest last*.ckpt of the config's checkpoint folder" if command == "fit"
                else "--ckpt_path last / best take the newest of the run's checkpoints")
    raise ValueError(f"lightning-rpn {command} --ckpt_path {text}: {found} ({Path(text).resolve()}); {keywords}")


def evaluation_checkpoint(trainer: pl.Trainer, ckpt_path: str | None, command: str) -> str | None:
    """The checkpoint a command in a new process loads for ``ckpt_path`` (``fit`` included).

    Lightning resolves ``"best"`` from what its ``ModelCheckpoint`` remembers of a ``fit`` in the
    same process (nothing here: a ``ValueError`` that the callback "is not configured to save the
    best model", though ``best.ckpt`` is on disk), and ``"last"`` with no last checkpoint to no
    checkpoint at all, with a warning: ``validate`` would then report the recall of untrained
    weights. Here either keyword is :func:`newest_checkpoint`, and ``"hpc"`` the newest of
    Lightning's SLURM requeue saves in ``trainer.default_root_dir``, as Lightning finds it; finding
    none is a ``ValueError`` naming where it looked, except for ``fit --ckpt_path last``, which
    then starts afresh (``"last"`` is returned: the README's way to run a job that may or may not
    resume; likewise when the config gives ``last`` no folder to look in). Paths
    (:func:`check_checkpoint_file`: a missing one is a ``ValueError`` too) and ``None`` are returned
    as given.
    """
    if ckpt_path == "hpc":
        return _hpc_checkpoint(trainer, command)
    if ckpt_path not in ("best", "last"):
        check_checkpoint_file(ckpt_path, command)
        return ckpt_path
    starts_afresh = command == "fit" and ckpt_path == "last"
    try:
        folders, found = newest_checkpoint(trainer, ckpt_path, f"lightning-rpn {command}")
    except ValueError:
        if starts_afresh:  # no checkpoint folder in the config: Lightning's own resolution and warning
            return ckpt_path
        raise
    if found is not None or starts_afresh:
        return found or ckpt_path
    stem = ModelCheckpoint.CHECKPOINT_NAME_LAST if ckpt_path == "last" else _best_stem(trainer)
    if command == "fit":
        what_to_do = "pass a checkpoint path (--ckpt_path last resumes the latest run)"
    elif ckpt_path == "best" and any(next(Path(folder).glob("last*.ckpt"), None) for folder in folders):
        # a fit that never validated (max_steps before the first validation, fast_dev_run) saves no best
        what_to_do = ("a best checkpoint is saved by a validation during fit, which the run has not had; "
                      "--ckpt_path last takes its latest weights")
    else:
        what_to_do = "train first (fit) or pass a checkpoint path"
    raise ValueError(f"lightning-rpn {command} --ckpt_path {ckpt_path}: no {stem}*.ckpt in "
                     f"{', '.join(map(str, folders))}; {what_to_do}")


def _hpc_checkpoint(trainer: pl.Trainer, command: str) -> str:
    """``hpc_ckpt_N.ckpt`` with the highest ``N`` in ``trainer.default_root_dir`` (a remote folder:
    ``"hpc"``, for Lightning to find), or a ``ValueError`` naming the folder."""
    folder = Path(trainer.default_root_dir)
    if "://" in str(trainer.default_root_dir):
        return "hpc"
    numbered = {int(match.group(1)): path for path in (folder.iterdir() if folder.is_dir() else [])
                if (match := _HPC_CHECKPOINT.fullmatch(path.name))}
    if not numbered:
        raise ValueError(f"lightning-rpn {command} --ckpt_path hpc: no hpc_ckpt_*.ckpt (Lightning's saves when SLURM "
                         f"requeues a job) in {folder}; pass a checkpoint path, or --ckpt_path last")
    return str(numbered[max(numbered)])


_PICKLE_START = b"\x80"
"""The first byte of a pickle (protocol 2 and up): ``torch.save``'s format before the zip archive."""
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def read_checkpoint(path: str | Path, command: str, weights_only: bool = True) -> dict[str, Any]:
    """The Lightning checkpoint in the local file ``path``, its tensors mapped from the file, not
    read (``mmap``): cheap to look into before Lightning loads it, whatever its size.

    A file Lightning could not load is a ``ValueError`` naming it and what it is, in one line,
    where Lightning stops with a traceback after the model and the data were set up: empty,
    truncated or corrupt (a save or copy that did not finish), no PyTorch file, a ``torch.export``
    program (``load_proposal_network`` loads those), a bare ``state_dict`` or another object
    without Lightning's keys, or objects that a ``weights_only`` load (the CLI's default) refuses.
    """
    try:
        return _lightning_checkpoint(Path(path), weights_only)
    except ValueError as error:
        raise ValueError(f"lightning-rpn {command} --ckpt_path {path}: {error}") from error


def _lightning_checkpoint(file: Path, weights_only: bool) -> dict[str, Any]:
    """:func:`read_checkpoint`'s load; its ``ValueError`` says what ``file`` is instead."""
    try:
        with file.open("rb") as stream:
            start = stream.read(len(ZIP_START))
    except OSError as error:
        raise ValueError(f"cannot be read ({error.strerror or error})") from error
    if not start:
        raise ValueError("an empty file (0 bytes: a save or copy that did not finish); use another checkpoint")
    if start == ZIP_START:
        _check_archive(file)
    elif not start.startswith(_PICKLE_START):
        raise ValueError(f"not a PyTorch checkpoint (it starts with {start!r}: neither a zip archive nor a pickle); "
                         f"--ckpt_path takes the .ckpt files fit writes")
    try:
        checkpoint = torch.load(file, map_location="cpu", mmap=start == ZIP_START, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused is None:  # torch's weights_only message blames the setting for any damaged pickle
            reason = str(error).split("WeightsUnpickler error:")[-1]
            raise ValueError(f"truncated or corrupt (its pickle cannot be read: {first_line(reason)}); use another "
                             f"checkpoint") from error
        raise ValueError(f"holds a Python object ({refused.group(1)}) that a weights_only load refuses, as it could "
                         f"run code; pass --weights_only false only for a file you trust") from error
    except (AttributeError, ImportError) as error:  # a full load (--weights_only false) imports its classes
        raise ValueError(f"holds a Python object whose class cannot be imported here ({first_line(error)}); install "
                         f"the package that saved it") from error
    except (RuntimeError, EOFError, OSError) as error:  # what torch.load raises for a damaged file
        raise ValueError(f"truncated or corrupt ({first_line(error)}); use another checkpoint") from error
    _check_lightning_keys(checkpoint)
    return checkpoint


def _check_archive(file: Path) -> None:
    """A ``ValueError`` when the zip archive ``file`` is cut short or is no ``torch.save`` archive."""
    kind = torch_file_kind(file)
    if kind == "truncated_zip":
        raise ValueError(f"truncated or corrupt: a zip archive without its end ({file.stat().st_size} bytes; a save "
                         f"or copy that did not finish); copy it again or use another checkpoint")
    if kind == "program":
        raise ValueError("a torch.export program (as export_proposal_network writes), not a Lightning checkpoint: load "
                         "it in Python with lightning_rpn.load_proposal_network(path); --ckpt_path takes the .ckpt "
                         "files fit writes")
    if kind != "checkpoint":
        raise ValueError("a zip archive that is not a PyTorch checkpoint (no data.pkl in it); --ckpt_path takes the "
                         ".ckpt files fit writes")


def _check_lightning_keys(checkpoint: Any) -> None:
    """A ``ValueError`` saying what ``checkpoint`` is when it lacks what Lightning restores from."""
    if isinstance(checkpoint, Mapping) and {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
        return
    if isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"a bare state_dict ({len(checkpoint)} tensors, as torch.save(model.state_dict()) writes: no "
                         f"hyperparameters, no training state), not a Lightning checkpoint; --ckpt_path takes the "
                         f".ckpt files fit writes, and these weights load in Python with "
                         f"model.load_state_dict(torch.load(path, weights_only=True))")
    if isinstance(checkpoint, Mapping):
        keys = [str(key) for key in list(checkpoint)[:6]]
        found = f"a dict with the keys {', '.join(keys)}{', ...' if len(checkpoint) > len(keys) else ''}"
    else:
        found = f"a {type(checkpoint).__name__}"
    raise ValueError(f"not a Lightning checkpoint ({found}; one holds 'state_dict' and 'pytorch-lightning_version'); "
                     f"--ckpt_path takes the .ckpt files fit writes")


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (torch's run on for lines), or its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _checkpoints_with_folder(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath is not None]


def _best_stem(trainer: pl.Trainer) -> str:
    """The file name of the first monitored ``ModelCheckpoint`` with a plain filename (``best``)."""
    callbacks = [c for c in _checkpoints_with_folder(trainer)
                 if c.monitor is not None and c.filename and "{" not in c.filename][:1]
    return callbacks[0].filename if callbacks else "best"  # type: ignore[return-value]


def newest_checkpoint(trainer: pl.Trainer, keyword: str, where: str) -> tuple[list[Path], str | None]:
    """``(folders searched, the newest file or None)`` for ``--ckpt_path best`` / ``last``.

    ``"best"``: ``{filename}.ckpt`` / ``{filename}-vN.ckpt`` in the folder of the config's first
    monitored ``ModelCheckpoint`` (the latest run's best); ``"last"``: ``last*.ckpt`` in the
    folders of every ``ModelCheckpoint`` (the latest run's last). ``ValueError`` starting with
    ``where`` when the config has no such folder.
    """
    with_folder = _checkpoints_with_folder(trainer)
    if keyword == "best":
        stem = _best_stem(trainer)
        callbacks = [c for c in with_folder if c.monitor is not None and c.filename == stem][:1]
        pattern = re.compile(rf"{re.escape(stem)}(-v\d+)?\.ckpt")
        wanted = "no ModelCheckpoint with a monitor, a dirpath and a plain filename"
    else:
        callbacks = with_folder
        pattern = re.compile(rf"{re.escape(ModelCheckpoint.CHECKPOINT_NAME_LAST)}.*\.ckpt")
        wanted = "no ModelCheckpoint with a dirpath"
    folders = sorted({Path(c.dirpath) for c in callbacks})  # type: ignore[arg-type]
    if not folders:
        raise ValueError(f"{where} --ckpt_path {keyword}: the config has {wanted} to find it in; pass a checkpoint path")
    found = [path for folder in folders if folder.is_dir() for path in folder.iterdir() if pattern.fullmatch(path.name)]
    return folders, (str(max(found, key=lambda path: path.stat().st_mtime)) if found else None)


def checkpoint_stem(checkpoint: str | Path | None) -> str:
    """The name a ``validate`` / ``test`` / ``predict`` gives its files after its checkpoint.

    The checkpoint's file name without suffix (``last`` for ``.../last.ckpt``), or
    ``no_checkpoint`` without one, so that the metrics summary and the proposal files of one
    run carry the same name.
    """
    return Path(checkpoint).stem if checkpoint else "no_checkpoint"


def free_version(paths: Callable[[int], Sequence[Path]], first: int = 0) -> tuple[int, list[Path]]:
    """The first version ``first, first + 1, ...`` none of whose ``paths(version)`` exists, and the
    existing files of the versions passed over: a run's output never replaces an earlier run's."""
    kept: list[Path] = []
    version = first
    while taken := [path for path in paths(version) if path.exists()]:
        kept += taken
        version += 1
    return version, kept


def versioned(path: Path, version: int) -> Path:
    """``path`` with ``-v{version}`` before its suffix (``version`` 0: as it is), as Lightning names checkpoints."""
    return path if version == 0 else path.with_name(f"{path.stem}-v{version}{path.suffix}")


def repeated_name(name: str, repeat: int) -> str:
    """``name`` (a file name without its suffix) of an output named after a checkpoint or weights, for
    the ``repeat``-th run of the same command on them after the first (0: ``name`` itself; 1:
    ``name.2``, 2: ``name.3``, ...). Not Lightning's ``-v1``, which the checkpoints' own names carry:
    ``predict-best-v1`` is ``best-v1.ckpt``'s, ``predict-best.2`` a later predict of ``best.ckpt``."""
    return name if repeat == 0 else f"{name}.{repeat + 1}"


def repeated(path: Path, repeat: int) -> Path:
    """``path`` with :func:`repeated_name`'s ``.2``, ``.3``, ... before its suffix (0: ``path`` itself)."""
    return path.with_name(f"{repeated_name(path.stem, repeat)}{path.suffix}")


def _trainer_fn(trainer: pl.Trainer) -> str | None:
    """The command ``trainer`` runs (or last ran): ``"fit"``, ``"validate"``, ... (``None`` before any)."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return getattr(fn, "value", fn)


def evaluation_command(trainer: pl.Trainer) -> str | None:
    """``"validate"``, ``"test"`` or ``"predict"`` while (and after) ``trainer`` runs that command, else
    ``None`` (``fit``, whose validations write no metrics summary)."""
    command = _trainer_fn(trainer)
    return command if command in EVALUATION_ROLES else None


_CHOSEN_REPEAT = "_lightning_rpn_output_repeat"
"""The trainer attribute that holds :func:`output_repeat`'s choice for the running evaluation."""


def output_repeat(trainer: pl.Trainer, own: Callable[[int], Sequence[Path]]) -> tuple[int, list[Path]]:
    """The one repeat number (:func:`repeated`) of every output the running evaluation names after its
    checkpoint or weights, and the existing files of the numbers passed over.

    The outputs are the asker's own (``own(repeat)``: the files it writes at that number), the
    metrics summary of a ``validate`` / ``test`` / ``predict`` (:func:`metrics_summary_path`) and
    those of every callback of ``trainer`` with an ``outputs_at(trainer, repeat)`` method
    (``ProposalWriter``, ``RecallCurves``, ``ProposalImages``); a predict without gt boxes writes
    its proposal files alone (:func:`_evaluation_outputs`). The number is the first at which
    none of them exists, so that no file is replaced and the files of one command carry the same
    number even when an earlier command wrote only some of them. The first writer to ask chooses;
    the later ones of the same evaluation (command, checkpoint and step) get that number, unless a
    file of their own already holds it: that is a new evaluation of the same weights by this
    trainer, and the number is chosen again. Global rank 0 writes these files, and alone asks.
    """
    evaluation = (_trainer_fn(trainer), trainer.ckpt_path, getattr(trainer, "global_step", None))
    chosen = getattr(trainer, _CHOSEN_REPEAT, None)
    if chosen is not None and chosen[0] == evaluation and not any(path.exists() for path in own(chosen[1])):
        return chosen[1], chosen[2]
    repeat, kept = free_version(lambda r: [*own(r), *_evaluation_outputs(trainer, r)])
    kept = list(dict.fromkeys(kept))  # the asker's files can be among the callbacks' and the summary
    setattr(trainer, _CHOSEN_REPEAT, (evaluation, repeat, kept))
    return repeat, kept


def listed_paths(paths: Sequence[Path], at_most: int = 4) -> str:
    """``paths`` (the files :func:`output_repeat` passed over, lowest number first) for a notice: the
    last ``at_most``, those of the numbers just below the one chosen, and how many earlier ones (an
    evaluation's proposal images alone are eight files)."""
    shown = ", ".join(map(str, paths[-at_most:]))
    return shown if len(paths) <= at_most else f"{shown} and {len(paths) - at_most} earlier"


def _evaluation_outputs(trainer: pl.Trainer, repeat: int) -> list[Path]:
    """The running evaluation's metrics summary and callbacks' outputs at ``repeat`` (:func:`output_repeat`);
    of a predict that measures no recall (:func:`_predict_measures_recall`), its prediction writers'
    files alone: it writes no summary and draws no recall curves."""
    command = evaluation_command(trainer)
    recall = command != "predict" or _predict_measures_recall(trainer)
    outputs = [metrics_summary_path(trainer, command, repeat)] if command is not None and recall else []
    for callback in getattr(trainer, "callbacks", []):
        outputs_at = getattr(callback, "outputs_at", None)
        if callable(outputs_at) and (recall or isinstance(callback, BasePredictionWriter)):
            outputs += outputs_at(trainer, repeat)
    return outputs


def _predict_measures_recall(trainer: pl.Trainer) -> bool:
    """Whether the running predict's split has a gt box, as its module's ``val_recall`` counted them:
    ``RPNModule.on_predict_epoch_end`` keeps a recall only then, after the callbacks' epoch end,
    where a ``ProposalWriter`` asks :func:`output_repeat` first. Global rank 0's count (the rank that
    asks): gt boxes that all fell to other processes' shares number the summary apart from the
    proposal files (neither replaces a file). A module without that count: assumed to measure it."""
    counted = getattr(getattr(getattr(trainer, "lightning_module", None), "val_recall", None), "num_boxes", None)
    return counted is None or int(counted[0]) > 0  # [0]: the "all" area range, whose AR -1 means no gt box


def metrics_summary_path(trainer: pl.Trainer, command: str, repeat: int = 0) -> Path:
    """``{trainer.default_root_dir}/metrics/{command}-{checkpoint stem}.json``, :func:`repeated`:
    where :func:`write_metrics_summary` writes, one of the outputs whose repeat :func:`output_repeat`
    chooses."""
    base = Path(trainer.default_root_dir) / "metrics" / f"{command}-{checkpoint_stem(trainer.ckpt_path)}.json"
    return repeated(base, repeat)


def _written_proposals(trainer: pl.Trainer) -> list[Any]:
    """The prediction writers of ``trainer`` that wrote files in its last predict (their ``written``)."""
    return [callback for callback in getattr(trainer, "callbacks", [])
            if isinstance(callback, BasePredictionWriter) and getattr(callback, "written", None)]


def _predicted_proposals(writers: Sequence[Any], recall: dict[str, float]) -> dict[str, Any]:
    """What predict's recall was computed on, and the proposal files the same predict wrote.

    The recall counts every proposal ``predict_step`` returned (the model's own per-image
    limit, as ``validate`` / ``test`` do); a writer keeps each image's best ``top_k`` of them, so
    ``AR@k`` with ``k <= top_k`` is also the files' recall, and a larger ``k`` counts proposals
    the files do not hold.
    """
    budgets = sorted({int(key.rsplit("@", 1)[1]) for key in recall if key.startswith("AR@")})
    files = []
    for writer in writers:
        top_k = getattr(writer, "top_k", None)
        entry: dict[str, Any] = {"top_k": top_k,
                                 "paths": {name: str(Path(path).resolve()) for name, path in writer.written.items()}}
        beyond = [k for k in budgets if top_k is not None and k > top_k]
        if beyond:
            entry["note"] = (f"these files hold each image's best {top_k} proposals: AR@k and recall@t@k for "
                             f"k = {', '.join(map(str, beyond))} (> {top_k}) count proposals they do not hold")
        files.append(entry)
    return {
        "recall_of": "every proposal predict_step returned per image (the model's own limit, "
                     "e.g. RPNModule's post_nms_top_n_test), before any writer's top_k",
        "files": files,
    }


def write_metrics_summary(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, command: str
) -> Path | None:
    """Write the final recall and losses of ``validate`` / ``test`` / ``predict`` as JSON.

    The file is ``{trainer.default_root_dir}/metrics/{command}-{checkpoint stem}.json``
    (``...-no_checkpoint.json`` without one) with the command, the resolved checkpoint path and
    the epoch and global step its weights were saved at (``model.last_recall_epoch`` / ``_step``),
    the dataset (name, root, split), the coordinates the recall was measured in, every
    ``ProposalRecall.compute()`` key of ``model.last_recall`` (AR@k per area range, recall at
    each IoU threshold), for validate / test the losses and, for predict, ``proposals``: what
    the recall was computed on (every proposal ``predict_step`` returned, not a writer's
    ``top_k``) and each prediction writer's ``top_k`` and the files it wrote in this predict.
    Written on global rank 0; nothing (``None``) when there is no recall, as for a predict
    split without gt boxes. A file an earlier command left under that name stays: this one gets
    ``.2``, ``.3``, ... and a notice, the repeat number of every output of the command
    (:func:`output_repeat`), so that ``predict-last.3.json`` describes ``proposals_coco-last.3.json``.
    """
    recall = getattr(model, "last_recall", None)
    if not trainer.is_global_zero or not recall:
        return None
    role = EVALUATION_ROLES[command]
    splits = getattr(datamodule, "splits", {})
    images = getattr(datamodule, "predict_images", None) if command == "predict" else None
    root = getattr(datamodule, "root", None)
    checkpoint = trainer.ckpt_path
    summary = {
        "command": command,
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        # the weights' own counters (a loaded checkpoint's: see training/evaluated_weights.py)
        "epoch": getattr(model, "last_recall_epoch", None),
        "step": getattr(model, "last_recall_step", None),
        "dataset": {
            "name": getattr(datamodule, "dataset", type(datamodule).__name__),
            "root": None if root is None else str(root),
            "split": splits.get(role) if images is None else None,
            "images": images,
            "limited_by": _evaluation_limit(trainer, role),
        },
        "coordinates": "original images" if command == "predict" else "resized images",
        "metrics": recall,
    }
    writers = _written_proposals(trainer) if command == "predict" else []
    if command == "predict":
        summary["proposals"] = _predicted_proposals(writers, recall)
    else:
        prefix = f"{'val' if command == 'validate' else 'test'}/"
        summary["losses"] = {
            key[len(prefix):]: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(prefix) and key[len(prefix):].startswith("loss")
        }
    repeat, kept = output_repeat(trainer, lambda r: [metrics_summary_path(trainer, command, r)])
    path = metrics_summary_path(trainer, command, repeat)
    if kept and not writers:  # a predict's writer has named them
        print(f"lightning-rpn {command}: {listed_paths(kept)} stay (earlier runs); "
              f"this one's metrics go to {path.name}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
