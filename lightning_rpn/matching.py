"""Label anchors positive / negative / ignored by their IoU with the ground-truth boxes.

Shapes: ``N`` anchors of an image (all levels), ``G`` ground-truth boxes, ``Q`` anchor groups
(one per level and cell anchor).

The decisions are those of torchvision's ``Matcher(fg_iou, bg_iou, allow_low_quality_matches)``
followed by the RPN's label mapping:

* an anchor whose best IoU is ``>= fg_iou`` is positive (1), ``< bg_iou`` negative (0), and in
  between ignored (-1);
* with ``allow_low_quality``, every anchor that reaches the best IoU of some gt box (ties
  included) is positive as well;
* ``matched`` is the anchor's best gt box (the lowest index among equal maxima, like
  ``torch.max``) for positives and 0 elsewhere (torchvision's ``clamp(min=0)``).

IoU is computed with torchvision's float32 formula, ``inter / (area_gt + area_anchor - inter)``,
so thresholds and ties agree bit for bit.

Deliberate deviation: a gt box that overlaps no anchor at all (best IoU 0) makes no
low-quality match. torchvision marks *every* anchor with IoU 0 to it positive (and matches
them to an unrelated box), which floods the loss with meaningless positives.

Border filter (off by default): with ``allowed_border`` set, anchors reaching more than that
many pixels outside the image are left out of matching altogether, as in the original Faster
R-CNN (they never become a gt's best anchor), and labelled -1.

Two implementations give identical results:

* the grid path, taken when ``anchors`` is an :class:`~lightning_rpn.anchors.AnchorGrid`.
  Only pairs that can matter are enumerated: for each gt box and each group of anchors with the
  same shape on a regular grid, the grid positions whose IoU can reach a per-gt threshold form
  an index window. The threshold is ``min(bg_iou, a lower bound of the gt's best IoU)``, so the
  windows hold every pair that can decide a label, a per-gt maximum or (almost always) an
  argmax. The exception, a low-quality anchor whose best IoU is below ``bg_iou``, gets its
  argmax from the gt boxes overlapping its spatial tile. Time and memory grow with the number
  of gt boxes and their overlaps, not with ``N x G``; IoU values of the grid path are
  computed from the same float32 coordinates the generator produced (``grid_centres``);
* the dense path for any other anchor tensor (and for small ``N x G``, where it is faster),
  chunked over anchors to bound memory.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .anchors import AnchorGrid, grid_centres
from .boxes import box_area, box_iou

__all__ = ["match_anchors", "anchors_inside_image", "check_gt_box_batch"]

_PAIR_BUDGET = 1 << 20  # candidate pairs evaluated at once on the grid path
_DENSE_BUDGET = 1 << 22  # IoU entries evaluated at once on the dense path
_WINDOW_SLACK = 1e-3  # relative slack on the IoU bound that sizes the grid windows
_TILE_SIZE = 16  # anchors per tile when re-checking low-quality matches against all gts
_TILE_PAIR_BUDGET = 1 << 18  # (anchor, gt) pairs of those tiles evaluated at once
_SMALL_PROBLEM = 1 << 16  # N x G at or below which the dense path is faster (same result)


def anchors_inside_image(anchors: Tensor, image_size: tuple[int, int], allowed_border: float) -> Tensor:
    """Bool ``[N]``: anchors reaching at most ``allowed_border`` pixels outside the ``(h, w)`` image."""
    height, width = float(image_size[0]), float(image_size[1])
    border = float(allowed_border)
    return (
        (anchors[:, 0] >= -border)
        & (anchors[:, 1] >= -border)
        & (anchors[:, 2] < width + border)
        & (anchors[:, 3] < height + border)
    )


def check_gt_box_batch(
    gt_boxes: Sequence[Tensor],
    where: Callable[[int], str],
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> None:
    """Raise ``ValueError`` for the first malformed box of float32 ``[G_i, 4]`` tensors (one device).

    Malformed: a non-finite coordinate, ``x2 <= x1`` or ``y2 <= y1`` (no area) or, with
    ``image_sizes`` (``(h, w)`` per tensor), a box wholly outside its image. One vectorised
    pass over the whole batch and one host sync; the message starts with ``where(i)`` for
    the ``i``-th tensor and names the box's row and coordinates.
    """
    counts = [int(boxes.shape[0]) for boxes in gt_boxes]
    if not sum(counts):
        return
    boxes = torch.cat(list(gt_boxes)) if len(gt_boxes) > 1 else gt_boxes[0]
    x1, y1, x2, y2 = boxes.unbind(1)
    good = torch.isfinite(boxes).all(dim=1) & (x2 > x1) & (y2 > y1)
    if image_sizes is not None:
        size = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)
        size = size.repeat_interleave(torch.tensor(counts, device=boxes.device), dim=0)
        good &= (x1 < size[:, 1]) & (y1 < size[:, 0]) & (x2 > 0) & (y2 > 0)
    if bool(good.all()):
        return
    first = int(torch.nonzero(~good)[0, 0])
    image = bisect.bisect_right(list(itertools.accumulate(counts)), first)
    row = first - sum(counts[:image])
    values = boxes[first].tolist()
    if not all(math.isfinite(value) for value in values):
        problem = "has non-finite coordinates"
    elif not (values[2] > values[0] and values[3] > values[1]):
        problem = "is empty; expected x2 > x1 and y2 > y1 (xyxy pixels)"
    else:
        assert image_sizes is not None
        height, width = image_sizes[image]
        problem = f"lies wholly outside its {height}x{width} (h x w) image; expected image pixels"
    raise ValueError(f"{where(image)}: gt box {row} = {values} {problem}")


def match_anchors(
    anchors: Tensor | AnchorGrid,
    gt_boxes: Tensor,
    fg_iou: float = 0.7,
    bg_iou: float = 0.3,
    allow_low_quality: bool = True,
    *,
    image_size: tuple[int, int] | None = None,
    allowed_border: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(labels int64 [N] in {1, 0, -1}, matched int64 [N])`` for one image.

    ``anchors`` is an ``[N, 4]`` tensor or an ``AnchorGrid`` (fast path, same result).
    ``G == 0`` gives all negatives with ``matched`` all 0. ``allowed_border`` needs
    ``image_size`` ``(h, w)``.
    """
    if not 0.0 <= bg_iou <= fg_iou <= 1.0:
        raise ValueError(
            f"match_anchors: need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}"
        )
    grid = anchors if isinstance(anchors, AnchorGrid) else None
    anchor_boxes = grid.anchors if grid is not None else anchors
    if not isinstance(anchor_boxes, Tensor) or anchor_boxes.dim() != 2 or anchor_boxes.shape[1] != 4:
        raise ValueError(f"match_anchors: anchors must be [N, 4] or an AnchorGrid, got {_describe(anchor_boxes)}")
    if not isinstance(gt_boxes, Tensor) or gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"match_anchors: gt_boxes must be [G, 4], got {_describe(gt_boxes)}")
    device = anchor_boxes.device
    anchor_boxes = anchor_boxes.float()
    gt = gt_boxes.to(device=device, dtype=torch.float32)
    check_gt_box_batch([gt], lambda _: "match_anchors(gt_boxes)")

    inside = None
    if allowed_border is not None:
        if image_size is None:
            raise ValueError("match_anchors: allowed_border needs image_size=(h, w)")
        inside = anchors_inside_image(anchor_boxes, image_size, allowed_border)

    num_anchors, num_gt = anchor_boxes.shape[0], gt.shape[0]
    if num_gt == 0 or num_anchors == 0:
        labels = torch.zeros(num_anchors, dtype=torch.int64, device=device)
        if inside is not None:
            labels[~inside] = -1
        return labels, torch.zeros(num_anchors, dtype=torch.int64, device=device)

    with torch.no_grad():
        if grid is not None and num_anchors * num_gt > _SMALL_PROBLEM:
            anchor_ids, anchor_max, anchor_arg, low_quality = _grid_summary(
                grid, gt, inside, bg_iou, allow_low_quality
            )
            some_labels, some_matched = _decide(anchor_max, anchor_arg, low_quality, fg_iou, bg_iou, allow_low_quality)
            # Anchors without a kept pair have best IoU 0 as far as thresholds can tell.
            unseen = 1 if fg_iou <= 0 else (-1 if bg_iou <= 0 else 0)
            labels = torch.full((num_anchors,), unseen, dtype=torch.int64, device=device)
            matched = torch.zeros(num_anchors, dtype=torch.int64, device=device)
            labels[anchor_ids] = some_labels
            matched[anchor_ids] = some_matched
        else:
            summary = _dense_summary(anchor_boxes, gt, inside, allow_low_quality)
            labels, matched = _decide(*summary, fg_iou, bg_iou, allow_low_quality)
        if inside is not None:
            labels[~inside] = -1
            matched[~inside] = 0
    return labels, matched


