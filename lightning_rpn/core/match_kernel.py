"""The compiled matching kernel: the statistics of ``decide_labels`` for a batch, on the CPU.

Shapes: ``B`` images, ``N`` anchors of an image (any ``[N, 4]`` tensor), ``G`` gt boxes of an
image, ``G_all`` those of all images concatenated, ``K`` low-quality candidate pairs.

:func:`match_stats_cpu` computes only the statistics that
:func:`~lightning_rpn.core.matching.decide_labels` turns into labels, visiting for each gt box
only the anchors of the :class:`~lightning_rpn.core.anchor_index.AnchorIndex` cells that can
overlap it. Only pairs that overlap at all get an IoU; every other pair has IoU 0, which
changes no maximum.

IoU is :func:`~lightning_rpn.core.boxes.iou_from_overlap` on float32 coordinates and areas, so
maxima and ties equal ``box_iou``'s bit for bit (tested against torchvision). Ties between gt
boxes resolve to the lowest index (boxes are visited in order and only a strictly larger IoU
replaces the best), as ``torch.max`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

from .anchor_index import anchor_index, index_arrays, overlap_cells
from .boxes import iou_from_overlap
from .compiled import jit as _jit

__all__ = ["match_stats_cpu"]

_iou = numba.njit(inline="always")(iou_from_overlap)


def match_stats_cpu(
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    inside: Tensor | None,
    bg_iou: float,
    low_quality: bool,
    where: str = "match_stats_cpu",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The matching statistics of ``anchors [N, 4]`` (float32, CPU) with each image's gt boxes.

    Returns, for the anchors overlapping a gt box whose best IoU reaches ``bg_iou`` and the
    low-quality candidates (no others), their flat index ``anchor`` (``b * N + n``) int64, ``best_iou`` float32 and
    ``best_gt`` int32 ``[V]``; then ``gt_best_iou`` float32 ``[G_all]`` and the low-quality
    candidates ``pair_anchor`` (their position in ``anchor``), ``pair_gt`` (into ``G_all``) int64 ``[K]`` and
    ``pair_iou`` float32 ``[K]``: every pair with IoU > 0 at its gt's best (ties included; none
    without ``low_quality``). ``gt_boxes``: finite float32 CPU ``[G_i, 4]``; ``inside``: the
    border filter's bool ``[B, N]``, or None; anchors it leaves out reach no gt box.

    Pairs whose IoU cannot reach ``bg_iou`` nor their gt's best are skipped (see
    ``_match_batch``); ``best_iou`` and ``best_gt`` are exact for every listed anchor.
    """
    index = anchor_index(anchors, where)
    num_anchors = index.boxes.shape[0]
    offsets = np.cumsum([0] + [boxes.shape[0] for boxes in gt_boxes])
    all_gt = torch.cat(list(gt_boxes)) if gt_boxes else torch.zeros(0, 4)
    if inside is None:
        inside_sorted = np.ones((1, num_anchors), dtype=np.bool_)
    else:
        inside_sorted = inside.cpu()[:, torch.from_numpy(index.order)].numpy()
    gt_best = np.zeros(int(offsets[-1]), dtype=np.float32)
    arrays = _match_batch(
        index.boxes, index.areas, index.order, index.geometry, index.layout, index.cell_start, inside_sorted,
        all_gt.contiguous().numpy(), offsets, np.float32(bg_iou), bool(low_quality), gt_best,
    )
    anchor, best_iou, best_gt, pair_anchor, pair_gt, pair_iou = (torch.from_numpy(array) for array in arrays)
    return anchor, best_iou, best_gt, torch.from_numpy(gt_best), pair_anchor, pair_gt, pair_iou


@_jit
def _iou_bound(gt_w, gt_h, gt_area, half_w, half_h, min_area):
    """An upper bound of the IoU of a ``gt_w x gt_h`` box with any anchor of a size class.

    The intersection is at most ``inter = min(gt_w, 2 half_w) * min(gt_h, 2 half_h)``; IoU
    grows with the intersection and falls with the anchor's area, which is at least
    ``max(min_area, inter)``, hence ``inter / (gt_area + max(min_area, inter) - inter)``.
    Widened far beyond float32 rounding, so a pair's computed IoU never exceeds it.
    """
    inter = min(gt_w, 2.0 * half_w) * min(gt_h, 2.0 * half_h)
    return inter / (gt_area + max(min_area, inter) - inter) * (1.0 + 1e-5) + 1e-12


