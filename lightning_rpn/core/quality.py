"""Localisation-quality scoring (the OLN idea): centerness and IoU targets, losses and scores.

Shapes: ``B`` images, ``N`` anchors of an image, ``S+`` positive anchors of the batch, ``Q``
quality branches (1 or 2).

Object Localization Networks (Kim et al., 2022) rank proposals by how well an anchor's box is
placed on *some* object rather than by a classifier that learnt to call every unannotated
object background. Two branches, each one logit per anchor, are trained on the positive
anchors only (no negatives, so nothing is pushed towards "not an object"):

- ``"centerness"``: of the anchor's centre inside its matched gt box,
  ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` with ``l, r, t, b`` the distances
  from the centre to the box's sides (0 when the centre lies outside the box);
- ``"iou"``: the IoU of the anchor's decoded (predicted) box with its matched gt box, a
  target that follows the regression (read without gradient).

Each branch's loss is the binary cross-entropy of its logit against the soft target in
``[0, 1]``, averaged over the positives. A proposal's score is a geometric mean of
probabilities (:func:`score_logits`): of the quality branches alone (``"quality"``) or of the
objectness and the quality branches (``"geometric_mean"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .boxes import iou_from_overlap
from .config import PROPOSAL_SCORES, check_choice

__all__ = [
    "QUALITY_BRANCHES",
    "PROPOSAL_SCORES",
    "parse_quality",
    "parse_scoring",
    "rank_logits",
    "centerness_targets",
    "aligned_iou",
    "quality_loss",
    "score_logits",
]

QUALITY_BRANCHES: tuple[str, ...] = ("centerness", "iou")
_TINY = torch.finfo(torch.float32).tiny


def parse_quality(quality: str | None, where: str = "quality") -> tuple[str, ...]:
    """The branch names of a quality option: ``None`` -> ``()``, ``"centerness+iou"`` -> both.

    ``ValueError`` naming ``where`` for an unknown or repeated branch.
    """
    if quality is None:
        return ()
    if not isinstance(quality, str):
        raise TypeError(f"{where}: expected None or a string such as 'centerness+iou', got {type(quality).__name__}")
    names = tuple(part.strip() for part in quality.split("+"))
    if not names or any(name not in QUALITY_BRANCHES for name in names) or len(set(names)) != len(names):
        hint = " (no branch is null in YAML, None in Python)" if quality.strip().lower() == "none" else ""
        raise ValueError(
            f"{where}: expected None or '+'-joined distinct branches of {QUALITY_BRANCHES} "
            f"(e.g. 'centerness', 'centerness+iou'), got {quality!r}{hint}"
        )
    return names


def parse_scoring(quality: str | None, proposal_score: str, where: str) -> tuple[str, ...]:
    """The branch names of ``quality``, checked with ``proposal_score`` (which needs branches unless ``"objectness"``).

    ``ValueError`` naming ``where`` (e.g. ``"RPN"``) for an unknown score or branch.
    """
    branches = parse_quality(quality, f"{where}: quality")
    check_choice(proposal_score, PROPOSAL_SCORES, f"{where}: proposal_score")
    if proposal_score != "objectness" and not branches:
        raise ValueError(f"{where}: proposal_score={proposal_score!r} needs quality branches, got quality=None")
    return branches


def centerness_targets(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """Centerness ``[S+]`` in ``[0, 1]`` of each anchor's centre inside its gt box (row ``i`` with row ``i``)."""
    cx = (anchors[:, 0] + anchors[:, 2]) * 0.5
    cy = (anchors[:, 1] + anchors[:, 3]) * 0.5
    left, right = (cx - gt_boxes[:, 0]).clamp(min=0), (gt_boxes[:, 2] - cx).clamp(min=0)
    top, bottom = (cy - gt_boxes[:, 1]).clamp(min=0), (gt_boxes[:, 3] - cy).clamp(min=0)
    ratio_x = torch.minimum(left, right) / torch.maximum(left, right).clamp(min=_TINY)
    ratio_y = torch.minimum(top, bottom) / torch.maximum(top, bottom).clamp(min=_TINY)
    return torch.sqrt(ratio_x * ratio_y)


def aligned_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU ``[S]`` of row ``i`` of ``boxes1`` with row ``i`` of ``boxes2`` (the project's IoU formula).

    Degenerate pairs (zero union) give 0.
    """
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    area1 = ((boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])).clamp(min=0)
    area2 = ((boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return torch.nan_to_num(iou_from_overlap(inter, area1, area2), nan=0.0)  # 0 / 0 -> 0


def quality_loss(
    pred_quality: dict[str, Tensor], anchors: Tensor, pred_boxes: Tensor, gt_boxes: Tensor
) -> Tensor:
    """Sum over branches of the mean binary cross-entropy over the positives (fp32 scalar).

    Args:
        pred_quality: per branch the logits of the positives, ``[S+]``.
        anchors / pred_boxes / gt_boxes: ``[S+, 4]`` the positives' anchors, decoded predicted
            boxes and matched gt boxes (the IoU target is read from ``pred_boxes`` without grad).

    No positives give a zero loss still connected to the predictions.
    """
    total = torch.zeros((), dtype=torch.float32, device=anchors.device)
    count = max(anchors.shape[0], 1)
    for name, logits in pred_quality.items():
        if name == "centerness":
            target = centerness_targets(anchors, gt_boxes)
        elif name == "iou":
            target = aligned_iou(pred_boxes.detach(), gt_boxes)
        else:
            raise ValueError(f"quality_loss: unknown branch {name!r}; expected one of {QUALITY_BRANCHES}")
        total = total + F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / count
    return total


def rank_logits(objectness: Tensor, quality: Tensor | None, proposal_score: str) -> Tensor:
    """The logits ``[B, N]`` that rank proposals: ``objectness`` ``[B, N]``, or with ``quality``
    ``[B, N, Q]`` the geometric mean of the quality branches (``"quality"``) or of them and the
    objectness (``"geometric_mean"``)."""
    if quality is None or proposal_score == "objectness":
        return objectness
    return score_logits(([objectness] if proposal_score == "geometric_mean" else []) + list(quality.unbind(-1)))


def score_logits(logits: Sequence[Tensor]) -> Tensor:
    """The logit of the geometric mean of ``sigmoid(logits[i])`` (same shapes); one input is returned as is.

    Computed in log space, ``log p = mean_i logsigmoid(l_i)`` and ``logit = log p - log(1 - p)``,
    so that ranking stays exact where the probabilities round to 1.
    """
    if len(logits) == 0:
        raise ValueError("score_logits: expected at least one logit tensor")
    if len(logits) == 1:
        return logits[0]
    log_p = torch.stack([F.logsigmoid(value.float()) for value in logits]).mean(dim=0)
    return log_p - torch.log((-torch.expm1(log_p)).clamp(min=_TINY))
