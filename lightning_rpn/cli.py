"""The ``lightning-rpn`` command: LightningCLI for RPNModule + RPNDataModule, plus data tools.

::

    lightning-rpn fit --config configs/shapes.yaml          # train (resume: --ckpt_path last)
    lightning-rpn validate --config ... --ckpt_path PATH    # losses + recall table
    lightning-rpn test --config ... --ckpt_path PATH
    lightning-rpn predict --config ... --ckpt_path PATH     # proposal files (training.proposal_writer.ProposalWriter)
    lightning-rpn check-data --config ...                   # dataset report, no training
    lightning-rpn analyze-anchors --config ... [--optimize] # anchor coverage (+ a better design, same anchor count)
    lightning-rpn configs list | copy NAME [DEST]           # the built-in configs (--config NAME)

Anchors and strides are declared once, in the model section: the data module reads the
anchor generator, target config, box coder and size divisibility from the model in ``setup``.
Every checkpoint carries the resolved config (key ``"lightning_rpn_config"``, YAML text) besides
the model's hyperparameters, so ``RPNModule.load_from_checkpoint(path)`` needs no config file
(that and the other files a run leaves: :mod:`lightning_rpn.training.run_files`).

W&B is the configs' logger. Without credentials (``WANDB_API_KEY`` or a ``wandb login`` entry
in ``~/.netrc``) and without an explicit ``WANDB_MODE``, runs log offline and the command
prints the ``wandb sync`` line that uploads them later (:mod:`lightning_rpn.training.wandb_mode`).

Scale-out, precision and faults use Lightning's own machinery: ``--trainer.devices N
--trainer.strategy ddp`` (``--trainer.num_nodes`` under SLURM or torchrun),
``--trainer.precision bf16-mixed``, checkpoints written atomically and ``--ckpt_path last``
to resume. ``--ckpt_path`` files load with ``weights_only=True`` unless ``--weights_only
false`` is given. Configs are parsed with safe YAML; a ``class_path`` must name an importable
class of the declared type (importing it runs that installed module's own code, nothing from
the config).
"""

from __future__ import annotations

import enum
import errno
import importlib
import os
import re
import sys
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
import jsonargparse
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, Namespace
from lightning.pytorch.callbacks import (
    BasePredictionWriter,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console

from lightning_rpn._files import folder_write_problem
from lightning_rpn.core.backbones import weights_from_checkpoint
from lightning_rpn.core.config import SettingError
from lightning_rpn.data.problems import DataError
from lightning_rpn.training.checkpoint_io import use_atomic_checkpoints
from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.module import RESIZE_KEY, RPNModule
from lightning_rpn.training.proposal_writer import ProposalWriter
from lightning_rpn.training.run_files import (
    EVALUATION_ROLES,
    check_checkpoint_dirs,
    continued_folders,
    evaluation_checkpoint,
    first_line,
    newest_checkpoint,
    read_checkpoint,
    start_new_run_files,
    warn_if_budget_reached,
    warn_if_last_waits_for_best,
    write_metrics_summary,
)
from lightning_rpn.training.wandb_mode import default_wandb_offline, prepare_wandb_logger, wandb_credentials_available
from lightning_rpn.training.wandb_resume import continue_wandb_run, record_wandb_run

__all__ = [
    "CONFIG_KEY",
    "RPNArgumentParser",
    "RPNLightningCLI",
    "ResolvedConfigCallback",
    "analyze_anchors",
    "check_checkpoint_dirs",
    "check_data",
    "default_wandb_offline",
    "main",
    "write_metrics_summary",
    "wandb_credentials_available",
]

CONFIG_KEY = "lightning_rpn_config"
# what stands in for RichProgressBar when stdout is not a terminal, and its line interval
TEXT_PROGRESS = "lightning_rpn.training.callbacks.TextProgress"
TEXT_PROGRESS_INTERVAL_S = 30.0
DATA_ERROR = 1
"""Exit status of a command stopped by a data problem (a :class:`~lightning_rpn.data.problems.DataError`),
printed as its message alone, as ``check-data`` exits 1 for data with errors."""
USAGE_ERROR = 2
"""Exit status of a command refused before it starts (an output it may not write, a split or
checkpoint the config does not give), as argparse's; ``check-data`` exits 1 for data with errors."""

_DESCRIPTION = (
    "Train and evaluate Region Proposal Networks. Subcommands: fit, validate, test, predict "
    "(LightningCLI), check-data (dataset report: `lightning-rpn check-data --config FILE`), "
    "analyze-anchors (anchor coverage: `lightning-rpn analyze-anchors --config FILE [--optimize]`) and "
    "configs (the built-in configs: `lightning-rpn configs list`, `lightning-rpn configs copy NAME [DEST]`). "
    "Each takes --help."
)
CONFIG_HELP = (
    "A YAML or JSON config file, or the name of a built-in config (`lightning-rpn configs list`; "
    "a local NAME.yaml of that name is read instead, with a notice)."
)
TOP_CONFIG_HELP = (
    "A config with one section per subcommand (fit:, validate:, ...). The built-in configs and "
    "copies of them hold one run's settings: give those after the subcommand, "
    "`lightning-rpn fit --config shapes`."
)


class _Refusal(Exception):
    """A command refused before it starts, for a setting the user gives (the message says which
    and what to do): :func:`main` prints the message as one line and exits :data:`USAGE_ERROR`."""


_CLASS_PATH_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)")
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)"')


class RPNArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors end with their cause.

    jsonargparse prints the whole usage (~120 lines for this CLI) before the message, and
    buries the reason for a bad ``class_path`` (a typo: "module ... has no attribute ...")
    among the other union alternatives. Here an error prints one line pointing to ``--help``,
    the message, and last a ``cause:`` line naming the config key, the class path and the
    reason. ``exit_on_error=False`` and ``JSONARGPARSE_DEBUG`` keep jsonargparse's behaviour.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: invalid arguments (`{prog} --help` lists every option)\n")
        sys.stderr.write(f"error: {message.rstrip()}\n")
        problem = _CLASS_PATH_PROBLEM.search(message)
        if problem is not None:
            key = _PARSER_KEY.search(message)
            where = f"{key.group(1)}: " if key else ""
            sys.stderr.write(f"cause: {where}class_path {problem.group(1)!r}: {problem.group(2).strip()}\n")
        self.exit(2)


_KEEP_NONE = ({"skip_unset": False} if tuple(int(part) for part in jsonargparse.__version__.split(".")[:2]) >= (4, 49)
              else {"skip_none": False})
"""jsonargparse's keyword for a dump that keeps the ``null`` entries: ``skip_unset`` since 4.49, which
warns at every save that ``skip_none`` (the only one before) is deprecated."""


def _serialise_devices() -> None:
    """Let jsonargparse write ``torch.device`` values (as ``"cpu"``, ``"cuda:0"``) and read them back.

    Without it a callback argument typed ``torch.device``, such as ``StochasticWeightAveraging``'s
    ``device`` (default ``torch.device("cpu")``), is written into the run's ``config.yaml`` and its
    checkpoints as ``Unable to serialize instance cpu``, and a rerun of that config crashes when SWA
    starts."""
    from jsonargparse.typing import register_type

    register_type(torch.device, serializer=str, deserializer=torch.device)  # a second call is a no-op