@_jit
def _match_batch(boxes, areas, order, geometry, layout, cell_start, inside, gt, offsets, bg_iou, low_quality, gt_best):
    """Fill ``gt_best [G_all]``; return the listed anchors' statistics and the candidate pairs.

    Image ``b`` has gt rows ``offsets[b]:offsets[b + 1]``; ``inside`` is ``[1, N]`` or
    ``[B, N]`` in index order. Per image, every gt box visits the index cells that can hold
    anchors overlapping it, size classes in descending order of ``_iou_bound``; ``best`` /
    ``arg`` (index order, 0 between images) collect the per-anchor maxima, ``touched`` the
    anchors they changed (so the work per image follows the overlapping pairs, not ``N``),
    ``reaching`` the anchors at the box's running best IoU.

    A class whose bound is below ``bg_iou`` and below the box's best so far is skipped (and
    so are the rest): none of its pairs can change a label, the box's best or its ties. They
    could only be the best gt of a low-quality anchor whose best IoU is below ``bg_iou``, so
    those anchors get their best gt at the end from every box near them, found through an
    index over the image's boxes (``_best_gt_near``).
    """
    num_images, num_anchors = offsets.shape[0] - 1, boxes.shape[0]
    best = np.zeros(num_anchors, dtype=np.float32)
    arg = np.zeros(num_anchors, dtype=np.int32)
    touched = np.empty(num_anchors, dtype=np.int32)
    slot = np.empty(num_anchors, dtype=np.int64)  # a listed anchor's position in the list
    reaching = np.empty(num_anchors, dtype=np.int32)
    bounds = np.empty(geometry.shape[0])
    classes = np.empty(geometry.shape[0], dtype=np.int64)  # by descending bound
    fixed = np.zeros(num_anchors, dtype=np.int32)  # 1 + the image whose fix-up an anchor had
    pairs = 0
    pair_anchor = np.empty(1024, dtype=np.int64)
    pair_gt = np.empty(1024, dtype=np.int64)
    pair_iou = np.empty(1024, dtype=np.float32)
    listed = 0
    list_anchor = np.empty(4096, dtype=np.int64)
    list_iou = np.empty(4096, dtype=np.float32)
    list_gt = np.empty(4096, dtype=np.int32)
    zero = np.float32(0.0)
    for b in range(num_images):
        mask = inside[b] if inside.shape[0] > 1 else inside[0]
        num_touched = 0
        first_pair = pairs
        for g in range(offsets[b], offsets[b + 1]):
            gx1, gy1, gx2, gy2 = gt[g, 0], gt[g, 1], gt[g, 2], gt[g, 3]
            gt_area = (gx2 - gx1) * (gy2 - gy1)
            for c in range(geometry.shape[0]):  # insertion sort: a few dozen classes at most
                bounds[c] = _iou_bound(
                    np.float64(gx2) - gx1, np.float64(gy2) - gy1, np.float64(gt_area),
                    geometry[c, 3], geometry[c, 4], geometry[c, 5],
                )
                place = c
                while place > 0 and bounds[classes[place - 1]] < bounds[c]:
                    classes[place] = classes[place - 1]
                    place -= 1
                classes[place] = c
            top = zero
            num_reaching = 0
            for c in classes:
                if bounds[c] < bg_iou and bounds[c] < top:
                    break
                col0, col1, row0, row1 = overlap_cells(geometry, layout, c, gx1, gy1, gx2, gy2)
                for row in range(row0, row1 + 1):  # empty windows run no row
                    line = layout[c, 0] + row * layout[c, 1]
                    for k in range(cell_start[line + col0], cell_start[line + col1 + 1]):
                        inter_h = min(gy2, boxes[k, 3]) - max(gy1, boxes[k, 1])
                        inter_w = min(gx2, boxes[k, 2]) - max(gx1, boxes[k, 0])
                        if inter_h <= zero or inter_w <= zero or not mask[k]:
                            continue
                        iou = _iou(inter_w * inter_h, gt_area, areas[k])
                        if iou > best[k]:
                            if best[k] == zero:
                                touched[num_touched] = k
                                num_touched += 1
                            best[k] = iou
                            arg[k] = g - offsets[b]
                        if iou > top:
                            top = iou
                            num_reaching = 0
                        if iou == top:
                            reaching[num_reaching] = k
                            num_reaching += 1
            gt_best[g] = top
            if not low_quality or top == zero:
                continue
            if pairs + num_reaching > pair_anchor.shape[0]:
                capacity = 2 * (pairs + num_reaching)
                pair_anchor = _grown(pair_anchor, pairs, capacity)
                pair_gt = _grown(pair_gt, pairs, capacity)
                pair_iou = _grown(pair_iou, pairs, capacity)
            for r in range(num_reaching):
                pair_anchor[pairs] = reaching[r]  # index order until the image is listed
                pair_gt[pairs] = g
                pair_iou[pairs] = top
                pairs += 1
        num_fixed = 0  # the candidates below bg_iou: skipped classes may hold their best gt
        for p in range(first_pair, pairs):
            k = pair_anchor[p]
            if best[k] < bg_iou and fixed[k] != b + 1:
                fixed[k] = b + 1
                reaching[num_fixed] = k
                num_fixed += 1
        if num_fixed:
            gt_index = index_arrays(gt[offsets[b] : offsets[b + 1]])
            for r in range(num_fixed):
                k = reaching[r]
                best[k], arg[k] = _best_gt_near(boxes[k], areas[k], gt_index)
        if listed + num_touched > list_anchor.shape[0]:
            capacity = 2 * (listed + num_touched)
            list_anchor = _grown(list_anchor, listed, capacity)
            list_iou = _grown(list_iou, listed, capacity)
            list_gt = _grown(list_gt, listed, capacity)
        for t in range(num_touched):  # candidates were touched: they overlap their gt box
            k = touched[t]
            if best[k] >= bg_iou or fixed[k] == b + 1:
                list_anchor[listed] = b * num_anchors + order[k]
                list_iou[listed] = best[k]
                list_gt[listed] = arg[k]
                slot[k] = listed
                listed += 1
            best[k] = zero
        for p in range(first_pair, pairs):
            pair_anchor[p] = slot[pair_anchor[p]]
    listing = (list_anchor[:listed], list_iou[:listed], list_gt[:listed])
    return listing + (pair_anchor[:pairs], pair_gt[:pairs], pair_iou[:pairs])


