"""The training-parity harness: our Lightning training step against torchvision's, step by step.

Shapes: ``B`` images, ``Hp x Wp`` the padded batch, ``N`` anchors of an image, ``G`` gt boxes.

:func:`compare_training` trains an :class:`~lightning_rpn.training.module.RPNModule` through
Lightning while :class:`StepRecorder` keeps every step's batch, sampled anchors, losses and
unclipped gradients; it then replays those batches through the yardstick,
:class:`~lightning_rpn.training.torchvision_loop.TorchvisionLoop` (torchvision's own RPN,
started from the module's initial weights, our sampled anchors injected), and reports per step
how far every quantity lies apart (:class:`StepDifference`, :class:`ParityReport`). The loop's
names (``TorchvisionLoop``, ``copy_weights``, ...) are served here too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_rpn.core.matching import match_anchors
from lightning_rpn.training.torchvision_loop import InjectedSampler, StepRecord, TorchvisionLoop, copy_weights

__all__ = [
    "InjectedSampler", "ParityReport", "StepDifference", "StepRecord", "StepRecorder", "TorchvisionLoop",
    "compare_training", "copy_weights", "relative_difference",
]


@dataclass
class StepDifference:
    """Largest differences between our training step and the reference's, for one step.

    Discrete quantities are counts of disagreeing entries (0 means identical); float ones are
    maxima of ``|ours - theirs|`` relative to ``max(|theirs|)`` over the whole tensor.
    """

    step: int
    anchors: float
    labels_differ: int
    matched_boxes: float
    sampled_differ: int
    regression_targets: float
    loss_cls: float
    loss_reg: float
    gradients: dict[str, float]  # "head" / "fpn" / "backbone" -> worst relative difference


def relative_difference(ours: Tensor, theirs: Tensor) -> float:
    """``max |ours - theirs| / max(max |theirs|, 1e-12)`` (0 for two empty tensors)."""
    if ours.shape != theirs.shape:
        raise ValueError(f"relative_difference: shapes {tuple(ours.shape)} and {tuple(theirs.shape)}")
    if ours.numel() == 0:
        return 0.0
    scale = float(theirs.abs().max())
    return float((ours.double() - theirs.double()).abs().max()) / max(scale, 1e-12)


def _part(name: str) -> str:
    if name.startswith("rpn."):
        return "head"
    return "fpn" if ".fpn." in name else "backbone"


@dataclass
class _RecordedStep:
    images: Tensor
    image_sizes: list[tuple[int, int]]
    gt_boxes: list[Tensor]
    anchor_labels: Tensor
    positive_deltas: Tensor
    losses: dict[str, float]
    gradients: dict[str, Tensor]


class StepRecorder(pl.Callback):
    """Records every training step's batch, logged losses and (unclipped) gradients."""

    def __init__(self) -> None:
        self.steps: list[_RecordedStep] = []
        self._gradients: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch.anchor_labels is None or batch.positive_deltas is None:
            raise ValueError("StepRecorder: the batches carry no worker-side targets (assign_targets is off)")
        self.steps.append(_RecordedStep(
            images=batch.images.clone(), image_sizes=list(batch.image_sizes),
            gt_boxes=[boxes.clone() for boxes in batch.gt_boxes],
            anchor_labels=batch.anchor_labels.clone(), positive_deltas=batch.positive_deltas.clone(),
            losses={}, gradients={},
        ))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.steps[-1].gradients = {name: p.grad.detach().clone()
                                    for name, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        self.steps[-1].losses = {key: float(metrics[f"train/{key}"]) for key in ("loss_rpn_cls", "loss_rpn_reg")}


@dataclass
class ParityReport:
    """Per-step differences and the weights' difference after the last step, per part."""

    steps: list[StepDifference]
    weights: dict[str, float]

    def worst(self) -> dict[str, float]:
        """The largest value of every compared quantity over all steps."""
        worst: dict[str, float] = {}
        for step in self.steps:
            values = {key: value for key, value in vars(step).items() if key not in ("step", "gradients")}
            values.update({f"grad_{part}": value for part, value in step.gradients.items()})
            for key, value in values.items():
                worst[key] = max(worst.get(key, 0.0), float(value))
        worst.update({f"weights_{part}": value for part, value in self.weights.items()})
        return worst


def compare_training(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    steps: int,
    gradient_clip_val: float | None = None,
    **trainer_kwargs: Any,
) -> ParityReport:
    """Train ``module`` for ``steps`` steps through Lightning (our real path: the data module's
    workers assign and sample the targets, ``training_step``, clipping, the schedule), then
    replay the same batches through :class:`TorchvisionLoop` started from ``module``'s initial
    weights with our sampled anchors injected, and compare every step.

    The module must be set up like torchvision's recipe for the results to agree (smooth L1
    with beta 1/9, sigmoid objectness, one head conv, contiguous memory format).
    """
    initial = copy.deepcopy(module)
    recorder = StepRecorder()
    trainer = pl.Trainer(
        max_steps=steps, gradient_clip_val=gradient_clip_val, callbacks=[recorder],
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, **trainer_kwargs,
    )
    trainer.fit(module, datamodule=datamodule)
    schedule = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0])
    # the loop builds the module's optimiser with the function our run used (build_optimizer)
    loop = TorchvisionLoop.from_module(
        initial, gradient_clip_norm=gradient_clip_val, schedule=schedule,
        norm_weight_decay=getattr(initial.hparams, "norm_weight_decay", 0.0),
    )
    differences = []
    for index, recorded in enumerate(recorder.steps):
        record = loop.step(recorded.images, recorded.image_sizes, recorded.gt_boxes, recorded.anchor_labels)
        differences.append(_compare_step(index, initial, recorded, record))
    theirs_weights = loop.parameters()
    weights: dict[str, float] = {}
    for name, parameter in module.named_parameters():
        if name in theirs_weights:
            part = _part(name)
            weights[part] = max(weights.get(part, 0.0), relative_difference(parameter.detach(), theirs_weights[name]))
    return ParityReport(differences, weights)


