"""Sliding-window proposals for images larger than the network should see at once.

Shapes: ``H x W`` the image, ``S`` windows, ``h x w`` a window, ``P_s`` proposals of window
``s``, ``P`` proposals of the image after merging, ``k`` its top-k. Boxes are ``(x1, y1, x2, y2)``
float32 pixels; windows are ``(x0, y0, x1, y1)`` ints.

Pure torch (no Lightning): :func:`sliding_window_proposals` cuts an image into overlapping
windows (:func:`window_grid`, the grid of SAHI's slices and DeepForest's patches), runs them
through ``propose`` ``window_batch`` at a time (memory bounded by the window batch, not the
image), shifts each window's proposals to image pixels, merges them across windows
(:func:`merge_window_proposals`) and keeps the image's ``top_k`` best by objectness logit.

The merge is non-maximum suppression over the union of the windows' proposals, for pairs from
different windows (inside a window the network's own per-level NMS stands, as on a whole
image). A proposal touching a window edge that is not an image edge is *cut*: the object may
go on beyond the window. Proposals are ranked interior first, then by logit, so the window
where a box is interior wins over the one that cuts it. ``merge_metric="iou"`` suppresses at
IoU above ``merge_thresh``; ``"ios"`` (intersection over the smaller box) uses it for pairs with
a cut proposal, so a cut box, a fraction of the object it belongs to, is removed by the whole
one (pairs of interior proposals keep IoU). Only proposals reaching into another window can be
suppressed, so the merge costs little next to the network.

Evaluation losses on windows, and the rule for boxes cut by a window, are in
:mod:`lightning_rpn.core.window_targets` (its names are importable from here too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rpn.core.anchors import padded_size
from lightning_rpn.core.config import SettingError
from lightning_rpn.core.boxes import box_area
from lightning_rpn.core.window_targets import Window, WindowTargets, clip_to_window, mean_window_losses, window_key

__all__ = [
    "SlidingWindowConfig",
    "WindowProgressFn",
    "config_from_mapping",
    "window_starts",
    "window_grid",
    "merge_window_proposals",
    "sliding_window_proposals",
    "clip_to_window",
    "window_key",
    "WindowTargets",
    "mean_window_losses",
]

MergeMetric = Literal["iou", "ios"]
ProposeFn = Callable[[Tensor, list[tuple[int, int]], list[Window]], Sequence[tuple[Tensor, ...]]]
"""``propose(images uint8 [B, 3, Hp, Wp] padded, image_sizes, windows)`` -> per window ``(boxes, scores, logits)``.

``windows`` are the batch's ``(x0, y0, x1, y1)`` in the image (what :class:`WindowTargets` cuts by)."""

WindowProgressFn = Callable[[int, int], None]
"""``progress(windows_done, windows_total)`` of one image, after each window batch: a minute-long
image shows its progress (``TextProgress`` prints it) without this module knowing a trainer."""

EDGE_TOLERANCE = 1.0
"""A proposal within this many pixels of an inner window edge is cut by it."""

PAIR_CHUNK = 256
"""Proposals of one window compared at a time with a neighbour's (the merge's memory bound)."""