@_jit
def _best_gt_near(anchor, area, gt_index):
    """``(best IoU, lowest gt index reaching it)`` of one anchor, over the boxes of ``gt_index``
    (an ``index_arrays`` of the image's gt boxes) that overlap it."""
    boxes, areas, order, geometry, layout, cell_start = gt_index
    zero = np.float32(0.0)
    best, arg = zero, 0
    for c in range(geometry.shape[0]):
        col0, col1, row0, row1 = overlap_cells(geometry, layout, c, anchor[0], anchor[1], anchor[2], anchor[3])
        for row in range(row0, row1 + 1):
            line = layout[c, 0] + row * layout[c, 1]
            for j in range(cell_start[line + col0], cell_start[line + col1 + 1]):
                inter_h = min(boxes[j, 3], anchor[3]) - max(boxes[j, 1], anchor[1])
                inter_w = min(boxes[j, 2], anchor[2]) - max(boxes[j, 0], anchor[0])
                if inter_h <= zero or inter_w <= zero:
                    continue
                iou = _iou(inter_w * inter_h, areas[j], area)
                if iou > best or (iou == best and order[j] < arg):
                    best, arg = iou, order[j]
    return best, arg


@_jit
def _grown(values, used, capacity):
    """A copy of ``values[:used]`` in a new array of ``capacity`` entries."""
    grown = np.empty(capacity, dtype=values.dtype)
    grown[:used] = values[:used]
    return grown
