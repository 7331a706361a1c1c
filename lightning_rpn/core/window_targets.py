"""What a window sees of an image's boxes: the one rule for boxes cut by a window, and window losses.

Shapes: ``G`` gt boxes of the image, ``C`` its crowd boxes. Boxes are ``(x1, y1, x2, y2)``
float32 pixels; windows are ``(x0, y0, x1, y1)`` ints.

Evaluation losses on sliding windows (:class:`WindowTargets`, for :mod:`lightning_rpn.core.windows`):
each window gets the training targets it would have as a training window (:func:`clip_to_window`, the one rule for boxes cut by a window,
which :func:`~lightning_rpn.data.tiles.cut_window` applies too: gt boxes clipped, those keeping
less than ``min_visibility`` of their area dropped, crowd boxes kept where they reach in), its
anchors matched and sampled by the model's own functions, seeded by the image's sampling key and
the window (:func:`window_key`). A window batch's losses are those of a training batch of these
windows; :func:`mean_window_losses` averages them over the windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_rpn.core.boxes import box_area

__all__ = ["Window", "WindowTargets", "clip_to_window", "mean_window_losses", "window_key"]

Window = tuple[int, int, int, int]


def clip_to_window(boxes: Tensor, window: Window, min_visibility: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(clipped [G, 4] in window pixels, inside [G], kept [G])`` of ``boxes`` ``[G, 4]`` (image pixels).

    ``inside``: the clipped box has a positive area; ``kept``: inside and keeping at least
    ``min_visibility`` of its area (a zero-area box keeps none). Boxes inside but not kept are
    the ones a window removes (counted by the data report).
    """
    x0, y0, x1, y1 = window
    low = boxes.new_tensor([x0, y0, x0, y0])
    clipped = torch.minimum(torch.maximum(boxes, low), boxes.new_tensor([x1, y1, x1, y1]))
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    area, kept_area = box_area(boxes), box_area(clipped)
    visible = torch.where(area > 0, kept_area / area.clamp(min=1e-12), torch.zeros_like(area))
    return clipped - low, inside, inside & (visible >= min_visibility)


def window_key(key: int | str, window: Window) -> str:
    """``"key@x0,y0,x1,y1"``: the id (and anchor-sampling key) of a window of the image ``key``."""
    x0, y0, x1, y1 = window
    return f"{key}@{x0},{y0},{x1},{y1}"


@dataclass
class WindowTargets:
    """One evaluation image's gt boxes, cut into each window's training targets; the windows' losses.

    ``gt_boxes`` ``[G, 4]`` / ``crowd_boxes`` ``[C, 4]`` in image pixels; ``image_id`` names the
    windows in errors, ``sampling_key`` (with the window) seeds their anchor sampling;
    ``min_visibility`` is the data's rule for cut boxes. ``losses`` collects ``(windows, loss
    dict)`` per window batch (see :func:`mean_window_losses`).
    """

    gt_boxes: Tensor
    crowd_boxes: Tensor
    image_id: int | str
    sampling_key: int | str
    min_visibility: float = 0.0
    losses: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)

    def for_windows(self, windows: Sequence[Window]) -> tuple[list[dict[str, Tensor]], list[str], list[str]]:
        """Per window ``{"boxes", "crowd_boxes"}`` (window pixels), its id and its sampling key."""
        targets = []
        for window in windows:
            boxes, _, kept = clip_to_window(self.gt_boxes, window, self.min_visibility)
            crowd, crowd_inside, _ = clip_to_window(self.crowd_boxes, window, 0.0)
            targets.append({"boxes": boxes[kept], "crowd_boxes": crowd[crowd_inside]})
        return (targets, [window_key(self.image_id, w) for w in windows],
                [window_key(self.sampling_key, w) for w in windows])


def mean_window_losses(parts: Sequence[tuple[int, Mapping[str, Tensor]]]) -> dict[str, Tensor]:
    """Each loss averaged over the windows: ``parts`` are ``(windows, losses)`` per window batch."""
    total = sum(count for count, _ in parts)
    if not parts or total == 0:
        raise ValueError(f"mean_window_losses: expected at least one window batch with windows, got {list(parts)}")
    return {key: sum(count * losses[key] for count, losses in parts) / total for key in parts[0][1]}
