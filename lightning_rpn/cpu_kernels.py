"""Compiled CPU kernels for anchor-target assignment: matching and sampling one image.

Shapes: ``N`` anchors of an image (all levels), ``G`` ground-truth boxes, ``L`` levels, ``A``
anchors per location of a level, ``H_l x W_l`` its anchor grid.

They serve the CPU paths of ``match_anchors_batched`` and ``sample_anchors_batched``, above
all in DataLoader workers, where a few dozen small tensor ops per image cost more than their
arithmetic.

Matching (``match_grid_cpu``). On a grid, the anchors that overlap a gt box at all form, per level and cell anchor, one
rectangle of rows and columns (an anchor's ``x1, x2`` depend only on its column, ``y1, y2``
only on its row). The kernel visits only those pairs, in gt order, so its cost is the sum of
the rectangles' sizes (a few thousand pairs per box) instead of ``G x N``, with no
temporaries. Every anchor outside all rectangles has IoU exactly 0 with every box.

IoU is ``box_iou``'s float32 arithmetic on the grid's own coordinates and areas
(``inter / ((area_gt + area_anchor) - inter)``, ``inter = w * h``), so thresholds, maxima and
ties equal :func:`~lightning_rpn.matching.match_anchors` bit for bit (tested). Ties between
gt boxes resolve to the lowest index (pairs are visited in gt order and only a strictly
larger IoU replaces the best), as ``torch.max`` does.

Sampling: ``random_subset`` draws ``k`` of ``n`` indices by a partial Fisher-Yates shuffle
driven by ``k`` uniforms from the image's generator, ``O(k)`` random draws where
``torch.randperm`` makes ``n`` (every sampling path uses it, so they agree);
``sample_row_cpu`` counts the candidates and marks the chosen ones in one scan each, instead
of materialising the index lists.

Numba compiles the kernels on first call and caches them on disk, so DataLoader workers and
later runs load them instead of compiling again.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from .anchors import AnchorGrid
from .boxes import box_area

__all__ = ["GridTables", "load_kernels", "match_grid_cpu", "random_subset", "sample_row_cpu"]

_jit = numba.njit(cache=True, nogil=True)  # compiled on first call, cached on disk


class GridTables:
    """The numpy views of an ``AnchorGrid`` that the kernel reads; build once per grid and batch."""

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
        self.everywhere = np.ones(self.anchors.shape[0], dtype=np.bool_)


def match_grid_cpu(
    tables: GridTables,
    gt_boxes: Tensor,
    fg_iou: float,
    bg_iou: float,
    allow_low_quality: bool,
    inside: Tensor | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(labels int64 [N], matched int64 [N])`` of ``match_anchors(grid, gt_boxes, ...)`` on the CPU.

    ``tables``: ``GridTables(grid)``; ``gt_boxes``: finite float32 ``[G, 4]`` with ``G >= 1``;
    ``inside``: the border filter's bool ``[N]`` mask, or ``None``; ``out``: contiguous int64
    CPU ``[N]`` tensors to write the result into (e.g. rows of a batch), else new ones.
    """
    num_anchors = tables.anchors.shape[0]
    if out is None:
        out = (torch.empty(num_anchors, dtype=torch.int64), torch.empty(num_anchors, dtype=torch.int64))
    labels, matched = out
    _match_grid(
        tables.anchors,
        tables.areas,
        tables.everywhere if inside is None else inside.cpu().numpy(),
        tables.layout,
        tables.geometry,
        tables.cells,
        gt_boxes.detach().float().cpu().contiguous().numpy(),
        np.float32(fg_iou),
        np.float32(bg_iou),
        bool(allow_low_quality),
        labels.numpy(),
        matched.numpy(),
    )
    return labels, matched


def sample_row_cpu(
    labels: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: torch.Generator | None,
    out: Tensor,
) -> Tensor:
    """Write ``sample_anchors(labels, ...)`` into ``out`` (int64 CPU ``[N]``); return the sampled positives.

    ``labels`` and ``out`` are contiguous int64 CPU ``[N]`` (``out`` may be ``labels``: sampling
    in place); the result holds the sampled positive anchors' indices, ascending.
    """
    labels_np = labels.numpy()
    num_positive, num_negative = _count_labels(labels_np)
    keep_positive = min(num_positive, int(batch_size_per_image * positive_fraction))
    keep_negative = min(num_negative, batch_size_per_image - keep_positive)
    positives = np.empty(keep_positive, dtype=np.int64)
    _select_ranked(
        labels_np,
        num_positive,
        num_negative,
        _uniforms(keep_positive, generator),  # drawn in random_subset's order: positives first
        _uniforms(keep_negative, generator),
        out.numpy(),
        positives,
    )
    return torch.from_numpy(positives)


