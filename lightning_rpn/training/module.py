"""RPNModule: a backbone + :class:`~lightning_rpn.core.rpn.RPN` as a LightningModule.

Shapes: ``B`` images, ``Hp x Wp`` the padded batch, ``N`` anchors of an image, ``G`` gt boxes,
``P`` proposals of an image.

The Python defaults are detectron2's ``rpn_R_50_FPN_1x`` recipe (ResNet-50 FPN, and the
settings of :mod:`lightning_rpn.core.config`, where each is declared once: anchors 32-512 on P2-P6,
ratios 0.5/1/2, 256 sampled anchors per image, 2000/1000 pre/post-NMS proposals in training and
1000/1000 in evaluation, NMS 0.7, L1 box loss, SGD lr 0.02 with a 1000-step linear warm-up and
x0.1 decays at 60k and 80k steps), so a config only states what differs.

Batches are :class:`~lightning_rpn.data.batch.RPNBatch` objects: uint8 images (converted here
to float and normalised with ImageNet mean/std), ``image_sizes`` after resize, the gt boxes and,
when the data pipeline assigned them in its workers, ``anchor_labels`` / ``target_deltas``.
Without precomputed targets the RPN assigns them in the model, with the same functions.

``backbone`` is a name of :data:`lightning_rpn.core.backbones.BACKBONES` or any ``nn.Module`` with
the backbone interface: ``forward(images [B, 3, H, W] float, normalised) -> list`` of level
features ``[B, out_channels, H_l, W_l]`` (finest first), and the attributes ``out_channels``
(int), ``strides`` (tuple of ints, one per level) and ``size_divisibility`` (int).

The data pipeline reads ``anchor_generator``, ``target_config``, ``box_coder`` and
``size_divisibility`` from this module, so model and data cannot disagree about anchors.
Evaluation fills ``val_recall`` (a :class:`~lightning_rpn.evaluation.metrics.ProposalRecall`); at the end
of each validation / test epoch every ``compute()`` key is logged as ``val/{key}`` /
``test/{key}``, copied to ``last_recall`` (``dict[str, float]``) with the recall curves in
``last_recall_curves``, and the metric is reset. ``predict`` fills it too, with the proposals
against the gt boxes in original-image pixels, and sets ``last_recall`` only when the split has
gt boxes (predictions are not logged). The area ranges (``AR_small`` ...) sort gt boxes by their
annotated area where the data gives one (COCO's ``area``, ``RPNBatch.annotation_areas``), else by
their box area, both in original-image pixels.

Non-finite training steps (``nonfinite_loss``): a non-finite loss, or finite loss with
non-finite gradients, either raises a ``ValueError`` naming the batch's image ids
(``"raise"``, the default) or skips the optimizer update for that batch (``"skip"``, counted
as ``train/skipped_nonfinite_batches`` and kept in checkpoints; ten in a row stop training: the
weights have then diverged); the module installs the policy,
a callback (:mod:`lightning_rpn.training.nonfinite`), itself. Its other parts: optimisation
(:mod:`~lightning_rpn.training.optim`), sliding-window evaluation
(:mod:`~lightning_rpn.training.windowed`) and ``predict_images`` (:mod:`~lightning_rpn.training.predict`).

Over 350 lines for one reason: the flat constructor (about fifty arguments, each documented) is
the ``model:`` section of the YAML configs and of the checkpoints' hparams, and builds the parts.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any, Literal, overload

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
from torch import Tensor, nn

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.backbone_interface import check_backbone, check_feature_strides
from lightning_rpn.core.backbones import StagedBackbone, build_backbone
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.boxes import box_area
from lightning_rpn.core.cascade import BoxLossPositives, CascadeRPN, ObjectnessLevel
from lightning_rpn.core.config import (
    AnchorConfig, AnchorTargetConfig, LossConfig, OptimConfig, ProposalConfig, SettingError,
)
from lightning_rpn.core.head import RPNHead
from lightning_rpn.core.loss import NonFiniteLossError
from lightning_rpn.core.rpn import RPN
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.core.window_targets import WindowTargets
from lightning_rpn.core.windows import SlidingWindowConfig
from lightning_rpn.data.collate import set_sampling_epoch
from lightning_rpn.data.loose_images import ImageInput
from lightning_rpn.data.transforms import ResizePolicy
from lightning_rpn.data.window_sampler import drop_empty_loader_states
from lightning_rpn.evaluation.metrics import DEFAULT_IOU_THRESHOLDS, ProposalRecall
from lightning_rpn.training.checkpoint_agreement import (
    CASCADE_PREFIX,
    check_checkpoint_agrees,
    check_optimizer_agrees,
    check_resume_agrees,
)
from lightning_rpn.training.evaluated_weights import (
    TrainedCounters, counters_in_use, evaluated_counters, logged_as,
)
from lightning_rpn.training.monitored_metrics import check_monitored_metrics
from lightning_rpn.training.moved_run import follow_moved_run
from lightning_rpn.training.nonfinite import SKIPPED_KEY, NonFiniteLossPolicy
from lightning_rpn.training.optim import LRSchedule, RunLambdaLR, configure_optimization, fit_total_steps
from lightning_rpn.training.predict import predict_images, to_original_coordinates
from lightning_rpn.training.resume_state import resume_where_saved
from lightning_rpn.training.windowed import window_losses, window_proposals

RESIZE_KEY = "lightning_rpn_resize_policy"  # checkpoint entry: the training data's ResizePolicy
# hparams["backbone"] of a backbone module built in Python: this prefix + its class path. The
# module's arguments are unknown, so loading such a checkpoint needs ``backbone=``.
_CUSTOM_BACKBONE = "custom: "

# LRSchedule, RunLambdaLR (training.optim) and to_original_coordinates (training.predict) are
# named here too, for code importing them from here
__all__ = ["LRSchedule", "RPNModule", "RunLambdaLR", "to_original_coordinates"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _original_areas(batch: RPNBatch) -> list[Tensor]:
    """Per image, the areas in original-image pixels that sort its gt boxes into the recall's area
    ranges, at COCO's scale whatever the resize: the annotated ones (COCO's ``area``, what COCOeval
    and detectron2 sort by) where the batch has them, else the boxes' (mapped back as ``predict``
    maps them)."""
    annotated = batch.annotation_areas or [None] * len(batch)
    return [
        box_area(to_original_coordinates(boxes.float(), resized, original)) if areas is None else areas
        for boxes, resized, original, areas in zip(batch.gt_boxes, batch.image_sizes, batch.original_sizes,
                                                    annotated)
    ]


def _head_width_given(hparams: dict[str, Any], width: int | None) -> dict[str, Any]:
    """``hparams`` with ``head_conv_channels: None`` written as the backbone ``width`` it means, so that
    a checkpoint of ``None`` and a run of that number (or the other way round) agree."""
    if width is None or "head_conv_channels" not in hparams or hparams["head_conv_channels"] is not None:
        return hparams
    return {**hparams, "head_conv_channels": int(width)}


_STAGE_CALLS = {"val": "validate", "test": "test", "predict": "predict"}  # trainer method of each stage


def _warn_cascade_settings_ignored(hparams: Mapping[str, Any]) -> None:
    """Name the ``model.cascade_*`` settings given to a plain head, which ignores them."""
    defaults = inspect.signature(RPNModule.__init__).parameters
    ignored = {f"model.{name}": value for name, value in hparams.items()
               if name.startswith(CASCADE_PREFIX) and value != defaults[name].default}
    if ignored:
        rank_zero_warn(f"RPNModule: {', '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} to "
                       f"model.head: cascade only; this run's head is 'rpn', which ignores "
                       f"{'them' if len(ignored) > 1 else 'it'} ({ignored}). Set model.head: cascade, or leave "
                       f"{'them' if len(ignored) > 1 else 'it'} out")


class RPNModule(pl.LightningModule):
    """Train and evaluate a Region Proposal Network (see the module docstring).

    Args:
        backbone: a built-in backbone name or an ``nn.Module`` with the backbone interface.
        weights: torchvision weight name (``"ResNet50_Weights.IMAGENET1K_V1"``) or a local
            checkpoint of the classification network, for a named backbone; ``None``: random.
        trainable_layers: backbone stages (from the top) that train with pretrained weights;
            ``None``: 3. Without weights all train (a value that would freeze one is ignored, with a warning).
        frozen_bn: FrozenBatchNorm2d in the backbone; ``None``: frozen iff weights are given.
        anchor_sizes: anchor sizes (pixels) per level (``((32,), (64,), ...)``, one size per level), or
            one tuple for every level: a flat ``(32, 64)`` puts both sizes on every level.
        aspect_ratios: ``h / w`` ratios per level, or one tuple for every level (``(0.5, 1.0, 2.0)``,
            on the command line ``--model.aspect_ratios '[0.5, 1.0, 2.0]'``).
        anchor_offset: anchor centres at ``(offset + j * anchor_stride) * stride``.
        anchor_stride: anchors at every n-th feature cell (the head's first conv stride).
        fg_iou: IoU at or above which an anchor is positive.
        bg_iou: IoU below which an anchor is negative.
        allow_low_quality: also make each gt box's best anchors positive.
        allowed_border: ignore anchors sticking out of the image by more than this (pixels);
            ``None`` keeps them all.
        batch_size_per_image: anchors sampled per image for the loss.
        positive_fraction: largest share of positives among the sampled anchors.
        crowd_ioa: ignore anchors whose intersection-over-anchor with a crowd box reaches this.
        box_coder_weights: ``(wx, wy, ww, wh)`` delta weights.
        head_conv_depth: 3x3 conv layers in the head.
        head_conv_channels: their channels (``None``: the backbone's ``out_channels``).
        objectness: ``"sigmoid"`` (A logits) or ``"softmax"`` (2A logits, the paper's head).
        loss_normalization: ``"sampled"`` (detectron2/torchvision) or ``"paper"``.
        reg_weight: box-loss weight lambda (``None``: 1 for "sampled", 10 for "paper").
        box_loss: ``"smooth_l1"``, ``"l1"``, ``"giou"`` or ``"iou"``.
        quality: ``None`` or localisation-quality branches of the head (the OLN idea,
            :mod:`~lightning_rpn.core.quality`): ``"centerness"``, ``"iou"`` or ``"centerness+iou"``,
            trained on the positive anchors.
        proposal_score: what ranks the proposals: ``"objectness"``, ``"quality"`` (the quality
            branches alone, no objectness classifier trained) or ``"geometric_mean"`` of both.
        head: ``"rpn"`` (one head, :class:`~lightning_rpn.core.rpn.RPN`) or ``"cascade"`` (multi-stage
            refinement of one anchor per location, :class:`~lightning_rpn.core.cascade.CascadeRPN`:
            IoU box losses, ``reg_weight`` default 1; ``quality`` and ``proposal_score`` are its last
            stage's, and ``box_loss``, ``smooth_l1_beta``, the softmax head, ``"paper"``
            normalisation, a deeper head, ``crowd_ioa`` and ``allowed_border`` are refused). Its targets come from the
            gt boxes in the model, so ``data.assign_targets: false`` saves the DataLoader workers
            the anchor targets.
        cascade_stages: stages of the cascade (>= 2).
        cascade_dilation: dilation of the cascade's first 3x3 convolution.
        cascade_centre_ratio: central fraction of a gt box whose locations the first stage regresses.
        cascade_objectness_level: which positives of a gt box the cascade's objectness learns:
            ``"any"`` (every level), ``"size"`` (its first-stage level's) or ``"best"`` (those on
            the level of its best refined box); its boxes on other levels are background, so one
            object does not fill the top of the list with near-identical boxes from several
            levels (dense scenes).
        cascade_box_loss_positives: which IoU positives the box losses of the cascade's later
            stages average over: ``"sampled"`` (the sampler's ``batch_size_per_image *
            positive_fraction`` at most, as the RPN's) or ``"all"`` (every one; dense scenes have
            several hundred an image).
        cascade_test_iterations: how many more times the cascade's last stage refines its own
            boxes in validation, test and predict.
        cascade_train_iterations: how many more times it refines them in training, each pass
            with its own box loss (so it learns the boxes it refines at test time).
        cascade_delta_scales: one ``(sx, sy, sw, sh)`` per cascade stage multiplying its raw deltas
            (mmdetection's target stds; ``None``: ones).
        smooth_l1_beta: beta of the smooth L1 loss.
        pre_nms_top_n_train: proposals kept per level before NMS in training.
        post_nms_top_n_train: proposals kept per image after NMS in training.
        pre_nms_top_n_test: proposals kept per level before NMS in evaluation.
        post_nms_top_n_test: proposals kept per image after NMS in evaluation.
        nms_thresh: NMS IoU threshold.
        min_size: proposals with a side below this (pixels) are dropped.
        score_thresh: proposals with an objectness probability below this are dropped.
        anchor_sampling_seed: seed of the anchor sampling (mixed with the epoch and each image
            id, so every epoch samples afresh); the data module uses it too, through ``rpn.seed``.
        optimizer: ``"sgd"`` (momentum) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay of every parameter outside normalisation layers.
        norm_weight_decay: weight decay of normalisation-layer parameters (BatchNorm, GroupNorm,
            LayerNorm); detectron2's default 0, where torchvision's reference scripts and a plain
            ``SGD(weight_decay=...)`` use ``weight_decay`` (see the README's ablations).
        lr_schedule: ``"multistep"`` (x ``gamma`` at each milestone) or ``"cosine"`` (to
            ``min_lr_factor * lr`` at the last training step).
        warmup_steps: steps of linear warm-up from ``warmup_factor * lr``.
        warmup_factor: starting fraction of the learning rate.
        milestones: optimizer steps at which the multi-step schedule decays.
        gamma: decay factor of the multi-step schedule.
        min_lr_factor: final fraction of the learning rate of the cosine schedule.
        recall_iou_thresholds: IoU thresholds averaged by AR.
        recall_max_proposals: proposal budgets k reported as ``AR@k``.
        nonfinite_loss: ``"raise"`` (stop, naming the batch's image ids) or ``"skip"`` (no
            update from that batch; counted as ``train/skipped_nonfinite_batches``; the 10th in a
            row stops training) when a training loss or gradient is non-finite.
        channels_last: run the backbone and the head in the channels-last (NHWC) memory
            format. Same results up to float rounding; on CPUs (oneDNN) and on GPUs with mixed
            precision, convolutions are faster in it (see the README's performance table).
        sliding_window: ``None`` (whole images) or the keys of
            :class:`~lightning_rpn.core.windows.SlidingWindowConfig` (``size``, ``overlap``,
            ``window_batch``, ``merge_metric``, ``merge_thresh``, ``top_k``): validation, test,
            predict and ``predict_images`` propose on overlapping windows of each image (each
            with the ``*_test`` settings), merged into the image's ``top_k`` best (default
            ``post_nms_top_n_test``); memory follows the window batch, not the image.
            Evaluation losses are then each window's training loss (targets from the gt boxes
            clipped to it under the data module's ``min_visibility``, seeded per window),
            averaged over the windows (:class:`~lightning_rpn.core.windows.WindowTargets`).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50_fpn",
        weights: str | None = None,
        trainable_layers: int | None = None,
        frozen_bn: bool | None = None,
        anchor_sizes: tuple[tuple[float, ...], ...] | tuple[float, ...] = AnchorConfig.sizes,
        aspect_ratios: tuple[tuple[float, ...], ...] | tuple[float, ...] = AnchorConfig.aspect_ratios,
        anchor_offset: float = AnchorConfig.offset,
        anchor_stride: int = AnchorConfig.anchor_stride,
        fg_iou: float = AnchorTargetConfig.fg_iou,
        bg_iou: float = AnchorTargetConfig.bg_iou,
        allow_low_quality: bool = AnchorTargetConfig.allow_low_quality,
        allowed_border: float | None = AnchorTargetConfig.allowed_border,
        batch_size_per_image: int = AnchorTargetConfig.batch_size_per_image,
        positive_fraction: float = AnchorTargetConfig.positive_fraction,
        crowd_ioa: float | None = AnchorTargetConfig.crowd_ioa,
        box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        head_conv_depth: int = 1,
        head_conv_channels: int | None = None,
        objectness: Literal["sigmoid", "softmax"] = "sigmoid",
        loss_normalization: Literal["sampled", "paper"] = LossConfig.normalization,  # type: ignore[assignment]
        reg_weight: float | None = LossConfig.reg_weight,
        box_loss: Literal["smooth_l1", "l1", "giou", "iou"] = LossConfig.box_loss,  # type: ignore[assignment]
        smooth_l1_beta: float = LossConfig.smooth_l1_beta,
        quality: str | None = None,
        proposal_score: Literal["objectness", "quality", "geometric_mean"] = "objectness",
        head: Literal["rpn", "cascade"] = "rpn",
        cascade_stages: int = 2,
        cascade_dilation: int = 3,
        cascade_centre_ratio: float = 0.2,
        cascade_objectness_level: ObjectnessLevel = "any",
        cascade_box_loss_positives: BoxLossPositives = "sampled",
        cascade_test_iterations: int = 0,
        cascade_train_iterations: int = 0,
        cascade_delta_scales: tuple[tuple[float, float, float, float], ...] | None = None,
        pre_nms_top_n_train: int = ProposalConfig.pre_nms_top_n_train,
        post_nms_top_n_train: int = ProposalConfig.post_nms_top_n_train,
        pre_nms_top_n_test: int = ProposalConfig.pre_nms_top_n_test,
        post_nms_top_n_test: int = ProposalConfig.post_nms_top_n_test,
        nms_thresh: float = ProposalConfig.nms_thresh,
        min_size: float = ProposalConfig.min_size,
        score_thresh: float = ProposalConfig.score_thresh,
        anchor_sampling_seed: int = 0,
        optimizer: Literal["sgd", "adamw"] = OptimConfig.optimizer,  # type: ignore[assignment]
        lr: float = OptimConfig.lr,
        momentum: float = OptimConfig.momentum,
        weight_decay: float = OptimConfig.weight_decay,
        norm_weight_decay: float = OptimConfig.norm_weight_decay,
        lr_schedule: Literal["multistep", "cosine"] = OptimConfig.lr_schedule,  # type: ignore[assignment]
        warmup_steps: int = OptimConfig.warmup_steps,
        warmup_factor: float = OptimConfig.warmup_factor,
        milestones: tuple[int, ...] = OptimConfig.milestones,
        gamma: float = OptimConfig.gamma,
        min_lr_factor: float = OptimConfig.min_lr_factor,
        recall_iou_thresholds: tuple[float, ...] = DEFAULT_IOU_THRESHOLDS,
        recall_max_proposals: tuple[int, ...] = (100, 300, 1000),
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        channels_last: bool = True,
        sliding_window: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.sliding_window = None if sliding_window is None else SlidingWindowConfig.from_mapping(sliding_window)
        self.nonfinite_policy = NonFiniteLossPolicy(nonfinite_loss)  # checks the name
        if isinstance(backbone, nn.Module):
            check_backbone(backbone, where="RPNModule(backbone=...)")
            given = {"weights": weights, "trainable_layers": trainable_layers, "frozen_bn": frozen_bn}
            if any(value is not None for value in given.values()):
                raise ValueError(
                    f"RPNModule: {given} apply to named backbones only; load weights and freeze "
                    f"layers of your own {type(backbone).__name__} before passing it"
                )
            self.backbone = backbone
            # the hparams name the module's class, never hold the module (see _CUSTOM_BACKBONE)
            backbone = f"{_CUSTOM_BACKBONE}{type(backbone).__module__}.{type(backbone).__qualname__}"
        elif isinstance(backbone, str) and backbone.startswith(_CUSTOM_BACKBONE):
            class_path = backbone[len(_CUSTOM_BACKBONE):]
            raise ValueError(
                f"RPNModule: this model's backbone was a {class_path} built in Python, whose "
                f"arguments were not recorded; pass it when loading: RPNModule.load_from_checkpoint("
                f"path, backbone={class_path.rpartition('.')[2]}(...)). A backbone given by "
                f"class_path in a lightning-rpn config is rebuilt from the checkpoint"
            )
        elif isinstance(backbone, str):
            self.backbone = build_backbone(backbone, weights, trainable_layers, frozen_bn)
        else:
            raise TypeError(
                f"RPNModule: backbone must be a backbone name or an nn.Module, "
                f"got {type(backbone).__name__}"
            )
        # reads this frame's arguments (``backbone`` rebound above); under LightningCLI the
        # parsed config instead, where a custom backbone is its class_path and init_args
        self.save_hyperparameters()
        # checked now, not when configure_optimizers first runs
        self.optim_config = OptimConfig(
            optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
            norm_weight_decay=norm_weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
            warmup_factor=warmup_factor, milestones=tuple(milestones), gamma=gamma, min_lr_factor=min_lr_factor,
        )

        strides = tuple(self.backbone.strides)
        try:
            self.anchor_generator = AnchorGenerator(
                anchor_sizes, aspect_ratios, strides, offset=anchor_offset, anchor_stride=anchor_stride
            )
            num_anchors = self.anchor_generator.num_anchors_per_location()
        except (TypeError, ValueError) as error:  # a setting that cannot work: one line from the CLI
            raise SettingError(
                f"model.anchor_sizes / model.aspect_ratios do not fit the backbone "
                f"{type(self.backbone).__name__} with strides {strides}: {error}"
            ) from None
        self.box_coder = BoxCoder(box_coder_weights)
        try:
            self.target_config = AnchorTargetConfig(
                fg_iou=fg_iou,
                bg_iou=bg_iou,
                allow_low_quality=allow_low_quality,
                allowed_border=allowed_border,
                batch_size_per_image=batch_size_per_image,
                positive_fraction=positive_fraction,
                crowd_ioa=crowd_ioa,
            )
        except ValueError as error:  # one line from the CLI, as the head's settings below
            raise SettingError(f"model: {error}") from None
        self.size_divisibility = int(self.backbone.size_divisibility)
        if head not in ("rpn", "cascade"):
            raise ValueError(f"model.head must be 'rpn' or 'cascade', got {head!r}")
        proposal_settings = dict(
            pre_nms_top_n_train=pre_nms_top_n_train,
            post_nms_top_n_train=post_nms_top_n_train,
            pre_nms_top_n_test=pre_nms_top_n_test,
            post_nms_top_n_test=post_nms_top_n_test,
            nms_thresh=nms_thresh,
            min_size=min_size,
            score_thresh=score_thresh,
        )
        self.rpn: RPN | CascadeRPN
        if head == "rpn":  # the cascade's own settings are ignored: say so (a checkpoint is not judged by them)
            _warn_cascade_settings_ignored(self.hparams)
        try:
            if head == "cascade":
                # its box losses are IoU losses: box_loss and smooth_l1_beta would be ignored
                given = {"objectness": objectness, "loss_normalization": loss_normalization, "head_conv_depth": head_conv_depth,
                         "crowd_ioa": crowd_ioa, "allowed_border": allowed_border, "box_loss": box_loss,
                         "smooth_l1_beta": smooth_l1_beta}
                plain = {"objectness": "sigmoid", "loss_normalization": "sampled", "head_conv_depth": 1, "crowd_ioa": None,
                         "allowed_border": None, "box_loss": LossConfig.box_loss, "smooth_l1_beta": LossConfig.smooth_l1_beta}
                unsupported = {f"model.{name}": value for name, value in given.items() if value != plain[name]}
                if unsupported:
                    raise SettingError(f"model.head='cascade' does not support {unsupported}; leave them at their "
                                       "defaults (its box losses are IoU losses)")
                self.rpn = CascadeRPN(
                    self.anchor_generator,
                    in_channels=self.backbone.out_channels,
                    num_stages=cascade_stages,
                    conv_channels=head_conv_channels,
                    dilation=cascade_dilation,
                    centre_ratio=cascade_centre_ratio,
                    objectness_level=cascade_objectness_level,
                    box_loss_positives=cascade_box_loss_positives,
                    test_iterations=cascade_test_iterations,
                    train_iterations=cascade_train_iterations,
                    delta_scales=cascade_delta_scales,
                    box_coder=self.box_coder,
                    target_config=self.target_config,
                    reg_weight=1.0 if reg_weight is None else reg_weight,
                    quality=quality,
                    proposal_score=proposal_score,
                    seed=anchor_sampling_seed,
                    **proposal_settings,
                )
            else:
                rpn_head = RPNHead(
                    self.backbone.out_channels,
                    num_anchors,
                    conv_channels=head_conv_channels,
                    conv_depth=head_conv_depth,
                    objectness=objectness,
                    anchor_stride=anchor_stride,
                    quality=quality,
                )
                self.rpn = RPN(
                    self.anchor_generator,
                    head=rpn_head,
                    in_channels=self.backbone.out_channels,
                    box_coder=self.box_coder,
                    target_config=self.target_config,
                    loss_normalization=loss_normalization,
                    reg_weight=reg_weight,
                    smooth_l1_beta=smooth_l1_beta,
                    box_loss=box_loss,
                    objectness=objectness,
                    seed=anchor_sampling_seed,
                    quality=quality,
                    proposal_score=proposal_score,
                    **proposal_settings,
                )
        except SettingError:
            raise
        except ValueError as error:  # a head setting that cannot work: one line from the CLI, not a traceback
            raise SettingError(f"model: {error}") from None
        self.channels_last = channels_last
        self.backbone.to(memory_format=self.memory_format)
        self.rpn.to(memory_format=self.memory_format)
        self.register_buffer(
            "pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False
        )
        self.val_recall = ProposalRecall(
            iou_thresholds=recall_iou_thresholds, max_proposals=recall_max_proposals
        )
        # per evaluation loss, its sum over the evaluation's images (times their batch's size) and those images
        self._evaluation_losses: dict[str, tuple[Tensor, int]] = {}
        self.last_recall: dict[str, float] = {}
        self.last_recall_curves: dict[str, tuple[list, list[float]]] = {}
        self.last_recall_step: int | None = None  # the global step whose weights gave last_recall
        self.last_recall_epoch: int | None = None  # and the epoch it validated
        # what the weights were trained to: a checkpoint's loaded outside fit, or the last fit's
        self.trained_counters: TrainedCounters | None = None
        self._evaluation_dating = ExitStack()  # Lightning's logging at trained_counters' step
        self.resize_policy: ResizePolicy | None = None  # of the training data; see setup()
        self._strides_checked = False
        self._unit_range_warned = False

    @property
    def skipped_nonfinite_batches(self) -> int:
        """Training batches skipped so far for a non-finite loss or gradient (``nonfinite_loss="skip"``)."""
        return self.nonfinite_policy.skipped

    @skipped_nonfinite_batches.setter
    def skipped_nonfinite_batches(self, count: int) -> None:
        self.nonfinite_policy.skipped = count

    def configure_callbacks(self) -> list[pl.Callback]:
        """The non-finite policy (``nonfinite_loss``), installed in every trainer the module runs in
        (once: a ``validate`` after ``fit`` on the same trainer finds it there, and Lightning would
        warn that it overrides a callback "passed to Trainer")."""
        trainer = self._trainer
        if trainer is not None and any(callback is self.nonfinite_policy for callback in trainer.callbacks):
            return []
        return [self.nonfinite_policy]

    @property
    def memory_format(self) -> torch.memory_format:
        """The backbone's and the head's: ``channels_last`` or contiguous. Derived, not stored:
        a ``torch.memory_format`` cannot be pickled (``torch.save(model)``)."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    # ------------------------------------------------------------------ forward
    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or 0-255 float) ``[B, 3, H, W]`` -> normalised with ImageNet mean/std, in the
        module's floating dtype (float32; half / bf16 / float64 after ``.to(dtype)`` or a
        ``*-true`` precision) and memory format (``channels_last``), ready for the backbone.

        Float images whose values all lie in [0, 1] (torchvision's ``ToTensor`` scale) get a
        warning, once: batches are 0-255, and such images would look nearly black.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"RPNModule: expected images [B, 3, H, W], got shape {tuple(images.shape)}"
            )
        if images.is_floating_point() and not self._unit_range_warned and not torch.compiler.is_compiling():
            self._warn_if_unit_range(images)
        normalized = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        return normalized.contiguous(memory_format=self.memory_format)

    def _warn_if_unit_range(self, images: Tensor) -> None:
        if images.numel() and float(images.max()) <= 1.0 and float(images.min()) >= 0.0:
            self._unit_range_warned = True
            rank_zero_warn(
                "RPNModule: the float images of this batch all lie in [0, 1], but batch images are 0-255 "
                "(uint8, as RPNCollate makes them); scale them by 255 (predict_images takes [0, 1] floats)"
            )

    def features(self, images: Tensor) -> list[Tensor] | dict[str, Tensor]:
        """The backbone's level features of a padded uint8 batch ``[B, 3, Hp, Wp]``; on the first
        batch, its declared ``strides`` are checked against them (anchors are laid out with them)."""
        features = self.backbone(self.normalize(images))
        if not self._strides_checked:
            check_feature_strides(self.backbone, tuple(images.shape[-2:]), features, "RPNModule")
            self._strides_checked = True
        return features

    def _check_padding(self, images: Tensor) -> None:
        height, width = images.shape[-2:]
        if height % self.size_divisibility or width % self.size_divisibility:
            raise ValueError(
                f"RPNModule: batch images are {height}x{width}, not a multiple of the backbone's "
                f"size_divisibility {self.size_divisibility}; pad the batch (RPNDataModule does)"
            )

    def forward(
        self,
        batch: RPNBatch,
        need_proposals: bool = True,
        with_targets: bool = True,
        proposal_logits: bool = False,
    ) -> tuple[list[tuple[Tensor, ...]], dict[str, Tensor]]:
        """Proposals per image ``(boxes [P, 4], scores [P])`` in resized-image pixels, and losses.

        Losses are computed when ``with_targets`` (from ``batch.anchor_targets`` when they were
        sampled for the current epoch, else from the gt boxes, sampled for the current epoch);
        ``proposal_logits`` adds each proposal's logit ``[P]``.
        """
        if not isinstance(batch, RPNBatch):
            raise TypeError(
                f"RPNModule: a batch must be an RPNBatch (lightning_rpn.data.RPNBatch), got {type(batch).__name__}; "
                "a DataLoader of your own makes them with collate_fn=lightning_rpn.data.RPNCollate(...) over "
                "DetectionSample items (see the README's library section), or use RPNDataModule"
            )
        self._check_padding(batch.images)
        features = self.features(batch.images)
        epoch = self.current_epoch
        return self.rpn(
            features,
            batch.image_sizes,
            targets=batch.targets if with_targets else None,
            anchor_targets=batch.anchor_targets_for(epoch) if with_targets else None,
            image_ids=batch.image_ids,
            sampling_keys=batch.sampling_keys or None,
            sampling_epoch=epoch,
            need_proposals=need_proposals,
            proposal_logits=proposal_logits,
        )

    # ------------------------------------------------------------------ steps
    def _run(self, batch: RPNBatch, stage: str, **kwargs: Any) -> tuple[list, dict[str, Tensor]]:
        """``forward`` with the batch's image ids added to any error (e.g. a non-finite loss)."""
        try:
            return self(batch, **kwargs)
        except ValueError as error:
            hint = ""
            if isinstance(error, NonFiniteLossError):
                hint = self._float16_hint() + "; lower model.lr, set trainer.gradient_clip_val, or check these images' boxes"
                if stage == "training":
                    hint += " (model.nonfinite_loss='skip' skips such batches)"
            # keep a non-finite loss recognisable to callers (training_step's skip policy)
            wrapped = NonFiniteLossError if isinstance(error, NonFiniteLossError) else ValueError
            raise wrapped(
                f"RPNModule {stage} step (global step {self.global_step}) on images "
                f"{list(batch.image_ids)}: {error}{hint}"
            ) from error

    def _float16_hint(self) -> str:
        """The non-finite hint's first advice when parameters are float16 (``16-true``, ``.half()``), else ``""``:
        float16 overflows above 65504 and loses gradients below 6e-8, which no learning rate fixes."""
        if not any(parameter.dtype == torch.float16 for parameter in self.parameters()):
            return ""
        precision = getattr(self._trainer, "precision", None)
        source = f"trainer.precision {precision!r}" if precision is not None else "a model cast with .half()"
        return (
            f"; the parameters are float16 ({source}), whose range (6e-8 to 65504) activations and gradients "
            "easily leave: train with --trainer.precision 16-mixed, bf16-mixed or bf16-true"
        )

    def _log_losses(self, stage: str, losses: dict[str, Tensor], batch_size: int) -> Tensor:
        """Log each training step's losses; add an evaluation's up, for their mean over its images
        (:meth:`_log_evaluation_losses`)."""
        loss = losses["loss_rpn_cls"] + losses["loss_rpn_reg"]
        values = {f"{stage}/loss": loss, **{f"{stage}/{k}": v for k, v in losses.items()}}
        if stage == "train":
            self.log_dict(values, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
            return loss
        for name, value in values.items():
            total, images = self._evaluation_losses.get(name, (0.0, 0))
            self._evaluation_losses[name] = (total + value.detach().float() * batch_size, images + batch_size)
        return loss

    def _log_evaluation_losses(self) -> None:
        """Log each evaluation loss as its mean over the images of every process (a batch's loss
        weighted by its size). Lightning's own ``sync_dist`` mean averages the processes' image
        counts as integers: on shares of unequal size (7 images on 2 processes) it was off, by 7/6
        there."""
        for name, (total, images) in self._evaluation_losses.items():
            local = torch.stack([total, total.new_tensor(float(images))])
            summed = self.trainer.strategy.reduce(local, reduce_op="sum")
            # every process now holds the same mean: sync_dist=True says so, and Lightning stops warning
            self.log(name, summed[0] / summed[1], prog_bar=True, sync_dist=True)
        self._evaluation_losses = {}

    def training_step(self, batch: RPNBatch, batch_idx: int) -> Tensor:
        """The batch's loss; a non-finite one goes to the non-finite policy (raise, or a zero loss
        that updates nothing)."""
        try:
            _, losses = self._run(batch, "training", need_proposals=False)
        except NonFiniteLossError as error:
            return self.nonfinite_policy.step_loss(self, None, error)
        return self.nonfinite_policy.step_loss(self, self._log_losses("train", losses, len(batch)))

    def on_train_epoch_start(self) -> None:
        """Workers sample this epoch's anchors (``RPNCollate.set_epoch``) before its first batch."""
        set_sampling_epoch([self.trainer.train_dataloader, self.trainer.val_dataloaders], self.current_epoch)

    def setup(self, stage: str) -> None:
        """At ``fit``, record the data module's ``resize_policy`` (kept in checkpoints) for ``predict_images``."""
        policy = getattr(self.trainer.datamodule, "resize_policy", None)
        if stage == "fit" and isinstance(policy, ResizePolicy):
            self.resize_policy = policy

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SKIPPED_KEY] = self.skipped_nonfinite_batches
        checkpoint[RESIZE_KEY] = None if self.resize_policy is None else asdict(self.resize_policy)
        drop_empty_loader_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights trained as another network (:func:`check_checkpoint_agrees`), before they
        load, and a fit resumed with another optimiser or other trainable backbone parameters
        (:func:`check_resume_agrees`, :func:`check_optimizer_agrees`), before the optimiser's state
        loads; restore the skip count and the training resize; resume a
        checkpoint where it was saved (:func:`~.resume_state.resume_where_saved`: an interrupted
        validation runs again, a save at an epoch's end resumes at the next epoch's start, one after
        ``max_steps`` stopped inside an epoch with that epoch's next batch), and a moved run folder
        with its own files (:func:`~.moved_run.follow_moved_run`)."""
        resume_where_saved(checkpoint)
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        self.check_checkpoint(checkpoint, getattr(self._trainer, "ckpt_path", None), fitting)
        if self._trainer is not None:
            follow_moved_run(self._trainer, checkpoint)
        self.skipped_nonfinite_batches = int(checkpoint.get(SKIPPED_KEY, 0))
        resize = checkpoint.get(RESIZE_KEY)
        self.resize_policy = None if resize is None else ResizePolicy(**resize)
        if not fitting:  # Lightning restores epoch and step in fit only: date the evaluation ourselves
            self.trained_counters = TrainedCounters.of_checkpoint(checkpoint)

    def check_checkpoint(self, checkpoint: Mapping[str, Any], path: str | None, fitting: bool) -> None:
        """A :class:`SettingError` when ``checkpoint`` holds weights trained as another network
        (:func:`check_checkpoint_agrees`), or, ``fitting`` from its optimiser state, with another
        optimiser or other trainable backbone parameters (:func:`check_resume_agrees`,
        :func:`check_optimizer_agrees`). The command line calls it before the run starts (no file and
        no W&B run touched by a refused command); loading calls it again."""
        current = dict(self.hparams)
        if str(current.get("backbone")).startswith(_CUSTOM_BACKBONE):  # a module: its weights' shapes tell
            current.pop("backbone")
        saved = checkpoint.get("hyper_parameters", {})
        width = getattr(self.backbone, "out_channels", None)  # what head_conv_channels None means
        saved, current = _head_width_given(saved, width), _head_width_given(current, width)
        check_checkpoint_agrees(saved, current, path)
        if fitting and "optimizer_states" in checkpoint:
            if isinstance(self.backbone, StagedBackbone):
                check_resume_agrees(saved, current, len(self.backbone.stages), path)
            else:  # a backbone of one's own: only the optimiser decides what its state holds
                check_optimizer_agrees(saved, current, path)

    def _window_proposals(
        self, batch: RPNBatch, targets: list[WindowTargets] | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image, ``(boxes, scores, logits)`` of its sliding windows (:func:`~lightning_rpn.training.windowed.window_proposals`)."""
        return window_proposals(self, batch, targets)

    def _eval_step(self, batch: RPNBatch, stage: str) -> dict[str, Any]:
        if self.sliding_window is not None:  # losses per window, from the gt boxes cut by each
            datamodule = getattr(self._trainer, "datamodule", None)  # its rule for cut boxes, as in training
            visibility = getattr(getattr(datamodule, "hparams", None), "min_visibility", 0.0)
            proposals, losses, windows = window_losses(self, batch, float(visibility))
            self._log_losses(stage, losses, windows)
        else:
            proposals, losses = self._run(batch, stage, need_proposals=True)
            self._log_losses(stage, losses, len(batch))
        # area ranges at the original image's scale, as predict and COCO (the resize scales box areas);
        # an image standing in for an unusable one is left out (it is counted at its own position)
        counted, areas = batch.evaluated, _original_areas(batch)
        self.val_recall.update([proposals[i][0] for i in counted], [batch.gt_boxes[i] for i in counted],
                               areas=[areas[i] for i in counted])
        return {"proposals": proposals}

    # dataloader_idx (here and in predict_step): Lightning checks it is there before any hook runs;
    # several loaders are then refused by _check_one_dataloader, which says what to do instead
    def validation_step(self, batch: RPNBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: RPNBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def _end_recall_epoch(self, stage: str) -> None:
        self._log_evaluation_losses()
        results = self.val_recall.compute()
        # compute() already summed the states of every process, so each rank holds the global
        # values; sync_dist=True says so (averaging equal values), and Lightning stops warning
        self.log_dict({f"{stage}/{k}": v for k, v in results.items()}, sync_dist=True)
        if not self.trainer.sanity_checking:  # a batch or two, never reported: no table may show it
            self._keep_recall(results)
        self.val_recall.reset()

    def _keep_recall(self, results: dict[str, Tensor]) -> None:
        """``last_recall`` / ``last_recall_curves`` from ``val_recall``'s ``results``, dated by the
        weights' epoch and step (:mod:`.evaluated_weights`)."""
        self.last_recall = {k: float(v) for k, v in results.items()}
        self.last_recall_curves = self.val_recall.curves()
        self.last_recall_epoch, self.last_recall_step = evaluated_counters(self.trainer)

    def _forget_recall(self) -> None:
        self.last_recall, self.last_recall_curves = {}, {}
        self.last_recall_step = self.last_recall_epoch = None

    def _check_one_dataloader(self) -> None:
        """One recall, table and set of proposals per evaluation or predict: several dataloaders
        would be pooled into one figure, and Lightning's own refusal asks to edit our step."""
        trainer = self.trainer
        if trainer.testing:
            stage, counts = "test", trainer.num_test_batches
        elif trainer.predicting:
            stage, counts = "predict", trainer.num_predict_batches
        else:
            stage = "val"
            counts = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        if len(counts) > 1:
            raise SettingError(
                f"RPNModule: {len(counts)} {stage} dataloaders given; it takes one (one recall, table and "
                f"set of proposals a run). Join them with torch.utils.data.ConcatDataset, or run each with its "
                f"own trainer.{_STAGE_CALLS[stage]}(model, dataloaders=loader)"
            )

    def _start_evaluation(self) -> None:
        """Count from zero, whatever an evaluation that failed or was interrupted left in
        ``val_recall`` or open; log at the weights' epoch and step outside fit
        (:mod:`.evaluated_weights`; inside fit a checkpoint saved at this validation's end must
        keep Lightning's own counts)."""
        self._check_one_dataloader()
        self._evaluation_dating.close()
        self.val_recall.reset()
        self._evaluation_losses = {}
        trained = counters_in_use(self.trainer, self.trained_counters)
        if trained is not None:
            self._evaluation_dating.enter_context(logged_as(self.trainer, trained))

    def _end_evaluation(self) -> None:
        self._evaluation_dating.close()

    def on_fit_start(self) -> None:
        """The trainer's counters date this fit's weights, and no recall of earlier weights (an
        earlier evaluation's or predict's) may be reported as this fit's."""
        self.trained_counters = None
        self._forget_recall()

    def on_train_end(self) -> None:
        """Keep what the weights were trained to, for evaluations by another trainer."""
        self.trained_counters = TrainedCounters.of_trainer(self.trainer)

    on_validation_start = on_test_start = _start_evaluation
    on_test_end = _end_evaluation

    def on_validation_end(self) -> None:
        """End the evaluation's dating; after the sanity check, refuse checkpoint and early-stopping
        monitors that validation does not log (:func:`check_monitored_metrics`), before training."""
        self._end_evaluation()
        if self.trainer.sanity_checking:
            check_monitored_metrics(self.trainer)

    def on_validation_epoch_end(self) -> None:
        self._end_recall_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_recall_epoch("test")

    def on_predict_epoch_start(self) -> None:
        self._check_one_dataloader()
        self.val_recall.reset()
        self._forget_recall()

    def on_predict_batch_end(
        self, outputs: list[dict[str, Any]], batch: RPNBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Recall of the predicted proposals against the batch's gt boxes, in original-image pixels
        (``outputs`` hold the images :attr:`RPNBatch.evaluated` names, as :meth:`predict_step` returns them)."""
        gt_boxes = [
            to_original_coordinates(batch.gt_boxes[i].to(self.device).float(), batch.image_sizes[i],
                                    batch.original_sizes[i])
            for i in batch.evaluated
        ]
        areas = _original_areas(batch)
        self.val_recall.update([item["boxes"] for item in outputs], gt_boxes,
                               areas=[areas[i] for i in batch.evaluated])

    def on_predict_epoch_end(self) -> None:
        """``last_recall`` / ``last_recall_curves`` of the predicted split, when it has gt boxes.

        Lightning's ``self.log`` is not allowed in predict, so the recall goes to the loggers
        directly (``predict/AR@100``, ..., at the step of the weights, as a validation of them
        would be dated), ``RecallTable`` prints it and the CLI writes it to JSON; a split without
        any gt box (a folder of images) leaves ``last_recall`` empty and logs nothing.
        """
        results = self.val_recall.compute()
        k = self.val_recall.max_proposals[0]
        if float(results[f"AR@{k}"]) >= 0:  # -1: no gt box in the whole split
            self._keep_recall(results)
            step = evaluated_counters(self.trainer)[1]
            for logger in self.trainer.loggers:  # Lightning's loggers write on global rank 0 only
                logger.log_metrics({f"predict/{name}": value for name, value in self.last_recall.items()}, step=step)
        self.val_recall.reset()

    def predict_step(self, batch: RPNBatch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per image ``{"image_id", "boxes" [P, 4], "scores" [P], "objectness_logits" [P]}``,
        boxes in original-image pixels; an image standing in for an unusable one is left out (its
        own position in the split predicts it)."""
        if self.sliding_window is not None:
            proposals: list = self._window_proposals(batch)
        else:
            proposals, _ = self._run(batch, "predict", need_proposals=True, with_targets=False, proposal_logits=True)
        outputs = []
        for i in batch.evaluated:
            boxes, scores, logits = proposals[i]
            outputs.append({
                "image_id": batch.image_ids[i],
                "boxes": to_original_coordinates(boxes, batch.image_sizes[i], batch.original_sizes[i]),
                "scores": scores,
                "objectness_logits": logits,
            })
        return outputs

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimization(self.optim_config, self, lambda: fit_total_steps(self.trainer))

    # ------------------------------------------------------------------ inference helper
    @overload
    def predict_images(
        self, images: ImageInput, resize: ResizePolicy | None = None, batch_size: int = 1
    ) -> dict[str, Tensor]: ...

    @overload
    def predict_images(
        self, images: Sequence[ImageInput] | np.ndarray | Tensor, resize: ResizePolicy | None = None,
        batch_size: int = 1,
    ) -> list[dict[str, Tensor]]: ...

    def predict_images(
        self,
        images: ImageInput | Sequence[ImageInput],
        resize: ResizePolicy | None = None,
        batch_size: int = 1,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Proposals for loose images, in their original pixel coordinates.

        ``images``: one image or a sequence of them, each a file path, a PIL image, an RGB
        array ``H x W x 3`` or a tensor ``[3, H, W]`` (torchvision's layout), uint8 (0..255)
        or float (0..1); grayscale (``H x W``, ``[1, H, W]``) and RGBA (alpha dropped) too. A
        4-D array or tensor is a batch (``[B, H, W, 3]`` / ``[B, 3, H, W]``). They go through
        the evaluation pipeline: ``resize``, padding and collation as in
        :class:`~lightning_rpn.training.datamodule.RPNDataModule`. ``resize=None`` uses the policy of
        the data the model was trained on (:attr:`resize_policy`, recorded at ``fit`` and kept
        in checkpoints; no resize when unknown); ``ResizePolicy()`` keeps the size. Returns per
        image ``{"boxes" [P, 4], "scores" [P], "objectness_logits" [P]}``, best first: a
        dict for one image, a list for a sequence or batch.
        """
        return predict_images(self, images, resize, batch_size)
