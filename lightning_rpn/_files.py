"""Checks on files before long work, shared by every layer: what a saved torch file is, and
whether a folder can take our output.

- :func:`torch_file_kind`: ``torch.save`` checkpoints and ``torch.export`` programs are both zip
  archives, so one handed to the other's loader is an easy mix-up; the archive's entry names
  tell them apart without loading anything (``torch.save`` writes ``<name>/data.pkl``,
  ``torch.export.save`` ``<name>/archive_format``).
- :func:`folder_write_problem`: one rule for "can files be written there?", asked before a fit,
  an analysis or a data check rather than at its first write, after the work. It creates
  nothing that stays, so a command that stops later leaves no empty folder behind.
- :func:`atomic_write`: a file written whole or not at all (a temporary file beside it, renamed
  into place), for the proposal files and the checkpoints.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["TorchFileKind", "atomic_write", "folder_write_problem", "torch_file_kind"]

ZIP_START = b"PK\x03\x04"
"""The first bytes of a zip archive, as ``torch.save`` and ``torch.export.save`` write."""

TorchFileKind = Literal["empty", "checkpoint", "program", "zip", "truncated_zip", "other"]
"""``checkpoint``: a ``torch.save`` zip archive; ``program``: a ``torch.export`` archive; ``zip``:
another zip archive; ``truncated_zip``: a zip archive without its end (a save or copy that did not
finish); ``other``: no zip archive (a legacy pickle ``torch.save``, or anything else)."""


def torch_file_kind(path: Path) -> TorchFileKind:
    """What the local file ``path`` holds, from its first bytes and its zip entry names.

    ``OSError`` when it cannot be read.
    """
    with path.open("rb") as stream:
        start = stream.read(len(ZIP_START))
    if not start:
        return "empty"
    if start != ZIP_START:
        return "other"
    try:
        with zipfile.ZipFile(path) as archive:
            names = {Path(name).name for name in archive.namelist()}
    except zipfile.BadZipFile:
        return "truncated_zip"
    if "data.pkl" in names:
        return "checkpoint"
    if "archive_format" in names:
        return "program"
    return "zip"


def folder_write_problem(folder: Path) -> str | None:
    """Why files could not be written in ``folder`` (its missing parents made first), or ``None``.

    The nearest folder on the path that exists is probed: it must be a folder, and an unnamed
    temporary file must be creatable there (a real write, which also finds read-only file systems
    and access rules that permission bits do not show). Nothing is created that stays.
    """
    path = folder.absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            return f"{existing} is a file"
        with tempfile.TemporaryFile(dir=existing):  # unnamed where supported, removed on close
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


@contextmanager
def atomic_write(path: Path, mode: str) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` (``.{name}.tmp{pid}``); flushed to disk and moved into
    place only if the block succeeds, removed otherwise: ``path`` is never left half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open(mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
