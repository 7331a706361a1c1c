"""Every default of the recipe, declared once, in small frozen config objects.

Each object holds one group of settings, checks them once when it is built and names the bad
value; :class:`~lightning_rpn.core.rpn.RPN`, :class:`~lightning_rpn.training.module.RPNModule`, the data
module and the CLI read their defaults from here (a flat argument's default is the class
attribute, e.g. ``ProposalConfig.post_nms_top_n_train``), so they cannot disagree.

The defaults are detectron2's ``rpn_R_50_FPN_1x`` recipe, the one the README documents:

- :class:`AnchorConfig`: sizes 32-512 (one per level P2-P6), ratios 0.5 / 1 / 2;
- :class:`AnchorTargetConfig`: positives at IoU >= 0.7, negatives < 0.3, 256 anchors per image,
  half of them positive at most;
- :class:`LossConfig`: ``"sampled"`` normalisation, L1 box loss (detectron2's smooth L1 with
  beta 0);
- :class:`ProposalConfig`: 2000 / 1000 pre- / post-NMS proposals in training, 1000 / 1000 in
  evaluation, NMS 0.7;
- :class:`OptimConfig`: SGD lr 0.02, momentum 0.9, weight decay 1e-4 (0 on normalisation
  layers), 1000 warm-up steps from 0.001 lr, x0.1 at 60k and 80k steps.

Pure Python: no torch, no Lightning, importable anywhere.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AnchorConfig",
    "AnchorTargetConfig",
    "BOX_LOSSES",
    "LOSS_NORMALIZATIONS",
    "LR_SCHEDULES",
    "LossConfig",
    "OBJECTNESS_MODES",
    "OPTIMIZERS",
    "OptimConfig",
    "PROPOSAL_SCORES",
    "ProposalConfig",
    "SettingError",
    "check_choice",
]


class SettingError(ValueError):
    """A setting the user gave that cannot work as given (the message names it and says what to
    do): the ``lightning-rpn`` command prints it as one line and exits 2, not as a traceback."""


OBJECTNESS_MODES: tuple[str, ...] = ("sigmoid", "softmax")
LOSS_NORMALIZATIONS: tuple[str, ...] = ("sampled", "paper")
BOX_LOSSES: tuple[str, ...] = ("smooth_l1", "l1", "giou", "iou")
PROPOSAL_SCORES: tuple[str, ...] = ("objectness", "quality", "geometric_mean")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
LR_SCHEDULES: tuple[str, ...] = ("multistep", "cosine")


def check_choice(value: Any, options: tuple[str, ...], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"{where} must be one of {options}, got {value!r}")


def _positive_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where} must be a positive int, got {value!r}")


def _number(value: Any) -> bool:
    """A real number (an int, a float, a NumPy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _in_range(
    value: Any, low: float, high: float, where: str, closed_low: bool = True, closed_high: bool = True
) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``value`` is a number from ``low`` to ``high``
    (each end included unless told); NaN is refused too (it compares false with everything)."""
    above = _number(value) and (value >= low if closed_low else value > low)
    below = _number(value) and (value <= high if closed_high else value < high)
    if not (above and below):
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
        raise ValueError(f"{where} must be a number in {interval}, got {value!r}")


def _finite_at_least_zero(value: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``value`` is a finite number >= 0."""
    if not (_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{where} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class AnchorConfig:
    """Anchor shapes and layout (the strides come from the backbone).

    Attributes:
        sizes: anchor sizes (pixels) per level, or one tuple for every level.
        aspect_ratios: ``h / w`` ratios per level, or one tuple for every level.
        offset: anchor centres at ``(offset + j * anchor_stride) * stride``.
        anchor_stride: anchors at every n-th feature cell (the head's first conv stride).
    """

    sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),)
    offset: float = 0.0
    anchor_stride: int = 1

    def __post_init__(self) -> None:
        _positive_int(self.anchor_stride, "AnchorConfig: anchor_stride")


@dataclass(frozen=True)
class AnchorTargetConfig:
    """How anchors are labelled and sampled.

    Attributes:
        fg_iou: best IoU at or above which an anchor is positive.
        bg_iou: best IoU below which an anchor is negative (in between: ignored).
        allow_low_quality: also make each gt box's best anchors positive.
        allowed_border: if set, anchors reaching more than this many pixels outside the
            image are ignored and left out of matching; ``None`` keeps all anchors.
        batch_size_per_image: anchors sampled per image for the loss.
        positive_fraction: at most this fraction of the sample is positive.
        crowd_ioa: if set, non-positive anchors whose intersection with a crowd box covers at
            least this fraction of the anchor's area are ignored.
    """

    fg_iou: float = 0.7
    bg_iou: float = 0.3
    allow_low_quality: bool = True
    allowed_border: float | None = None
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    crowd_ioa: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise ValueError(
                f"AnchorTargetConfig: need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou}, fg_iou={self.fg_iou}"
            )
        if self.allowed_border is not None and self.allowed_border < 0:
            raise ValueError(f"AnchorTargetConfig: allowed_border must be >= 0 or None, got {self.allowed_border}")
        _positive_int(self.batch_size_per_image, "AnchorTargetConfig: batch_size_per_image")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"AnchorTargetConfig: positive_fraction must be in [0, 1], got {self.positive_fraction}")
        if self.crowd_ioa is not None and not 0.0 < self.crowd_ioa <= 1.0:
            raise ValueError(f"AnchorTargetConfig: crowd_ioa must be in (0, 1] or None, got {self.crowd_ioa}")


