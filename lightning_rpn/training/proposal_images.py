"""Sample images of each evaluation epoch with their ground truth and top proposals, per logger.

Shapes: ``B`` images of a batch, ``G`` gt boxes and ``P`` proposals of an image.

The callback reads what the evaluation step returns (``{"proposals": [(boxes [P, 4], scores
[P]), ...]}``) and the batch (see :mod:`~lightning_rpn.training.callbacks`); where it writes is
:mod:`~lightning_rpn.training.log_targets`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.nn.functional import pad
from torchvision.utils import draw_bounding_boxes

from lightning_rpn.training.log_targets import (
    announce_folder,
    evaluated_counters,
    evaluation_files,
    evaluation_stage,
    file_loggers,
    log_dir,
    reporting,
)

__all__ = ["GT_COLOR", "PROPOSAL_COLOR", "ProposalImages"]

GT_COLOR = "#00d000"
PROPOSAL_COLOR = "#ff3030"


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
    proposals red) in ``proposal_images/`` under the log directory, named
    ``{evaluation}_{n}_{image id}.png``: ``{evaluation}`` is ``{stage}_epoch{E:03d}_step{S}`` in
    ``fit``, ``{stage}-{checkpoint stem}`` for a checkpoint a ``validate`` / ``test`` loaded
    (:func:`~lightning_rpn.training.log_targets.evaluation_name`), with ``-v1``, ``-v2``, ... when an
    earlier file has the name (no file is replaced). The folder is printed on stderr the first
    time it is written.

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
        self._announced: set[Path] = set()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samples = []

    on_test_epoch_start = on_validation_epoch_start

    def _collect(self, trainer: Trainer, outputs: Any, batch: Any) -> None:
        if not reporting(trainer) or len(self._samples) >= self.num_images:
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

    on_test_batch_end = on_validation_batch_end

    def _log(self, trainer: Trainer) -> None:
        samples, self._samples = self._samples, []
        if not reporting(trainer) or not samples:
            return
        stage, (_, step) = evaluation_stage(trainer), evaluated_counters(trainer)
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
        for logger in file_loggers(trainer):
            self._write_files(log_dir(trainer, logger) / "proposal_images", samples, trainer)

    def _write_files(self, folder: Path, samples: list[_Sample], trainer: Trainer) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        names = [re.sub(r"[^\w.-]", "_", str(s.image_id)) for s in samples]
        stem, paths = evaluation_files(
            trainer, lambda stem: [folder / f"{stem}_{n}_{name}.png" for n, name in enumerate(names)]
        )
        for s, path in zip(samples, paths, strict=True):
            Image.fromarray(self._draw(s).permute(1, 2, 0).numpy()).save(path)
        announce_folder(self._announced, folder, f"ProposalImages: {len(paths)} images with gt and proposals "
                                                 f"written to {folder} ({stem}_*.png)")

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

    on_test_end = on_validation_end
