"""Sample images of each evaluation epoch with their ground truth and top proposals, per logger.

Shapes: ``B`` images of a batch, ``G`` gt boxes and ``P`` proposals of an image.

The callback reads what the evaluation step returns (``{"proposals": [(boxes [P, 4], scores
[P]), ...]}``) and the batch: an ``RPNBatch``, a mapping with its field names, or a
torchvision-style ``(images, targets)`` pair (see :mod:`~lightning_rpn.training.callbacks`);
uint8 images are drawn as they are, float ones as 0..1 values. Any other batch is skipped with one
warning. Where it writes is :mod:`~lightning_rpn.training.log_targets`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
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
    evaluation_name,
    evaluation_stage,
    file_loggers,
    log_dir,
    reporting,
)
from lightning_rpn.training.run_files import repeated_name

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
    """uint8 as it is; float images are read as 0..1 values (torchvision's convention)."""
    if image.dtype == torch.uint8:
        return image
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass
class _BatchImages:
    """What the callback draws of a batch, per image: the image cropped to its size ``[C, H, W]``,
    its gt boxes ``[G, 4]`` and its id (``None``: the batch names none)."""

    images: list[Tensor]
    gt_boxes: list[Tensor]
    image_ids: list[Any]


_BATCH_FIELDS = (
    "an RPNBatch, or a mapping with its fields 'images' ([B, C, H, W] or a list of [C, H, W]), "
    "'gt_boxes' (a list of [G, 4]) and optionally 'image_sizes' and 'image_ids', or a "
    "torchvision-style (images, targets) pair whose targets are dicts with 'boxes' (and 'image_id')"
)


def _is_images(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.ndim == 4
    return isinstance(value, Sequence) and all(isinstance(v, Tensor) and v.ndim == 3 for v in value)


def _is_boxes(value: Any) -> bool:
    return isinstance(value, Sequence) and all(isinstance(v, Tensor) and v.ndim == 2 for v in value)


def _image_id(value: Any) -> Any:
    """An id as a file name shows it: a one-element tensor (torchvision targets) as its number."""
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


def _fields_batch(batch: Any) -> _BatchImages | None:
    """An ``RPNBatch`` or a mapping with its field names (``None``: not one)."""
    get = batch.get if isinstance(batch, Mapping) else lambda name: getattr(batch, name, None)
    images, gt_boxes, sizes, ids = get("images"), get("gt_boxes"), get("image_sizes"), get("image_ids")
    if not (_is_images(images) and _is_boxes(gt_boxes)):
        return None
    sizes = [tuple(image.shape[-2:]) for image in images] if sizes is None else sizes
    ids = [None] * len(images) if ids is None else ids
    if not len(images) == len(gt_boxes) == len(sizes) == len(ids):
        return None
    return _BatchImages(
        [image[:, : int(h), : int(w)] for image, (h, w) in zip(images, sizes, strict=True)],
        list(gt_boxes),
        [_image_id(i) for i in ids],
    )


def _torchvision_batch(batch: Any) -> _BatchImages | None:
    """A torchvision-style ``(images, targets)`` pair (``None``: not one)."""
    if not (isinstance(batch, Sequence) and len(batch) == 2 and _is_images(batch[0])):
        return None
    images, targets = batch
    if not (
        isinstance(targets, Sequence)
        and len(targets) == len(images)
        and all(isinstance(t, Mapping) and isinstance(t.get("boxes"), Tensor) for t in targets)
    ):
        return None
    return _BatchImages(
        list(images), [t["boxes"] for t in targets], [_image_id(t.get("image_id")) for t in targets]
    )


def _batch_images(batch: Any) -> _BatchImages | None:
    """The images, gt boxes and ids of ``batch`` (see ``_BATCH_FIELDS``); ``None`` for any other batch."""
    return _fields_batch(batch) or _torchvision_batch(batch)


def _boxes_and_scores(item: Any) -> tuple[Tensor, Tensor] | None:
    """One image's ``(boxes [P, 4], scores [P])`` from ``(boxes, scores, ...)`` or ``{"boxes", "scores"}``
    (torchvision's form), else ``None``."""
    if isinstance(item, Mapping):
        boxes, scores = item.get("boxes"), item.get("scores")
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        boxes, scores = item[0], item[1]
    else:
        return None
    if not (isinstance(boxes, Tensor) and boxes.ndim == 2 and boxes.shape[1] == 4
            and isinstance(scores, Tensor) and tuple(scores.shape) == (boxes.shape[0],)):
        return None
    return boxes, scores


def _described(item: Any) -> str:
    """``item``'s type, and its shape when it has one, for a message."""
    shape = getattr(item, "shape", None)
    return type(item).__name__ + ("" if shape is None else f" of shape {tuple(shape)}")


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
    (:func:`~lightning_rpn.training.log_targets.evaluation_name`), with ``.2``, ``.3``, ... when an
    earlier run left one of the evaluation's outputs under that number (no file is replaced; the
    number every output of the evaluation takes, :func:`~lightning_rpn.training.run_files.output_repeat`).
    The folder is printed on stderr the first time it is written.

    Args:
        num_images: images per evaluation: the first ones of its split (under DDP, the first of
            each process's share in turn, gathered on rank 0).
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
        self._warned: set[str] = set()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samples = []

    on_test_epoch_start = on_validation_epoch_start

    def _collect(self, trainer: Trainer, outputs: Any, batch: Any) -> None:
        # every process collects its first images: under DDP each evaluates its share of the split
        if trainer.sanity_checking or len(self._samples) >= self.num_images:
            return
        proposals = outputs.get("proposals") if isinstance(outputs, Mapping) else None
        if proposals is None:
            self._warn_once(
                "ProposalImages: the evaluation step must return {'proposals': [(boxes, scores)]};"
                f" got {type(outputs).__name__}; no images are drawn"
            )
            return
        fields = _batch_images(batch)
        if fields is None:
            self._warn_once(
                f"ProposalImages: cannot read the images and gt boxes of a {type(batch).__name__} batch; "
                f"it needs {_BATCH_FIELDS}. No images are drawn"
            )
            return
        for image, gt_boxes, image_id, item in zip(fields.images, fields.gt_boxes, fields.image_ids, proposals):
            if len(self._samples) >= self.num_images:
                break
            pair = _boxes_and_scores(item)
            if pair is None:
                self._warn_once(
                    "ProposalImages: each image's proposals must be (boxes [P, 4], scores [P]) (a longer tuple's "
                    f"first two, or a {{'boxes', 'scores'}} dict); got {_described(item)}; no images are drawn"
                )
                return
            boxes, scores = pair
            self._samples.append(
                _Sample(
                    image=_to_uint8(image.detach().cpu()),
                    gt_boxes=gt_boxes.detach().float().cpu(),
                    boxes=boxes[: self.top_k].detach().float().cpu(),
                    scores=scores[: self.top_k].detach().float().cpu(),
                    image_id=len(self._samples) if image_id is None else image_id,
                )
            )

    def _warn_once(self, message: str) -> None:
        """Warn about a batch or step the callback cannot read once, not at every batch."""
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message)

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
        if trainer.sanity_checking:
            return
        samples = self._first_of_the_split(trainer, samples)
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

    def _first_of_the_split(self, trainer: Trainer, samples: list[_Sample]) -> list[_Sample]:
        """On rank 0, the first ``num_images`` of every process's ``samples``, taken in turn (rank 0's
        first, rank 1's first, ...: a distributed sampler deals the split out so, so an unshuffled
        split gives the images a single process draws); ``samples`` as they are on one process. A
        collective: every process calls it."""
        if trainer.world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return samples
        gathered: list[list[_Sample] | None] = [None] * trainer.world_size
        torch.distributed.gather_object(samples, gathered if trainer.is_global_zero else None, dst=0)
        if not trainer.is_global_zero:
            return []
        in_turn = [s for turn in zip_longest(*(g or [] for g in gathered)) for s in turn if s is not None]
        return in_turn[: self.num_images]

    def outputs_at(self, trainer: Trainer, repeat: int) -> list[Path]:
        """The images of ``trainer``'s validation / test at ``repeat`` that are on disk already (their
        names end with image ids, known once drawn), what
        :func:`~lightning_rpn.training.run_files.output_repeat` asks every callback; none in predict."""
        if evaluation_stage(trainer) == "predict":
            return []
        drawn = re.compile(rf"{re.escape(repeated_name(evaluation_name(trainer), repeat))}_\d+_[\w.-]*\.png")
        folders = [log_dir(trainer, logger) / "proposal_images" for logger in file_loggers(trainer)]
        return [path for folder in folders if folder.is_dir()
                for path in folder.iterdir() if drawn.fullmatch(path.name)]

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
        """uint8 [3, H, W] with proposals in red (labelled with objectness), gt in green on top
        (an image without either is drawn without them: torchvision would warn at each)."""
        image = s.image.expand(3, -1, -1) if s.image.shape[0] == 1 else s.image  # grey, as torchvision
        if len(s.boxes):
            labels = [f"{v:.2f}" for v in s.scores.tolist()]
            image = draw_bounding_boxes(image, s.boxes, labels=labels, colors=PROPOSAL_COLOR)
        return draw_bounding_boxes(image, s.gt_boxes, colors=GT_COLOR, width=2) if len(s.gt_boxes) else image

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
