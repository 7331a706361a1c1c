"""Compiled CPU kernels for anchor-target assignment: matching and sampling a batch.

Shapes: ``B`` images, ``N`` anchors of an image (all levels), ``G`` ground-truth boxes of an
image, ``L`` levels, ``A`` anchors per location of a level, ``H_l x W_l`` its anchor grid.

They serve the CPU paths of ``match_anchors_batched`` and ``sample_anchors_batched``, above
all in DataLoader workers, where a few dozen small tensor ops per image cost more than their
arithmetic: one kernel call per batch does all of its images.

Matching (``match_grid_cpu``). On a grid, the anchors that overlap a gt box at all form, per
level and cell anchor, one rectangle of rows and columns (an anchor's ``x1, x2`` depend only on its column, ``y1, y2``
only on its row). The kernel visits only those pairs, in gt order, so its cost is the sum of
the rectangles' sizes (a few thousand pairs per box) instead of ``G x N``, with no
temporaries. Every anchor outside all rectangles has IoU exactly 0 with every box.

IoU is ``box_iou``'s float32 arithmetic on the grid's own coordinates and areas
(``inter / ((area_gt + area_anchor) - inter)``, ``inter = w * h``), so thresholds, maxima and
ties equal :func:`~lightning_rpn.matching.match_anchors` bit for bit (tested). Ties between
gt boxes resolve to the lowest index (pairs are visited in gt order and only a strictly
larger IoU replaces the best), as ``torch.max`` does.

Sampling: ``random_subset`` draws ``k`` of ``n`` indices with Floyd's algorithm driven by
``k`` uniforms from the image's generator: a uniformly random subset from ``O(k)`` random
draws where ``torch.randperm`` makes ``n`` (every sampling path uses it, so they agree); ``sample_cpu``
counts the candidates and marks the chosen ones in one scan each, instead of materialising
the index lists.

Numba compiles the kernels on first call and caches them on disk, so DataLoader workers and
later runs load them instead of compiling again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

from .anchors import AnchorGenerator, AnchorGrid
from .boxes import box_area

__all__ = ["GridTables", "load_kernels", "match_grid_cpu", "random_subset", "sample_cpu"]

_jit = numba.njit(cache=True, nogil=True)  # compiled on first call, cached on disk


class GridTables:
    """The numpy views of an ``AnchorGrid`` that the matching kernel reads (cached per grid)."""

    def __init__(self, grid: AnchorGrid) -> None:
        anchors = grid.anchors.detach().float().cpu()
        self.anchors = anchors.numpy()
        self.areas = box_area(anchors).numpy()
        cells = [level.cell_anchors.detach().cpu().double() for level in grid.levels]
        self.cells = torch.cat(cells).numpy() if cells else np.zeros((0, 4))
        first_cell = np.cumsum([0] + [c.shape[0] for c in cells])[:-1]
        self.layout = np.array(
            [(lv.start, lv.height, lv.width, lv.cell_anchors.shape[0], int(first)) for lv, first in zip(grid.levels, first_cell)],
            dtype=np.int64,
        ).reshape(-1, 5)
        self.geometry = np.array([(lv.step, lv.origin) for lv in grid.levels], dtype=np.float64).reshape(-1, 2)
        self.everywhere = np.ones((1, self.anchors.shape[0]), dtype=np.bool_)  # no border filter


_TABLES: OrderedDict[int, tuple[AnchorGrid, GridTables]] = OrderedDict()
_TABLES_KEPT = 16  # as many as AnchorGenerator caches grids


def _tables_of(grid: AnchorGrid) -> GridTables:
    """``GridTables(grid)``, cached per grid object (the generator hands out cached grids)."""
    entry = _TABLES.get(id(grid))
    if entry is None or entry[0] is not grid:
        entry = (grid, GridTables(grid))  # holding the grid keeps its id from being reused
        _TABLES[id(grid)] = entry
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    _TABLES.move_to_end(id(grid))
    return entry[1]


def match_grid_cpu(
    grid: AnchorGrid,
    gt_boxes: Sequence[Tensor],
    fg_iou: float,
    bg_iou: float,
    allow_low_quality: bool,
    inside: Tensor | None = None,
    compact: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(labels int64 [B, N], matched int64 [B, N])``: row ``i`` is ``match_anchors(grid, gt_boxes[i], ...)``.

    ``gt_boxes``: finite float32 CPU ``[G_i, 4]`` per image (``G_i`` may be 0); ``inside``: the
    border filter's bool ``[B, N]`` mask, or ``None``; ``compact``: labels int8, matched int32.
    """
    tables = _tables_of(grid)
    count, num_anchors = len(gt_boxes), tables.anchors.shape[0]
    labels = torch.empty(count, num_anchors, dtype=torch.int8 if compact else torch.int64)
    matched = torch.empty(count, num_anchors, dtype=torch.int32 if compact else torch.int64)
    offsets = np.cumsum([0] + [boxes.shape[0] for boxes in gt_boxes])
    all_gt = torch.cat([boxes.detach().float().cpu() for boxes in gt_boxes]) if count else torch.zeros(0, 4)
    _match_batch(
        tables.anchors,
        tables.areas,
        tables.everywhere if inside is None else inside.cpu().numpy(),
        tables.layout,
        tables.geometry,
        tables.cells,
        all_gt.contiguous().numpy(),
        offsets,
        np.float32(fg_iou),
        np.float32(bg_iou),
        bool(allow_low_quality),
        labels.numpy(),
        matched.numpy(),
    )
    return labels, matched


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
        positive_uniforms.append(_uniforms(int(keep[row, 0]), generator))  # random_subset's order
        negative_uniforms.append(_uniforms(int(keep[row, 1]), generator))
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
    return torch.from_numpy(np.flatnonzero(_choose(population, _uniforms(count, generator))))


