"""Lightning callbacks: a recall table, recall curves and sample images with proposals.

Shapes: ``B`` images of a batch, ``G`` gt boxes and ``P`` proposals of an image.

They read what the LightningModule exposes (``RPNModule`` does; a user's module can too):

* ``last_recall: dict[str, float]``: ``ProposalRecall.compute()`` as floats, set at the end of
  each validation / test epoch (empty before the first one);
* ``last_recall_curves``: ``ProposalRecall.curves()`` of that epoch;
* ``validation_step`` / ``test_step`` return ``{"proposals": [(boxes [P, 4], scores [P]), ...]}``
  in the batch's (resized, unpadded) image pixels, best first, on a batch with the
  ``RPNBatch`` fields ``images`` (uint8 ``[B, 3, H, W]``), ``image_sizes``, ``image_ids`` and
  ``gt_boxes``.

Everything happens on global rank 0 only and never during the sanity check. Where things go,
per logger: ``WandbLogger`` gets W&B line plots and ``wandb.Image`` s with box overlays,
``TensorBoardLogger`` matplotlib figures and ``add_image_with_boxes``, any other logger (CSV,
...) or no logger CSV files and PNGs under its log directory.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.nn.functional import pad
from torchvision.utils import draw_bounding_boxes

__all__ = ["ProposalImages", "RecallCurves", "RecallTable", "recall_curves_figure", "recall_table"]

GT_COLOR = "#00d000"
PROPOSAL_COLOR = "#ff3030"


def _reporting(trainer: Trainer) -> bool:
    return trainer.is_global_zero and not trainer.sanity_checking


def _stage(trainer: Trainer) -> str:
    return "test" if trainer.state.fn == TrainerFn.TESTING else "val"


def _log_dir(trainer: Trainer, logger: Logger | None) -> Path:
    """Where files for ``logger`` go: its ``log_dir`` / ``save_dir``, else the trainer's root."""
    for attr in ("log_dir", "save_dir"):
        value = getattr(logger, attr, None) if logger is not None else None
        if value:
            return Path(value)
    return Path(trainer.default_root_dir)


def _file_loggers(trainer: Trainer) -> list[Logger | None]:
    """The loggers that get files rather than logger-native media (``[None]`` without loggers)."""
    if not trainer.loggers:
        return [None]
    return [lg for lg in trainer.loggers if not isinstance(lg, (WandbLogger, TensorBoardLogger))]


# ------------------------------------------------------------------------------ recall table


