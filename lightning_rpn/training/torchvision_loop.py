"""torchvision's RPN in a plain PyTorch loop, started from an RPNModule's weights: the parity yardstick.

Shapes: ``B`` images, ``Hp x Wp`` the padded batch, ``N`` anchors of an image, ``G`` gt boxes.

:class:`TorchvisionLoop` is what a torchvision user writes in a hundred lines: torchvision's
``resnet_fpn_backbone``-style ``BackboneWithFPN``, ``AnchorGenerator``, ``RPNHead`` and
``RegionProposalNetwork``, an SGD optimiser, a ``LambdaLR`` schedule, gradient-norm clipping.
:meth:`TorchvisionLoop.from_module` builds it with the same settings as an
:class:`~lightning_rpn.training.module.RPNModule` and copies the module's weights into it, so that both
start from **identical weights**; :meth:`TorchvisionLoop.step` trains on one of our
:class:`~lightning_rpn.data.batch.RPNBatch` batches (the same images, crops and boxes the module
saw). With ``sampled_labels`` it makes torchvision's sampler draw the anchors our sampler drew,
so that every later quantity can be compared one to one
(:func:`~lightning_rpn.training.torchvision_reference.compare_training` does).

Everything here is torchvision's own code path; only the weight copy, the batch conversion and
the optional injected sampler are ours.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from lightning_rpn.training.optim import build_optimizer, weight_decay_groups

__all__ = ["InjectedSampler", "StepRecord", "TorchvisionLoop", "copy_weights"]


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
        ``weight_decay``, as a plain loop does), the others ``weight_decay``; default: the
        module's optimiser (SGD with its ``lr`` and ``momentum``, or AdamW with its ``lr``).
        ``schedule`` is the ``LambdaLR`` factor (default: constant 1).
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
            optimizer = build_optimizer(hp.optimizer, groups, hp.lr, hp.momentum)
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