def random_subset(population: int, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` distinct uniformly random indices below ``population`` (int64 CPU, in draw order).

    The uniforms come from ``generator`` (on its own device; the default CPU generator for
    ``None``), so the same generator state gives the same subset on every path.
    """
    if not 0 <= count <= population:
        raise ValueError(f"random_subset: need 0 <= count <= population, got count={count}, population={population}")
    return torch.from_numpy(_partial_shuffle(population, _uniforms(count, generator)))


def load_kernels() -> None:
    """Compile (or load from the disk cache) every kernel now, with a call on a tiny input.

    Call it in a process before it forks DataLoader workers: they inherit the compiled code
    instead of each loading it again at every epoch's start (about 0.2-0.5 s per worker).
    """
    labels = np.zeros(4, dtype=np.int64)
    counts = _count_labels(labels)
    _select_ranked(labels, counts[0], counts[1], np.zeros(0), np.zeros(1), labels.copy(), np.zeros(0, dtype=np.int64))
    random_subset(4, 2, None)
    anchors = np.array([[0.0, 0.0, 2.0, 2.0]], dtype=np.float32)
    _match_grid(
        anchors, np.array([4.0], dtype=np.float32), np.ones(1, dtype=np.bool_),
        np.array([[0, 1, 1, 1, 0]], dtype=np.int64), np.array([[2.0, 0.0]]), np.array([[-1.0, -1.0, 1.0, 1.0]]),
        anchors, np.float32(0.7), np.float32(0.3), True, labels[:1].copy(), labels[:1].copy(),
    )


def _uniforms(count: int, generator: torch.Generator | None) -> np.ndarray:
    """``count`` float64 uniforms in [0, 1) from ``generator``, drawn on its device."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(count, generator=generator, device=device, dtype=torch.float64).cpu().numpy()


@_jit
def _partial_shuffle(population, uniforms):
    """The first ``len(uniforms)`` entries of a Fisher-Yates shuffle of ``range(population)``."""
    order = np.arange(population)
    for i in range(uniforms.shape[0]):
        j = min(i + int(uniforms[i] * (population - i)), population - 1)
        order[i], order[j] = order[j], order[i]
    return order[: uniforms.shape[0]].copy()


@_jit
def _count_labels(labels):
    """``(positives, negatives)`` in ``labels``."""
    positives = negatives = 0
    for label in labels:
        if label == 1:
            positives += 1
        elif label == 0:
            negatives += 1
    return positives, negatives


@_jit
def _select_ranked(labels, num_positive, num_negative, positive_uniforms, negative_uniforms, out, positives):
    """``out``: 1 / 0 for the chosen ranks among the positives / negatives, -1 elsewhere; ``positives``
    gets the chosen positive anchors, ascending. Ranks come from ``_partial_shuffle``."""
    chosen_positive = np.zeros(num_positive, dtype=np.bool_)
    chosen_positive[_partial_shuffle(num_positive, positive_uniforms)] = True
    chosen_negative = np.zeros(num_negative, dtype=np.bool_)
    chosen_negative[_partial_shuffle(num_negative, negative_uniforms)] = True
    positive_rank = negative_rank = found = 0
    for n in range(labels.shape[0]):
        label = labels[n]  # read before writing: ``out`` may be ``labels``
        out[n] = -1
        if label == 1:
            if chosen_positive[positive_rank]:
                out[n] = 1
                positives[found] = n
                found += 1
            positive_rank += 1
        elif label == 0:
            if chosen_negative[negative_rank]:
                out[n] = 0
            negative_rank += 1


@_jit
def _match_grid(anchors, areas, inside, layout, geometry, cells, gt, fg_iou, bg_iou, allow_low_quality, labels, matched):
    """Fill ``labels`` / ``matched``; see :func:`match_grid_cpu`."""
    num_anchors = anchors.shape[0]
    zero = np.float32(0.0)
    best = np.zeros(num_anchors, dtype=np.float32)
    best_gt = matched  # the outputs double as scratch: best gt, then low-quality flags
    low_quality = labels
    best_gt[:] = 0
    low_quality[:] = 0
    gt_best = np.zeros(gt.shape[0], dtype=np.float32)
    for visit in range(2):  # 0: maxima; 1: anchors reaching their gt's best (low quality)
        if visit == 1 and not allow_low_quality:
            break
        for g in range(gt.shape[0]):
            if visit == 1 and gt_best[g] <= zero:
                continue  # overlaps no anchor: no low-quality match (as match_anchors)
            gx1, gy1, gx2, gy2 = gt[g, 0], gt[g, 1], gt[g, 2], gt[g, 3]
            gt_area = (gx2 - gx1) * (gy2 - gy1)
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
                            if visit == 0:
                                if iou > best[n]:
                                    best[n] = iou
                                    best_gt[n] = g
                                if iou > gt_best[g]:
                                    gt_best[g] = iou
                            elif iou == gt_best[g]:
                                low_quality[n] = 1
    for n in range(num_anchors):
        if not inside[n]:
            labels[n] = -1
            matched[n] = 0
            continue
        label = 1 if best[n] >= fg_iou or low_quality[n] == 1 else (-1 if best[n] >= bg_iou else 0)
        labels[n] = label
        if label != 1:
            matched[n] = 0