@dataclass(frozen=True)
class LossConfig:
    """The RPN loss (see :func:`~lightning_rpn.core.loss.rpn_loss`).

    Attributes:
        normalization: ``"sampled"`` (detectron2 / torchvision) or ``"paper"``.
        reg_weight: box-loss weight lambda; ``None``: 1 for ``"sampled"``, 10 for ``"paper"``.
        smooth_l1_beta: smooth-L1 transition point (``box_loss="smooth_l1"`` only).
        box_loss: ``"smooth_l1"``, ``"l1"``, ``"giou"`` or ``"iou"``.
    """

    normalization: str = "sampled"
    reg_weight: float | None = None
    smooth_l1_beta: float = 1.0 / 9.0
    box_loss: str = "l1"

    def __post_init__(self) -> None:
        check_choice(self.normalization, LOSS_NORMALIZATIONS, "LossConfig: normalization")
        check_choice(self.box_loss, BOX_LOSSES, "LossConfig: box_loss")
        if self.smooth_l1_beta < 0:
            raise ValueError(f"LossConfig: smooth_l1_beta must be >= 0, got {self.smooth_l1_beta}")
        if self.reg_weight is not None and not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise ValueError(f"LossConfig: reg_weight must be a finite number >= 0 or None, got {self.reg_weight}")

    @property
    def resolved_reg_weight(self) -> float:
        """``reg_weight``, or its default for the normalisation."""
        if self.reg_weight is not None:
            return float(self.reg_weight)
        return 1.0 if self.normalization == "sampled" else 10.0


@dataclass(frozen=True)
class ProposalConfig:
    """Proposal selection (see :func:`~lightning_rpn.core.proposals.generate_proposals`).

    Attributes:
        pre_nms_top_n_train / post_nms_top_n_train: proposals kept per level before NMS / per
            image after NMS in training; ``*_test`` in evaluation.
        nms_thresh: NMS IoU threshold.
        min_size: proposals with a side below this (pixels) are dropped.
        score_thresh: proposals with a probability below this are dropped.
    """

    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 1000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0

    def __post_init__(self) -> None:
        for name in ("pre_nms_top_n_train", "post_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_test"):
            _positive_int(getattr(self, name), f"ProposalConfig: {name}")
        if not 0.0 <= self.nms_thresh <= 1.0:
            raise ValueError(f"ProposalConfig: nms_thresh must be in [0, 1], got {self.nms_thresh}")
        # NaN compares false with every score and side: every proposal dropped, silently
        _finite_at_least_zero(self.min_size, "ProposalConfig: min_size")
        _in_range(self.score_thresh, 0.0, 1.0, "ProposalConfig: score_thresh", closed_high=False)

    def top_n(self, training: bool) -> tuple[int, int]:
        """``(pre_nms_top_n, post_nms_top_n)`` of training or evaluation."""
        if training:
            return self.pre_nms_top_n_train, self.post_nms_top_n_train
        return self.pre_nms_top_n_test, self.post_nms_top_n_test


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (read by ``RPNModule.configure_optimizers``).

    Attributes:
        optimizer: ``"sgd"`` (momentum) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: of every parameter outside normalisation layers.
        norm_weight_decay: of normalisation-layer parameters (detectron2: 0).
        lr_schedule: ``"multistep"`` (x ``gamma`` at each milestone) or ``"cosine"`` (to
            ``min_lr_factor * lr`` at the last training step).
        warmup_steps / warmup_factor: linear warm-up from ``warmup_factor * lr``.
        milestones / gamma: the multi-step decays.
        min_lr_factor: final fraction of the learning rate of the cosine schedule.
    """

    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0
    lr_schedule: str = "multistep"
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    milestones: tuple[int, ...] = (60000, 80000)
    gamma: float = 0.1
    min_lr_factor: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.optimizer, OPTIMIZERS, "model.optimizer")
        check_choice(self.lr_schedule, LR_SCHEDULES, "model.lr_schedule")
        if not self.lr > 0:
            raise ValueError(f"model.lr must be > 0, got {self.lr}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"model.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"model.milestones must be increasing, got {list(self.milestones)}")
        _finite_at_least_zero(self.weight_decay, "model.weight_decay")
        _finite_at_least_zero(self.norm_weight_decay, "model.norm_weight_decay")
        _in_range(self.momentum, 0.0, 1.0, "model.momentum", closed_high=False)
        _in_range(self.gamma, 0.0, 1.0, "model.gamma", closed_low=False)
        _in_range(self.warmup_factor, 0.0, 1.0, "model.warmup_factor")
        _in_range(self.min_lr_factor, 0.0, 1.0, "model.min_lr_factor")
        object.__setattr__(self, "milestones", tuple(int(step) for step in self.milestones))
