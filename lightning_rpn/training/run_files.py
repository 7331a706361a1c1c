"""The files of a ``lightning-rpn`` run: earlier runs' checkpoints kept, the final metrics written.

A new ``fit`` never overwrites the checkpoints another run left in its folder, and finds out
before training, not at its first save, that a folder cannot be written
(:func:`check_checkpoint_dirs`), and is told when its ``last.ckpt`` would lag behind its end
(:func:`warn_if_last_waits_for_best`); ``validate`` / ``test`` / ``predict`` write their final recall
and losses as JSON (:func:`write_metrics_summary`), named after the checkpoint as ``predict``'s
proposal files are (:func:`checkpoint_stem`), and like them never replacing an earlier file
(:func:`free_version`); a predict's summary lists its proposal files and takes their version;
their ``--ckpt_path best`` / ``last`` is found on disk or refused (:func:`evaluation_checkpoint`).
The resolved config, the third file a run leaves, is saved by the CLI's own
``ResolvedConfigCallback`` (:mod:`lightning_rpn.cli`).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint

__all__ = [
    "check_checkpoint_dirs", "check_checkpoint_file", "checkpoint_stem", "evaluation_checkpoint", "free_version",
    "metrics_summary_path", "newest_checkpoint", "versioned", "warn_if_last_waits_for_best", "write_metrics_summary",
]


def check_checkpoint_dirs(trainer: pl.Trainer, ckpt_path: str | None) -> None:
    """Keep a new ``fit`` from overwriting the checkpoints another run left in its folder.

    The configs fix each ``ModelCheckpoint.dirpath``, so a second run of the same config finds
    the first run's files there. Unless it resumes from that folder (``--ckpt_path last``, or a
    file in the folder), Lightning's version counter gives the new run's files a ``-v1``,
    ``-v2``, ... suffix, which is announced once a folder; with ``enable_version_counter: false``
    on any of the folder's callbacks they would replace the earlier ones, which is a
    ``ValueError`` naming the folder and files. Each local folder is also created and written
    to here (:func:`_check_writable`), so that one that cannot be is a ``ValueError`` before
    training rather than an ``OSError`` at the first save, after a whole epoch.
    """
    callbacks_by_folder: dict[Path, list[ModelCheckpoint]] = {}
    for callback in trainer.checkpoint_callbacks:
        # without a fixed folder Lightning writes to the logger's new version folder: nothing to keep
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            callbacks_by_folder.setdefault(Path(callback.dirpath), []).append(callback)
    for folder, callbacks in callbacks_by_folder.items():
        _check_writable(folder, callbacks)
        earlier = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if ckpt_path == "last":
            resumes_here = any(name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST) for name in earlier)
        else:
            resumes_here = ckpt_path is not None and Path(ckpt_path).resolve().parent == folder.resolve()
        if resumes_here or not earlier:
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
                f"they stay, this run's files get a version suffix (e.g. last-v1.ckpt), and "
                f"--ckpt_path last resumes the newest last*.ckpt",
                file=sys.stderr,
            )


def _check_writable(folder: Path, callbacks: Sequence[ModelCheckpoint]) -> None:
    """Create the checkpoint folder ``folder`` (with its parents), and create and remove a file there.

    Lightning would first do both at the end of the first epoch; a ``ValueError`` naming the
    callbacks, their ``dirpath`` and the reason comes here instead. Remote folders (``s3://...``)
    are left to Lightning.
    """
    if "://" in str(callbacks[0].dirpath):
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # unnamed where supported, removed on close
            pass
    except OSError as error:
        names = ", ".join(sorted({type(callback).__name__ for callback in callbacks}))
        blocking = next((parent for parent in folder.parents if parent.exists()), None)
        reason = error.strerror or str(error)
        if blocking is not None and not blocking.is_dir():
            reason += f": {blocking} is a file"
        raise ValueError(
            f"lightning-rpn fit: the checkpoint folder {folder} ({names} dirpath) cannot be created and "
            f"written to ({reason}); choose another dirpath, or make that folder writable, and run again"
        ) from error


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
    """The checkpoint a ``validate`` / ``test`` / ``predict`` in a new process loads for ``ckpt_path``.

    Lightning resolves ``"best"`` from what its ``ModelCheckpoint`` remembers of a ``fit`` in the
    same process (nothing here: a ``ValueError`` that the callback "is not configured to save the
    best model"), and ``"last"`` with no last checkpoint to no checkpoint at all, with a warning:
    the command would then report the recall of untrained weights. Here either keyword is
    :func:`newest_checkpoint`, and finding no file is a ``ValueError`` naming the folders. Paths
    (:func:`check_checkpoint_file`: a missing one is a ``ValueError`` too) and ``None`` are
    returned as given.
    """
    if ckpt_path not in ("best", "last"):
        check_checkpoint_file(ckpt_path, command)
        return ckpt_path
    folders, found = newest_checkpoint(trainer, ckpt_path, f"lightning-rpn {command}")
    if found is None:
        stem = ModelCheckpoint.CHECKPOINT_NAME_LAST if ckpt_path == "last" else _best_stem(trainer)
        raise ValueError(f"lightning-rpn {command} --ckpt_path {ckpt_path}: no {stem}*.ckpt in "
                         f"{', '.join(map(str, folders))}; train first (fit) or pass a checkpoint path")
    return found


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


def metrics_summary_path(trainer: pl.Trainer, command: str, version: int = 0) -> Path:
    """``{trainer.default_root_dir}/metrics/{command}-{checkpoint stem}.json`` with ``-v{version}``
    (none for 0): where :func:`write_metrics_summary` writes, which ``ProposalWriter`` keeps free
    for the summary of its own predict."""
    base = Path(trainer.default_root_dir) / "metrics" / f"{command}-{checkpoint_stem(trainer.ckpt_path)}.json"
    return versioned(base, version)


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
    ``-v1``, ``-v2``, ... and a notice; after a ``ProposalWriter`` it takes the writer's version
    (no lower), so that ``predict-last-v2.json`` describes ``proposals_coco-last-v2.json``.
    """
    recall = getattr(model, "last_recall", None)
    if not trainer.is_global_zero or not recall:
        return None
    role = {"validate": "val", "test": "test", "predict": "predict"}[command]
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
    first = max((getattr(writer, "version", 0) for writer in writers), default=0)  # the writer's files' version
    version, kept = free_version(lambda v: [metrics_summary_path(trainer, command, v)], first)
    path = metrics_summary_path(trainer, command, version)
    if kept:
        print(f"lightning-rpn {command}: {', '.join(p.name for p in kept)} in {path.parent} stay (earlier runs); "
              f"this one's metrics go to {path.name}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
