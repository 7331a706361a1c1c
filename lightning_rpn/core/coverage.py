"""Anchor coverage: the best anchor IoU of each gt box, exactly, without the dense IoU matrix.

Shapes: ``G`` ground-truth boxes (all images), ``L`` levels, ``A`` anchors per location,
``Q`` anchor groups (one per level and cell anchor, ``Q = sum_l A_l``).

The *coverage* of an anchor design is the fraction of ground-truth boxes whose best anchor
reaches an IoU threshold: no proposal can start from a better anchor, so it bounds what
matching (``fg_iou``) and hence training can do for those boxes. Each box is compared with
the anchors of its own image, padded as a one-image batch. The one computation behind both
``lightning-rpn check-data`` (:mod:`lightning_rpn.data.validation`) and ``analyze-anchors``
(:mod:`lightning_rpn.tools.anchor_analysis`).

Exact best IoU without the dense ``G x N`` matrix: within one group the anchors are one shape
translated over a regular grid, and the intersection of two axis-aligned boxes is
``overlap_x(dx) * overlap_y(dy)`` with each factor non-increasing in the centre distance along
its axis. The best anchor of a group is therefore the one whose grid column and row are
nearest to the box centre (clamped to the grid); its IoU is computed from the same float32
coordinates :class:`~lightning_rpn.core.anchors.AnchorGenerator` produces (``grid_centres`` plus
the cell anchor), so the result equals ``box_iou(boxes, anchors).amax(1)`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_rpn.core.anchors import AnchorGenerator, grid_centres, padded_size
from lightning_rpn.core.boxes import COCO_AREA_RANGES

__all__ = [
    "COVERAGE_THRESHOLDS",
    "GTBoxSet",
    "anchor_coverage",
    "best_anchor_iou",
    "coverage_from_best",
    "level_best_iou",
    "per_level_best_iou",
    "row_max",
]

COVERAGE_THRESHOLDS = (0.5, 0.7)


@dataclass(frozen=True)
class GTBoxSet:
    """Ground-truth boxes after the resize, with the padded size of each box's image.

    ``boxes`` float32 ``[G, 4]`` in resized-image pixels; ``padded_sizes`` int64 ``[G, 2]``
    ``(Hp, Wp)``: the image padded to ``size_divisibility`` (its anchors' grid extent).
    """

    boxes: Tensor
    padded_sizes: Tensor
    num_images: int = 0

    def __post_init__(self) -> None:
        if self.boxes.dim() != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"GTBoxSet: boxes must be [G, 4], got {tuple(self.boxes.shape)}")
        if self.padded_sizes.shape != (self.boxes.shape[0], 2):
            raise ValueError(
                f"GTBoxSet: padded_sizes must be [G, 2] = [{self.boxes.shape[0]}, 2], "
                f"got {tuple(self.padded_sizes.shape)}"
            )

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def wh(self) -> Tensor:
        """``[G, 2]`` widths and heights."""
        return self.boxes[:, 2:] - self.boxes[:, :2]

    @property
    def areas(self) -> Tensor:
        wh = self.wh
        return wh[:, 0] * wh[:, 1]

    def subset(self, index: Tensor) -> GTBoxSet:
        return GTBoxSet(self.boxes[index], self.padded_sizes[index], self.num_images)

    @classmethod
    def from_images(
        cls, images: Sequence[tuple[tuple[int, int], Any]], size_divisibility: int = 1
    ) -> GTBoxSet:
        """From ``[(image (h, w), boxes [G_i, 4]), ...]`` already in the analysed pixel frame."""
        boxes, sizes = [], []
        d = int(size_divisibility)
        for (height, width), image_boxes in images:
            image_boxes = np.asarray(image_boxes, dtype=np.float32).reshape(-1, 4)
            boxes.append(image_boxes)
            sizes.append(np.tile(padded_size([(int(height), int(width))], d), (len(image_boxes), 1)))
        all_boxes = torch.from_numpy(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32))
        all_sizes = torch.from_numpy(np.concatenate(sizes).astype(np.int64) if sizes else np.zeros((0, 2), np.int64))
        valid = (all_boxes[:, 2] > all_boxes[:, 0]) & (all_boxes[:, 3] > all_boxes[:, 1])
        return cls(all_boxes[valid].contiguous(), all_sizes[valid].contiguous(), len(images))


def level_best_iou(boxes: GTBoxSet, generator: AnchorGenerator, level: int) -> tuple[Tensor, Tensor]:
    """Best IoU ``[G]`` over the anchors of one level, and the cell anchor reaching it ``[G]``."""
    gt = boxes.boxes.float()
    stride = generator.strides[level]
    n = generator.anchor_stride
    feature = -(-boxes.padded_sizes // stride)
    grid = -(-feature // n)  # [G, 2] (rows, cols)
    step = float(n * stride)
    origin = generator.offset * stride
    step32 = torch.tensor(step, dtype=torch.float32)
    origin32 = torch.tensor(origin, dtype=torch.float32)
    cells = generator.cell_anchors[level].float()  # [A, 4]
    gt64 = gt.double()
    cell64 = cells.double()
    centre_x = (gt64[:, 0] + gt64[:, 2]) / 2
    centre_y = (gt64[:, 1] + gt64[:, 3]) / 2
    cell_cx = (cell64[:, 0] + cell64[:, 2]) / 2
    cell_cy = (cell64[:, 1] + cell64[:, 3]) / 2
    col = ((centre_x[:, None] - origin - cell_cx[None]) / step).round()
    row = ((centre_y[:, None] - origin - cell_cy[None]) / step).round()
    col = torch.minimum(col.clamp(min=0), (grid[:, 1:2] - 1).double()).float()
    row = torch.minimum(row.clamp(min=0), (grid[:, 0:1] - 1).double()).float()
    anchor_cx = grid_centres(col, step32, origin32)
    anchor_cy = grid_centres(row, step32, origin32)
    ax1, ax2 = anchor_cx + cells[None, :, 0], anchor_cx + cells[None, :, 2]
    ay1, ay2 = anchor_cy + cells[None, :, 1], anchor_cy + cells[None, :, 3]
    # The arithmetic of lightning_rpn.core.boxes.box_iou (same float32 bits).
    inter_w = (torch.minimum(ax2, gt[:, 2:3]) - torch.maximum(ax1, gt[:, 0:1])).clamp(min=0)
    inter_h = (torch.minimum(ay2, gt[:, 3:4]) - torch.maximum(ay1, gt[:, 1:2])).clamp(min=0)
    inter = inter_w * inter_h
    gt_area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    anchor_area = (ax2 - ax1) * (ay2 - ay1)
    iou = inter / (gt_area[:, None] + anchor_area - inter)
    empty = (grid[:, 0] == 0) | (grid[:, 1] == 0)
    iou[empty] = 0.0
    return row_max(iou)


def row_max(values: Tensor) -> tuple[Tensor, Tensor]:
    """Row maxima of ``[G, K]`` (small K) and their first column, by a loop over the columns.

    Equivalent to ``values.max(dim=1)`` but elementwise only: reductions over a short last
    dimension pay a large thread-pool overhead on busy machines, and the search runs many.
    """
    best = values[:, 0].clone()
    index = torch.zeros(values.shape[0], dtype=torch.int64)
    for column in range(1, values.shape[1]):
        better = values[:, column] > best
        best = torch.where(better, values[:, column], best)
        index.masked_fill_(better, column)
    return best, index


def per_level_best_iou(boxes: GTBoxSet, generator: AnchorGenerator) -> tuple[Tensor, Tensor]:
    """``[G, L]`` best IoU per level and the group index ``[G, L]`` (into all levels' cells)."""
    ious, groups = [], []
    first = 0
    for level in range(generator.num_levels):
        iou, cell = level_best_iou(boxes, generator, level)
        ious.append(iou)
        groups.append(cell + first)
        first += generator.cell_anchors[level].shape[0]
    if not ious:
        raise ValueError("best_anchor_iou: the anchor generator has no levels")
    return torch.stack(ious, dim=1), torch.stack(groups, dim=1)


def best_anchor_iou(boxes: GTBoxSet, anchor_generator: AnchorGenerator) -> tuple[Tensor, Tensor]:
    """Best IoU ``[G]`` of each gt box over every anchor of its image, and the group ``[G]``.

    The group indexes the cell anchors of all levels concatenated (level-major). Equal to
    ``box_iou(gt, all anchors of the image).amax(1)`` (see the module docstring), in ``O(G Q)``.
    """
    iou, groups = per_level_best_iou(boxes, anchor_generator)
    best, level = row_max(iou)
    return best, groups.gather(1, level[:, None]).squeeze(1)


def coverage_from_best(best: Tensor, areas: Tensor, thresholds: Sequence[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (lo, hi) in COCO_AREA_RANGES.items():
        in_range = (areas >= lo) & (areas < hi)
        count = int(in_range.sum())
        suffix = "" if name == "all" else f"_{name}"
        out[f"boxes{suffix}"] = float(count)
        for t in thresholds:
            hit = float((best[in_range] >= t).sum())
            out[f"coverage{suffix}@{t:.2f}"] = hit / count if count else float("nan")
    out["mean_best_iou"] = float(best.mean()) if best.numel() else float("nan")
    return out


def anchor_coverage(
    boxes: GTBoxSet, anchor_generator: AnchorGenerator, thresholds: Sequence[float] = COVERAGE_THRESHOLDS
) -> dict[str, float]:
    """Fraction of gt boxes whose best anchor reaches each IoU threshold, per COCO area range.

    Keys: ``"coverage@0.50"``, ``"coverage_small@0.70"``, ... (``nan`` for an empty range),
    ``"boxes"``, ``"boxes_small"``, ... and ``"mean_best_iou"``.
    """
    best, _ = best_anchor_iou(boxes, anchor_generator)
    return coverage_from_best(best, boxes.areas, thresholds)
