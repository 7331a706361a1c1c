"""Compiled CPU kernels for anchor-target assignment: matching statistics and sampling a batch.

Shapes: ``B`` images, ``N`` anchors of an image (any ``[N, 4]`` tensor), ``G`` gt boxes of
an image, ``G_all`` those of all images concatenated, ``K`` low-quality candidate pairs,
``C`` size classes of an anchor index, ``T`` its cells.

They serve the ``"compiled"`` backend of :func:`~lightning_rpn.core.matching.match_anchors_batched`
and ``sample_anchors_batched``, above all in DataLoader workers, where a few dozen small
tensor ops per image cost more than their arithmetic: one kernel call per batch does all of
its images.

Matching (``match_stats_cpu``) computes only the statistics that
:func:`~lightning_rpn.core.matching.decide_labels` turns into labels. An :class:`AnchorIndex`
(built in ``O(N)``, cached per anchor tensor) buckets the anchors by size class (the power of
two of their width and of their height) and, within a class, by the cell of their centre on
a uniform grid, in one counting sort. The anchors of a class that overlap a box have centres
within the box widened by the class's largest half-width / half-height, so each gt box visits
the cells covering that window: a contiguous run of anchors per cell row. Only pairs that
overlap at all get an IoU; every other pair has IoU 0, which changes no maximum.

IoU is :func:`~lightning_rpn.core.boxes.iou_from_overlap` on float32 coordinates and areas, so
maxima and ties equal ``box_iou``'s bit for bit (tested against torchvision). Ties between gt
boxes resolve to the lowest index (boxes are visited in order and only a strictly larger IoU
replaces the best), as ``torch.max`` does.

Sampling: ``random_subset`` draws ``k`` of ``n`` indices with Floyd's algorithm driven by
``k`` uniforms from the image's generator: a uniformly random subset from ``O(k)`` random
draws where ``torch.randperm`` makes ``n``. Every sampling path draws an image's uniforms in
one call, the positives' first, then the negatives' (on a CPU generator the same numbers as
two calls), so they agree; ``sample_cpu``
counts the candidates and marks the chosen ones in one scan each, instead of materialising
the index lists.

Numba compiles the kernels on first call and caches them on disk, so DataLoader workers and
later runs load them instead of compiling again.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import Tensor

from .boxes import iou_from_overlap

__all__ = [
    "AnchorIndex", "anchor_index", "load_kernels", "match_stats_cpu", "random_subset", "sample_cpu",
    "draw_uniforms", "subset_of_uniforms",
]

_jit = numba.njit(cache=True, nogil=True)  # compiled on first call, cached on disk
_iou = numba.njit(inline="always")(iou_from_overlap)

_MIN_CLASS = -8  # size classes: floor(log2(extent)) from 2^-8 px ...
_CLASSES_PER_AXIS = 48  # ... to 2^39 px, per axis (extents outside are clamped into them)
_INDEXES_KEPT = 16  # anchor tensors whose index is cached (as many as AnchorGenerator caches)


@dataclass(frozen=True)
class AnchorIndex:
    """Anchors bucketed by size class and centre cell (numpy arrays the kernel reads).

    ``boxes`` float32 ``[N, 4]`` and ``areas`` float32 ``[N]`` in bucket order, ``order``
    int64 ``[N]`` the original row of each; per class, ``geometry`` float64 ``[C, 6]``
    (centre-grid origin x, y, cell size, largest half-width, largest half-height, smallest
    area) and
    ``layout`` int64 ``[C, 3]`` (first cell, columns, rows); ``cell_start`` int64 ``[T + 1]``
    where each cell's anchors begin.
    """

    boxes: np.ndarray
    areas: np.ndarray
    order: np.ndarray
    geometry: np.ndarray
    layout: np.ndarray
    cell_start: np.ndarray


_INDEXES: OrderedDict[int, tuple[weakref.ref, tuple, AnchorIndex]] = OrderedDict()


def anchor_index(anchors: Tensor, where: str = "anchor_index") -> AnchorIndex:
    """The :class:`AnchorIndex` of float32 CPU ``anchors [N, 4]``, cached per tensor.

    ``ValueError`` naming ``where`` for non-finite anchors.

    The cache holds a weak reference and the tensor's version counter, data pointer and
    shape, so an anchor tensor matched again (the generator's cached anchors, in every batch)
    reuses its index and one changed in place gets a new one.
    """
    key = id(anchors)
    state = (anchors.data_ptr(), tuple(anchors.shape), None if anchors.is_inference() else anchors._version)
    entry = _INDEXES.get(key)
    if entry is not None and entry[0]() is anchors and entry[1] == state and state[2] is not None:
        _INDEXES.move_to_end(key)
        return entry[2]
    boxes = anchors.detach().contiguous().numpy()
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: anchors must be finite, got a non-finite coordinate")
    index = AnchorIndex(*_build_index(boxes))
    if state[2] is not None:  # inference tensors have no version counter: not cached
        _INDEXES[key] = (weakref.ref(anchors), state, index)
        while len(_INDEXES) > _INDEXES_KEPT:
            _INDEXES.popitem(last=False)
    return index


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


def sample_cpu(
    labels: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generators: Sequence[torch.Generator | None],
) -> tuple[Tensor, Tensor]:
    """Overwrite int8 or int64 CPU ``[B, N]`` ``labels`` with ``sample_anchors`` of each row (row
    ``i`` with ``generators[i]``); return the sampled positives as ``(rows, anchors)``, row-major."""
    labels_np = labels.numpy()
    counts = _count_batch(labels_np)
    keep = np.empty_like(counts)
    positive_uniforms, negative_uniforms = [], []
    for row, generator in enumerate(generators):
        keep[row, 0] = min(int(counts[row, 0]), int(batch_size_per_image * positive_fraction))
        keep[row, 1] = min(int(counts[row, 1]), batch_size_per_image - int(keep[row, 0]))
        draws = draw_uniforms(int(keep[row, 0] + keep[row, 1]), generator)  # positives' first, as every path
        positive_uniforms.append(draws[: keep[row, 0]])
        negative_uniforms.append(draws[keep[row, 0] :])
    total = int(keep[:, 0].sum())
    rows, anchors = np.empty(total, dtype=np.int64), np.empty(total, dtype=np.int64)
    _select_batch(
        labels_np,
        counts,
        np.concatenate(positive_uniforms) if positive_uniforms else np.zeros(0),
        np.cumsum(np.concatenate([[0], keep[:, 0]])),
        np.concatenate(negative_uniforms) if negative_uniforms else np.zeros(0),
        np.cumsum(np.concatenate([[0], keep[:, 1]])),
        rows,
        anchors,
    )
    return torch.from_numpy(rows), torch.from_numpy(anchors)


def random_subset(population: int, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` distinct uniformly random indices below ``population`` (int64 CPU, ascending).

    The uniforms come from ``generator`` (on its own device; the default CPU generator for
    ``None``), so the same generator state gives the same subset on every path.
    """
    if not 0 <= count <= population:
        raise ValueError(f"random_subset: need 0 <= count <= population, got count={count}, population={population}")
    return subset_of_uniforms(population, draw_uniforms(count, generator))


def subset_of_uniforms(population: int, draws: np.ndarray) -> Tensor:
    """``len(draws)`` distinct indices below ``population`` (int64 CPU, ascending), chosen by
    Floyd's algorithm from float64 ``draws`` in [0, 1) (``draw_uniforms``)."""
    return torch.from_numpy(np.flatnonzero(_choose(population, draws)))


def load_kernels() -> None:
    """Compile (or load from the disk cache) every kernel now, with a call on a tiny input.

    Call it in a process before it forks DataLoader workers: they inherit the compiled code
    instead of each loading it again at every epoch's start (about 0.2-0.5 s per worker).
    """
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 12.0, 12.0]])
    boxes = [torch.tensor([[0.0, 0.0, 6.0, 6.0]]), torch.zeros(0, 4)]
    for inside in (None, torch.ones(2, 2, dtype=torch.bool)):
        match_stats_cpu(anchors, boxes, inside, 0.3, True)
    for labels in (torch.zeros(2, 2, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int64)):
        sample_cpu(labels, 2, 0.5, [None, None])
    random_subset(4, 2, None)


