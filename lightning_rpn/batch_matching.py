"""Label the anchors of a whole batch in one pass: ``match_anchors`` for ``B`` images at once.

Shapes: ``B`` images, ``G`` the largest gt count of an image in a chunk (smaller images are
padded), ``N`` anchors of an image, ``H_l x W_l x A`` the anchor grid of level ``l``.

Why a batched matcher: in a DataLoader worker, matching one small image is a few dozen small
tensor ops whose fixed cost dwarfs the arithmetic. On the CPU one call of a compiled kernel
(:mod:`~lightning_rpn.cpu_kernels`) matches the whole batch, visiting only the anchors that
overlap each box. On other devices the tensor passes below share every op across the batch.

Why the tensor passes are cheap: anchors on a grid have separable coordinates. On level ``l``, an anchor's
``x1, x2`` depend only on its column and cell anchor, ``y1, y2`` only on its row and cell
anchor. The intersection with a gt box is the product of a per-column width overlap
``[B, G, W_l, A]`` and a per-row height overlap ``[B, G, H_l, A]``, so the ``[B, G, N]`` IoU
takes four elementwise passes (product, two for the union, division) instead of the dozen
of a broadcast ``box_iou``.

The arithmetic is ``box_iou``'s float32 formula, ``inter / ((area_gt + area_anchor) - inter)``,
on coordinates read from the grid's own anchors, so IoU values, thresholds and ties equal
:func:`~lightning_rpn.matching.match_anchors` bit for bit, and so do the labels (tested).
Padded gt rows are ``(0, 0, 0, 0)``: zero IoU with every anchor, after every real box, so they
never change a maximum, an argmax (the lowest index among equal maxima) or a low-quality match.
Images whose own ``G x N`` exceeds the memory budget (dense scenes) go through
``match_anchors``' overlap-only grid path instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .anchors import AnchorGrid
from .boxes import box_area
from .cpu_kernels import match_grid_cpu
from .matching import anchors_inside_image, check_gt_box_batch, match_anchors

__all__ = ["match_anchors_batched", "CPU_KERNEL"]

CPU_KERNEL = True
"""On the CPU, match with the compiled grid kernel (``cpu_kernels``); the tensor passes below
serve other devices. Both give identical results (tests run both)."""

_IOU_BUDGET = 1 << 22  # entries of the [B, G, N] IoU block of one chunk (16 MB in float32)


def match_anchors_batched(
    grid: AnchorGrid,
    gt_boxes: Sequence[Tensor],
    fg_iou: float = 0.7,
    bg_iou: float = 0.3,
    allow_low_quality: bool = True,
    *,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    allowed_border: float | None = None,
    compact: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(labels int64 [B, N], matched int64 [B, N])``: row ``i`` is ``match_anchors(grid, gt_boxes[i])``.

    ``gt_boxes``: one ``[G_i, 4]`` float tensor per image (``G_i`` may be 0).
    ``allowed_border`` needs ``image_sizes`` (``(h, w)`` per image), as in ``match_anchors``.
    ``compact``: labels int8 and matched int32 instead, a quarter of the memory.
    """
    if not 0.0 <= bg_iou <= fg_iou <= 1.0:
        raise ValueError(
            f"match_anchors_batched: need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}"
        )
    if allowed_border is not None and (image_sizes is None or len(image_sizes) != len(gt_boxes)):
        raise ValueError("match_anchors_batched: allowed_border needs image_sizes, one (h, w) per image")
    anchors = grid.anchors.float()
    device, num_anchors = anchors.device, anchors.shape[0]
    boxes = []
    for index, gt in enumerate(gt_boxes):
        if not isinstance(gt, Tensor) or gt.dim() != 2 or gt.shape[1] != 4:
            raise ValueError(f"match_anchors_batched: gt_boxes[{index}] must be [G, 4], got {gt!r:.80}")
        boxes.append(gt.to(device=device, dtype=torch.float32))
    check_gt_box_batch(boxes, lambda index: f"match_anchors_batched(gt_boxes[{index}])")
    inside = None
    if allowed_border is not None:
        assert image_sizes is not None
        inside = torch.stack([anchors_inside_image(anchors, size, allowed_border) for size in image_sizes])
    thresholds = (fg_iou, bg_iou, allow_low_quality)
    if device.type == "cpu" and CPU_KERNEL:
        return match_grid_cpu(grid, boxes, *thresholds, inside=inside, compact=compact)

    labels = torch.zeros(len(boxes), num_anchors, dtype=torch.int64, device=device)
    matched = torch.zeros_like(labels)
    chunk: list[int] = []
    for index, gt in enumerate(boxes):
        size = image_sizes[index] if image_sizes is not None else None
        if gt.shape[0] * num_anchors > _IOU_BUDGET:  # dense scene: overlap-only grid path
            labels[index], matched[index] = match_anchors(
                grid, gt, *thresholds, image_size=size, allowed_border=allowed_border
            )
            continue
        most = max([boxes[i].shape[0] for i in chunk] + [gt.shape[0]])
        if chunk and (len(chunk) + 1) * most * num_anchors > _IOU_BUDGET:
            _match_chunk(grid, anchors, boxes, chunk, labels, matched, thresholds, inside)
            chunk = []
        chunk.append(index)
    if chunk:
        _match_chunk(grid, anchors, boxes, chunk, labels, matched, thresholds, inside)
    if compact:
        return labels.to(torch.int8), matched.to(torch.int32)
    return labels, matched


