"""Box utilities shared by every other module.

Boxes are ``(x1, y1, x2, y2)`` in input-image pixels. Shapes: ``N`` / ``M`` boxes, ``G``
ground-truth boxes. IoU math runs in float32 whatever the input dtype, so that half-precision
callers get the same thresholds and ties as float32 callers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "remove_small_boxes",
    "aligned_giou",
    "check_gt_boxes",
]


def _check_boxes_shape(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [N, 4], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of each box, ``[N, 4] -> [N]`` (no clamping)."""
    _check_boxes_shape(boxes, "box_area(boxes)")
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU ``[N, 4] x [M, 4] -> [N, M]`` computed in float32.

    ``iou = inter / (area1 + area2 - inter)``; the same arithmetic (and so the same bits) as
    torchvision's ``box_iou`` on float32 input.
    """
    _check_boxes_shape(boxes1, "box_iou(boxes1)")
    _check_boxes_shape(boxes2, "box_iou(boxes2)")
    b1 = boxes1.float()
    b2 = boxes2.float()
    area1 = box_area(b1)
    area2 = box_area(b2)
    top_left = torch.maximum(b1[:, None, :2], b2[None, :, :2])
    bottom_right = torch.minimum(b1[:, None, 2:], b2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union


def clip_boxes_to_image(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip ``[..., 4]`` boxes to an image of size ``(h, w)``; returns a new tensor."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"clip_boxes_to_image: expected boxes [..., 4], got {tuple(boxes.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64) of the boxes whose width and height are both ``>= min_size``."""
    _check_boxes_shape(boxes, "remove_small_boxes(boxes)")
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    keep = (widths >= min_size) & (heights >= min_size)
    return torch.nonzero(keep).flatten()


def aligned_giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalised IoU of row ``i`` of ``boxes1`` with row ``i`` of ``boxes2``, ``[N] `` in fp32.

    ``giou = iou - (hull - union) / hull`` where ``hull`` is the smallest enclosing box's area.
    ``eps`` keeps degenerate (zero-area) pairs finite.
    """
    _check_boxes_shape(boxes1, "aligned_giou(boxes1)")
    _check_boxes_shape(boxes2, "aligned_giou(boxes2)")
    if boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(
            f"aligned_giou: boxes1 has {boxes1.shape[0]} rows but boxes2 has {boxes2.shape[0]}"
        )
    b1 = boxes1.float()
    b2 = boxes2.float()
    area1 = box_area(b1)
    area2 = box_area(b2)
    top_left = torch.maximum(b1[:, :2], b2[:, :2])
    bottom_right = torch.minimum(b1[:, 2:], b2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    hull_wh = (torch.maximum(b1[:, 2:], b2[:, 2:]) - torch.minimum(b1[:, :2], b2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / (hull + eps)


def check_gt_boxes(boxes: Tensor, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if any ground-truth box is malformed.

    Checks the shape ``[G, 4]``, finiteness, and ``x2 > x1`` / ``y2 > y1``; the message gives
    the first bad row's index and values.
    """
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{where}: gt boxes must be a torch.Tensor [G, 4], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{where}: gt boxes must have shape [G, 4], got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    finite = torch.isfinite(boxes).all(dim=1)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0, 0])
        raise ValueError(
            f"{where}: gt box {row} has non-finite coordinates {boxes[row].tolist()}"
        )
    positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not bool(positive.all()):
        row = int(torch.nonzero(~positive)[0, 0])
        raise ValueError(
            f"{where}: gt box {row} = {boxes[row].tolist()} is empty; "
            "expected x2 > x1 and y2 > y1 (xyxy pixels)"
        )
