"""Boxes that tiled training cannot train: larger than any window keeps at ``min_visibility``.

A window of side ``size`` keeps at most ``size / w`` of a box ``w`` wide (and likewise in
height), so a box much larger than the window is cut below ``min_visibility`` in every window
and dropped (:func:`~lightning_rpn.data.tiles.cut_window`): it is never trained. The data report
and ``check-data`` name such boxes (problem kind ``box_larger_than_window``, a warning).
"""

from __future__ import annotations

import numpy as np

from lightning_rpn.data.problems import Problem

__all__ = ["boxes_no_window_keeps", "untrainable_boxes_problem"]


def boxes_no_window_keeps(
    boxes: np.ndarray, image_size: tuple[int, int], size: int, min_visibility: float
) -> np.ndarray:
    """Mask ``[G]`` of the ``boxes`` that keep less than ``min_visibility`` of their area in every
    window of side ``size`` of an ``image_size = (H, W)`` image: a box longer than the window
    keeps at most the window's share of that side (``cut_window`` then drops it everywhere)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    window_h, window_w = min(size, image_size[0]), min(size, image_size[1])
    share = (np.minimum(1.0, window_w / np.maximum(widths, 1e-6))
             * np.minimum(1.0, window_h / np.maximum(heights, 1e-6)))
    return (widths > 0) & (heights > 0) & (share < min_visibility)


def untrainable_boxes_problem(
    boxes: np.ndarray, image_size: tuple[int, int], size: int, min_visibility: float,
    file: str | None, image_id: int | str,
) -> Problem | None:
    """The :class:`~lightning_rpn.data.problems.Problem` (kind ``box_larger_than_window``) of the
    ``boxes`` of image ``image_id`` of ``file`` that no window keeps (:func:`boxes_no_window_keeps`):
    how many, and the window side that holds them whole; ``None`` when every box can be trained."""
    lost = boxes_no_window_keeps(boxes, image_size, size, min_visibility)
    if not lost.any():
        return None
    sides = np.maximum(boxes[lost, 2] - boxes[lost, 0], boxes[lost, 3] - boxes[lost, 1])
    detail = (f"{int(lost.sum())} of its {len(boxes)} boxes are larger than a window (data.tiles.size={size}) and "
              f"keep less than data.min_visibility={min_visibility} of their area in any window, so no window "
              f"trains them; windows of data.tiles.size >= {int(np.ceil(sides.max()))} hold them whole (or "
              "downscale the images, or lower data.min_visibility to train them clipped)")
    return Problem("box_larger_than_window", "skipped", detail, file, image_id)