def load_kernels() -> None:
    """Compile (or load from the disk cache) every kernel now, with a call on a tiny input.

    Call it in a process before it forks DataLoader workers: they inherit the compiled code
    instead of each loading it again at every epoch's start (about 0.2-0.5 s per worker).
    """
    grid = AnchorGenerator(((8,),), (1.0,), (8,)).grid([(2, 2)])
    boxes = [torch.tensor([[0.0, 0.0, 6.0, 6.0]]), torch.zeros(0, 4)]
    for compact in (True, False):  # the collate's signatures, then match_anchors_batched's
        for inside in (None, torch.ones(2, grid.num_anchors, dtype=torch.bool)):
            labels, _ = match_grid_cpu(grid, boxes, 0.7, 0.3, True, inside=inside, compact=compact)
            sample_cpu(labels, 2, 0.5, [None, None])
    random_subset(4, 2, None)


def _uniforms(count: int, generator: torch.Generator | None) -> np.ndarray:
    """``count`` float64 uniforms in [0, 1) from ``generator``, drawn on its device."""
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
def _match_batch(anchors, areas, inside, layout, geometry, cells, gt, offsets, fg_iou, bg_iou, allow_low_quality, labels, matched):
    """Fill ``labels`` / ``matched`` ``[B, N]``, image ``b`` with gt rows ``offsets[b]:offsets[b + 1]``."""
    best = np.empty(labels.shape[1], dtype=np.float32)  # scratch, shared by the images
    reaching = np.empty(labels.shape[1], dtype=np.int32)
    for b in range(labels.shape[0]):
        mask = inside[b] if inside.shape[0] > 1 else inside[0]
        if offsets[b + 1] == offsets[b]:  # no gt box: all negatives, whatever the thresholds
            for n in range(labels.shape[1]):
                labels[b, n] = 0 if mask[n] else -1
                matched[b, n] = 0
            continue
        _match_image(
            anchors, areas, mask, layout, geometry, cells, gt[offsets[b] : offsets[b + 1]],
            fg_iou, bg_iou, allow_low_quality, labels[b], matched[b], best, reaching,
        )


@_jit
def _match_image(
    anchors, areas, inside, layout, geometry, cells, gt, fg_iou, bg_iou, allow_low_quality, labels, matched, best, reaching
):
    """Fill one image's ``labels`` / ``matched`` ``[N]`` from its (non-empty) ``gt`` boxes.

    One visit of each box's rectangles finds every anchor's best IoU (and gt) and the box's own
    best IoU with the anchors reaching it (its low-quality matches, ties included). ``best``
    (float32) and ``reaching`` (int32) are ``[N]`` scratch arrays.
    """
    num_anchors = anchors.shape[0]
    zero = np.float32(0.0)
    best[:] = 0
    best_gt = matched  # the outputs double as scratch: best gt, then low-quality flags
    low_quality = labels
    best_gt[:] = 0
    low_quality[:] = 0
    for g in range(gt.shape[0]):
        gx1, gy1, gx2, gy2 = gt[g, 0], gt[g, 1], gt[g, 2], gt[g, 3]
        gt_area = (gx2 - gx1) * (gy2 - gy1)
        gt_best = zero
        num_reaching = 0
        for level in range(layout.shape[0]):
            start, height, width, count, first_cell = layout[level]
            step, origin = geometry[level, 0], geometry[level, 1]
            for a in range(count):
                cell = cells[first_cell + a]
                # grid indices that may overlap the box, one cell of slack each side
                col0 = max(int(np.floor((gx1 - cell[2] - origin) / step)) - 1, 0)
                col1 = min(int(np.ceil((gx2 - cell[0] - origin) / step)) + 2, width)
                row0 = max(int(np.floor((gy1 - cell[3] - origin) / step)) - 1, 0)
                row1 = min(int(np.ceil((gy2 - cell[1] - origin) / step)) + 2, height)
                for row in range(row0, row1):
                    top = start + row * width * count + a
                    inter_h = min(gy2, anchors[top, 3]) - max(gy1, anchors[top, 1])
                    if inter_h <= zero:
                        continue
                    for col in range(col0, col1):
                        n = top + col * count
                        inter_w = min(gx2, anchors[n, 2]) - max(gx1, anchors[n, 0])
                        if inter_w <= zero or not inside[n]:
                            continue
                        inter = inter_w * inter_h
                        iou = inter / ((gt_area + areas[n]) - inter)
                        if iou > best[n]:
                            best[n] = iou
                            best_gt[n] = g
                        if iou > gt_best:
                            gt_best = iou
                            num_reaching = 0
                        if iou == gt_best:
                            reaching[num_reaching] = n
                            num_reaching += 1
        # a box overlapping no anchor (best IoU 0) makes no low-quality match, as match_anchors
        if allow_low_quality:
            for k in range(num_reaching):
                low_quality[reaching[k]] = 1
    for n in range(num_anchors):
        if not inside[n]:
            labels[n] = -1
            matched[n] = 0
            continue
        label = 1 if best[n] >= fg_iou or low_quality[n] == 1 else (-1 if best[n] >= bg_iou else 0)
        labels[n] = label
        if label != 1:
            matched[n] = 0