def draw_uniforms(count: int, generator: torch.Generator | None) -> np.ndarray:
    """``count`` float64 uniforms in [0, 1) from ``generator``, drawn on its device in one call."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(count, generator=generator, device=device, dtype=torch.float64).cpu().numpy()


@_jit
def _choose(population, uniforms):
    """Bool ``[population]`` marking ``len(uniforms)`` distinct indices, by Floyd's algorithm.

    For ``j`` from ``n - k`` to ``n - 1``: pick ``t`` uniformly in ``[0, j]``; take ``t`` unless
    it is taken already, then take ``j``. Every ``k``-subset is equally likely.
    """
    chosen = np.zeros(population, dtype=np.bool_)
    first = population - uniforms.shape[0]
    for i in range(uniforms.shape[0]):
        j = first + i
        t = min(int(uniforms[i] * (j + 1)), j)
        if chosen[t]:
            chosen[j] = True
        else:
            chosen[t] = True
    return chosen


@_jit
def _count_batch(labels):
    """``[B, 2]``: positives and negatives of each row of ``labels``."""
    counts = np.zeros((labels.shape[0], 2), dtype=np.int64)
    for row in range(labels.shape[0]):
        positives = negatives = 0
        for n in range(labels.shape[1]):  # branch-free, so that it vectorises
            positives += labels[row, n] == 1
            negatives += labels[row, n] == 0
        counts[row, 0] = positives
        counts[row, 1] = negatives
    return counts


@_jit
def _select_batch(labels, counts, positive_uniforms, positive_offsets, negative_uniforms, negative_offsets, rows, anchors):
    """Sample every row of ``labels`` in place: 1 / 0 for the chosen ranks among its positives /
    negatives (ranks from ``_choose`` with the row's uniforms), -1 elsewhere; the chosen
    positives go to ``rows`` / ``anchors``, row-major."""
    found = 0
    for row in range(labels.shape[0]):
        uniforms = positive_uniforms[positive_offsets[row] : positive_offsets[row + 1]]
        chosen_positive = _choose(counts[row, 0], uniforms)
        uniforms = negative_uniforms[negative_offsets[row] : negative_offsets[row + 1]]
        chosen_negative = _choose(counts[row, 1], uniforms)
        positive_rank = negative_rank = 0
        for n in range(labels.shape[1]):
            label = labels[row, n]
            labels[row, n] = -1
            if label == 1:
                if chosen_positive[positive_rank]:
                    labels[row, n] = 1
                    rows[found] = row
                    anchors[found] = n
                    found += 1
                positive_rank += 1
            elif label == 0:
                if chosen_negative[negative_rank]:
                    labels[row, n] = 0
                negative_rank += 1


@_jit
def _size_class(extent):
    """Index of ``floor(log2(extent))`` among the size classes of one axis (0 for empty extents)."""
    if not extent > 0:
        return 0
    return min(max(int(np.floor(np.log2(extent))) - _MIN_CLASS, 0), _CLASSES_PER_AXIS - 1)


@_jit
def _cell_range(low, high, origin, cell, count):
    """Cells ``[first, last]`` (of ``count``) holding centres in ``[low, high]``; empty if first > last."""
    first = np.floor((low - origin) / cell)
    last = np.floor((high - origin) / cell)
    if last < 0 or first > count - 1:
        return 1, 0
    return int(max(first, 0.0)), int(min(last, count - 1.0))


@_jit
def _window(geometry, layout, c, x1, y1, x2, y2):
    """Cells ``(col0, col1, row0, row1)`` of class ``c`` that can hold boxes overlapping ``(x1, y1, x2, y2)``.

    Their centres lie within the box widened by the class's largest half extents (float64,
    widened again far beyond rounding error); empty when ``col0 > col1`` or ``row0 > row1``.
    """
    x1, y1, x2, y2 = np.float64(x1), np.float64(y1), np.float64(x2), np.float64(y2)
    slack = 1e-7 * (abs(x1) + abs(x2) + abs(y1) + abs(y2)) + 1e-30
    origin_x, origin_y, cell, half_w, half_h = geometry[c, 0], geometry[c, 1], geometry[c, 2], geometry[c, 3], geometry[c, 4]
    col0, col1 = _cell_range(x1 - half_w - slack, x2 + half_w + slack, origin_x, cell, layout[c, 1])
    row0, row1 = _cell_range(y1 - half_h - slack, y2 + half_h + slack, origin_y, cell, layout[c, 2])
    return col0, col1, row0, row1


@_jit
def _build_index(boxes):
    """:class:`AnchorIndex` arrays of float32 ``boxes [N, 4]`` (finite): two counting sorts, O(N)."""
    num = boxes.shape[0]
    key = np.empty(num, dtype=np.int64)
    keys = _CLASSES_PER_AXIS * _CLASSES_PER_AXIS
    members = np.zeros(keys, dtype=np.int64)
    for i in range(num):
        width = np.float64(boxes[i, 2]) - np.float64(boxes[i, 0])
        height = np.float64(boxes[i, 3]) - np.float64(boxes[i, 1])
        key[i] = _size_class(width) * _CLASSES_PER_AXIS + _size_class(height)
        members[key[i]] += 1
    class_of = np.full(keys, -1, dtype=np.int64)
    num_classes = 0
    for k in range(keys):
        if members[k]:
            class_of[k] = num_classes
            num_classes += 1
    # per class: centre bounds (x0, y0, x1, y1) and the largest half extents
    bounds = np.empty((num_classes, 4))
    bounds[:, :2] = np.inf
    bounds[:, 2:] = -np.inf
    geometry = np.zeros((num_classes, 6))
    geometry[:, 5] = np.inf
    layout = np.zeros((num_classes, 3), dtype=np.int64)
    smallest = np.zeros(num_classes, dtype=np.int64)
    for k in range(keys):
        if members[k]:
            c = class_of[k]
            layout[c, 0] = members[k]  # member count, until it becomes the first cell
            smallest[c] = min(k // _CLASSES_PER_AXIS, k % _CLASSES_PER_AXIS) + _MIN_CLASS
    for i in range(num):
        c = class_of[key[i]]
        key[i] = c
        x1, y1, x2, y2 = np.float64(boxes[i, 0]), np.float64(boxes[i, 1]), np.float64(boxes[i, 2]), np.float64(boxes[i, 3])
        cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
        bounds[c, 0] = min(bounds[c, 0], cx)
        bounds[c, 1] = min(bounds[c, 1], cy)
        bounds[c, 2] = max(bounds[c, 2], cx)
        bounds[c, 3] = max(bounds[c, 3], cy)
        geometry[c, 3] = max(geometry[c, 3], 0.5 * (x2 - x1))
        geometry[c, 4] = max(geometry[c, 4], 0.5 * (y2 - y1))
        geometry[c, 5] = min(geometry[c, 5], (x2 - x1) * (y2 - y1))
    total = 0
    for c in range(num_classes):
        # cells of half the class's smaller extent, coarsened until there are about 2 per member
        cell = 2.0 ** (smallest[c] - 1)
        while ((bounds[c, 2] - bounds[c, 0]) / cell + 1) * ((bounds[c, 3] - bounds[c, 1]) / cell + 1) > 2 * layout[c, 0] + 16:
            cell *= 2.0
        columns = int(np.floor((bounds[c, 2] - bounds[c, 0]) / cell)) + 1
        rows = int(np.floor((bounds[c, 3] - bounds[c, 1]) / cell)) + 1
        geometry[c, 0], geometry[c, 1], geometry[c, 2] = bounds[c, 0], bounds[c, 1], cell
        layout[c, 0], layout[c, 1], layout[c, 2] = total, columns, rows
        total += columns * rows
    cell_of = np.empty(num, dtype=np.int64)
    cell_start = np.zeros(total + 1, dtype=np.int64)
    for i in range(num):
        c = key[i]
        cx = 0.5 * (np.float64(boxes[i, 0]) + np.float64(boxes[i, 2]))
        cy = 0.5 * (np.float64(boxes[i, 1]) + np.float64(boxes[i, 3]))
        column = _cell_range(cx, cx, geometry[c, 0], geometry[c, 2], layout[c, 1])[0]
        row = _cell_range(cy, cy, geometry[c, 1], geometry[c, 2], layout[c, 2])[0]
        cell_of[i] = layout[c, 0] + row * layout[c, 1] + column
        cell_start[cell_of[i] + 1] += 1
    for t in range(total):
        cell_start[t + 1] += cell_start[t]
    fill = cell_start[:-1].copy()
    order = np.empty(num, dtype=np.int64)
    for i in range(num):
        order[fill[cell_of[i]]] = i
        fill[cell_of[i]] += 1
    sorted_boxes = np.empty((num, 4), dtype=np.float32)
    areas = np.empty(num, dtype=np.float32)
    for k in range(num):
        box = boxes[order[k]]
        sorted_boxes[k] = box
        areas[k] = (box[2] - box[0]) * (box[3] - box[1])  # float32, as box_area
    return sorted_boxes, areas, order, geometry, layout, cell_start


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
                col0, col1, row0, row1 = _window(geometry, layout, c, gx1, gy1, gx2, gy2)
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
            gt_index = _build_index(gt[offsets[b] : offsets[b + 1]])
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
    (an ``_build_index`` of the image's gt boxes) that overlap it."""
    boxes, areas, order, geometry, layout, cell_start = gt_index
    zero = np.float32(0.0)
    best, arg = zero, 0
    for c in range(geometry.shape[0]):
        col0, col1, row0, row1 = _window(geometry, layout, c, anchor[0], anchor[1], anchor[2], anchor[3])
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