def recall_table(
    recall: Mapping[str, float], recall_thresholds: Sequence[float] = (0.5, 0.7), title: str = ""
) -> Table:
    """A rich table of ``ProposalRecall.compute()`` values: one row per k, AR per area range
    and recall at ``recall_thresholds``. Ranges without gt boxes (value -1) show "-"."""
    budgets = sorted({int(m.group(1)) for key in recall if (m := re.fullmatch(r"AR@(\d+)", key))})
    areas = list(
        dict.fromkeys(m.group(1) for key in recall if (m := re.fullmatch(r"AR_(.+)@\d+", key)))
    )
    columns = ["AR", *(f"AR_{area}" for area in areas), *(f"R@{t:.2f}" for t in recall_thresholds)]
    table = Table(title=title or None)
    table.add_column("top-k", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for k in budgets:
        keys = [
            f"AR@{k}",
            *(f"AR_{area}@{k}" for area in areas),
            *(f"recall@{t:.2f}@{k}" for t in recall_thresholds),
        ]
        cells = [
            "-" if key not in recall or recall[key] < 0 else f"{recall[key]:.3f}" for key in keys
        ]
        table.add_row(str(k), *cells)
    return table


class RecallTable(Callback):
    """Prints the proposal-recall table (AR per k and area range, recall@t) with rich.

    Printed at the end of ``fit`` and of each ``validate`` / ``test`` run, from the module's
    ``last_recall``; with ``every_epoch=True`` also after every validation epoch during fit; at
    the end of ``predict`` when ``last_recall`` is set (``RPNModule``: the split has gt boxes).

    Args:
        recall_thresholds: IoU thresholds whose recall gets a column (must be among the
            metric's ``iou_thresholds``; missing ones show "-").
        every_epoch: also print after each validation epoch of ``fit``.
    """

    def __init__(
        self, recall_thresholds: Sequence[float] = (0.5, 0.7), every_epoch: bool = False
    ) -> None:
        self.recall_thresholds = tuple(float(t) for t in recall_thresholds)
        self.every_epoch = every_epoch

    def _print(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        if not _reporting(trainer):
            return
        recall = getattr(pl_module, "last_recall", None)
        if not recall:
            rank_zero_warn(
                f"RecallTable: {type(pl_module).__name__}.last_recall is empty; no table"
            )
            return
        title = (
            f"Proposal recall ({when}, epoch {trainer.current_epoch}, step {trainer.global_step})"
        )
        Console().print(recall_table(recall, self.recall_thresholds, title))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._print(trainer, pl_module, "validate")
        elif self.every_epoch:
            self._print(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer, pl_module, "test")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(pl_module, "last_recall", None):  # empty: the split has no gt boxes
            self._print(trainer, pl_module, "predict, original-image pixels")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(trainer, pl_module, "end of fit")


# ------------------------------------------------------------------------------ curves


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


class RecallCurves(Callback):
    """Logs recall vs IoU and AR vs number of proposals after every validation / test epoch.

    W&B: line plots ``{stage}/recall_vs_iou`` and ``{stage}/recall_vs_proposals``
    (``wandb.plot.line`` over a ``wandb.Table``). TensorBoard: a matplotlib figure
    ``{stage}/recall_curves``. Other loggers / none: rows appended to
    ``recall_curves/{stage}_recall_vs_iou.csv`` and ``..._recall_vs_proposals.csv`` (columns
    epoch, step, x, y) and a PNG of the figure per epoch under the log directory.

    Args:
        save_png: write the PNG next to the CSV files.
    """

    def __init__(self, save_png: bool = True) -> None:
        self.save_png = save_png

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not _reporting(trainer):
            return
        curves = getattr(pl_module, "last_recall_curves", None)
        if not curves:
            rank_zero_warn(f"RecallCurves: {type(pl_module).__name__}.last_recall_curves is empty")
            return
        stage, step = _stage(trainer), trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, curves, stage, step)
            elif isinstance(logger, TensorBoardLogger):
                fig = recall_curves_figure(curves)
                logger.experiment.add_figure(f"{stage}/recall_curves", fig, global_step=step)
        for logger in _file_loggers(trainer):
            self._write_files(_log_dir(trainer, logger) / "recall_curves", curves, stage, trainer)

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

    def _write_files(self, folder: Path, curves: Mapping, stage: str, trainer: Trainer) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        epoch, step = trainer.current_epoch, trainer.global_step
        for name, header in (
            ("recall_vs_iou", "iou,recall"),
            ("recall_vs_proposals", "proposals,AR"),
        ):
            path = folder / f"{stage}_{name}.csv"
            new = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["epoch", "step", *header.split(",")])
                for x, y in zip(*curves[name], strict=True):
                    writer.writerow([epoch, step, x, y])
        if self.save_png:
            fig = recall_curves_figure(curves)
            fig.savefig(folder / f"{stage}_epoch{epoch:03d}_step{step}.png", dpi=100)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module)


# ------------------------------------------------------------------------------ images


@dataclass
class _Sample:
    image: Tensor  # uint8 [3, H, W], cropped to the image size
    gt_boxes: Tensor  # [G, 4]
    boxes: Tensor  # [P, 4], best first
    scores: Tensor  # [P]
    image_id: Any


def _to_uint8(image: Tensor) -> Tensor:
    if image.dtype == torch.uint8:
        return image
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


