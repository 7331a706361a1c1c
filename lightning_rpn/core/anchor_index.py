"""A spatial index over any anchor tensor, for the compiled matching kernel.

Shapes: ``N`` anchors (any ``[N, 4]`` tensor), ``C`` size classes of the index, ``T`` its cells.

An :class:`AnchorIndex` (built in ``O(N)``, cached by the anchors' values) buckets the anchors
by size class (the power of two of their width and of their height) and, within a class, by the
cell of their centre on a uniform grid, in one counting sort. The
anchors of a class that overlap a box have centres within the box widened by the class's
largest half-width / half-height, so a box visits the cells covering that window
(:func:`overlap_cells`): a contiguous run of anchors per cell row.
:mod:`~lightning_rpn.core.match_kernel` reads it (and indexes each image's gt boxes with
:func:`index_arrays` too).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from .compiled import jit as _jit

__all__ = ["AnchorIndex", "anchor_index", "index_arrays", "overlap_cells"]

_MIN_CLASS = -8  # size classes: floor(log2(extent)) from 2^-8 px ...
_CLASSES_PER_AXIS = 48  # ... to 2^39 px, per axis (extents outside are clamped into them)
_INDEXES_KEPT = 16  # anchor sets whose index is cached (as many as AnchorGenerator caches)


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


# (shape, fingerprint) of the anchor values -> their index, most recently used last
_INDEXES: OrderedDict[tuple[tuple[int, ...], int], AnchorIndex] = OrderedDict()


def anchor_index(anchors: Tensor, where: str = "anchor_index") -> AnchorIndex:
    """The :class:`AnchorIndex` of float32 CPU ``anchors [N, 4]``, cached by their values.

    ``ValueError`` naming ``where`` for non-finite anchors.

    The cache is keyed by a 64-bit fingerprint of the values (:func:`_fingerprint`, one pass:
    0.1 to 0.2 ms for 250k anchors, where building an index takes about 10 ms). So equal anchors
    reuse one index whatever tensor holds them (the generator's cached anchors in every batch,
    and torchvision's ``AnchorGenerator``, which makes new ones in every forward), and anchors
    changed in any way (in place, through ``.data`` or a numpy array sharing their memory,
    which the tensor's version counter does not see) get a new one.
    """
    boxes = anchors.detach().contiguous().numpy()
    key = (boxes.shape, _fingerprint(boxes))
    index = _INDEXES.get(key)
    if index is not None:
        _INDEXES.move_to_end(key)
        return index
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: anchors must be finite, got a non-finite coordinate")
    index = _INDEXES[key] = AnchorIndex(*index_arrays(boxes))
    while len(_INDEXES) > _INDEXES_KEPT:
        _INDEXES.popitem(last=False)
    return index


def _fingerprint(boxes: np.ndarray) -> int:
    """A 64-bit hash of the bits of C-contiguous float32 ``boxes [N, 4]``, in one pass.

    Each 8-byte word goes through a bijective mix of (word, position) and the mixes are summed,
    so changing one coordinate always changes the hash and other changes leave it equal only
    by a 64-bit coincidence; rows swapped or shifted change it too (unlike a plain sum).
    """
    return int(_hash_words(boxes.reshape(-1).view(np.uint64)))


@_jit
def _hash_words(words):
    """Sum (mod 2^64) of a bijective mix of each uint64 word with its position; vectorises."""
    total = np.uint64(0)
    for i in range(words.shape[0]):
        x = words[i] ^ (np.uint64(i) * np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(32))) * np.uint64(0xD6E8FEB86659FD93)
        total += x ^ (x >> np.uint64(32))
    return total


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
def overlap_cells(geometry, layout, c, x1, y1, x2, y2):
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
def index_arrays(boxes):
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