class ResolvedConfigCallback(SaveConfigCallback):
    """Save the resolved config to the log dir, into every checkpoint, and to W&B.

    Written when the command starts, once the checkpoint it loads has been checked: a resume or
    an evaluation refused for its checkpoint leaves the run's config and its W&B run as they were.
    ``fit`` writes ``config.yaml``, ``validate`` / ``test`` / ``predict`` ``config-<command>.yaml``
    beside it (the training's config stays the training's), and a config file the command was
    given is never written over. The saved ``ckpt_path`` is the file the run loaded, not the
    keyword that found it (``--ckpt_path last`` / ``best``): run again later, the config would load
    a newer file.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started = False
        self.given_files = _given_config_files(self.config)
        """The config files the command was given: never written over (the command line adds those
        given before the subcommand, ``lightning-rpn --config C fit``)."""

    def _config_text(self) -> str:
        return self.parser.dump(self.config, **_KEEP_NONE)

    def _config_file(self, trainer: pl.Trainer) -> Path:
        """In the logger's folder, or the trainer's root when the logger has none: a ``WandbLogger``
        without ``save_dir`` gives ``trainer.log_dir`` ``None``, which Lightning's own setup asserts
        against (the run's other files go to the root too, see
        :func:`~lightning_rpn.training.log_targets.log_dir`). Call it on every process: it broadcasts."""
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        command = str(trainer.state.fn.value) if trainer.state.fn is not None else "fit"
        stem = Path(self.config_filename).stem
        path = folder / (self.config_filename if command == "fit" else f"{stem}-{command}.yaml")
        if any(_same_file(path, given) for given in self.given_files):
            path = folder / f"{stem}-{command}-resolved.yaml"
            _notice(f"the resolved config is written to {path}, not over the config file you gave")
        return path

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path = self._config_file(trainer) if self.save_to_log_dir else None
        if not trainer.is_global_zero:
            return
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if folder_write_problem(path.parent) is not None:  # jsonargparse's "not creatable" was a traceback
                raise PermissionError(errno.EACCES, "the run's folder cannot be written", str(path))
            self.parser.save(self.config, path, **_KEEP_NONE, multifile=self.multifile,
                             overwrite=self.overwrite or self.already_saved)  # a second save replaces our own
        self.save_config(trainer, pl_module, stage)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing yet: the checkpoint the command loads is checked after this (:meth:`write_once`)."""

    def write_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the config once, as the command starts (or, for an evaluation with no batch, whose
        start hooks Lightning skips, when it ends): with a ``ckpt_path`` keyword replaced by the file
        Lightning resolved it to (``null``: none found). Only the command's own start: fit's closing
        validation of its final weights loads nothing."""
        if self._started:
            return
        self._started = True
        named = self.config.get("ckpt_path")
        loaded = None if trainer.ckpt_path is None else str(trainer.ckpt_path)
        if named is not None and str(named) != loaded:
            self.config.ckpt_path = loaded
        self._write(trainer, pl_module, str(trainer.state.fn))
        self.already_saved = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write_once(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not fit's validation loops
            self.write_once(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write_once(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write_once(trainer, pl_module)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                resolved = yaml.safe_load(self._config_text())
                logger.experiment.config.update({"config": resolved}, allow_val_change=True)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self._config_text()
        record_wandb_run(trainer, checkpoint)


def _plain_str_enums(value: Any) -> Any:
    """``value`` (a config section, changed in place) with each ``str`` enum member replaced by its
    string: Lightning's ``Timer`` annotates ``interval: str`` with the default ``Interval.step``,
    which the run's YAML config cannot hold (its write crashed the run)."""
    if isinstance(value, enum.Enum) and isinstance(value, str):
        return value.value
    if isinstance(value, list):
        value[:] = [_plain_str_enums(item) for item in value]
    elif isinstance(value, (Namespace, dict)):
        for key in list(value.keys()) if isinstance(value, dict) else list(vars(value)):
            value[key] = _plain_str_enums(value[key])
    return value


def _given_config_files(config: Any) -> list[Path]:
    """The config files the command line gave (``--config``), as paths on disk."""
    given = config.get("config") or []
    return [Path(str(getattr(item, "absolute", item))) for item in given if item is not None]


def _same_file(path: Path, other: Path) -> bool:
    """Whether ``path`` exists and is ``other`` (by inode: a link or another spelling of the path too)."""
    try:
        return path.exists() and other.exists() and path.samefile(other)
    except OSError:
        return False


def _notice(message: str) -> None:
    """``lightning-rpn: message`` on stderr, from the first process only: under DDP every process
    parses the command line, and a notice about the config would print once per process."""
    if rank_zero_only.rank == 0:
        print(f"lightning-rpn: {message}", file=sys.stderr)


def _names_subclass(callback: object, base: type) -> bool:
    """Whether a config's callback (or logger) entry names (``class_path``) a subclass of
    ``base``; an entry whose class does not import is not one (the parser reports it)."""
    if not hasattr(callback, "get"):
        return False
    module, _, name = str(callback.get("class_path")).rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, base)


def _stdout_is_live() -> bool:
    """Whether rich redraws a live display on stdout (a terminal, or Jupyter), by rich's own test."""
    console = Console()
    return console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)


def _text_progress_off_terminal(trainer: Any) -> None:
    """Off a terminal (a job log, ``| tee``, CI), swap the config's ``RichProgressBar`` for
    :class:`~lightning_rpn.training.text_progress.TextProgress`: rich draws its bar there once,
    when training ends, so a long run would show no progress at all until it is over. Without a
    progress-bar callback (no config, as in ``predict --ckpt_path P``), ``TextProgress`` stands in
    for Lightning's default bar, which draws the same way.
    """
    callbacks = trainer.get("callbacks")
    if trainer.get("enable_progress_bar") is False or _stdout_is_live():
        return
    text_progress = Namespace(class_path=TEXT_PROGRESS, init_args=Namespace(interval_s=TEXT_PROGRESS_INTERVAL_S))
    if callbacks is None or (isinstance(callbacks, list) and not any(_names_subclass(c, ProgressBar) for c in callbacks)):
        trainer["callbacks"] = [*(callbacks or []), text_progress]
        _notice(f"stdout is not a terminal, so progress is printed as a line every {TEXT_PROGRESS_INTERVAL_S:g} s "
                "(TextProgress)")
        return
    if not isinstance(callbacks, list):
        return
    swapped = False
    for index, callback in enumerate(callbacks):
        if _names_subclass(callback, RichProgressBar):
            callbacks[index] = text_progress
            swapped = True
    if swapped:
        _notice(f"stdout is not a terminal, so progress is printed as a line every {TEXT_PROGRESS_INTERVAL_S:g} s "
                "(TextProgress) instead of the config's RichProgressBar")


