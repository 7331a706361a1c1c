"""Box utilities shared by every other module.

Boxes are ``(x1, y1, x2, y2)`` in input-image pixels. Shapes: ``N`` / ``M`` boxes, ``G``
ground-truth boxes. IoU math runs in float32 whatever the input dtype, so that half-precision
callers get the same thresholds and ties as float32 callers.

``iou_from_overlap`` is the one IoU formula of the project: ``box_iou`` applies it to tensors
and the compiled matching kernel (:mod:`~lightning_rpn.core.cpu_kernels`) to float32 scalars, so
every matching backend gets the same bits (and so the same thresholds and ties) as
torchvision's ``box_iou``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "COCO_AREA_RANGES",
    "box_area",
    "box_iou",
    "box_ioa",
    "iou_from_overlap",
    "clip_boxes_to_image",
    "aligned_giou",
    "check_gt_boxes",
]

COCO_AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, math.inf),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, math.inf),
}
"""COCO's area ranges (pixels squared): the recall metric reads them closed, ``[low, high]``, as
COCOeval does; the data report's histogram and the anchor coverage, which count each box once,
half-open, ``[low, high)``."""


def _check_boxes_shape(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [N, 4], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of each box, ``[N, 4] -> [N]`` (no clamping)."""
    _check_boxes_shape(boxes, "box_area(boxes)")
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def iou_from_overlap(inter, area1, area2):
    """IoU from the intersection area and the two box areas: ``inter / ((area1 + area2) - inter)``.

    Works elementwise on tensors and on float32 scalars inside compiled kernels; the order of
    operations is torchvision's (``area1[:, None] + area2 - inter``), hence the same bits.
    """
    return inter / ((area1 + area2) - inter)


def _overlap(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Float32 intersection areas ``[N, M]`` of ``[N, 4] x [M, 4]`` boxes (0 for disjoint pairs)."""
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU ``[N, 4] x [M, 4] -> [N, M]`` computed in float32 (``iou_from_overlap``)."""
    _check_boxes_shape(boxes1, "box_iou(boxes1)")
    _check_boxes_shape(boxes2, "box_iou(boxes2)")
    b1 = boxes1.float()
    b2 = boxes2.float()
    return iou_from_overlap(_overlap(b1, b2), box_area(b1)[:, None], box_area(b2)[None, :])


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """``[N, M]``: the fraction of each box's area covered by each region (float32).

    Crowd regions use it: an anchor mostly inside one is ignored rather than negative.
    """
    _check_boxes_shape(boxes, "box_ioa(boxes)")
    _check_boxes_shape(regions, "box_ioa(regions)")
    b = boxes.float()
    return _overlap(b, regions.float()) / box_area(b)[:, None]


def clip_boxes_to_image(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip ``[..., 4]`` boxes to an image of size ``(h, w)``; returns a new tensor."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"clip_boxes_to_image: expected boxes [..., 4], got {tuple(boxes.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


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