@dataclass(frozen=True)
class SlidingWindowConfig:
    """How an image is cut into windows and their proposals merged (see the module docstring).

    Args:
        size: window side in pixels (the network sees ``size x size`` or less at the image border).
        overlap: pixels shared by neighbouring windows; at least the largest object's side, so
            every object is whole in some window.
        window_batch: windows per forward pass (bounds memory).
        merge_metric: ``"iou"`` or ``"ios"`` (intersection over the smaller box, for pairs with
            a proposal cut by a window edge).
        merge_thresh: suppression threshold of the merge; ``None``: the model's NMS threshold.
        top_k: proposals kept per image after the merge; ``None``: as many as one window keeps
            (the model's ``post_nms_top_n_test``, which still applies to each window).
    """

    size: int = 1024
    overlap: int = 128
    window_batch: int = 4
    merge_metric: MergeMetric = "iou"
    merge_thresh: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        where = "model.sliding_window"
        for name, low in (("size", 16), ("window_batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingError(f"{where}.{name}={value!r} must be an int >= {low}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap < self.size:
            raise SettingError(f"{where}.overlap={self.overlap!r} must be an int in [0, size={self.size}) (pixels)")
        if self.merge_metric not in ("iou", "ios"):
            raise SettingError(f"{where}.merge_metric={self.merge_metric!r} is not one of 'iou', 'ios'")
        if self.merge_thresh is not None and not 0.0 < float(self.merge_thresh) <= 1.0:
            raise SettingError(f"{where}.merge_thresh={self.merge_thresh!r} must be null or in (0, 1]")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise SettingError(f"{where}.top_k={self.top_k!r} must be null or a positive int")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | SlidingWindowConfig) -> SlidingWindowConfig:
        """A config from the YAML mapping ``model.sliding_window`` (unknown keys named)."""
        return config_from_mapping(cls, options, "model.sliding_window", "{size: 512, overlap: 64}")


Config = TypeVar("Config")


def config_from_mapping(
    cls: type[Config], options: Mapping[str, Any] | Config, where: str, example: str, required: tuple[str, ...] = ()
) -> Config:
    """The dataclass ``cls`` from the YAML mapping at config key ``where``; unknown or missing keys are named."""
    if isinstance(options, cls):
        return options
    if not isinstance(options, Mapping):
        raise SettingError(f"{where} must be a mapping like {example}, got {options!r}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SettingError(f"{where}: unknown key(s) {unknown}; known keys: {known}")
    missing = [name for name in required if name not in options]
    if missing:
        raise SettingError(f"{where} needs {' and '.join(missing)} (got {dict(options)!r})")
    return cls(**dict(options))


def window_starts(length: int, size: int, overlap: int) -> list[int]:
    """Starts of windows of ``size`` covering ``[0, length)`` with stride ``size - overlap``.

    The last window ends at ``length`` (it overlaps its neighbour more when the stride does
    not divide); a length up to ``size`` is one window at 0.
    """
    if length <= size:
        return [0]
    stride = size - overlap
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def window_grid(image_size: tuple[int, int], size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """The ``(x0, y0, x1, y1)`` windows covering an image of ``image_size = (H, W)``, row by row."""
    height, width = image_size
    return [
        (x0, y0, min(x0 + size, width), min(y0 + size, height))
        for y0 in window_starts(height, size, overlap)
        for x0 in window_starts(width, size, overlap)
    ]


def _cut_by_window(boxes: Tensor, window: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Bool ``[P]``: the box touches an edge of ``window`` that is not an edge of the image."""
    height, width = image_size
    x0, y0, x1, y1 = window.tolist()
    tol = EDGE_TOLERANCE
    return (
        ((boxes[:, 0] <= x0 + tol) & (x0 > 0))
        | ((boxes[:, 1] <= y0 + tol) & (y0 > 0))
        | ((boxes[:, 2] >= x1 - tol) & (x1 < width))
        | ((boxes[:, 3] >= y1 - tol) & (y1 < height))
    )


def _pair_metric(a: Tensor, b: Tensor, cut_a: Tensor, cut_b: Tensor, metric: MergeMetric) -> Tensor:
    """``[Pa, Pb]`` overlap of two box sets: IoU, or intersection over the smaller box for pairs with a cut box."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area_a, area_b = box_area(a)[:, None], box_area(b)[None, :]
    iou = inter / (area_a + area_b - inter).clamp(min=1e-9)
    if metric == "iou":
        return iou
    ios = inter / torch.minimum(area_a, area_b).clamp(min=1e-9)
    return torch.where(cut_a[:, None] | cut_b[None, :], ios, iou)


def merge_window_proposals(
    boxes: Sequence[Tensor],
    logits: Sequence[Tensor],
    windows: Sequence[tuple[int, int, int, int]],
    image_size: tuple[int, int],
    thresh: float,
    metric: MergeMetric = "iou",
    top_k: int | None = None,
) -> Tensor:
    """Indices into the concatenated proposals of the survivors of the merge, best logit first.

    ``boxes[s]`` ``[P_s, 4]`` are window ``s``'s proposals in *image* pixels, ``logits[s]``
    ``[P_s]`` their objectness logits, ``windows[s]`` its ``(x0, y0, x1, y1)``. A proposal is
    suppressed by a higher-ranked kept proposal of another window (interior ranks above cut,
    then by logit) whose overlap (``metric``) exceeds ``thresh``; see the module docstring.
    """
    if len(boxes) != len(windows) or len(logits) != len(windows) or not windows:
        raise ValueError(f"merge_window_proposals: {len(boxes)} box sets and {len(logits)} logit sets for "
                         f"{len(windows)} windows; expected one of each per window (at least one window)")
    device = boxes[0].device
    all_boxes, all_logits = torch.cat(list(boxes)), torch.cat(list(logits))
    counts = [int(b.shape[0]) for b in boxes]
    grid = torch.tensor(windows, dtype=torch.float32, device=device).reshape(-1, 4)
    cut = torch.cat([_cut_by_window(b, grid[s], image_size) for s, b in enumerate(boxes)])
    # rank: interior before cut, then by logit (stable, so ties keep window order)
    order = torch.argsort(all_logits, descending=True, stable=True)
    order = order[torch.argsort(cut[order].to(torch.int8), stable=True)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)

    # edges (stronger, weaker) between overlapping proposals of neighbouring windows
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    stronger: list[Tensor] = []
    weaker: list[Tensor] = []
    for s in range(len(windows)):
        for t in range(s + 1, len(windows)):
            (sx0, sy0, sx1, sy1), (tx0, ty0, tx1, ty1) = windows[s], windows[t]
            if min(sx1, tx1) <= max(sx0, tx0) or min(sy1, ty1) <= max(sy0, ty0):
                continue  # windows that do not overlap share no proposal overlap either
            idx_s = torch.arange(starts[s], starts[s + 1], device=device)
            idx_t = torch.arange(starts[t], starts[t + 1], device=device)
            # only proposals reaching into the other window can overlap its proposals
            idx_s = idx_s[_reaches(all_boxes[idx_s], grid[t])]
            idx_t = idx_t[_reaches(all_boxes[idx_t], grid[s])]
            if not len(idx_s) or not len(idx_t):
                continue
            for rows in idx_s.split(PAIR_CHUNK):  # bounds the [rows, P_t] overlap matrices
                value = _pair_metric(all_boxes[rows], all_boxes[idx_t], cut[rows], cut[idx_t], metric)
                i, j = torch.nonzero(value > thresh, as_tuple=True)
                a, b = rows[i], idx_t[j]
                s_first = rank[a] < rank[b]
                stronger.append(torch.where(s_first, a, b))
                weaker.append(torch.where(s_first, b, a))

    keep = torch.ones(all_boxes.shape[0], dtype=torch.bool, device=device)
    if stronger:
        strong, weak = torch.cat(stronger).tolist(), torch.cat(weaker).tolist()
        rank_list = rank.tolist()
        parents: dict[int, list[int]] = {}
        for a, b in zip(strong, weak):
            parents.setdefault(b, []).append(a)
        kept = keep.tolist()
        # greedy NMS in rank order; only proposals with a stronger neighbour can fall
        for b in sorted(parents, key=rank_list.__getitem__):
            kept[b] = not any(kept[a] for a in parents[b])
        keep = torch.tensor(kept, dtype=torch.bool, device=device)
    survivors = torch.nonzero(keep).squeeze(1)
    survivors = survivors[torch.argsort(all_logits[survivors], descending=True, stable=True)]
    return survivors if top_k is None else survivors[:top_k]


def _reaches(boxes: Tensor, window: Tensor) -> Tensor:
    """Bool ``[P]``: the box intersects ``window``."""
    return (boxes[:, 0] < window[2]) & (boxes[:, 2] > window[0]) & (boxes[:, 1] < window[3]) & (boxes[:, 3] > window[1])


def _window_proposals(window: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One window's ``(boxes, scores, logits)`` from ``propose``, or a ``ValueError`` saying what it must return."""
    if len(window) != 3:
        raise ValueError(
            f"sliding_window_proposals: propose returned {len(window)} tensors for a window, expected "
            "(boxes [P, 4], scores [P], logits [P]): an RPN gives them with proposal_logits=True"
        )
    return window[0], window[1], window[2]


@torch.no_grad()
def sliding_window_proposals(
    image: Tensor,
    propose: ProposeFn,
    config: SlidingWindowConfig | Mapping[str, Any],
    top_k: int,
    nms_thresh: float,
    size_divisibility: int = 32,
    progress: WindowProgressFn | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Whole-image ``(boxes [k, 4], scores [k], logits [k])`` from windows of ``image`` (uint8 ``[3, H, W]``).

    ``propose`` is the network (see :data:`ProposeFn`); windows are zero padded to a multiple
    of ``size_divisibility`` as a batch would be. ``config`` is a :class:`SlidingWindowConfig`
    or its mapping (``{"size": 512, "overlap": 96}``, as in the YAML). ``nms_thresh`` is the
    merge threshold when ``config.merge_thresh`` is ``None``. ``progress(done, total)`` is
    called after each window batch (see :data:`WindowProgressFn`).
    """
    config = SlidingWindowConfig.from_mapping(config)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"sliding_window_proposals: expected an image [3, H, W], got shape {tuple(image.shape)}")
    image_size = (int(image.shape[1]), int(image.shape[2]))
    windows = window_grid(image_size, config.size, config.overlap)
    boxes: list[Tensor] = []
    scores: list[Tensor] = []
    logits: list[Tensor] = []
    for start in range(0, len(windows), config.window_batch):
        chunk = windows[start : start + config.window_batch]
        sizes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in chunk]
        pad_h, pad_w = padded_size(sizes, size_divisibility)
        batch = torch.stack([
            F.pad(image[:, y0:y1, x0:x1], (0, pad_w - (x1 - x0), 0, pad_h - (y1 - y0)))
            for x0, y0, x1, y1 in chunk
        ])
        for (x0, y0, _, _), window in zip(chunk, propose(batch, sizes, chunk)):
            window_boxes, window_scores, window_logits = _window_proposals(window)
            boxes.append(window_boxes + window_boxes.new_tensor([x0, y0, x0, y0]))
            scores.append(window_scores)
            logits.append(window_logits)
        if progress is not None:
            progress(start + len(chunk), len(windows))
    thresh = nms_thresh if config.merge_thresh is None else float(config.merge_thresh)
    keep = merge_window_proposals(boxes, logits, windows, image_size, thresh, config.merge_metric, top_k)
    return torch.cat(boxes)[keep], torch.cat(scores)[keep], torch.cat(logits)[keep]
