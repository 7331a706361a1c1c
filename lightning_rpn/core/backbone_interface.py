"""The backbone interface: what the RPN, the module and the data pipeline need of a backbone.

Shapes: ``B`` images, ``L`` levels, ``H_l x W_l`` the feature size of level ``l``.

The built-in backbones (:mod:`lightning_rpn.core.backbones`) have it, and a user's own
``nn.Module`` works if it provides the same:

- ``forward(images: Tensor[B, 3, H, W]) -> list[Tensor[B, out_channels, H_l, W_l]]``, one
  feature map per level, finest first (a dict is taken in its order, and a single tensor is one
  level, as torchvision's ``GeneralizedRCNN`` takes it: a C4 backbone such as
  ``nn.Sequential(*list(resnet.children())[:-3])`` works as it is). ``images`` are float and
  already normalised (the module converts the uint8 batch and applies ImageNet mean/std).
- ``out_channels: int``: channels of every level (the RPN head is shared across levels).
- ``strides: tuple[int, ...]``: input pixels per feature cell, one per level, increasing.
  They are measured on the network by a dry run (:func:`infer_strides`), never typed twice.
- ``size_divisibility: int``: inputs are zero-padded to a multiple of this, which must be a
  multiple of the largest stride (the built-in backbones use the largest stride). An input of
  that size gives feature maps of exactly ``H / stride x W / stride``, which is what the anchor
  generator assumes when the data pipeline computes targets in its workers.

:func:`check_backbone` checks the attributes when a backbone is given; :func:`check_feature_strides`
checks the declared strides against the feature maps of a first batch; :func:`feature_levels` reads
a backbone's output as its list of levels; :func:`evaluation_mode` runs a module in eval mode and
puts back every submodule's mode (for dry runs on a user's module).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["check_backbone", "check_feature_strides", "evaluation_mode", "feature_levels", "infer_strides"]

Features = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
"""A backbone's output: one tensor per level in a list or a dict, or a single tensor (one level)."""


def feature_levels(features: Features, where: str) -> list[Tensor]:
    """``features`` as a list of per-level tensors: a dict in its order, a single tensor as one level.

    A single tensor must not be iterated: that would split it along the batch, one image per "level".
    """
    if isinstance(features, Tensor):
        return [features]
    levels = list(features.values()) if isinstance(features, Mapping) else list(features)
    for level, feature in enumerate(levels):
        if not isinstance(feature, Tensor):
            raise TypeError(
                f"{where}: feature level {level} is a {type(feature).__name__}, not a Tensor; features are "
                "one [B, C, H_l, W_l] tensor per level (a list, a dict, or a single tensor for one level)"
            )
    return levels


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; afterwards each submodule's ``training`` flag as
    it was. ``module.train(was_training)`` would not do: it sets every submodule alike, so a part
    the caller keeps in eval mode (a frozen backbone body, its BatchNorm statistics fixed) would
    come back in train mode."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes.items():
            submodule.training = training


def infer_strides(body: nn.Module, size: int = 128) -> tuple[int, ...]:
    """Strides of ``body``'s output levels, measured by dry runs on zero images.

    Runs a ``size x size`` and a ``2size x 2size`` input; each level's side must divide the
    input side and give the same stride both times (``size`` must be a multiple of the
    largest stride). The body runs in eval mode under ``no_grad`` (BatchNorm on a 1x1 map
    would fail in train mode); afterwards each of its submodules is in the mode it was in.
    """
    param = next(body.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32  # a .double() body
    measured = []
    with evaluation_mode(body), torch.no_grad():
        for side in (size, 2 * size):
            probe = torch.zeros(1, 3, side, side, device=device, dtype=dtype)
            features = feature_levels(body(probe), "infer_strides")
            measured.append([(side, tuple(f.shape[-2:])) for f in features])
    strides = []
    for level, ((side1, hw1), (side2, hw2)) in enumerate(zip(*measured)):
        candidates = {side1 / hw1[0], side1 / hw1[1], side2 / hw2[0], side2 / hw2[1]}
        if len(candidates) != 1 or not next(iter(candidates)).is_integer():
            raise ValueError(
                f"infer_strides: level {level} of {type(body).__name__} has sides {hw1} on a "
                f"{side1}x{side1} input and {hw2} on a {side2}x{side2} input; expected one "
                f"integer stride (is size={size} a multiple of the largest stride?)"
            )
        strides.append(int(candidates.pop()))
    return tuple(strides)


def check_backbone(backbone: nn.Module, where: str = "backbone") -> None:
    """Raise a TypeError naming the missing piece if ``backbone`` lacks the interface."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(backbone).__name__}")
    for name, kind in (("out_channels", int), ("size_divisibility", int), ("strides", tuple)):
        value = getattr(backbone, name, None)
        if not isinstance(value, kind):
            raise TypeError(
                f"{where}: {type(backbone).__name__}.{name} must be {kind.__name__}, got "
                f"{value!r}; see lightning_rpn.core.backbone_interface"
            )
    if not backbone.strides or any(not isinstance(s, int) or s <= 0 for s in backbone.strides):
        raise TypeError(
            f"{where}: {type(backbone).__name__}.strides must be positive ints, "
            f"got {backbone.strides!r}"
        )
    if backbone.size_divisibility % max(backbone.strides):
        raise ValueError(
            f"{where}: {type(backbone).__name__}.size_divisibility={backbone.size_divisibility} "
            f"is not a multiple of its largest stride {max(backbone.strides)}"
        )


def check_feature_strides(backbone: nn.Module, image_size: tuple[int, int], features: Features, where: str) -> None:
    """Raise a ValueError if ``backbone``'s declared ``strides`` disagree with its ``features``
    of a padded ``image_size`` batch: the anchors are laid out with the declared strides, and a
    wrong one would place them off the features silently."""
    levels = feature_levels(features, f"{where}: backbone {type(backbone).__name__}")
    declared = tuple(backbone.strides)
    name = type(backbone).__name__
    if len(levels) != len(declared):
        raise ValueError(
            f"{where}: backbone {name} returned {len(levels)} feature levels but declares "
            f"strides {declared} ({len(declared)} levels)"
        )
    height, width = image_size
    for level, (feature, stride) in enumerate(zip(levels, declared)):
        if tuple(feature.shape[-2:]) != (height // stride, width // stride):
            measured_h, measured_w = height / feature.shape[-2], width / feature.shape[-1]
            measured = (f"{measured_h:g}" if measured_h == measured_w
                        else f"{measured_h:g} (height) / {measured_w:g} (width)")
            raise ValueError(
                f"{where}: backbone {name} declares strides {declared}, but level {level} "
                f"measures stride {measured}, not {stride}: its {feature.shape[-2]}x"
                f"{feature.shape[-1]} feature map of the {height}x{width} batch; fix "
                f"{name}.strides (anchors are laid out with them)"
            )