def _drop_progress_bars(trainer: Any) -> None:
    """With ``--trainer.enable_progress_bar false``, leave out the config's progress-bar callbacks.

    Lightning refuses a progress-bar callback on a trainer without one; the shipped configs
    list ``RichProgressBar``, and turning it off (logs to a file, CI) is an ordinary flag.
    """
    callbacks = trainer.get("callbacks")
    if trainer.get("enable_progress_bar") is not False or not isinstance(callbacks, list):
        return
    dropped = [c for c in callbacks if _names_subclass(c, ProgressBar)]
    if dropped:
        trainer["callbacks"] = [c for c in callbacks if c not in dropped]
        names = ", ".join(str(c.get("class_path")).rpartition(".")[2] for c in dropped)
        _notice(f"enable_progress_bar is false, so the config's {names} is left out")


_RESIZE_ARGS = frozenset({"--data.resize", "--data.min_sizes", "--data.max_size", "--data.fixed_size"})
"""Command-line settings of the data module's resize (a checkpoint alone takes its own otherwise)."""

_HARDWARE_SETTINGS = ("accelerator", "devices", "num_nodes", "strategy", "precision")
"""The trainer settings that choose the hardware and how it runs, quoted when Lightning refuses the trainer."""

_TRAINER_REFUSALS = (MisconfigurationException, ValueError, ModuleNotFoundError)
"""What Lightning raises for trainer settings it cannot run with, while it builds the trainer: an accelerator
this machine lacks, an unknown strategy, devices it cannot use, a strategy's missing package."""


def _trainer_setting_error(settings: Namespace, error: Exception) -> SettingError:
    """A :class:`SettingError` for a trainer that Lightning refused to build from ``settings`` (one
    line: Lightning's reason and what to do; for a refusal that concerns the hardware, the
    hardware settings in effect and how to let Lightning choose)."""
    reason = " ".join(str(error).split())
    if "enable_checkpointing=False" in reason and "ModelCheckpoint" in reason:
        return SettingError(
            f"Lightning refused the trainer settings: {reason} -- the config's trainer.callbacks hold the checkpoint "
            "callbacks (ModelCheckpoint, LastCheckpoint); to train without checkpoints, also give --trainer.callbacks "
            "without them"
        )
    if not re.search(r"accelerator|device|strategy|precision|node|gpu|cuda|mps|tpu|hpu|xla", reason, re.IGNORECASE):
        return SettingError(f"Lightning refused the trainer settings: {reason} -- change the one at fault in the "
                            "config's trainer section or with --trainer.NAME VALUE")
    shown = ", ".join(f"{name}={settings[name]!r}" for name in _HARDWARE_SETTINGS
                      if isinstance(settings.get(name), str | int | list))
    return SettingError(
        f"the trainer settings ({shown}) were refused by Lightning: {reason} -- change the one at fault in the "
        "config's trainer section or with --trainer.NAME VALUE (`--trainer.accelerator auto --trainer.devices auto "
        "--trainer.strategy auto` runs on whatever this machine has)"
    )


def _refused_by_loop_setup(error: BaseException) -> bool:
    """Whether ``error`` was raised by Lightning itself while one of its loops set up its data
    (``setup_data``: where it checks trainer settings against the data: ``val_check_interval``
    above the batches of an epoch, a ``limit_*_batches`` fraction below one batch, a fractional
    ``val_check_interval`` with an iterable dataset), not by code it called, such as the data module's."""
    frames, traceback = [], error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next

    def module(frame: Any) -> str:
        return str(frame.f_globals.get("__name__", ""))

    in_loop_setup = any(frame.f_code.co_name == "setup_data" and module(frame).startswith("lightning.pytorch.loops.")
                        for frame in frames)
    return in_loop_setup and bool(frames) and module(frames[-1]).startswith("lightning.")


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first: the folders making it creates."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


_MISSING_CALLBACKS_WARNING = r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need"
"""The start of Lightning's warning that a loaded checkpoint holds states of callbacks the trainer lacks."""


