"""The yardstick of the training-parity harness: torchvision's RPN in a plain PyTorch loop.

Shapes: ``B`` images, ``Hp x Wp`` the padded batch, ``N`` anchors of an image, ``G`` gt boxes.

:class:`TorchvisionLoop` is what a torchvision user writes in a hundred lines: torchvision's
``resnet_fpn_backbone``-style ``BackboneWithFPN``, ``AnchorGenerator``, ``RPNHead`` and
``RegionProposalNetwork``, an SGD optimiser, a ``LambdaLR`` schedule, gradient-norm clipping.
:meth:`TorchvisionLoop.from_module` builds it with the same settings as an
:class:`~lightning_rpn.training.module.RPNModule` and copies the module's weights into it, so that both
start from **identical weights**; :meth:`TorchvisionLoop.step` trains on one of our
:class:`~lightning_rpn.data.batch.RPNBatch` batches (the same images, crops and boxes the module
saw). With ``sampled_labels`` it makes torchvision's sampler draw the anchors our sampler drew,
so that every later quantity can be compared one to one.

Everything here is torchvision's own code path; only the weight copy, the batch conversion and
the optional injected sampler are ours.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from lightning_rpn.core.backbones import _last_conv_channels
from lightning_rpn.core.matching import match_anchors
from lightning_rpn.training.optim import weight_decay_groups

__all__ = [
    "InjectedSampler", "ParityReport", "StepDifference", "StepRecord", "StepRecorder", "TorchvisionLoop",
    "compare_training", "copy_weights", "relative_difference",
]


def copy_weights(source: nn.Module, target: nn.Module, where: str) -> None:
    """Copy ``source``'s parameters and buffers into ``target`` in registration order.

    The two modules are the same network written with different module names (our staged
    backbone against torchvision's ``BackboneWithFPN``; our head against torchvision's), so the
    ``state_dict`` entries correspond one to one; every shape is checked.
    """
    source_state = list(source.state_dict().values())
    target_state = target.state_dict()
    if len(source_state) != len(target_state):
        raise ValueError(
            f"copy_weights({where}): {len(source_state)} tensors in the source, "
            f"{len(target_state)} in the target"
        )
    copied = OrderedDict()
    for (name, expected), value in zip(target_state.items(), source_state):
        if expected.shape != value.shape:
            raise ValueError(
                f"copy_weights({where}): {name} has shape {tuple(expected.shape)} in the target, "
                f"{tuple(value.shape)} in the source"
            )
        copied[name] = value.detach().clone()
    target.load_state_dict(copied)


class InjectedSampler:
    """Stands in for torchvision's ``BalancedPositiveNegativeSampler``: returns given draws.

    ``labels``: per image the sampled labels ``[N]`` (1 / 0 / -1) that the other side drew.
    """

    def __init__(self) -> None:
        self.labels: list[Tensor] | None = None

    def __call__(self, matched_labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.labels is None:
            raise RuntimeError("InjectedSampler: no labels injected for this step")
        positives = [(labels == 1).to(torch.uint8) for labels in self.labels]
        negatives = [(labels == 0).to(torch.uint8) for labels in self.labels]
        return positives, negatives


@dataclass
class StepRecord:
    """What one reference step computed: the pieces the harness compares."""

    anchors: Tensor  # [N, 4], of image 0 (every image of a batch has the same anchors)
    matched_labels: list[Tensor]  # per image [N] float: 1 / 0 / -1 before sampling
    matched_boxes: list[Tensor]  # per image [N, 4]
    regression_targets: list[Tensor]  # per image [N, 4]
    losses: dict[str, float]
    gradients: dict[str, Tensor]  # our parameter name -> gradient (before clipping)


class TorchvisionLoop:
    """torchvision's backbone + RPN, trained by a plain loop (see the module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        rpn: RegionProposalNetwork,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        pixel_mean: Tensor,
        pixel_std: Tensor,
        gradient_clip_norm: float | None,
        parameter_names: dict[int, str],
    ) -> None:
        self.backbone = backbone
        self.rpn = rpn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.pixel_mean = pixel_mean
        self.pixel_std = pixel_std
        self.gradient_clip_norm = gradient_clip_norm
        self.parameter_names = parameter_names
        self.injected = InjectedSampler()
        self._own_sampler = rpn.fg_bg_sampler

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        gradient_clip_norm: float | None = None,
        make_optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
        schedule: Callable[[int], float] | None = None,
        norm_weight_decay: float | None = None,
    ) -> TorchvisionLoop:
        """The torchvision equivalent of ``module`` (an ``RPNModule`` with a ``resnet*_fpn``
        backbone and a one-conv head), with ``module``'s weights copied in.

        ``make_optimizer`` receives parameter groups ``[{"params", "weight_decay"}]``: the
        normalisation layers' parameters get ``norm_weight_decay`` (``None``: the module's
        ``weight_decay``, as a plain loop does), the others ``weight_decay``; default: SGD with
        the module's ``lr`` and ``momentum``. ``schedule`` is the ``LambdaLR`` factor (default:
        constant 1).
        """
        hp = module.hparams
        arch = str(hp.backbone).removesuffix("_fpn")
        if arch not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(f"TorchvisionLoop: needs a resnet*_fpn backbone, got {hp.backbone!r}")
        norm = nn.BatchNorm2d if not _has_frozen_bn(module.backbone) else torchvision.ops.FrozenBatchNorm2d
        network = getattr(torchvision.models, arch)(weights=None, norm_layer=norm)
        stage_channels = [_last_conv_channels(getattr(network, f"layer{i}")) for i in range(1, 5)]
        backbone = BackboneWithFPN(
            network,
            return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
            in_channels_list=stage_channels,
            out_channels=module.backbone.out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        copy_weights(module.backbone, backbone, "backbone")
        for ours, theirs in zip(module.backbone.parameters(), backbone.parameters()):
            theirs.requires_grad_(ours.requires_grad)
        generator = module.anchor_generator
        head = TVRPNHead(module.backbone.out_channels, generator.num_anchors_per_location())
        copy_weights(module.rpn.head, head, "head")
        config = module.target_config
        rpn = RegionProposalNetwork(
            TVAnchorGenerator(tuple(generator.sizes), tuple(generator.aspect_ratios)),
            head,
            fg_iou_thresh=config.fg_iou,
            bg_iou_thresh=config.bg_iou,
            batch_size_per_image=config.batch_size_per_image,
            positive_fraction=config.positive_fraction,
            pre_nms_top_n={"training": hp.pre_nms_top_n_train, "testing": hp.pre_nms_top_n_test},
            post_nms_top_n={"training": hp.post_nms_top_n_train, "testing": hp.post_nms_top_n_test},
            nms_thresh=hp.nms_thresh,
        )
        # parameter names in our module's naming, for comparing gradients and weights
        ours = [f"backbone.{name}" for name, _ in module.backbone.named_parameters()]
        ours += [f"rpn.head.{name}" for name, _ in module.rpn.head.named_parameters()]
        theirs = list(backbone.parameters()) + list(head.parameters())
        names = {id(parameter): name for parameter, name in zip(theirs, ours)}
        norm_decay = hp.weight_decay if norm_weight_decay is None else norm_weight_decay
        groups = weight_decay_groups([backbone, head], hp.weight_decay, norm_decay)
        if make_optimizer is None:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            optimizer = make_optimizer(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or (lambda step: 1.0))
        return cls(backbone, rpn, optimizer, scheduler, module.pixel_mean.detach().clone(),
                   module.pixel_std.detach().clone(), gradient_clip_norm, names)

    def train(self) -> None:
        self.backbone.train()
        self.rpn.train()

    def parameters(self) -> dict[str, Tensor]:
        """Current weights under our module's parameter names."""
        return {self.parameter_names[id(p)]: p.detach() for p in self._all_parameters()}

    def _all_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.rpn.head.parameters())

    def step(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        gt_boxes: Sequence[Tensor],
        sampled_labels: Tensor | None = None,
    ) -> StepRecord:
        """One training step on a padded uint8 batch ``[B, 3, Hp, Wp]``.

        ``sampled_labels`` (``[B, N]``, 1 / 0 / -1): draw exactly these anchors instead of
        torchvision's own random sample.
        """
        self.train()
        normalized = (images.float() - self.pixel_mean) / self.pixel_std
        image_list = ImageList(normalized, [(int(h), int(w)) for h, w in image_sizes])
        features = self.backbone(normalized)
        targets = [{"boxes": boxes.float()} for boxes in gt_boxes]
        if sampled_labels is not None:
            self.injected.labels = list(sampled_labels.to(torch.int64))
            self.rpn.fg_bg_sampler = self.injected  # type: ignore[assignment]
        else:
            self.rpn.fg_bg_sampler = self._own_sampler
        _, losses = self.rpn(image_list, features, targets)
        with torch.no_grad():
            anchors = self.rpn.anchor_generator(image_list, list(features.values()))
            labels, matched = self.rpn.assign_targets_to_anchors(anchors, targets)
            regression = [self.rpn.box_coder.encode_single(m, a) for m, a in zip(matched, anchors)]
        loss = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradients = {self.parameter_names[id(p)]: p.grad.detach().clone()
                     for p in self._all_parameters() if p.grad is not None}
        if self.gradient_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._all_parameters(), self.gradient_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return StepRecord(
            anchors=anchors[0],
            matched_labels=labels,
            matched_boxes=matched,
            regression_targets=regression,
            losses={"loss_rpn_cls": losses["loss_objectness"].item(),
                    "loss_rpn_reg": losses["loss_rpn_box_reg"].item()},
            gradients=gradients,
        )

    @torch.no_grad()
    def proposals(self, images: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Evaluation-mode proposals per image ``[P, 4]``, best first."""
        self.backbone.eval()
        self.rpn.eval()
        normalized = (images.float() - self.pixel_mean) / self.pixel_std
        image_list = ImageList(normalized, [(int(h), int(w)) for h, w in image_sizes])
        boxes, _ = self.rpn(image_list, self.backbone(normalized))
        return boxes


def _has_frozen_bn(backbone: nn.Module) -> bool:
    return any(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in backbone.modules())


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
    optimizer = trainer.optimizers[0]
    schedule = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0])
    defaults = {key: value for key, value in optimizer.defaults.items() if key != "weight_decay"}
    loop = TorchvisionLoop.from_module(
        initial, gradient_clip_norm=gradient_clip_val,
        make_optimizer=lambda groups: type(optimizer)(groups, **defaults), schedule=schedule,
        norm_weight_decay=getattr(initial.hparams, "norm_weight_decay", 0.0),
    )
    config = initial.target_config
    differences = []
    for index, recorded in enumerate(recorder.steps):
        record = loop.step(recorded.images, recorded.image_sizes, recorded.gt_boxes, recorded.anchor_labels)
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
            value = relative_difference(ours_grad, record.gradients[name])
            gradient_diff[part] = max(gradient_diff.get(part, 0.0), value)
        differences.append(StepDifference(
            step=index,
            anchors=relative_difference(ours_anchors, record.anchors),
            labels_differ=labels_differ,
            matched_boxes=box_diff,
            sampled_differ=sampled_differ,
            regression_targets=relative_difference(recorded.positive_deltas, torch.cat(theirs_targets)),
            loss_cls=abs(recorded.losses["loss_rpn_cls"] - record.losses["loss_rpn_cls"])
            / max(abs(record.losses["loss_rpn_cls"]), 1e-12),
            loss_reg=abs(recorded.losses["loss_rpn_reg"] - record.losses["loss_rpn_reg"])
            / max(abs(record.losses["loss_rpn_reg"]), 1e-12),
            gradients=gradient_diff,
        ))
    theirs_weights = loop.parameters()
    weights: dict[str, float] = {}
    for name, parameter in module.named_parameters():
        if name in theirs_weights:
            part = _part(name)
            weights[part] = max(weights.get(part, 0.0), relative_difference(parameter.detach(), theirs_weights[name]))
    return ParityReport(differences, weights)
