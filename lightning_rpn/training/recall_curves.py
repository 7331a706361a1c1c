"""Recall curves: recall vs IoU threshold and AR vs number of proposals, as a figure and per logger.

The callback reads the LightningModule's ``last_recall_curves`` (see
:mod:`~lightning_rpn.training.callbacks`); where it writes is :mod:`~lightning_rpn.training.log_targets`.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure

from lightning_rpn.training.log_targets import (
    announce_folder,
    evaluated_counters,
    evaluation_files,
    evaluation_name,
    evaluation_stage,
    file_loggers,
    loaded_checkpoint,
    log_dir,
    reporting,
)
from lightning_rpn.training.run_files import free_version, repeated_name, versioned

__all__ = ["RecallCurves", "recall_curves_figure"]


def recall_curves_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> Figure:
    """Two panels: recall vs IoU threshold, and AR vs number of proposals (log x)."""
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax_iou, ax_k = fig.subplots(1, 2)
    ious, recalls = curves["recall_vs_iou"]
    ax_iou.plot(ious, recalls, marker="o")
    ax_iou.set(xlabel="IoU threshold", ylabel="recall", title="Recall vs IoU", ylim=(0, 1.02))
    budgets, ars = curves["recall_vs_proposals"]
    ax_k.plot(budgets, ars, marker="o")
    ax_k.set_xscale("log")
    ax_k.set(xlabel="proposals per image", ylabel="AR", title="AR vs proposals", ylim=(0, 1.02))
    for ax in (ax_iou, ax_k):
        ax.grid(alpha=0.3)
    return fig


def _csv_path(path: Path, header: list[str]) -> Path:
    """``path``, or ``path`` with ``-v1``, ``-v2``, ...: the first that is new or starts with ``header``,
    so that rows are never appended to a CSV of other columns."""

    def other_layout(version: int) -> list[Path]:
        candidate = versioned(path, version)
        if not candidate.exists():
            return []
        with candidate.open(newline="") as f:
            return [] if next(csv.reader(f), None) == header else [candidate]

    return versioned(path, free_version(other_layout)[0])


class RecallCurves(Callback):
    """Logs recall vs IoU and AR vs number of proposals after every validation / test epoch.

    W&B: line plots ``{stage}/recall_vs_iou`` and ``{stage}/recall_vs_proposals``
    (``wandb.plot.line`` over a ``wandb.Table``). TensorBoard: a matplotlib figure
    ``{stage}/recall_curves``. Other loggers / none: rows appended to
    ``recall_curves/{stage}_recall_vs_iou.csv`` and ``..._recall_vs_proposals.csv`` (columns
    epoch, step, checkpoint, x, y; ``checkpoint`` is the file a ``validate`` / ``test`` loaded,
    empty for the weights of a ``fit``; each ``fit`` has CSV files of its own, ``-v1``, ... when
    an earlier run's are there, which its checkpoints record so that a resumed ``fit`` goes on
    in them) and a PNG of the figure per evaluation under the log
    directory: ``{stage}_epoch{E:03d}_step{S}.png`` in ``fit``, ``{stage}-{checkpoint stem}.png``
    for a loaded checkpoint (:func:`~lightning_rpn.training.log_targets.evaluation_name`). No
    file is replaced: the PNG gets ``.2``, ``.3``, ... when an earlier run left one of the
    evaluation's outputs under that name, the number every output of the evaluation takes
    (its metrics summary, proposal files and images:
    :func:`~lightning_rpn.training.run_files.output_repeat`), and a CSV of another layout
    (an older version's) is left as it is, the rows going to ``..._recall_vs_iou-v1.csv``. The
    folder is printed on stderr the first time it is written.

    Args:
        save_png: write the PNG next to the CSV files.
    """

    def __init__(self, save_png: bool = True) -> None:
        self.save_png = save_png
        self._announced: set[Path] = set()
        self._fit_csv_names: dict[str, str] = {}  # this fit's CSV file name per base name
        self._fitted = False  # a fit ran: a later evaluation of the weights in the process is its

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # before a resumed fit's checkpoint restores them
            self._fit_csv_names = {}
            self._fitted = True

    def state_dict(self) -> dict[str, dict[str, str]]:
        return {"fit_csv_names": dict(self._fit_csv_names)}

    def load_state_dict(self, state_dict: dict[str, dict[str, str]]) -> None:
        self._fit_csv_names = dict(state_dict.get("fit_csv_names", {}))

    def _fit_csv_path(self, base: Path) -> Path:
        """This fit's CSV for ``base``: the file it began (a resumed fit's, from its checkpoint),
        else the first of ``base``, ``-v1``, ... that no earlier run wrote."""
        name = self._fit_csv_names.get(base.name)
        if name is None:
            name = versioned(base, free_version(lambda version: [versioned(base, version)])[0]).name
            self._fit_csv_names[base.name] = name
        return base.with_name(name)

    def _fit_weights(self, trainer: Trainer) -> bool:
        """Whether the evaluation is of this fit's weights: during it, or after it with no checkpoint
        loaded (the CLI validates the final weights of a fit that ended between validations)."""
        return trainer.state.fn == TrainerFn.FITTING or (self._fitted and loaded_checkpoint(trainer) is None)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not reporting(trainer):
            return
        curves = getattr(pl_module, "last_recall_curves", None)
        if not curves:
            rank_zero_warn(f"RecallCurves: {type(pl_module).__name__}.last_recall_curves is empty")
            return
        stage, (_, step) = evaluation_stage(trainer), evaluated_counters(trainer)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, curves, stage, step)
            elif isinstance(logger, TensorBoardLogger):
                fig = recall_curves_figure(curves)
                logger.experiment.add_figure(f"{stage}/recall_curves", fig, global_step=step)
        for logger in file_loggers(trainer):
            self._write_files(log_dir(trainer, logger) / "recall_curves", curves, stage, trainer)

    @staticmethod
    def _log_wandb(logger: WandbLogger, curves: Mapping, stage: str, step: int) -> None:
        import wandb

        ious, recalls = curves["recall_vs_iou"]
        budgets, ars = curves["recall_vs_proposals"]
        iou_table = wandb.Table(
            columns=["iou", "recall"], data=[list(r) for r in zip(ious, recalls, strict=True)]
        )
        k_table = wandb.Table(
            columns=["proposals", "AR"], data=[list(r) for r in zip(budgets, ars, strict=True)]
        )
        charts = {
            f"{stage}/recall_vs_iou": wandb.plot.line(
                iou_table, "iou", "recall", title=f"{stage}: recall vs IoU (top {budgets[-1]})"
            ),
            f"{stage}/recall_vs_proposals": wandb.plot.line(
                k_table, "proposals", "AR", title=f"{stage}: AR vs proposals per image"
            ),
        }
        logger.log_metrics(charts, step=step)

    def outputs_at(self, trainer: Trainer, repeat: int) -> list[Path]:
        """The PNGs it writes for ``trainer``'s evaluation at ``repeat``, what
        :func:`~lightning_rpn.training.run_files.output_repeat` asks every callback."""
        if not self.save_png:
            return []
        png = f"{repeated_name(evaluation_name(trainer), repeat)}.png"
        return [log_dir(trainer, logger) / "recall_curves" / png for logger in file_loggers(trainer)]

    def _write_files(self, folder: Path, curves: Mapping, stage: str, trainer: Trainer) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (epoch, step), checkpoint = evaluated_counters(trainer), loaded_checkpoint(trainer) or ""
        written = []
        for name, columns in (("recall_vs_iou", ["iou", "recall"]), ("recall_vs_proposals", ["proposals", "AR"])):
            header = ["epoch", "step", "checkpoint", *columns]
            base = folder / f"{stage}_{name}.csv"
            path = self._fit_csv_path(base) if self._fit_weights(trainer) else _csv_path(base, header)
            new = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(header)
                for x, y in zip(*curves[name], strict=True):
                    writer.writerow([epoch, step, checkpoint, x, y])
            written.append(path.name)
        if self.save_png:
            _, (png,) = evaluation_files(trainer, lambda stem: [folder / f"{stem}.png"])
            recall_curves_figure(curves).savefig(png, dpi=100)
            written.insert(0, png.name)
        announce_folder(self._announced, folder, f"RecallCurves: recall curves written to {folder} "
                                                 f"({', '.join(written)})")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)

    on_test_end = on_validation_end

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The predicted split's curves, when it has gt boxes (a folder of images has none: nothing)."""
        if getattr(pl_module, "last_recall_curves", None):
            self._log(trainer, pl_module)