def _match_chunk(
    grid: AnchorGrid,
    anchors: Tensor,
    boxes: list[Tensor],
    chunk: list[int],
    labels: Tensor,
    matched: Tensor,
    thresholds: tuple[float, float, bool],
    batch_inside: Tensor | None,
) -> None:
    """Fill ``labels`` / ``matched`` rows ``chunk`` from one IoU block per level.

    ``batch_inside``: the border filter's bool ``[B, N]`` mask of the whole batch, or ``None``.

    Only the maxima are reduced over every anchor; argmax and low-quality ties are resolved
    on the few candidate anchors whose best IoU reaches ``fg_iou`` or some gt's best IoU.
    """
    fg_iou, bg_iou, allow_low_quality = thresholds
    device, batch = anchors.device, len(chunk)
    num_gt = torch.tensor([boxes[i].shape[0] for i in chunk], device=device)
    most = int(num_gt.max())
    rows = torch.tensor(chunk, device=device)
    inside = None if batch_inside is None else batch_inside[rows]
    if most == 0:
        labels[rows] = 0 if inside is None else torch.where(inside, 0, -1)
        matched[rows] = 0
        return
    gt = torch.zeros(batch, most, 4, device=device)
    for slot, index in enumerate(chunk):
        gt[slot, : boxes[index].shape[0]] = boxes[index]

    levels = [level for level in grid.levels if level.num_anchors]
    ious = _level_ious(levels, anchors, gt, inside)
    best = [iou.amax(dim=1) for iou in ious]  # [B, A, H, W]
    gt_best = torch.stack([iou.amax(dim=(2, 3, 4)) for iou in ious]).amax(dim=0)  # [B, G]
    # A gt with best IoU 0 overlaps nothing: no low-quality match (as match_anchors).
    gt_best = torch.where(gt_best > 0, gt_best, torch.nan)
    candidate = torch.full((batch,), fg_iou, device=device)
    if allow_low_quality:
        candidate = torch.minimum(candidate, torch.nan_to_num(gt_best, nan=2.0).amin(dim=1))

    chunk_labels = torch.empty(batch, anchors.shape[0], dtype=torch.int64, device=device)
    chunk_matched = torch.zeros_like(chunk_labels)
    for level, iou, level_best in zip(levels, ious, best):
        level_labels = torch.where(level_best >= fg_iou, 1, torch.where(level_best >= bg_iou, -1, 0))
        level_matched = torch.zeros_like(level_labels)
        image, a, y, x = torch.nonzero(level_best >= candidate[:, None, None, None]).unbind(1)
        if image.numel():
            values = iou[image, :, a, y, x]  # [K, G]
            best_value, best_gt = values.max(dim=1)  # the lowest gt index among equal maxima
            positive = best_value >= fg_iou
            if allow_low_quality:
                positive |= (values == gt_best[image]).any(dim=1)
            level_labels[image[positive], a[positive], y[positive], x[positive]] = 1
            level_matched[image[positive], a[positive], y[positive], x[positive]] = best_gt[positive]
        shape = (batch, level.height, level.width, level.cell_anchors.shape[0])
        end = level.start + level.num_anchors
        chunk_labels[:, level.start : end].view(shape).copy_(level_labels.permute(0, 2, 3, 1))
        chunk_matched[:, level.start : end].view(shape).copy_(level_matched.permute(0, 2, 3, 1))
    chunk_labels[num_gt == 0] = 0  # G == 0: all negatives, whatever the thresholds
    chunk_matched[num_gt == 0] = 0
    if inside is not None:
        chunk_labels[~inside] = -1
        chunk_matched[~inside] = 0
    labels[rows] = chunk_labels
    matched[rows] = chunk_matched


def _level_ious(levels: list, anchors: Tensor, gt: Tensor, inside: Tensor | None) -> list[Tensor]:
    """Per level, the float32 IoU ``[B, G, A, H, W]`` of padded gt boxes ``[B, G, 4]`` with its anchors.

    Cell anchor outermost and column innermost keep every broadcast operand contiguous along
    the innermost dimension (vectorised loops). Anchors outside the border filter get -1.
    """
    batch, most = gt.shape[:2]
    gt_area = box_area(gt.reshape(-1, 4)).view(batch, most, 1, 1, 1)
    gx1, gy1, gx2, gy2 = (gt[:, :, None, None, k] for k in range(4))  # [B, G, 1, 1]
    ious = []
    for level in levels:
        count = level.cell_anchors.shape[0]
        cells = anchors[level.start : level.start + level.num_anchors].view(level.height, level.width, count, 4)
        x1, x2 = cells[0, :, :, 0].T, cells[0, :, :, 2].T  # [A, W]: the same in every row
        y1, y2 = cells[:, 0, :, 1].T, cells[:, 0, :, 3].T  # [A, H]: the same in every column
        inter_w = (torch.minimum(x2, gx2) - torch.maximum(x1, gx1)).clamp_(min=0)  # [B, G, A, W]
        inter_h = (torch.minimum(y2, gy2) - torch.maximum(y1, gy1)).clamp_(min=0)  # [B, G, A, H]
        inter = inter_w[:, :, :, None, :] * inter_h[..., None]  # [B, G, A, H, W]
        anchor_area = (x2 - x1)[:, None, :] * (y2 - y1)[:, :, None]  # [A, H, W], as box_area
        union = (gt_area + anchor_area).sub_(inter)
        iou = inter.div_(union)
        if inside is not None:
            level_inside = inside[:, level.start : level.start + level.num_anchors]
            level_inside = level_inside.view(batch, level.height, level.width, count).permute(0, 3, 1, 2)
            iou.masked_fill_(~level_inside[:, None], -1.0)
        ious.append(iou)
    return ious
