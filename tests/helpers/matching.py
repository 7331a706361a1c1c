"""torchvision's matching rule and random gt boxes, for the matching tests."""

from __future__ import annotations

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou as tv_box_iou

IMAGE = (256, 320)


def torchvision_match(anchors, gt, fg=0.7, bg=0.3, low_quality=True):
    matcher = det_utils.Matcher(fg, bg, allow_low_quality_matches=low_quality)
    idx = matcher(tv_box_iou(gt, anchors))
    labels = (idx >= 0).long()
    labels[idx == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
    return labels, idx.clamp(min=0)


def random_gt(n: int, seed: int, image=IMAGE, max_size: float = 200.0, integer: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = image
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 2.0, h - 2.0])
    wh = torch.rand(n, 2, generator=g) ** 2 * max_size + 1.0
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 2] = boxes[:, 2].clamp(max=w)
    boxes[:, 3] = boxes[:, 3].clamp(max=h)
    return boxes.round() if integer else boxes
