"""The built-in configs: found by name (``--config shapes``), listed, copied out.

The repository's top-level ``configs/`` folder is their single source. A wheel carries a copy
inside the package, ``lightning_rpn/configs/`` (``setup.py`` copies it at build time); a clone
or an editable install reads ``configs/`` beside the package. ``lightning-rpn configs list``
prints the names, ``lightning-rpn configs copy NAME [DEST]`` writes one out to edit.

A ``--config NAME`` that names no file means the local ``NAME.yaml`` (or ``NAME.yml``) when there
is one, with a notice naming it, and otherwise the built-in config: the copy a user made with
``configs copy NAME`` and edited is what ``--config NAME`` then runs, as a relative path is read
from the working folder first.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import yaml

__all__ = [
    "config_dir", "config_names", "config_path", "config_problem", "configs_command", "copy_config",
    "resolve_config_args",
]

_SUFFIX = ".yaml"
_LOCAL_SUFFIXES = (_SUFFIX, ".yml")
"""The suffixes a ``--config NAME`` looks for in the working folder, in this order."""
_CONFIG_FLAGS = ("--config", "-c")
_RUN_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def config_dir() -> Path:
    """The folder of the built-in configs: the installed package's copy, else the source tree's."""
    packaged = Path(str(resources.files("lightning_rpn"))) / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def config_names() -> list[str]:
    """The built-in config names (file names without ``.yaml``), sorted."""
    folder = config_dir()
    return sorted(path.stem for path in folder.glob(f"*{_SUFFIX}")) if folder.is_dir() else []


def config_path(name: str) -> Path:
    """The file of built-in config ``name`` (``"shapes"`` or ``"shapes.yaml"``)."""
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    path = config_dir() / f"{stem}{_SUFFIX}"
    if "/" in stem or "\\" in stem or not path.is_file():
        raise ValueError(
            f"no built-in config named {name!r}; built-in configs: {', '.join(config_names()) or 'none found'} "
            f"(in {config_dir()}); `lightning-rpn configs list` lists them"
        )
    return path


def copy_config(name: str, destination: str | Path = ".", overwrite: bool = False) -> Path:
    """Copy built-in config ``name`` to ``destination``: a file, or a folder to put ``NAME.yaml`` in
    (an existing folder, or a path ending in a separator, ``out/``, which is created).

    An existing file is kept unless ``overwrite``; returns the path written.
    """
    source = config_path(name)
    target = Path(destination)
    if target.is_dir() or _names_a_folder(destination):
        target = target / source.name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} exists; choose another destination or pass --force to replace it")
    if target.parent.exists() and not target.parent.is_dir():
        raise FileExistsError(f"{str(target.parent)!r} is a file, not a folder; choose another destination")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    except OSError as error:  # a read-only folder, a file in the path, no permission
        raise ValueError(f"cannot write {str(target)!r} ({error.strerror or error}); choose another destination") from error
    return target


def _names_a_folder(destination: str | Path) -> bool:
    """Whether ``destination`` is written as a folder: a string ending in a path separator
    (``Path`` drops it, so ``out/`` would otherwise be a file named ``out``)."""
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    return isinstance(destination, str) and destination.endswith(separators)


def _print_notice(message: str) -> None:
    """``lightning-rpn: message`` on stderr."""
    print(f"lightning-rpn: {message}", file=sys.stderr)


def resolve_config_args(args: Sequence[str], notice: Callable[[str], None] = _print_notice) -> list[str]:
    """``args`` with each ``--config NAME`` (``-c NAME``) naming no file replaced by the file it means.

    That is the local ``NAME.yaml`` (or ``NAME.yml``) when there is one, with a ``notice`` naming
    it (the edited copy of ``configs copy NAME`` wins over the built-in), else built-in config
    ``NAME``'s path. ``NAME`` is ``shapes``, ``shapes.yaml`` or, outside a clone, the README's
    ``configs/shapes.yaml``. A value naming an existing file is left as it is, and so is anything
    else, for the CLI to report.
    """
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg in _CONFIG_FLAGS and index + 1 < len(resolved):
            resolved[index + 1] = _resolve(resolved[index + 1], notice)
        elif arg.startswith("--config="):
            resolved[index] = "--config=" + _resolve(arg[len("--config=") :], notice)
    return resolved


def config_problem(args: Sequence[str]) -> str | None:
    """Why a ``--config`` of ``args`` (as typed: a name is read as ``--config NAME`` reads it) cannot
    run as meant, or ``None``; a file that cannot be read is left to the CLI to report.

    - An empty file (jsonargparse says only "Unexpected config:"), such as the ``shapes.yaml`` that
      ``fit --config shapes --print_config > shapes.yaml`` creates before it runs, which then
      shadows the built-in ``shapes``.
    - ``lightning-rpn -c FILE fit ...``: before the subcommand, LightningCLI reads a config with
      one section per subcommand (``fit: {trainer: ...}``); a config of one run's settings there
      (every built-in one, and what ``configs copy`` writes) is silently not applied to the run
      (``--print_config`` shows the defaults) or fails on its first key.
    """
    before_subcommand = True
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in _CONFIG_FLAGS and index + 1 < len(args):
            value, index = args[index + 1], index + 2
        elif arg.startswith("--config="):
            value, index = arg[len("--config="):], index + 1
        else:
            # the subcommand: configs after it are its own
            before_subcommand = before_subcommand and arg.startswith("-")
            index += 1
            continue
        path = Path(_resolve(value, lambda _: None))
        if not path.is_file():  # a pipe (`--config <(...)`) is read once, by the CLI; others it reports
            continue
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if content is None:
            return (f"--config {value}: {path} is empty (a `--print_config > {path.name}` creates it empty before "
                    f"the command reads it: print to another file name)")
        if before_subcommand and isinstance(content, dict) and not set(content) & set(_RUN_SUBCOMMANDS):
            subcommand = next((a for a in args[index:] if a in _RUN_SUBCOMMANDS), "fit")
            held = "holds the settings of a run" if content else "holds no setting (`{}`)"
            return (f"--config {value} comes before the subcommand, where a config needs one section per "
                    f"subcommand ({', '.join(f'{name}:' for name in _RUN_SUBCOMMANDS)}); this one {held}: give "
                    f"it after the subcommand, `lightning-rpn {subcommand} --config {value}`")
    return None


def _resolve(value: str, notice: Callable[[str], None]) -> str:
    path = Path(value)
    if path.is_file():  # a folder of the same name (a data folder called scenes/) is no config
        return value
    stem = path.name[: -len(_SUFFIX)] if path.name.endswith(_SUFFIX) else path.name
    builtin = stem in config_names() and path.parent in (Path("."), Path("configs"))
    local = _local_config(path)
    if local is not None:
        shadowed = builtin and config_path(stem).resolve() != local.resolve()
        also = f", not the built-in config {stem!r} ({config_path(stem)})" if shadowed else ""
        notice(f"--config {value}: reading the local file {local}{also}")
        return str(local)
    return str(config_path(stem)) if builtin else value


def _local_config(path: Path) -> Path | None:
    """``path`` plus ``.yaml`` or else ``.yml``, whichever file exists, for a ``path`` without either suffix."""
    if not path.name or path.suffix.lower() in _LOCAL_SUFFIXES:  # "", ".", "/": no name to add to
        return None
    candidates = (path.with_name(path.name + suffix) for suffix in _LOCAL_SUFFIXES)
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def configs_command(args: Sequence[str]) -> int:
    """``lightning-rpn configs list`` | ``lightning-rpn configs copy NAME [DEST] [--force]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lightning-rpn configs", description="The built-in configs.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the built-in config names and where they are")
    copy = commands.add_parser("copy", help="write a built-in config to a file to edit (then `--config NAME` "
                               "reads the local NAME.yaml)")
    copy.add_argument("name", help="a built-in config name, e.g. shapes")
    copy.add_argument("destination", nargs="?", default=".",
                      help="a file, or a folder to write NAME.yaml in: an existing one, or one written with a "
                      "trailing slash (out/), which is created (default: .)")
    copy.add_argument("--force", action="store_true", help="replace an existing file")
    options = parser.parse_args(list(args))
    if options.command == "list":
        for name in config_names():
            print(name)
        print(f"(in {config_dir()}; use one with `lightning-rpn fit --config NAME`)", file=sys.stderr)
        return 0
    try:
        target = copy_config(options.name, options.destination, overwrite=options.force)
    except (ValueError, FileExistsError) as error:
        print(f"lightning-rpn configs copy: {error}", file=sys.stderr)
        return 1
    print(target)
    return 0
