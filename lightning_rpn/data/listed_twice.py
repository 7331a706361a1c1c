"""Image files that a dataset lists more than once, under one path or several names.

One file listed twice trains twice as often and counts its boxes twice in recall, so the readers
warn of it (``file_listed_twice``). Names are paths; several names are one file through symbolic
links (a link to a listed file, a folder listed both as it is and through a link) or as hard links
of one inode (``cp -al``, DVC's hard-link cache). Each folder is listed once, so that the check
costs no call per file on a split of 100k images.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["files_listed_twice"]


def files_listed_twice(files: Sequence[Path]) -> list[list[list[int]]]:
    """Each file listed more than once in ``files``, as the positions of each of its names (by first
    position, the file's and the name's): a name is one path, or the paths that symbolic links make
    one (a link to a listed file, or a folder listed both as it is and through a link); a file has
    several names where they are hard links of one inode (``cp -al``, DVC's hardlink cache).

    Resolving every path took 0.8 s for 20k files, where this check takes under 0.1 s: each folder
    is resolved and listed once (``os.scandir`` names its links and, on POSIX, the inode of each
    entry: readdir's, without a call per file), and paths are compared by real folder and name (a
    link's by its target's) only where a folder holds a link or two folders are one; elsewhere they
    are compared as they are. A link is followed by reading it (the target's folder resolved once):
    ``realpath`` per link doubled the load of a 100k-image split whose folder holds only links (a
    DVC cache, a link farm). Names are looked up by inode only where two entries of the listed
    folders (or link targets outside them) share one (:func:`_shared_inodes`).
    """
    by_path: dict[Path, list[int]] = {}
    for position, file in enumerate(files):
        by_path.setdefault(file, []).append(position)
    by_real: dict[str, _Folder] = {}  # each real folder listed once
    folders: dict[tuple[str, ...], _Folder] = {}  # by parts (half the cost of os.path.split, which makes the text)
    for file in by_path:
        parts = file.parts[:-1]
        if parts not in folders:
            real = os.path.realpath(os.path.join(*parts) if parts else os.curdir)
            if real not in by_real:
                by_real[real] = _Folder.listed(real)
            folders[parts] = by_real[real]
    linked = any(folder.links for folder in by_real.values()) or len(by_real) < len(folders)
    if not linked and not _shared_inodes(by_real.values(), []):
        return [[positions] for positions in by_path.values() if len(positions) > 1]
    names: dict[tuple[str, str], list[int]] = {}
    real_folders: dict[str, str] = {}  # a link target's folder (as the link names it) -> its real path
    outside: list[tuple[int, int]] = []  # (device, inode) of each link target outside the listed folders
    for file, positions in by_path.items():
        folder = folders[file.parts[:-1]]
        if file.name in folder.links:
            key, identity = _link_target(file, real_folders)
            if identity is not None and key[0] not in by_real:
                outside.append(identity)
        else:
            key = (folder.real, file.name)
        names.setdefault(key, []).extend(positions)
    if not _shared_inodes(by_real.values(), outside):
        return [[sorted(positions)] for positions in names.values() if len(positions) > 1]
    files_named = [[sorted(names[key]) for key in file] for file in _names_by_inode(names)]
    return sorted((file for file in files_named if sum(map(len, file)) > 1), key=lambda file: file[0][0])


_FREE_INODES = os.name == "posix"
"""Whether ``os.DirEntry.inode`` is readdir's (free); on Windows it costs a call per file."""
_UNNUMBERED = frozenset({0, 0xFFFFFFFF})
"""Inode numbers that a listing gives where it has none: FUSE file systems that do not number
their files (libfuse's ``FUSE_UNKNOWN_INO``) list every entry as 0xFFFFFFFF."""


@dataclass(frozen=True)
class _Folder:
    """A folder of listed files as one ``os.scandir`` lists it: its real path, its device, the names
    of its symbolic links and the inode numbers of its other entries (none without
    :data:`_FREE_INODES`, or where the listing numbers none); ``repeated``: two of them are one inode."""

    real: str
    device: int
    links: set[str]
    inodes: set[int]
    repeated: bool

    @classmethod
    def listed(cls, real: str) -> _Folder:
        """The folder at the real path ``real`` (empty where it cannot be listed: a missing folder's
        images are reported when they are read)."""
        links: set[str] = set()
        numbers: list[int] = []  # a loop: a list of the entries held them all (and took longer)
        try:
            device = os.stat(real).st_dev
            with os.scandir(real) as listing:
                for entry in listing:
                    if entry.is_symlink():
                        links.add(entry.name)
                    elif _FREE_INODES:
                        numbers.append(entry.inode())
        except OSError:
            return cls(real, -1, set(), set(), False)
        inodes = set(numbers) if _UNNUMBERED.isdisjoint(numbers) else set()
        return cls(real, device, links, inodes, 0 < len(inodes) < len(numbers))


def _shared_inodes(folders: Iterable[_Folder], outside: list[tuple[int, int]]) -> bool:
    """Whether two entries of ``folders`` (each real folder once), or of them and the link targets
    ``outside`` them (``(device, inode)`` each), may be one inode: sets compared, no call per file."""
    by_device: dict[int, list[set[int]]] = {}
    for folder in folders:
        if folder.repeated:
            return True
        by_device.setdefault(folder.device, []).append(folder.inodes)
    targets: dict[int, set[int]] = {}
    for device, inode in outside:
        targets.setdefault(device, set()).add(inode)
    if sum(map(len, targets.values())) < len(outside):
        return True
    for device, inodes in targets.items():
        by_device.setdefault(device, []).append(inodes)
    return any(len(sets) > 1 and len(set().union(*sets)) < sum(map(len, sets)) for sets in by_device.values())


def _names_by_inode(names: Iterable[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """``names`` (real folder, file name) grouped by the inode they name, in their order: each
    folder listed again for its names' inode numbers, a shared number confirmed by ``os.stat``
    (another file system's file, or a layer's of an overlay, may have the same number)."""
    listed: dict[str, tuple[int, dict[str, int]]] = {}
    by_number: dict[tuple[int, int] | tuple[str, str], list[tuple[str, str]]] = {}
    for key in names:
        real, name = key
        if real not in listed:
            listed[real] = _inode_numbers(real)
        device, numbers = listed[real]
        number = numbers.get(name)
        by_number.setdefault(key if number is None else (device, number), []).append(key)
    files: list[list[tuple[str, str]]] = []
    for keys in by_number.values():
        by_identity: dict[object, list[tuple[str, str]]] = {}
        for key in keys:
            by_identity.setdefault(_identity(key) if len(keys) > 1 else key, []).append(key)
        files.extend(by_identity.values())
    return files


def _inode_numbers(real: str) -> tuple[int, dict[str, int]]:
    """The device of the folder at the real path ``real`` and the inode number of each of its
    entries but links, by name (none where it cannot be listed or numbers none)."""
    try:
        device = os.stat(real).st_dev
        with os.scandir(real) as listing:
            numbers = {entry.name: entry.inode() for entry in listing if not entry.is_symlink()}
    except OSError:
        return -1, {}
    return device, {} if not _UNNUMBERED.isdisjoint(numbers.values()) else numbers


def _identity(key: tuple[str, str]) -> object:
    """``(device, inode)`` of the file ``key`` (real folder, name) names, from ``os.stat``; ``key``
    itself where it cannot be read."""
    try:
        status = os.stat(os.path.join(*key))
    except OSError:
        return key
    return status.st_dev, status.st_ino


def _link_target(link: Path, real_folders: dict[str, str]) -> tuple[tuple[str, str], tuple[int, int] | None]:
    """``(real folder, name)`` of the file the symbolic link ``link`` leads to, and its ``(device,
    inode)`` (``None`` where there is none): its target read, the target's folder resolved once
    (``real_folders`` caches them); a link to a link resolved whole."""
    target = os.path.join(os.path.dirname(link), os.readlink(link))  # a relative target is relative to the link
    try:
        status = os.lstat(target)
    except OSError:  # a broken link: reported when its image is read
        status = None
    if status is not None and stat.S_ISLNK(status.st_mode):
        try:
            status = os.stat(link)
        except OSError:
            status = None
        return os.path.split(os.path.realpath(link)), None if status is None else (status.st_dev, status.st_ino)
    folder, name = os.path.split(target)
    if folder not in real_folders:
        real_folders[folder] = os.path.realpath(folder or os.curdir)
    return (real_folders[folder], name), None if status is None else (status.st_dev, status.st_ino)