class RPNLightningCLI(LightningCLI):
    """LightningCLI with RPNModule / RPNDataModule, config saving and W&B offline hints.

    The model owns the optimiser settings (``model.optimizer``, ``model.lr``, ...), so the
    generic ``--optimizer`` / ``--lr_scheduler`` arguments are not added.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        # Lightning's own use of a torch API that torch has deprecated: nothing a user can act on
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        self._given_args = list(sys.argv[1:] if args is None else args)  # what the command line itself sets
        self._checkpoint_read: tuple[str, dict[str, Any]] | None = None  # (path, checkpoint): read once
        self._made_folders: list[Path] = []  # by _prepare_wandb, in the order made
        _serialise_devices()
        kwargs.setdefault("save_config_callback", ResolvedConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": _DESCRIPTION})
        kwargs.setdefault("parser_class", RPNArgumentParser)
        # the seed a run without one gets: Lightning's default (True) seeds 0 too, but warns "No seed found"
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(
            RPNModule,
            RPNDataModule,
            auto_configure_optimizers=False,
            args=list(args) if args is not None else None,
            run=run,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser, whose ``-c/--config`` help says it also takes a built-in config name
        (:func:`~lightning_rpn.tools.config_files.resolve_config_args`)."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={pl.__version__}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile, help=CONFIG_HELP)
        return parser

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
                     ) -> None:
        """Lightning's parsers; the ``--config`` before the subcommand says what it takes (:data:`TOP_CONFIG_HELP`)."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            next(action for action in self.parser._actions if action.dest == "config").help = TOP_CONFIG_HELP

    def _parse_ckpt_path(self) -> None:
        """Keep the run's own model config when ``--ckpt_path`` names a file and a ``--config`` is given.

        Lightning parses such a checkpoint's hyperparameters over the command line and config, so
        ``--ckpt_path runs/x/last.ckpt --model.lr 0.01`` dropped the new ``lr`` (and ``validate``
        its ``--model.*`` settings) where ``--ckpt_path last`` kept them. A run with a config
        follows it either way; a checkpoint trained as another network is refused when it loads
        (:func:`~lightning_rpn.training.checkpoint_agreement.check_checkpoint_agrees`). Without a
        ``--config`` (``predict --ckpt_path P --data.predict_images DIR``) the model is the
        checkpoint's, as Lightning builds it.
        """
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._check_named_checkpoint(subcommand)
        if subcommand and not self.config[subcommand].get("config"):
            super()._parse_ckpt_path()
            if not any(arg.split("=")[0] in _RESIZE_ARGS or arg.startswith("--data=") or arg == "--data"
                       for arg in self._given_args):
                self._resize_as_the_checkpoint_trained(self.config[subcommand])

    def _check_named_checkpoint(self, subcommand: str) -> None:
        """A ``--ckpt_path`` file that Lightning could not load (truncated, a bare ``state_dict``, an
        exported program: :func:`~lightning_rpn.training.run_files.read_checkpoint`) is a
        :class:`_Refusal` here, before Lightning reads its hyperparameters and before the model and
        the data are built; a missing file
        (:func:`~lightning_rpn.training.run_files.check_checkpoint_file`) and the keywords (``last``,
        ``best``, ``hpc``) are found and checked in ``before_<command>``."""
        try:
            self._read_checkpoint(self.config[subcommand].get("ckpt_path"), subcommand)
        except ValueError as error:
            raise _Refusal(str(error)) from error

    def _read_checkpoint(self, path: str | None, subcommand: str) -> dict[str, Any] | None:
        """The checkpoint in the local file ``path``, mapped, not read
        (:func:`~lightning_rpn.training.run_files.read_checkpoint`), loaded as the command will
        (``--weights_only``, true unless given false); ``None`` for no file (none, a keyword left
        to Lightning, a remote URL)."""
        if path is None or str(path) in ("best", "last", "hpc") or not Path(str(path)).is_file():
            return None
        if self._checkpoint_read is None or self._checkpoint_read[0] != str(path):  # once for parse and run
            weights_only = self.config[subcommand].get("weights_only") is not False
            self._checkpoint_read = str(path), read_checkpoint(str(path), subcommand, weights_only)
        return self._checkpoint_read[1]

    @staticmethod
    def _resize_as_the_checkpoint_trained(run: Namespace) -> None:
        """Without a ``--config`` nor a resize on the command line, evaluate and predict with the
        resize of the checkpoint's training data (``RPNModule.resize_policy``, as ``predict_images``
        does), not the data module's default (none): images of another scale than it learnt."""
        ckpt_path, data = run.get("ckpt_path"), run.get("data")
        if not ckpt_path or not Path(str(ckpt_path)).is_file() or data is None:
            return
        path = str(ckpt_path)
        policy = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get(RESIZE_KEY)
        if policy is None or policy.get("mode") == "none":
            return
        data["resize"], data["min_sizes"] = policy["mode"], list(policy["min_sizes"])
        data["max_size"] = policy["max_size"]
        data["fixed_size"] = None if policy.get("fixed_size") is None else list(policy["fixed_size"])
        _notice(f"no --config: images are resized as the checkpoint's training data was (resize {policy['mode']!r}, "
                f"min_sizes {list(policy['min_sizes'])}, max_size {policy['max_size']}, fixed_size "
                f"{policy.get('fixed_size')}); --data.resize sets another")

    def before_instantiate_classes(self) -> None:
        """Choose W&B offline mode (after parsing, so ``--help`` stays quiet); safe loading;
        no progress-bar callback when the progress bar is off (:func:`_drop_progress_bars`), and
        progress lines instead of rich's bar off a terminal (:func:`_text_progress_off_terminal`).

        ``--ckpt_path`` checkpoints load with ``weights_only=True`` unless ``--weights_only
        false`` is given: our checkpoints hold tensors and plain types only, and a
        ``weights_only`` load cannot run code hidden in an untrusted file.
        """
        trainer = self._run_config()["trainer"]
        logger = trainer.get("logger")
        if any(_names_subclass(entry, WandbLogger) for entry in (logger if isinstance(logger, list) else [logger])):
            default_wandb_offline()  # its notice only for a run that logs to W&B
        if self.subcommand and self.config[self.subcommand].get("weights_only") is None:
            self.config[self.subcommand]["weights_only"] = True
        _drop_progress_bars(trainer)
        _text_progress_off_terminal(trainer)
        _plain_str_enums(trainer)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; pretrained backbone weights are not downloaded when a
        checkpoint will replace them (:func:`~lightning_rpn.core.backbones.weights_from_checkpoint`)."""
        with weights_from_checkpoint() if self._checkpoint_holds_the_weights() else nullcontext():
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Lightning's trainer; settings it refuses while building it (``--trainer.accelerator gpu`` on a
        machine without one) are a :class:`SettingError` (:func:`_trainer_setting_error`), not a traceback.
        Only here: the same exceptions raised later, while the command runs, keep their traceback."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except _TRAINER_REFUSALS as error:
            raise _trainer_setting_error(self._run_config()["trainer"], error) from error
        _RUN_PROCESSES[0] = trainer.world_size
        use_atomic_checkpoints(trainer)
        if self.subcommand:  # a config given before the subcommand is the user's too
            for callback in trainer.callbacks:
                if isinstance(callback, ResolvedConfigCallback):
                    callback.given_files += _given_config_files(self.config)
        return trainer

    def _checkpoint_holds_the_weights(self) -> bool:
        """``validate`` / ``test`` / ``predict`` with a ``--ckpt_path`` (found on disk, or refused:
        :func:`~lightning_rpn.training.run_files.evaluation_checkpoint`), and ``fit`` resuming a
        checkpoint file, ``best`` or ``hpc``. Not ``fit --ckpt_path last``: with no last checkpoint
        yet, the run starts afresh, from the pretrained weights."""
        ckpt_path = self._run_config().get("ckpt_path")
        if self.subcommand == "fit":  # best and hpc are found on disk or refused, as the evaluations' keywords
            return ckpt_path in ("best", "hpc") or (ckpt_path is not None and Path(str(ckpt_path)).is_file())
        return self.subcommand in ("validate", "test", "predict") and bool(ckpt_path)

    def _run_config(self) -> Any:
        """The parsed config of the run: the subcommand's section, or all of it without one."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def after_instantiate_classes(self) -> None:
        """A ``predict`` without a prediction writer gets a :class:`ProposalWriter` (:meth:`_write_predictions`).
        Without a logger (``--trainer.logger false``) leave out the callbacks that need one:
        ``LearningRateMonitor`` raises on a trainer without loggers; turning logging off is an
        ordinary flag, so every config keeps working with it.
        """
        self._write_predictions()
        self._say_which_folders_stay()
        if self.trainer.loggers:
            return
        kept = [c for c in self.trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        if len(kept) < len(self.trainer.callbacks):
            self.trainer.callbacks = kept
            _notice("no logger, so LearningRateMonitor is left out (learning rates are not logged)")

    def _say_which_folders_stay(self) -> None:
        """With ``--trainer.default_root_dir`` on the command line, name the folders the config sets
        itself (checkpoint ``dirpath``, the logger's ``save_dir``, the proposal writer's
        ``output_dir``) that lie outside it: Lightning uses the root only where nothing else is
        set, so a user moving a run with it found its checkpoints in the config's folder."""
        if not any(arg == "--trainer.default_root_dir" or arg.startswith("--trainer.default_root_dir=")
                   for arg in self._given_args):
            return
        root = Path(os.path.realpath(self.trainer.default_root_dir))  # Lightning resolves dirpath's links
        named = [(f"{type(c).__name__} dirpath", c.dirpath) for c in self.trainer.checkpoint_callbacks
                 if isinstance(c, ModelCheckpoint)]
        named += [(f"{type(logger).__name__} save_dir", logger.save_dir) for logger in self.trainer.loggers]
        named += [(f"{type(c).__name__} output_dir", c.output_dir) for c in self.trainer.callbacks
                  if isinstance(c, ProposalWriter)]
        by_folder: dict[str, list[str]] = {}
        for where, folder in named:
            if folder is not None and "://" not in str(folder) and not Path(os.path.realpath(folder)).is_relative_to(root):
                by_folder.setdefault(str(folder), []).append(where)
        outside = [f"{folder} ({', '.join(wheres)})" for folder, wheres in by_folder.items()]
        if outside:
            _notice(f"--trainer.default_root_dir {self.trainer.default_root_dir} moves only what the config leaves to "
                    f"Lightning; the config sets these folders itself, and they stay: {'; '.join(outside)} (set "
                    "them too, e.g. --trainer.logger.init_args.save_dir, or in a copy of the config)")

    def _write_predictions(self) -> None:
        """``predict`` with no ``BasePredictionWriter`` among the callbacks (a checkpoint alone, as in
        ``predict --ckpt_path P --data.predict_images DIR``, or a config without one) would compute
        every proposal and keep none: a :class:`ProposalWriter` into ``<default_root_dir>/proposals``."""
        if self.subcommand != "predict" or any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            return
        output_dir = Path(self.trainer.default_root_dir) / "proposals"
        self.trainer.callbacks.append(ProposalWriter(str(output_dir), top_k=None))  # every proposal the model returns
        _notice(f"no ProposalWriter among the callbacks, so predict writes its proposals into {output_dir} "
                "(a lightning_rpn.training.proposal_writer.ProposalWriter callback chooses the folder, formats and top_k)")

    def _report_wandb(self) -> None:
        if not any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            return
        import wandb

        if wandb.run is not None and wandb.run.offline:
            folder = Path(wandb.run.dir).parent
            # a resumed run logged into a folder per fit: naming this one alone left the earlier ones' history out
            segments = sorted(folder.parent.glob(f"offline-run-*-{wandb.run.id}"))
            which = (f"{folder.parent / f'offline-run-*-{wandb.run.id}'} (its {len(segments)} folders, one per fit, "
                     "in order)" if len(segments) > 1 else str(folder))
            print(f"lightning-rpn: W&B logged offline; upload with: wandb sync {which}", file=sys.stderr)

    def before_fit(self) -> None:
        """Find and check the checkpoint it resumes (:func:`evaluation_checkpoint`: ``best`` and ``hpc``
        are found on disk, with a notice, or refused; :meth:`_read_checkpoint`), never let a new run
        overwrite another run's checkpoints (:func:`check_checkpoint_dirs`: a fit from a checkpoint
        that is not the latest of its run, such as ``best.ckpt``, is a new run,
        :func:`start_new_run_files`), ready a W&B logger (:meth:`_prepare_wandb`) to go on logging
        to the run of a continued checkpoint (:func:`continue_wandb_run`), and say when the
        checkpoint has already reached the budget (:func:`warn_if_budget_reached`) and when
        ``last.ckpt`` would lag behind (:func:`warn_if_last_waits_for_best`).

        Lightning's "Checkpoint directory ... exists and is not empty" warning is left out: the
        folder holds either the run being resumed or files that stay, which the check names.
        """
        section = self.config_init["fit"]
        named = section.get("ckpt_path")
        try:
            path = evaluation_checkpoint(self.trainer, named, "fit")
            checkpoint = self._read_checkpoint(path, "fit")  # its callbacks' record and counters; mapped, not read
            continued = set() if checkpoint is None else continued_folders(self.trainer, checkpoint, path)
            if named in ("best", "hpc") and path != named:
                _notice(f"--ckpt_path {named} is {path}")
            if checkpoint is not None and not continued:
                _notice(f"fit from {path}, which is not the latest checkpoint of the run that saved it (its "
                        "last*.ckpt): a new run from these weights and training state, whose checkpoints do not "
                        "replace that run's")
            if not self.trainer.fast_dev_run:  # which saves no checkpoint
                check_checkpoint_dirs(self.trainer, continued)
        except ValueError as error:  # no such checkpoint, a folder it may not overwrite or cannot write: one line
            raise _Refusal(str(error)) from error
        self._check_checkpoint(checkpoint, path, fitting=True)
        section["ckpt_path"] = path
        if checkpoint is not None:  # before W&B or any run file: a budget it cannot resume is refused here
            warn_if_budget_reached(self.trainer, checkpoint, path)
        if checkpoint is not None and not continued:
            start_new_run_files(self.trainer)
        self._say_when_last_starts_afresh(path)
        self._prepare_wandb()
        run_id = continue_wandb_run(self.trainer, path) if continued else None
        if run_id is not None:
            _notice(f"the checkpoint was logged to W&B run {run_id}: this run goes on logging there "
                    "(--trainer.logger.init_args.id names another)")
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        warn_if_last_waits_for_best(self.trainer)

    def _say_when_last_starts_afresh(self, resolved: str | None) -> None:
        """``fit --ckpt_path last`` with no ``last*.ckpt`` yet (``resolved`` is still ``"last"``) starts
        from the beginning (the README's way to run a job that may or may not resume): one line
        saying so, instead of Lightning's warning whose hint (``save_last=True`` on a monitored
        checkpoint) is the layout that loses ``last.ckpt``
        (:func:`~lightning_rpn.training.run_files.warn_if_last_waits_for_best`)."""
        if resolved != "last":
            return
        try:
            folders, _ = newest_checkpoint(self.trainer, "last", "lightning-rpn fit")
        except ValueError:  # no checkpoint folder in the config: Lightning's own resolution and warning
            return
        warnings.filterwarnings("ignore", message=r".*there is no last checkpoint available")
        _notice(f"--ckpt_path last: no last*.ckpt in {', '.join(map(str, folders))} yet, so this run "
                "starts from the beginning")

    def after_fit(self) -> None:
        self._validate_final_weights()
        self._report_wandb()

    def _validate_final_weights(self) -> None:
        """Validate the final weights when fit ended between validations.

        A budget that ends off the validation cadence (``--trainer.max_steps`` not a multiple
        of the epoch, a resumed run given a new budget, ``check_val_every_n_epoch``) would
        otherwise end with no recall of the weights it saved as ``last.ckpt``. Skipped when fit
        was interrupted or has no validation data; ``best.ckpt`` stays the best of the
        validations made during fit.
        """
        trainer, model = self.trainer, self.model
        validated = getattr(model, "last_recall_step", None)
        if (trainer.interrupted or not trainer.enable_validation or validated == trainer.global_step
                or not getattr(self.datamodule, "has_val_split", True)):
            return
        if trainer.is_global_zero:
            last = "no validation in this run" if validated is None else f"last validated at step {validated}"
            print(f"lightning-rpn fit: ended at step {trainer.global_step} ({last}); validating the final weights",
                  file=sys.stderr)
        trainer.validate(model, datamodule=self.datamodule, verbose=False)

    def _write_summary(self, command: str) -> None:
        path = write_metrics_summary(self.trainer, self.model, self.datamodule, command)
        if path is not None:
            print(f"lightning-rpn {command}: metrics written to {path}", file=sys.stderr)

    def _before_evaluation(self) -> None:
        """Refuse ``validate`` / ``test`` / ``predict`` without the split they run on, resolve their
        ``--ckpt_path`` keyword (:meth:`_resolve_checkpoint_keyword`), ready a W&B logger
        (:meth:`_prepare_wandb`)."""
        self._require_evaluation_split()
        self._resolve_checkpoint_keyword()
        self._prepare_wandb()

    def _prepare_wandb(self) -> None:
        """Ready a ``WandbLogger`` before its run starts (its folder made, no warnings the user cannot
        act on: :func:`~lightning_rpn.training.wandb_mode.prepare_wandb_logger`); only for a command
        that runs, so that ``check-data`` or a parsed config makes no folder. The folders it makes are
        recorded, for :meth:`_remove_made_folders`."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                if logger.save_dir is not None:
                    self._made_folders += reversed(_missing_folders(Path(logger.save_dir)))
                prepare_wandb_logger(logger)

    def _remove_made_folders(self) -> None:
        """Remove the folders :meth:`_prepare_wandb` made that are still empty, last made first: a
        command that fails before its W&B run starts (``prepare_data`` refusing a data root without
        the dataset) leaves no folder behind. A folder that existed before the command, or that holds
        anything (the run's files), stays."""
        for folder in reversed(self._made_folders):
            try:
                folder.rmdir()  # only an empty folder
            except OSError:
                pass
        self._made_folders = []

    def _require_evaluation_split(self) -> None:
        """A :class:`_Refusal` naming the setting when the config gives the command no split (``test``
        without ``data.test_split``): the data module's own error came as a traceback from the loader."""
        role, data = EVALUATION_ROLES[self.subcommand], self.datamodule
        if data.splits[role] is not None or (role == "predict" and data.predict_images is not None):
            return
        fix = ("--data.predict_split NAME (default: the val split) or --data.predict_images DIR"
               if role == "predict" else f"--data.{role}_split NAME")
        raise _Refusal(f"lightning-rpn {self.subcommand}: the config gives no {role} split to run on; "
                       f"set one in its data section or pass {fix}")

    def _resolve_checkpoint_keyword(self) -> None:
        """``--ckpt_path best`` / ``last`` / ``hpc`` of ``validate`` / ``test`` / ``predict`` found on disk
        and checked (:meth:`_read_checkpoint`), or refused
        (:func:`~lightning_rpn.training.run_files.evaluation_checkpoint`: its ``ValueError`` names the
        keyword and the folders, a :class:`_Refusal`): never the recall of untrained weights."""
        section = self.config_init[self.subcommand]
        try:
            section["ckpt_path"] = evaluation_checkpoint(self.trainer, section.get("ckpt_path"), self.subcommand)
            checkpoint = self._read_checkpoint(section["ckpt_path"], self.subcommand)
        except ValueError as error:
            raise _Refusal(str(error)) from error
        self._check_checkpoint(checkpoint, section["ckpt_path"], fitting=False)

    def _check_checkpoint(self, checkpoint: dict[str, Any] | None, path: str | None, fitting: bool) -> None:
        """Refuse a checkpoint trained as another network, or resumed with another optimiser, before
        the run starts (``RPNModule.check_checkpoint``): Lightning starts the loggers (a W&B run) before
        it loads the checkpoint. A module of one's own is checked by its own loading, if at all."""
        if checkpoint is not None and isinstance(self.model, RPNModule):
            self.model.check_checkpoint(checkpoint, path, fitting)

    before_validate = before_test = _before_evaluation

    def before_predict(self) -> None:
        """As ``validate`` / ``test`` (:meth:`_before_evaluation`), and no predictions kept in memory
        when a writer streams them to disk (:meth:`_stream_predictions`)."""
        self._before_evaluation()
        self._stream_predictions()

    def _stream_predictions(self) -> None:
        """``return_predictions=False`` for a ``predict`` with a ``BasePredictionWriter`` among the callbacks
        (always, since :meth:`_write_predictions`), unless ``--return_predictions`` is given: Lightning's
        default keeps every batch's predictions until predict ends (about 23 KB an image at 1000
        proposals, gigabytes for a large dataset) although the writer has them on disk and the command
        returns nothing. A writer with ``write_interval="epoch"`` still gets them: Lightning keeps them for it."""
        section = self.config_init["predict"]
        if section.get("return_predictions") is None and any(
                isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            section["return_predictions"] = False

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; for ``validate`` / ``test`` / ``predict``, without Lightning's warning that
        the checkpoint's callbacks (``ModelCheckpoint``, ...) are missing: their states only matter to a
        ``fit`` that resumes, which keeps the warning. Trainer settings that a Lightning loop refuses
        once it sees the data (:func:`_refused_by_loop_setup`: ``val_check_interval`` beyond an
        epoch) are a :class:`SettingError`, as those refused while the trainer is built. A command that
        fails leaves none of the empty folders it made (:meth:`_remove_made_folders`)."""
        try:
            if subcommand not in EVALUATION_ROLES:
                super()._run_subcommand(subcommand)
                return
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_MISSING_CALLBACKS_WARNING)
                super()._run_subcommand(subcommand)
        except BaseException as error:
            self._remove_made_folders()
            if not (isinstance(error, _TRAINER_REFUSALS) and _refused_by_loop_setup(error)):
                raise
            reason = " ".join(str(error).split())
            raise SettingError(f"Lightning refused the trainer settings when {subcommand} set up its data: {reason} "
                               "-- change the one at fault in the config's trainer section or with "
                               "--trainer.NAME VALUE") from error

    def after_validate(self) -> None:
        self._after_evaluation("validate")

    def after_test(self) -> None:
        self._after_evaluation("test")

    def after_predict(self) -> None:
        self._after_evaluation("predict")

    def _after_evaluation(self, command: str) -> None:
        """The run's config (written here when no batch ran, :meth:`ResolvedConfigCallback.write_once`),
        metrics summary and W&B line."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, ResolvedConfigCallback):
                callback.write_once(self.trainer, self.model)
        self._write_summary(command)
        self._report_wandb()


class _NoRunCLI(RPNLightningCLI):
    """Parses the same config as ``fit`` (no subcommand) for a command that logs nothing and
    trains nothing (no pretrained weights downloaded). ``command`` and ``description`` head its ``--help``."""

    command = ""
    description = ""

    def _checkpoint_holds_the_weights(self) -> bool:
        return True  # no weights are used at all

    def before_instantiate_classes(self) -> None:
        """No W&B notice: nothing is logged. The trainer is built, so no progress-bar conflict either."""
        _drop_progress_bars(self._run_config()["trainer"])


class _CheckDataCLI(_NoRunCLI):
    """``check-data``: the ``fit`` config plus the report options."""

    command = "check-data"
    description = ("Check every configured split (images, boxes, their sizes and the anchors' coverage of "
                   "them) without training; exit 1 on errors. Takes the config of `fit`.")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--check_images",
            type=bool,
            default=True,
            help="check-data: decode every image (finds missing, corrupt, truncated, mis-sized files).",
        )
        parser.add_argument("--list_all", action=ActionYesNo, default=False,
                            help="check-data: print every problem (default: the first 20 of each split).")
        parser.add_argument("--report", type=str | None, default=None,
                            help="check-data: also write every problem to this .json (the whole report) "
                            "or .csv (one row per problem) file.")
        parser.add_argument("--force", action=ActionYesNo, default=False,
                            help="check-data: replace an existing --report file.")
        parser.add_argument("--strict", action=ActionYesNo, default=False,
                            help="check-data: exit 1 on warnings too (boxes slightly outside the image, "
                            "which training clips).")


def _parse_only(cli_class: type[_NoRunCLI], args: Sequence[str]) -> RPNLightningCLI:
    """Parse the ``fit`` config plus a subcommand's options; build model and data, run nothing."""
    parser_kwargs = {"prog": f"lightning-rpn {cli_class.command}", "description": cli_class.description}
    with warnings.catch_warnings():
        # the argv tail is passed on purpose (without the subcommand); LightningCLI warns about it
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        return cli_class(args=args, run=False, save_config_callback=None, parser_kwargs=parser_kwargs)


CHECKED_ROLES = ("train", "val", "test", "predict")
"""The split roles ``check-data`` reports on (those the config gives; predict: the ``data.predict_images``
folder, else a ``data.predict_split`` other than the splits above)."""


def check_data(args: Sequence[str]) -> int:
    """``lightning-rpn check-data``: report on every configured split; exit 1 on errors.

    Reads the same config as ``fit`` (``--config FILE``, ``--data.*`` overrides); the splits
    are checked by :meth:`RPNDataModule.check_data` with the model's anchor setup, so the report
    has the anchors' coverage of the boxes (the model is built without its pretrained weights).
    Warnings (repairs that training makes on its own) exit 0 unless ``--strict``. ``--list_all``
    prints every problem, ``--report FILE.json|FILE.csv`` writes them all (an existing file only
    with ``--force``; the path is checked before the data: exit 2 when it cannot be written).
    """
    from lightning_rpn.data.validation import report_path
    from lightning_rpn.tools.anchor_analysis import head_coverage_note

    cli = _parse_only(_CheckDataCLI, args)
    try:
        path = report_path(cli.config["report"], overwrite=cli.config["force"]) if cli.config["report"] else None
    except ValueError as error:
        print(f"lightning-rpn {error}", file=sys.stderr)
        return USAGE_ERROR
    report = cli.datamodule.check_data(cli.model, splits=CHECKED_ROLES, check_images=cli.config["check_images"])
    report.coverage_note = head_coverage_note(cli.model)
    report.max_listed = None if cli.config["list_all"] else report.max_listed
    summary = f"{report.num_errors} error(s), {report.num_warnings} warning(s)"
    if report.num_errors:
        policy = cli.datamodule.hparams.get("on_bad_annotation", "raise")
        summary += (f" (the actions listed are check-data's, which reads on to list every problem; fit with "
                    f"data.on_bad_annotation={policy!r} {_POLICY_EFFECT[policy]})")
    if path is not None:
        summary += f"; every problem written to {report.write(path)}"
    report.print()
    print(f"lightning-rpn check-data: {summary}", file=sys.stderr)
    return int(report.num_errors > 0 or (cli.config["strict"] and report.num_warnings > 0))


_POLICY_EFFECT = {"raise": "stops at the first error", "skip": "skips each as listed",
                  "clip": "clips what clipping repairs and skips the rest"}
"""What ``fit`` does with the errors ``check-data`` lists, by ``data.on_bad_annotation``."""


class _AnalyzeAnchorsCLI(_NoRunCLI):
    """``analyze-anchors``: the ``fit`` config plus the anchor-analysis options."""

    command = "analyze-anchors"
    description = ("How well the model's anchors cover a split's boxes (the recall ceiling they impose on the plain "
                   "RPN head), "
                   "and with --optimize a better design at the same anchor count. Takes the config of `fit`.")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--optimize",
            action=ActionYesNo,
            default=False,
            help="analyze-anchors: also search anchor sizes and ratios per level (sizes only for model.head: cascade, "
            "which keeps one square anchor per location) at the same anchor count "
            "(from the current design, a k-means and a quantile fit of the box shapes, improved one value at a "
            "time on the boxes' exact coverage, never lowering the coverage at IoU 0.5, 0.7 or the model's "
            "fg_iou) and write the config snippet anchors.yaml.",
        )
        parser.add_argument("--output_dir", type=str, default="anchor_analysis",
                            help="analyze-anchors: where the plot, report and snippet go.")
        parser.add_argument("--force", action=ActionYesNo, default=False,
                            help="analyze-anchors: replace the files of an earlier run in --output_dir "
                            "(without it, any of them there is an error before the analysis).")
        parser.add_argument("--split", type=str, default="train",
                            help="analyze-anchors: the split whose gt boxes are analysed: a role (train, val, "
                            "test, predict) or the split name the config gives one (e.g. val2017).")
        parser.add_argument("--max_images", type=int | None, default=None,
                            help="analyze-anchors: analyse at most this many images.")
        parser.add_argument("--anchor_seed", type=int, default=0,
                            help="analyze-anchors: seed of the --optimize search (its k-means start and "
                            "box sample).")


def analyze_anchors(args: Sequence[str]) -> int:
    """``lightning-rpn analyze-anchors``: anchor coverage of a split's boxes, optionally a better design.

    Reads the same config as ``fit``; see :func:`lightning_rpn.tools.anchor_analysis.run_analyze_anchors`.
    Files of an earlier run in ``--output_dir`` (or a hand-written ``anchors.yaml``, with
    ``--optimize``) are replaced only with ``--force``; otherwise exit 2 before the analysis. A
    ``--split`` the config does not give, or one without boxes, exits 2 with one line; data that
    cannot be read (a missing annotation file) exits 1 with one line, as ``check-data``'s errors.
    """
    from lightning_rpn.data.problems import DataError
    from lightning_rpn.tools.anchor_analysis import AnalysisInputError, output_paths, run_analyze_anchors

    cli = _parse_only(_AnalyzeAnchorsCLI, args)
    try:
        output_paths(cli.config["output_dir"], cli.config["optimize"], overwrite=cli.config["force"])
    except (ValueError, FileExistsError) as error:
        print(f"lightning-rpn {error}", file=sys.stderr)
        return USAGE_ERROR
    try:
        run_analyze_anchors(
            cli.model,
            cli.datamodule,
            optimize=cli.config["optimize"],
            output_dir=cli.config["output_dir"],
            split=cli.config["split"],
            max_images=cli.config["max_images"],
            seed=cli.config["anchor_seed"],
            overwrite=cli.config["force"],
        )
    except AnalysisInputError as error:
        print(f"lightning-rpn {error}", file=sys.stderr)
        return USAGE_ERROR
    except DataError as error:
        print(f"lightning-rpn analyze-anchors: {error} (`lightning-rpn check-data` reports every problem)",
              file=sys.stderr)
        return 1
    return 0


def _replace_unencodable_output() -> None:
    """Characters the console's encoding lacks (a cp1252 Windows console or redirect: table lines,
    '×') print as '?' rather than raise after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if callable(getattr(stream, "reconfigure", None)) and not encoding.startswith("utf"):
            stream.reconfigure(errors="replace")


def _data_error_message(error: DataError) -> str:
    """``error`` 's own message: one raised in a DataLoader worker comes back with the worker's whole
    traceback as its message (torch's ``ExceptionWrapper``), whose last line is the message."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


_RUN_PROCESSES = [1]
"""The processes of this command's run (``trainer.world_size``), kept as its trainer is built:
Lightning's ``WORLD_SIZE`` variable is gone by the time an error reaches :func:`main` (its
cluster environment's teardown removes it)."""


def _several_processes() -> bool:
    return max(_RUN_PROCESSES[0], int(os.environ.get("WORLD_SIZE", "1"))) > 1


def _rank_prefix() -> str:
    """``"[rank k] "`` under several processes: each prints its own data error (only one may have hit it)."""
    return f"[rank {rank_zero_only.rank}] " if _several_processes() else ""


def _report_interruption(error: BaseException) -> int | None:
    """When ``error`` comes from Ctrl-C or SIGTERM (:func:`interruption_of`), print where ``fit``
    stopped and what ``last.ckpt`` holds (rank zero), and return the shell's status of a process
    killed by that signal (130, 143): a ``fit && test`` chain or a scheduler must not take an
    interrupted run for a finished one. ``None`` for any other error."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_rpn.training.last_checkpoint import Interruption, interruption_of

    names = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
    stop = interruption_of(error)
    if stop is None:
        return None
    if isinstance(stop, Interruption):
        signum = stop.signal
        where, rerun = ((" in a validation", " (it runs the interrupted validation again first)")
                        if stop.in_validation else ("", ""))
        saved = (f"{stop.path} holds step {stop.saved_step}: continue with `--ckpt_path last`{rerun}" if stop.path
                 else "no last.ckpt was saved in this run")
        line = f"fit interrupted ({names[signum]}) at step {stop.step}{where}; {saved}"
    else:
        signum = signal.SIGTERM if isinstance(stop, SIGTERMException) else signal.SIGINT
        line = f"interrupted ({names[signum]})"
    if rank_zero_only.rank == 0:
        print(f"lightning-rpn: {line}", file=sys.stderr)
    return 128 + signum


def _refuse_setting(error: SettingError) -> int:
    """A setting that cannot work as given (its message names it, e.g. ``data.train_transforms[1]``
    or ``model.weights``, and says what to do), printed as one line like any other refused
    setting: :data:`USAGE_ERROR`, not a traceback through Lightning and the constructors."""
    if rank_zero_only.rank == 0:
        print(f"lightning-rpn: {error}", file=sys.stderr)
    return USAGE_ERROR


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-rpn`` console script.

    ``--config`` takes a file or a built-in config name (``--config shapes``; a local
    ``shapes.yaml`` wins, with a notice); ``lightning-rpn configs list`` / ``configs copy NAME
    [DEST]`` list the built-in configs and write one out. A command refused before it starts,
    or a :class:`~lightning_rpn.core.config.SettingError` (a transform spec that cannot run,
    weights that cannot be downloaded, an optimiser that cannot train at the precision, trainer
    settings Lightning refuses, such as a GPU accelerator on a machine without one), prints
    one line and returns :data:`USAGE_ERROR`.
    """
    from lightning_rpn.tools.config_files import config_problem, configs_command, resolve_config_args

    _replace_unencodable_output()
    given = sys.argv[1:] if args is None else args
    problem = config_problem(given)
    if problem is not None:
        print(f"lightning-rpn: {problem}", file=sys.stderr)
        return USAGE_ERROR
    argv = resolve_config_args(given, notice=_notice)
    subcommands = {"check-data": check_data, "analyze-anchors": analyze_anchors, "configs": configs_command}
    if argv and argv[0] in subcommands:
        try:
            return subcommands[argv[0]](argv[1:])
        except SettingError as error:  # check-data and analyze-anchors build the data module too
            return _refuse_setting(error)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads the console script's own argv (no "args" warning)
    _RUN_PROCESSES[0] = 1  # until this command's trainer is built
    try:
        RPNLightningCLI(args=None if args is None else argv)
    except _Refusal as refusal:
        if rank_zero_only.rank == 0:
            print(refusal, file=sys.stderr)
        return USAGE_ERROR
    except SettingError as error:
        return _refuse_setting(error)
    except DataError as error:  # its message names the file, image and annotation: a traceback adds nothing
        print(f"lightning-rpn: {_rank_prefix()}{_data_error_message(error)}\n"
              "(`lightning-rpn check-data --config ...`, given the same --data options, lists every problem of the "
              "data)", file=sys.stderr)
        return DATA_ERROR
    except BaseException as error:  # Ctrl-C, SIGTERM: one line and 128 + the signal, not 0 or tracebacks
        code = _report_interruption(error)
        if code is not None:
            return code
        if _peer_failed(error):
            print(f"lightning-rpn: {_rank_prefix()}stopped: another process of this run failed, and its message "
                  f"says why ({first_line(error)})", file=sys.stderr)
            return 1
        if _wandb_refused(error):
            print(f"lightning-rpn: W&B: {first_line(error)} (run `wandb login`, or set WANDB_MODE=offline to log "
                  "locally and `wandb sync` the run folder later)", file=sys.stderr)
            return USAGE_ERROR
        if isinstance(error, OSError) and error.errno in _UNWRITABLE:
            print(f"lightning-rpn: {_rank_prefix()}{_unwritable_message(error)}", file=sys.stderr)
            return 1
        raise
    return 0


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""A file could not be written whole: the disk, the quota or the file-size limit is reached."""
_UNWRITABLE = (*_FULL, errno.EROFS, errno.EACCES, errno.EPERM)
"""... or a file could not be made or opened: the folder is read-only, or its permissions say no."""


def _unwritable_message(error: OSError) -> str:
    """One line for a file the run could not write (or read): its reason and path (a traceback adds
    nothing to "disk full")."""
    where = f": {error.filename}" if error.filename else ""
    remedy = "free some space" if error.errno in _FULL else "check the file's and its folder's permissions"
    return (f"{error.strerror or error}{where}; {remedy}, or write the run to another folder "
            "(--trainer.default_root_dir, and the checkpoint callbacks' dirpath)")


_PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""How gloo (and NCCL) word the collective a process was in when another process of the run died."""


def _peer_failed(error: BaseException) -> bool:
    """Whether ``error`` is this process's collective failing because another process of a
    multi-process run stopped (that one prints its own error, e.g. a bad image only it read):
    one line here, instead of a 100-230 line traceback printed twice (torch's ``[rankN]:`` copy)."""
    if not _several_processes():
        return False
    distributed_error = getattr(torch.distributed, "DistError", ())
    return isinstance(error, distributed_error) or (
        isinstance(error, RuntimeError) and any(words in str(error) for words in _PEER_FAILURES)
    )


def _wandb_refused(error: BaseException) -> bool:
    """Whether ``error`` is W&B refusing to start a run (``WANDB_MODE=online`` without an API key,
    an unknown entity): its message says what to do, a traceback adds nothing."""
    from wandb.errors import UsageError

    return isinstance(error, UsageError)



if __name__ == "__main__":
    sys.exit(main())