class ProposalImages(Callback):
    """Logs the first ``num_images`` images of each validation / test epoch with their ground
    truth and top ``top_k`` proposals.

    W&B: ``{stage}/proposals``, a gallery of ``wandb.Image`` s (zero padded at the bottom / right
    to a common size) with box groups ``"ground_truth"`` and
    ``"proposals"`` (class labels "ground truth" / "proposal"; objectness as the box score
    ``"objectness"``, so the W&B slider filters by it). TensorBoard: ``add_image_with_boxes``
    per image (``{stage}/proposals/{i}``; proposals labelled with their objectness). Other
    loggers / none: PNGs drawn with ``torchvision.utils.draw_bounding_boxes`` (gt green,
    proposals red) in ``proposal_images/`` under the log directory.

    Args:
        num_images: images per epoch (the first ones of the epoch, on rank 0).
        top_k: proposals drawn per image (the best-scored ones).
    """

    def __init__(self, num_images: int = 8, top_k: int = 20) -> None:
        if num_images < 1 or top_k < 0:
            raise ValueError(
                f"ProposalImages: num_images must be >= 1 and top_k >= 0, got {num_images}, {top_k}"
            )
        self.num_images = num_images
        self.top_k = top_k
        self._samples: list[_Sample] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samples = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samples = []

    def _collect(self, trainer: Trainer, outputs: Any, batch: Any) -> None:
        if not _reporting(trainer) or len(self._samples) >= self.num_images:
            return
        proposals = outputs.get("proposals") if isinstance(outputs, Mapping) else None
        if proposals is None:
            rank_zero_warn(
                "ProposalImages: the evaluation step must return {'proposals': [(boxes, scores)]};"
                f" got {type(outputs).__name__}"
            )
            return
        for i, (boxes, scores) in enumerate(proposals):
            if len(self._samples) >= self.num_images:
                break
            height, width = batch.image_sizes[i]
            self._samples.append(
                _Sample(
                    image=_to_uint8(batch.images[i, :, :height, :width].detach().cpu()),
                    gt_boxes=batch.gt_boxes[i].detach().float().cpu(),
                    boxes=boxes[: self.top_k].detach().float().cpu(),
                    scores=scores[: self.top_k].detach().float().cpu(),
                    image_id=batch.image_ids[i],
                )
            )

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(trainer, outputs, batch)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(trainer, outputs, batch)

    def _log(self, trainer: Trainer) -> None:
        samples, self._samples = self._samples, []
        if not _reporting(trainer) or not samples:
            return
        stage, step = _stage(trainer), trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, samples, stage, step)
            elif isinstance(logger, TensorBoardLogger):
                for n, s in enumerate(samples):
                    logger.experiment.add_image_with_boxes(
                        f"{stage}/proposals/{n}",
                        s.image,
                        torch.cat([s.gt_boxes, s.boxes]),
                        global_step=step,
                        labels=["gt"] * len(s.gt_boxes) + [f"{v:.2f}" for v in s.scores.tolist()],
                    )
        for logger in _file_loggers(trainer):
            folder = _log_dir(trainer, logger) / "proposal_images"
            folder.mkdir(parents=True, exist_ok=True)
            for n, s in enumerate(samples):
                name = re.sub(r"[^\w.-]", "_", str(s.image_id))
                path = (
                    folder / f"{stage}_epoch{trainer.current_epoch:03d}_step{step}_{n}_{name}.png"
                )
                Image.fromarray(self._draw(s).permute(1, 2, 0).numpy()).save(path)

    @staticmethod
    def _draw(s: _Sample) -> Tensor:
        """uint8 [3, H, W] with proposals in red (labelled with objectness), gt in green on top."""
        image = draw_bounding_boxes(
            s.image, s.boxes, labels=[f"{v:.2f}" for v in s.scores.tolist()], colors=PROPOSAL_COLOR
        )
        return draw_bounding_boxes(image, s.gt_boxes, colors=GT_COLOR, width=2)

    @staticmethod
    def _log_wandb(logger: WandbLogger, samples: list[_Sample], stage: str, step: int) -> None:
        class_labels = {0: "ground truth", 1: "proposal"}

        def box_data(boxes: Tensor, scores: Tensor | None) -> list[dict[str, Any]]:
            out = []
            for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                entry: dict[str, Any] = {
                    "position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2},
                    "domain": "pixel",
                    "class_id": 0 if scores is None else 1,
                }
                if scores is not None:
                    score = float(scores[n])
                    entry["scores"] = {"objectness": score}
                    entry["box_caption"] = f"{score:.2f}"
                out.append(entry)
            return out

        boxes = [
            {
                "ground_truth": {
                    "box_data": box_data(s.gt_boxes, None),
                    "class_labels": class_labels,
                },
                "proposals": {
                    "box_data": box_data(s.boxes, s.scores),
                    "class_labels": class_labels,
                },
            }
            for s in samples
        ]
        # one gallery needs one size: pad bottom / right (pixel boxes stay where they are)
        height = max(s.image.shape[1] for s in samples)
        width = max(s.image.shape[2] for s in samples)
        images = [
            pad(s.image, (0, width - s.image.shape[2], 0, height - s.image.shape[1]))
            for s in samples
        ]
        logger.log_image(
            key=f"{stage}/proposals",
            images=[image.permute(1, 2, 0).numpy() for image in images],
            step=step,
            boxes=boxes,
            caption=[f"image {s.image_id}" for s in samples],
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)