def _relative_loss(ours: dict[str, float], theirs: dict[str, float], key: str) -> float:
    return abs(ours[key] - theirs[key]) / max(abs(theirs[key]), 1e-12)


def _compare_step(
    index: int, initial: pl.LightningModule, recorded: _RecordedStep, record: StepRecord
) -> StepDifference:
    """Step ``index``: what our training computed (``recorded``) against the reference's ``record``.

    Labels are re-derived with our matcher on our anchors (``initial``'s generator and target
    config), so that matching and sampling are compared separately.
    """
    config = initial.target_config
    padded = tuple(recorded.images.shape[-2:])
    ours_anchors = torch.cat(initial.anchor_generator(initial.anchor_generator.feature_shapes_for(padded)))
    labels_differ, sampled_differ, box_diff = 0, 0, 0.0
    theirs_targets = []
    for image, boxes in enumerate(recorded.gt_boxes):
        labels, matched = match_anchors(
            ours_anchors, boxes, config.fg_iou, config.bg_iou, config.allow_low_quality,
            image_size=recorded.image_sizes[image], allowed_border=config.allowed_border,
        )
        theirs = record.matched_labels[image].to(torch.int64)
        labels_differ += int((labels != theirs).sum())
        sampled = recorded.anchor_labels[image].to(torch.int64)
        drawn = sampled >= 0
        sampled_differ += int((sampled[drawn] != theirs[drawn]).sum())
        both = (labels == 1) & (theirs == 1)
        if both.any():
            box_diff = max(box_diff, relative_difference(boxes[matched[both]], record.matched_boxes[image][both]))
        theirs_targets.append(record.regression_targets[image][sampled == 1])
    gradient_diff: dict[str, float] = {}
    for name, ours_grad in recorded.gradients.items():
        part = _part(name)
        gradient_diff[part] = max(gradient_diff.get(part, 0.0), relative_difference(ours_grad, record.gradients[name]))
    return StepDifference(
        step=index,
        anchors=relative_difference(ours_anchors, record.anchors),
        labels_differ=labels_differ,
        matched_boxes=box_diff,
        sampled_differ=sampled_differ,
        regression_targets=relative_difference(recorded.positive_deltas, torch.cat(theirs_targets)),
        loss_cls=_relative_loss(recorded.losses, record.losses, "loss_rpn_cls"),
        loss_reg=_relative_loss(recorded.losses, record.losses, "loss_rpn_reg"),
        gradients=gradient_diff,
    )