def _decide(
    best_iou: Tensor, best_gt: Tensor, low_quality: Tensor, fg_iou: float, bg_iou: float, allow_low_quality: bool
) -> tuple[Tensor, Tensor]:
    """Labels (1 / 0 / -1) and matched gt (0 unless positive) from per-anchor summaries."""
    labels = torch.where(best_iou >= fg_iou, 1, torch.where(best_iou >= bg_iou, -1, 0)).to(torch.int64)
    if allow_low_quality:
        labels[low_quality] = 1
    return labels, torch.where(labels == 1, best_gt, 0)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _dense_summary(
    anchors: Tensor, gt: Tensor, inside: Tensor | None, need_low_quality: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-anchor best IoU and gt (first index on ties) and the low-quality mask, chunked."""
    num_anchors, num_gt = anchors.shape[0], gt.shape[0]
    chunk = max(1, _DENSE_BUDGET // num_gt)
    anchor_max = torch.empty(num_anchors, device=anchors.device)
    anchor_arg = torch.empty(num_anchors, dtype=torch.int64, device=anchors.device)
    gt_max = torch.full((num_gt,), -1.0, device=anchors.device)

    def iou_block(begin: int, end: int) -> Tensor:
        iou = box_iou(gt, anchors[begin:end])
        if inside is not None:
            iou.masked_fill_(~inside[begin:end][None], -1.0)
        return iou

    single_block = None
    for begin in range(0, num_anchors, chunk):
        iou = iou_block(begin, begin + chunk)
        values, indices = iou.max(dim=0)
        anchor_max[begin : begin + chunk] = values
        anchor_arg[begin : begin + chunk] = indices
        gt_max = torch.maximum(gt_max, iou.amax(dim=1))
        single_block = iou if chunk >= num_anchors else None

    low_quality = torch.zeros(num_anchors, dtype=torch.bool, device=anchors.device)
    if need_low_quality:
        # A gt with best IoU 0 overlaps nothing: no low-quality match (see module docstring).
        reachable = gt_max > 0
        if bool(reachable.any()):
            best = torch.where(reachable, gt_max, torch.nan)[:, None]
            for begin in range(0, num_anchors, chunk):
                iou = single_block if single_block is not None else iou_block(begin, begin + chunk)
                low_quality[begin : begin + chunk] = (iou == best).any(dim=0)
    return anchor_max, anchor_arg, low_quality


class _Groups:
    """Per anchor group (level x cell anchor) geometry as ``[Q]`` tensors."""

    def __init__(self, grid: AnchorGrid, device: torch.device) -> None:
        step, origin, height, width, start, per_loc, index, cells = [], [], [], [], [], [], [], []
        for level in grid.levels:
            if level.height == 0 or level.width == 0:
                continue
            count = level.cell_anchors.shape[0]
            for a in range(count):
                step.append(level.step)
                origin.append(level.origin)
                height.append(level.height)
                width.append(level.width)
                start.append(level.start)
                per_loc.append(count)
                index.append(a)
            cells.append(level.cell_anchors.to(device=device, dtype=torch.float32))
        i64 = dict(dtype=torch.int64, device=device)
        self.step32 = torch.tensor(step, dtype=torch.float32, device=device)
        self.origin32 = torch.tensor(origin, dtype=torch.float32, device=device)
        self.step = self.step32.double()
        self.origin = self.origin32.double()
        self.height = torch.tensor(height, **i64)
        self.width = torch.tensor(width, **i64)
        self.start = torch.tensor(start, **i64)
        self.per_loc = torch.tensor(per_loc, **i64)
        self.index = torch.tensor(index, **i64)
        self.cells32 = torch.cat(cells) if cells else torch.zeros(0, 4, dtype=torch.float32, device=device)
        self.cells = self.cells32.double()
        self.size = len(step)

    def anchor_index(self, q: Tensor, row: Tensor, col: Tensor) -> Tensor:
        """Row in ``AnchorGrid.anchors`` of group ``q``'s anchor at grid position ``(row, col)``."""
        return self.start[q] + (row * self.width[q] + col) * self.per_loc[q] + self.index[q]


def _pair_iou(gt: Tensor, gt_area: Tensor, anchors: Tensor) -> Tensor:
    """IoU of row i of ``gt`` with row i of ``anchors``; same float32 ops as the dense matrix."""
    top_left = torch.maximum(gt[:, :2], anchors[:, :2])
    bottom_right = torch.minimum(gt[:, 2:], anchors[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (gt_area + box_area(anchors) - inter)


def _grid_summary(
    grid: AnchorGrid, gt: Tensor, inside: Tensor | None, bg_iou: float, need_low_quality: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grid path of :func:`match_anchors`: ``_dense_summary`` restricted to some anchors.

    Returns ``(anchor_ids, best IoU, best gt, low-quality mask)`` for the anchors that have a
    kept pair; all others have best IoU below ``bg_iou`` and are not low-quality. The best IoU
    is exact where it is ``>= bg_iou`` (below, it only has to stay below), the best gt for
    anchors with best IoU ``>= bg_iou`` and for low-quality ones.
    """
    device = gt.device
    anchors = grid.anchors.float()
    num_gt = gt.shape[0]
    groups = _Groups(grid, device)
    gt_area = box_area(gt)

    # Per-gt IoU threshold: every pair at or above it is kept. It never exceeds bg_iou (so
    # every label-deciding pair is kept) nor the gt's best IoU (so its best anchors are kept).
    threshold = torch.full((num_gt,), bg_iou, dtype=torch.float32, device=device)
    if need_low_quality and groups.size:
        threshold = torch.minimum(threshold, _best_iou_lower_bound(anchors, gt, gt_area, groups, inside))
    window_threshold = threshold.double() * (1.0 - _WINDOW_SLACK)
    gt64 = gt.double()
    col_lo, col_count = _windows(gt64, 0, window_threshold, groups, groups.width)
    row_lo, row_count = _windows(gt64, 1, window_threshold, groups, groups.height)

    # Items: (gt, group) pairs with a non-empty window; rows: one grid row of an item's window.
    items = torch.nonzero((col_count * row_count).reshape(-1)).squeeze(1)
    item_rows = row_count.reshape(-1)[items]
    row_item = torch.repeat_interleave(item_rows)
    row_offset = torch.arange(row_item.shape[0], device=device) - (torch.cumsum(item_rows, 0) - item_rows)[row_item]
    row_cols = col_count.reshape(-1)[items][row_item]
    row_cols, order = torch.sort(row_cols)
    row_item = row_item[order]
    row_offset = row_offset[order]
    row_gt = torch.div(items, groups.size, rounding_mode="floor")[row_item]
    row_q = (items % groups.size)[row_item]
    row_y = row_lo.reshape(-1)[items][row_item] + row_offset
    row_x0 = col_lo.reshape(-1)[items][row_item]
    del order, row_offset, row_item

    # Row-level float32 geometry, built with the generator's own ops (bit-identical anchors).
    row_step = groups.step32[row_q]
    row_origin = groups.origin32[row_q]
    row_cells = groups.cells32[row_q]
    centre_y = grid_centres(row_y.float(), row_step, row_origin)
    anchor_y1 = centre_y + row_cells[:, 1]
    anchor_y2 = centre_y + row_cells[:, 3]
    row_gt_boxes = gt[row_gt]
    inter_h = (
        torch.minimum(anchor_y2, row_gt_boxes[:, 3]) - torch.maximum(anchor_y1, row_gt_boxes[:, 1])
    ).clamp(min=0)
    anchor_h = anchor_y2 - anchor_y1
    row_gt_area = gt_area[row_gt]
    row_threshold = threshold[row_gt]
    row_step_index = groups.per_loc[row_q]
    row_base = groups.start[row_q] + (row_y * groups.width[row_q] + row_x0) * row_step_index + groups.index[row_q]

    kept_rows = [torch.zeros(0, dtype=torch.int64, device=device)]
    kept_cols = [torch.zeros(0, dtype=torch.int64, device=device)]
    kept_iou = [torch.zeros(0, device=device)]
    widths = row_cols.tolist()
    begin = 0
    while begin < len(widths):
        # Rows of similar window width, padded to the widest one.
        end = bisect.bisect_right(widths, 2 * widths[begin], lo=begin)
        end = min(end, begin + max(1, _PAIR_BUDGET // max(widths[end - 1], 1)))
        cols = torch.arange(widths[end - 1], dtype=torch.float32, device=device)
        rows = slice(begin, end)
        centre_x = grid_centres(
            row_x0[rows].float()[:, None] + cols[None], row_step[rows, None], row_origin[rows, None]
        )
        anchor_x1 = centre_x + row_cells[rows, 0, None]
        anchor_x2 = centre_x + row_cells[rows, 2, None]
        boxes = row_gt_boxes[rows]
        inter_w = torch.minimum(anchor_x2, boxes[:, 2, None]) - torch.maximum(anchor_x1, boxes[:, 0, None])
        inter_w.clamp_(min=0)
        inter = inter_w * inter_h[rows, None]
        union = (row_gt_area[rows, None] + (anchor_x2 - anchor_x1) * anchor_h[rows, None]) - inter
        iou = inter / union
        keep = (iou >= row_threshold[rows, None]) & (iou > 0) & (cols[None] < row_cols[rows, None])
        hit_rows, hit_cols = torch.nonzero(keep).unbind(1)
        kept_rows.append(hit_rows + begin)
        kept_cols.append(hit_cols)
        kept_iou.append(iou[hit_rows, hit_cols])
        begin = end

    hit_rows = torch.cat(kept_rows)
    pair_iou = torch.cat(kept_iou)
    pair_anchor = row_base[hit_rows] + torch.cat(kept_cols) * row_step_index[hit_rows]
    pair_gt = row_gt[hit_rows]
    if inside is not None:
        keep = inside[pair_anchor]
        pair_iou, pair_anchor, pair_gt = pair_iou[keep], pair_anchor[keep], pair_gt[keep]

    # Reduce per distinct anchor (sparse: every other anchor has best IoU below bg_iou).
    anchor_ids, pair_slot = torch.unique(pair_anchor, return_inverse=True)
    anchor_max = torch.zeros(anchor_ids.shape[0], device=device)
    anchor_max.scatter_reduce_(0, pair_slot, pair_iou, reduce="amax", include_self=True)
    # Argmax with the lowest gt index among equal maxima.
    at_max = pair_iou == anchor_max[pair_slot]
    anchor_arg = torch.full((anchor_ids.shape[0],), num_gt, dtype=torch.int64, device=device)
    anchor_arg.scatter_reduce_(0, pair_slot[at_max], pair_gt[at_max], reduce="amin", include_self=True)

    low_quality = torch.zeros(anchor_ids.shape[0], dtype=torch.bool, device=device)
    if need_low_quality:
        gt_max = torch.zeros(num_gt, device=device)
        gt_max.scatter_reduce_(0, pair_gt, pair_iou, reduce="amax", include_self=True)
        low_quality[pair_slot[pair_iou == gt_max[pair_gt]]] = True
        # A low-quality anchor whose best kept IoU is below bg_iou may have its best gt
        # outside every window: compare it with all boxes.
        recheck = torch.nonzero(low_quality & (anchor_max < bg_iou)).squeeze(1)
        if recheck.numel():
            anchor_arg[recheck] = _best_gt_by_tiles(anchors[anchor_ids[recheck]], gt)
    return anchor_ids, anchor_max, anchor_arg, low_quality


def _best_gt_by_tiles(anchors: Tensor, gt: Tensor) -> Tensor:
    """Best gt (lowest index on ties) of each anchor, for anchors that overlap some gt.

    Anchors are put in Z-order per size class and cut into small tiles that are compact in
    space; each tile is compared only with the gt boxes overlapping the tile's bounding box
    (every other box has IoU 0 with all of its anchors).
    """
    num, device = anchors.shape[0], anchors.device
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    size_class = torch.log2((widths * heights).clamp(min=1.0)).div(2).round().clamp(0, 30)
    cell = torch.exp2(size_class) / 2
    quant_x = torch.floor((anchors[:, 0] + anchors[:, 2]) / 2 / cell).long() + (1 << 15)
    quant_y = torch.floor((anchors[:, 1] + anchors[:, 3]) / 2 / cell).long() + (1 << 15)
    key = (size_class.long() << 32) | (_spread_bits(quant_x) | (_spread_bits(quant_y) << 1))
    order = torch.argsort(key)
    num_tiles = -(-num // _TILE_SIZE)
    padding = num_tiles * _TILE_SIZE - num
    # Pad the last tile with copies of its last anchor; their results are dropped.
    slots = torch.cat([order, order[-1:].expand(padding)]).view(num_tiles, _TILE_SIZE)
    tiles = anchors[slots]  # [T, S, 4]
    bounds = torch.stack(
        (tiles[..., 0].amin(1), tiles[..., 1].amin(1), tiles[..., 2].amax(1), tiles[..., 3].amax(1)), dim=1
    )
    gt_area = box_area(gt)

    def near_gt(first: int, last: int) -> Tensor:
        box = bounds[first:last, None]
        return (gt[:, 0] < box[..., 2]) & (gt[:, 2] > box[..., 0]) & (gt[:, 1] < box[..., 3]) & (gt[:, 3] > box[..., 1])

    best = torch.empty(num, dtype=torch.int64, device=device)
    offsets = torch.arange(_TILE_SIZE, device=device)
    rows = max(1, _DENSE_BUDGET // gt.shape[0])
    for block in range(0, num_tiles, rows):
        near = near_gt(block, block + rows)
        pair_tile, pair_gt = torch.nonzero(near).unbind(1)  # ascending gt within a tile
        per_tile = near.sum(1).cumsum(0).tolist()
        # Runs of whole tiles with at most about _TILE_PAIR_BUDGET (anchor, gt) pairs each.
        first = 0
        while first < near.shape[0]:
            done = per_tile[first - 1] if first else 0
            last = max(first + 1, bisect.bisect_right(per_tile, done + _TILE_PAIR_BUDGET // _TILE_SIZE, lo=first))
            tile = pair_tile[done : per_tile[last - 1]]
            cand = pair_gt[done : per_tile[last - 1]]
            iou = _pair_iou(
                gt[cand].repeat_interleave(_TILE_SIZE, 0),
                gt_area[cand].repeat_interleave(_TILE_SIZE, 0),
                tiles[tile + block].reshape(-1, 4),
            )
            slot = ((tile - first)[:, None] * _TILE_SIZE + offsets).reshape(-1)
            size = (last - first) * _TILE_SIZE
            slot_max = torch.full((size,), -1.0, device=device).scatter_reduce_(0, slot, iou, reduce="amax")
            at_max = iou == slot_max[slot]
            slot_gt = torch.full((size,), gt.shape[0], dtype=torch.int64, device=device)
            slot_gt.scatter_reduce_(0, slot[at_max], cand.repeat_interleave(_TILE_SIZE)[at_max], reduce="amin")
            begin_slot = (block + first) * _TILE_SIZE
            keep = min(size, num - begin_slot)
            best[order[begin_slot : begin_slot + keep]] = slot_gt[:keep]
            first = last
    return best


def _spread_bits(value: Tensor) -> Tensor:
    """Move the low 16 bits of ``value`` to the even bit positions (for a Z-order key)."""
    value = value.clamp(0, 0xFFFF)
    value = (value | (value << 8)) & 0x00FF00FF
    value = (value | (value << 4)) & 0x0F0F0F0F
    value = (value | (value << 2)) & 0x33333333
    return (value | (value << 1)) & 0x55555555


def _best_iou_lower_bound(
    anchors: Tensor, gt: Tensor, gt_area: Tensor, groups: _Groups, inside: Tensor | None
) -> Tensor:
    """``[G]`` float32: IoU of each gt with its centre-aligned anchor of every group, maximised.

    A real anchor's IoU, hence a lower bound of the gt's best IoU (0 if none qualifies).
    """
    num_gt, num_groups = gt.shape[0], groups.size
    gt64 = gt.double()
    cell_cx = (groups.cells[:, 0] + groups.cells[:, 2]) / 2
    cell_cy = (groups.cells[:, 1] + groups.cells[:, 3]) / 2
    gt_cx = (gt64[:, 0] + gt64[:, 2]) / 2
    gt_cy = (gt64[:, 1] + gt64[:, 3]) / 2
    col = ((gt_cx[:, None] - groups.origin - cell_cx) / groups.step).round()
    row = ((gt_cy[:, None] - groups.origin - cell_cy) / groups.step).round()
    col = torch.minimum(col.clamp(min=0), (groups.width - 1).double()).long()
    row = torch.minimum(row.clamp(min=0), (groups.height - 1).double()).long()
    q = torch.arange(num_groups, device=gt.device).expand(num_gt, num_groups)
    index = groups.anchor_index(q, row, col).reshape(-1)
    gt_rows = torch.arange(num_gt, device=gt.device).repeat_interleave(num_groups)
    iou = _pair_iou(gt[gt_rows], gt_area[gt_rows], anchors[index])
    if inside is not None:
        iou.masked_fill_(~inside[index], 0.0)
    return iou.reshape(num_gt, num_groups).amax(dim=1).clamp(min=0)


def _windows(
    gt: Tensor, axis: int, threshold: Tensor, groups: _Groups, size: Tensor
) -> tuple[Tensor, Tensor]:
    """First grid index and count ``[G, Q]`` along one axis of the pairs that can reach ``threshold``.

    IoU >= t needs ``inter >= t * max(area_gt, area_anchor)`` and the overlap along the other
    axis is at most ``min(extent_gt, extent_anchor)``, so the overlap along this axis must be at
    least ``tau = t * max(areas) / min(other extents)``. That gives ``anchor_hi >= lo + tau``,
    ``anchor_lo <= hi - tau`` and ``tau <= min(extents)``. Windows are widened by one cell to
    absorb rounding; extra pairs are harmless (their IoU is computed exactly).
    """
    lo, hi = gt[:, axis, None], gt[:, axis + 2, None]
    other = gt[:, 3 - axis, None] - gt[:, 1 - axis, None]
    cell_lo = groups.cells[:, axis]
    cell_hi = groups.cells[:, axis + 2]
    cell_extent = cell_hi - cell_lo
    cell_other = groups.cells[:, 3 - axis] - groups.cells[:, 1 - axis]
    extent = hi - lo
    max_area = torch.maximum(extent * other, cell_extent * cell_other)
    min_other = torch.minimum(other, cell_other).clamp(min=1e-12)
    tau = threshold[:, None] * max_area / min_other
    feasible = tau <= torch.minimum(extent, cell_extent)
    first = torch.ceil((lo + tau - cell_hi - groups.origin) / groups.step) - 1
    last = torch.floor((hi - tau - cell_lo - groups.origin) / groups.step) + 1
    limit = (size - 1).double()
    first = torch.minimum(first.clamp(min=0), limit + 1)
    last = torch.minimum(last.clamp(min=-1), limit)
    count = (last - first + 1).clamp(min=0).long() * feasible
    return first.long(), count
