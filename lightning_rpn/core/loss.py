"""The RPN loss: objectness log loss + box regression over sampled anchors.

Shapes: ``B`` images, ``L`` levels, ``N`` anchors of an image (all levels, in anchor-generator
order), ``S`` sampled anchors of the batch (label 0 or 1), ``S+`` positive anchors (label 1).

The source document's loss is

    L = (1 / N_cls) * sum_i L_cls(p_i, p*_i) + lambda * (1 / N_reg) * sum_i p*_i * L_reg(t_i, t*_i)

with ``L_cls`` the log loss over the sampled anchors and ``L_reg`` the smooth L1 loss over the
four coordinates of the positive anchors. Two normalisations are offered:

- ``"sampled"`` (torchvision / detectron2 recipe, default): ``N_cls = N_reg = S``, the number
  of sampled anchors in the batch, and ``lambda = 1``.
- ``"paper"`` (Faster R-CNN paper): ``N_cls = S``, ``N_reg`` = the number of anchor
  *locations* = ``num_anchor_locations`` (``sum_l H_l * W_l`` of one image) times ``B``, and
  ``lambda = 10``.

``smooth_l1(x) = 0.5 * x**2 / beta if |x| < beta else |x| - 0.5 * beta`` (``beta = 1/9`` as in
torchvision / detectron2; the paper's form is ``beta = 1``). ``box_loss="l1"`` uses ``|x|``
``box_loss="giou"`` uses ``1 - GIoU`` and ``box_loss="iou"`` ``1 - IoU`` of the decoded
predicted and target boxes.

Localisation quality (the OLN idea, :mod:`~lightning_rpn.core.quality`): with ``pred_quality`` the
quality branches' binary cross-entropy, averaged over the positive anchors, is added to
``loss_rpn_cls`` (the loss of what scores the proposals), after the objectness term times
``objectness_weight`` (0 trains no classifier, OLN's choice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .box_coder import BoxCoder
from .boxes import aligned_giou
from .config import BOX_LOSSES, LOSS_NORMALIZATIONS, LossConfig
from .quality import aligned_iou, parse_quality, quality_loss

__all__ = ["rpn_loss", "NonFiniteLossError", "LOSS_NORMALIZATIONS", "BOX_LOSSES"]


class NonFiniteLossError(ValueError):
    """The RPN loss came out NaN or inf; the message names the input that caused it.

    A type of its own so that a training loop can skip such batches without also skipping
    other errors (malformed ground truth, bad arguments).
    """

_DECODED_BOX_LOSSES = ("giou", "iou")


def _concat_levels(value: Tensor | Sequence[Tensor], name: str) -> Tensor:
    """Accept one ``[B, N, ...]`` tensor or a per-level list of ``[B, N_l, ...]`` tensors."""
    if isinstance(value, Tensor):
        return value
    if len(value) == 0:
        raise ValueError(f"rpn_loss: {name} is an empty list; expected one tensor per level")
    return torch.cat(list(value), dim=1)


def _first_non_finite(values: Tensor, mask: Tensor) -> str | None:
    """Describe the non-finite rows of ``values[mask]`` (count, first image and anchor), if any."""
    finite = torch.isfinite(values)
    if finite.dim() > mask.dim():
        finite = finite.all(dim=-1)
    bad = torch.nonzero(mask & ~finite)
    if bad.shape[0] == 0:
        return None
    image, anchor = (int(v) for v in bad[0])
    return f"{bad.shape[0]} anchor(s), first at image {image}, anchor {anchor}: {values[image, anchor].tolist()}"


def rpn_loss(
    pred_objectness: Tensor | Sequence[Tensor],
    pred_deltas: Tensor | Sequence[Tensor],
    anchor_labels: Tensor,
    target_deltas: Tensor,
    *,
    normalization: Literal["sampled", "paper"] = LossConfig.normalization,  # type: ignore[assignment]
    reg_weight: float | None = LossConfig.reg_weight,
    smooth_l1_beta: float = LossConfig.smooth_l1_beta,
    box_loss: Literal["smooth_l1", "l1", "giou", "iou"] = LossConfig.box_loss,  # type: ignore[assignment]
    anchors: Tensor | Sequence[Tensor] | None = None,
    box_coder: BoxCoder | None = None,
    num_anchor_locations: int | None = None,
    pred_quality: Tensor | Sequence[Tensor] | None = None,
    quality: str | None = None,
    objectness_weight: float = 1.0,
) -> dict[str, Tensor]:
    """RPN objectness + regression losses, ``{"loss_rpn_cls", "loss_rpn_reg"}`` (fp32 scalars).

    Args:
        pred_objectness: logits ``[B, N]`` (sigmoid head) or ``[B, N, 2]`` (softmax head, a
            (background, object) pair -> cross-entropy), or a per-level list of those.
        pred_deltas: ``[B, N, 4]`` (or a per-level list).
        anchor_labels: integer ``[B, N]``: 1 positive, 0 negative, -1 not sampled.
        target_deltas: ``[B, N, 4]`` encoded matched gt boxes (read only where the label is 1).
        normalization: ``"sampled"`` or ``"paper"`` (see the module docstring).
        reg_weight: ``lambda``; ``None`` -> 1 for ``"sampled"``, 10 for ``"paper"``.
        smooth_l1_beta: smooth-L1 transition point (0 gives L1).
        box_loss: ``"smooth_l1"``, ``"l1"``, ``"giou"`` or ``"iou"``.
        anchors: ``[N, 4]`` (or per level) anchors, shared by the images; ``"giou"``,
            ``"iou"`` and ``pred_quality`` only.
        box_coder: decodes deltas to boxes; as ``anchors``.
        num_anchor_locations: anchor locations of ONE image (``sum_l H_l * W_l``);
            ``"paper"`` only, where ``N_reg = num_anchor_locations * B``.
        pred_quality: quality logits ``[B, N, Q]`` (or per level), the branches of ``quality``.
        quality: the branch names of ``pred_quality``'s channels (``"centerness+iou"``, ...).
        objectness_weight: weight of the objectness term in ``loss_rpn_cls``.

    No sampled anchors gives zero losses that are still connected to the predictions. A
    non-finite loss raises :class:`NonFiniteLossError` (a ``ValueError``) naming the input (and anchor) that caused it.
    """
    try:
        config = LossConfig(normalization, reg_weight, smooth_l1_beta, box_loss)
    except ValueError as error:
        raise ValueError(f"rpn_loss: {error}") from None
    if objectness_weight < 0:
        raise ValueError(f"rpn_loss: objectness_weight must be >= 0, got {objectness_weight}")
    reg_weight = config.resolved_reg_weight

    objectness = _concat_levels(pred_objectness, "pred_objectness")
    deltas = _concat_levels(pred_deltas, "pred_deltas")
    if anchor_labels.dim() != 2:
        raise ValueError(f"rpn_loss: anchor_labels must be [B, N], got {tuple(anchor_labels.shape)}")
    if anchor_labels.dtype.is_floating_point or anchor_labels.dtype == torch.bool:
        raise TypeError(f"rpn_loss: anchor_labels must be an integer tensor (1/0/-1), got {anchor_labels.dtype}")
    batch, num = anchor_labels.shape
    softmax = objectness.dim() == 3
    if objectness.shape[:2] != (batch, num) or (softmax and objectness.shape[2] != 2) or objectness.dim() > 3:
        raise ValueError(
            f"rpn_loss: pred_objectness has shape {tuple(objectness.shape)}, expected [{batch}, {num}] "
            f"or [{batch}, {num}, 2] to match anchor_labels"
        )
    for name, value in (("pred_deltas", deltas), ("target_deltas", target_deltas)):
        if tuple(value.shape) != (batch, num, 4):
            raise ValueError(f"rpn_loss: {name} has shape {tuple(value.shape)}, expected [{batch}, {num}, 4]")
    labels = anchor_labels.to(objectness.device)
    if bool(((labels < -1) | (labels > 1)).any()):
        bad = labels[(labels < -1) | (labels > 1)][0].item()
        raise ValueError(f"rpn_loss: anchor_labels must be 1, 0 or -1, found {bad}")

    if normalization == "paper":
        if num_anchor_locations is None or num_anchor_locations < 1:
            raise ValueError(
                "rpn_loss: normalization='paper' needs num_anchor_locations (anchor locations of one "
                f"image, sum of H_l * W_l over levels) >= 1, got {num_anchor_locations!r}"
            )
    branches = parse_quality(quality, "rpn_loss: quality")
    flat_quality: Tensor | None = None
    if (pred_quality is None) != (not branches):
        raise ValueError(
            f"rpn_loss: pred_quality and quality go together, got pred_quality "
            f"{'None' if pred_quality is None else 'given'} and quality={quality!r}"
        )
    if pred_quality is not None:
        flat_quality = _concat_levels(pred_quality, "pred_quality")
        if tuple(flat_quality.shape) != (batch, num, len(branches)):
            raise ValueError(
                f"rpn_loss: pred_quality has shape {tuple(flat_quality.shape)}, expected "
                f"[{batch}, {num}, {len(branches)}] (branches {branches})"
            )
    flat_anchors: Tensor | None = None
    if box_loss in _DECODED_BOX_LOSSES or flat_quality is not None:
        if anchors is None or box_coder is None:
            raise ValueError(
                f"rpn_loss: box_loss={box_loss!r} and pred_quality need both anchors and box_coder to decode boxes"
            )
        flat_anchors = anchors if isinstance(anchors, Tensor) else torch.cat(list(anchors), dim=0)
        if flat_anchors.dim() == 2:
            flat_anchors = flat_anchors.unsqueeze(0).expand(batch, -1, -1)
        if tuple(flat_anchors.shape) != (batch, num, 4):
            raise ValueError(
                f"rpn_loss: anchors have shape {tuple(flat_anchors.shape)}, expected [{num}, 4] or [{batch}, {num}, 4]"
            )

    sampled = labels >= 0
    positive = labels == 1
    target_deltas = target_deltas.to(deltas.device)
    device_type = objectness.device.type if torch.amp.is_autocast_available(objectness.device.type) else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        sampled_logits = objectness[sampled].float()
        sampled_labels = labels[sampled]
        if softmax:
            cls_sum = F.cross_entropy(sampled_logits, sampled_labels.long(), reduction="sum")
        else:
            cls_sum = F.binary_cross_entropy_with_logits(sampled_logits, sampled_labels.float(), reduction="sum")

        pos_pred = deltas[positive].float()
        pos_target = target_deltas[positive].float()
        if flat_anchors is not None:
            assert box_coder is not None
            pos_anchors = flat_anchors.to(deltas.device)[positive].float()
            pred_boxes = box_coder.decode(pos_pred, pos_anchors)
            target_boxes = box_coder.decode(pos_target, pos_anchors)
        if box_loss == "smooth_l1":
            reg_sum = F.smooth_l1_loss(pos_pred, pos_target, beta=smooth_l1_beta, reduction="sum")
        elif box_loss == "l1":
            reg_sum = F.l1_loss(pos_pred, pos_target, reduction="sum")
        elif box_loss == "giou":
            reg_sum = (1.0 - aligned_giou(pred_boxes, target_boxes)).sum()
        else:
            reg_sum = (1.0 - aligned_iou(pred_boxes, target_boxes)).sum()

        num_sampled = sampled.sum().clamp(min=1).float()
        num_reg = num_sampled if normalization == "sampled" else float(num_anchor_locations * batch)
        loss_cls = cls_sum / num_sampled
        if flat_quality is not None:
            pos_quality = flat_quality[positive].float()
            loss_cls = float(objectness_weight) * loss_cls + quality_loss(
                {name: pos_quality[:, index] for index, name in enumerate(branches)},
                pos_anchors, pred_boxes, target_boxes,
            )
        loss_reg = reg_sum * float(reg_weight) / num_reg

    if not bool(torch.isfinite(loss_cls + loss_reg)):
        raise NonFiniteLossError(
            _explain_non_finite(objectness, deltas, target_deltas, flat_quality, sampled, positive, loss_cls, loss_reg)
        )
    return {"loss_rpn_cls": loss_cls, "loss_rpn_reg": loss_reg}


def _explain_non_finite(
    objectness: Tensor,
    deltas: Tensor,
    target_deltas: Tensor,
    quality: Tensor | None,
    sampled: Tensor,
    positive: Tensor,
    loss_cls: Tensor,
    loss_reg: Tensor,
) -> str:
    """Name the input whose non-finite values made the loss non-finite."""
    inputs = [
        ("pred_objectness", objectness, sampled, "sampled"),
        ("pred_deltas", deltas, positive, "positive"),
        ("target_deltas", target_deltas, positive, "positive"),
    ]
    if quality is not None:
        inputs.append(("pred_quality", quality, positive, "positive"))
    for name, values, mask, which in inputs:
        found = _first_non_finite(values, mask)
        if found is not None:
            return f"rpn_loss: non-finite {name} at {which} {found}"
    return (
        f"rpn_loss: the loss is non-finite (loss_rpn_cls={loss_cls.item()}, loss_rpn_reg={loss_reg.item()}) "
        "although the sampled inputs are finite; check reg_weight and the decoded boxes"
    )
