"""Label anchors positive / negative / ignored by their IoU with the ground-truth boxes.

Shapes: ``B`` images, ``N`` anchors of an image (any ``[N, 4]`` tensor), ``G`` gt boxes of an
image, ``G_all`` the gt boxes of all images concatenated, ``K`` low-quality candidate pairs,
``C`` crowd boxes of an image.

**The rule** (:func:`decide_labels`, the only place a label is decided) reads per-anchor and
per-gt statistics (:class:`MatchStats`). The decisions are those of torchvision's
``Matcher(fg_iou, bg_iou, allow_low_quality_matches)`` followed by the RPN's label mapping:

* an anchor whose best IoU is ``>= fg_iou`` is positive (1), ``< bg_iou`` negative (0), and in
  between ignored (-1);
* with ``allow_low_quality``, every anchor that reaches the best IoU of some gt box (ties
  included) is positive as well;
* ``matched`` is the anchor's best gt box (the lowest index among equal maxima, like
  ``torch.max``) for positives and 0 elsewhere (torchvision's ``clamp(min=0)``);
* an image without gt boxes has only negatives, whatever the thresholds.

Deliberate deviation: a gt box that overlaps no anchor at all (best IoU 0) makes no
low-quality match. torchvision marks *every* anchor with IoU 0 to it positive (and matches
them to an unrelated box), which floods the loss with meaningless positives.

Border filter (off by default): with ``allowed_border`` set, anchors reaching more than that
many pixels outside the image are left out of matching altogether, as in the original Faster
R-CNN (they never become a gt's best anchor), and labelled -1. Crowd regions (``crowd_ioa``):
anchors that are not positive and whose area is covered at least that much by one crowd box
are ignored (-1) instead of negative.

**Backends** compute the statistics only, with the IoU arithmetic of
:func:`~lightning_rpn.core.boxes.iou_from_overlap`, so all give the same labels bit for bit;
``backend`` chooses one:

* ``"compiled"`` (CPU): :mod:`~lightning_rpn.core.match_kernel`, a spatial index over the anchors
  (built once per anchor tensor and cached) through which each gt box visits only the anchors
  that overlap it; time and memory grow with the overlapping pairs, not with ``G x N``;
* ``"torch"`` (any device): ``box_iou`` over chunks of anchors, memory bounded by
  ``_IOU_BUDGET`` IoU entries at once;
* ``"auto"``: ``"compiled"`` for CPU anchors, ``"torch"`` elsewhere.

:func:`match_anchors` is :func:`match_anchors_batched` for a batch of one.

About 400 lines for one reason: the label rule, the checks of its inputs and the choice of the
backend that computes its statistics are one idea, kept together so that every backend reads
the same rule (the compiled backend's kernel is :mod:`~lightning_rpn.core.match_kernel`).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .anchors import AnchorGrid
from .boxes import box_ioa, box_iou
from .config import AnchorTargetConfig
from .match_kernel import match_stats_cpu

__all__ = [
    "Backend",
    "MatchStats",
    "anchors_inside_image",
    "check_gt_box_batch",
    "crowd_coverage",
    "decide_labels",
    "match_anchors",
    "match_anchors_batched",
    "match_stats",
    "resolve_backend",
]

Backend = Literal["auto", "compiled", "torch"]
_BACKENDS = ("auto", "compiled", "torch")
_IOU_BUDGET = 1 << 21  # IoU entries the torch backend holds at once (8 MB in float32)


class MatchStats(NamedTuple):
    """What every backend computes and :func:`decide_labels` reads.

    Per-anchor statistics are sparse: they cover the anchors listed in ``anchor``, which
    include at least every anchor whose best IoU is above 0 and reaches ``bg_iou``, and every
    low-quality candidate; every other anchor counts as best IoU 0 (it overlaps no gt box, too
    little to change its label, or the border filter left it out), whose label is the same.

    Attributes:
        anchor: int64 ``[V]``, flat anchor index ``b * N + n`` (no repeats) of the anchors
            with statistics (the ``"torch"`` backend lists all ``B * N``).
        best_iou: float32 ``[V]``, their best IoU over their image's gt boxes (below 0 for
            anchors left out by the border filter).
        best_gt: int ``[V]``, the lowest gt index (within the image) reaching ``best_iou``.
        gt_best_iou: float32 ``[G_all]``, each gt box's best IoU over the anchors.
        pair_anchor: int64 ``[K]``, the position in ``anchor`` of the low-quality
            candidates: a superset of the (anchor, gt) pairs whose IoU is the gt's best and
            above 0 (pairs at IoU 0 are left out, as the rule never uses them).
        pair_gt: int64 ``[K]``, the candidates' gt index into ``G_all``.
        pair_iou: float32 ``[K]``, the candidates' IoU.
        num_anchors: ``N``, the anchors of an image.
    """

    anchor: Tensor
    best_iou: Tensor
    best_gt: Tensor
    gt_best_iou: Tensor
    pair_anchor: Tensor
    pair_gt: Tensor
    pair_iou: Tensor
    num_anchors: int


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


def decide_labels(
    stats: MatchStats,
    num_gt: Sequence[int],
    fg_iou: float,
    bg_iou: float,
    allow_low_quality: bool,
    *,
    inside: Tensor | None = None,
    crowd_ioa: Tensor | None = None,
    crowd_threshold: float | None = None,
    compact: bool = False,
) -> tuple[Tensor, Tensor]:
    """The label rule: ``(labels [B, N] in {1, 0, -1}, matched [B, N])`` from the statistics.

    ``num_gt``: gt boxes per image; ``inside``: the border filter's bool ``[B, N]``;
    ``crowd_ioa``: float32 ``[B, N]`` coverage by crowd boxes (``crowd_coverage``), compared
    with ``crowd_threshold``. ``compact``: labels int8 and matched int32, else both int64.
    """
    dtype = torch.int8 if compact else torch.int64
    device = stats.best_iou.device
    listed = _threshold_labels(stats.best_iou, fg_iou, bg_iou, dtype)
    if allow_low_quality and stats.pair_anchor.numel():
        reached = stats.gt_best_iou[stats.pair_gt]
        # ties included; a box overlapping no anchor (best IoU 0) makes no low-quality match
        listed[stats.pair_anchor[(stats.pair_iou == reached) & (reached > 0)]] = 1
    labels = torch.full((len(num_gt), stats.num_anchors), _unlisted_label(fg_iou, bg_iou), dtype=dtype, device=device)
    labels.view(-1)[stats.anchor] = listed
    for row, count in enumerate(num_gt):
        if count == 0:
            labels[row] = 0
    if crowd_ioa is not None and crowd_threshold is not None:
        labels.masked_fill_((crowd_ioa >= crowd_threshold) & (labels != 1), -1)
    if inside is not None:
        labels.masked_fill_(~inside, -1)
    matched = torch.zeros(labels.shape, dtype=torch.int32 if compact else torch.int64, device=device)
    # every positive is listed
    matched.view(-1)[stats.anchor] = torch.where(labels.view(-1)[stats.anchor] == 1, stats.best_gt, 0).to(matched.dtype)
    return labels, matched


@functools.lru_cache(maxsize=64)
def _unlisted_label(fg_iou: float, bg_iou: float) -> int:
    """The label of an anchor without statistics: the thresholds applied to best IoU 0."""
    return int(_threshold_labels(torch.zeros(1, dtype=torch.float32), fg_iou, bg_iou, torch.int64))


def _threshold_labels(best_iou: Tensor, fg_iou: float, bg_iou: float, dtype: torch.dtype) -> Tensor:
    """The thresholds of the rule: 1 at ``best_iou >= fg_iou``, -1 at ``>= bg_iou``, else 0."""
    labels = torch.zeros(best_iou.shape, dtype=dtype, device=best_iou.device)
    labels.masked_fill_(best_iou >= bg_iou, -1)
    return labels.masked_fill_(best_iou >= fg_iou, 1)


def resolve_backend(backend: Backend, device: torch.device, where: str) -> Literal["compiled", "torch"]:
    """The backend that runs for ``backend`` on ``device``; ``ValueError`` naming ``where`` if none can."""
    if backend not in _BACKENDS:
        raise ValueError(f"{where}: backend must be one of {_BACKENDS}, got {backend!r}")
    on_cpu = device.type == "cpu"
    if backend == "compiled" and not on_cpu:
        raise ValueError(f"{where}: backend='compiled' runs on the CPU, but the tensors are on {device}")
    return "compiled" if backend == "compiled" or (backend == "auto" and on_cpu) else "torch"


def match_stats(
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    inside: Tensor | None,
    bg_iou: float,
    allow_low_quality: bool,
    backend: Backend,
    where: str = "match_stats",
) -> MatchStats:
    """:class:`MatchStats` of float32 ``anchors [N, 4]`` with float32 ``[G_i, 4]`` gt boxes
    (on the anchors' device), computed by ``backend``; ``ValueError`` naming ``where`` for
    non-finite anchors. A backend may skip pairs below ``bg_iou`` that cannot change a label
    and leave out the anchors they concern (see :class:`MatchStats`)."""
    if resolve_backend(backend, anchors.device, where) == "compiled":
        stats = match_stats_cpu(anchors, gt_boxes, inside, bg_iou, allow_low_quality, where)
        return MatchStats(*stats, anchors.shape[0])
    if not bool(torch.isfinite(anchors).all()):
        raise ValueError(f"{where}: anchors must be finite, got a non-finite coordinate")
    return _torch_stats(anchors, gt_boxes, inside)


def _torch_stats(anchors: Tensor, gt_boxes: Sequence[Tensor], inside: Tensor | None) -> MatchStats:
    """The ``"torch"`` backend: ``box_iou`` over chunks of anchors, image by image."""
    device, num_anchors = anchors.device, anchors.shape[0]
    best_iou = torch.zeros(len(gt_boxes), num_anchors, dtype=torch.float32, device=device)
    best_gt = torch.zeros(len(gt_boxes), num_anchors, dtype=torch.int64, device=device)
    gt_best, pair_anchor, pair_gt, pair_iou = [], [], [], []
    first_gt = 0
    for image, gt in enumerate(gt_boxes):
        image_best = torch.full((gt.shape[0],), -1.0, dtype=torch.float32, device=device)
        chunk = max(1, _IOU_BUDGET // max(gt.shape[0], 1))
        for begin in range(0, num_anchors if gt.shape[0] else 0, chunk):
            iou = box_iou(gt, anchors[begin : begin + chunk])  # [G, chunk]
            if inside is not None:
                iou.masked_fill_(~inside[image, begin : begin + chunk], -1.0)
            best_iou[image, begin : begin + chunk], best_gt[image, begin : begin + chunk] = iou.max(dim=0)
            chunk_best = iou.amax(dim=1)
            torch.maximum(image_best, chunk_best, out=image_best)
            # a superset of the pairs at their gt's best: those at the chunk's best, above 0
            gt_index, anchor_index = torch.nonzero((iou == chunk_best[:, None]) & (chunk_best[:, None] > 0)).unbind(1)
            pair_anchor.append(image * num_anchors + begin + anchor_index)  # flat: its position in the arange
            pair_gt.append(first_gt + gt_index)
            pair_iou.append(chunk_best[gt_index])
        gt_best.append(image_best)
        first_gt += gt.shape[0]
    no_pairs = torch.zeros(0, dtype=torch.int64, device=device)
    no_ious = torch.zeros(0, dtype=torch.float32, device=device)
    return MatchStats(
        torch.arange(best_iou.numel(), device=device),
        best_iou.view(-1),
        best_gt.view(-1),
        torch.cat(gt_best) if gt_best else no_ious,
        torch.cat([no_pairs, *pair_anchor]),
        torch.cat([no_pairs, *pair_gt]),
        torch.cat([no_ious, *pair_iou]),
        num_anchors,
    )


def crowd_coverage(anchors: Tensor, crowd_boxes: Sequence[Tensor | None]) -> Tensor | None:
    """Float32 ``[B, N]``: the largest share of each anchor's area inside one crowd box of its image.

    ``None`` when no image has a crowd box. Chunked over anchors to bound memory.
    """
    if not any(crowd is not None and crowd.numel() for crowd in crowd_boxes):
        return None
    coverage = torch.zeros(len(crowd_boxes), anchors.shape[0], dtype=torch.float32, device=anchors.device)
    for image, crowd in enumerate(crowd_boxes):
        if crowd is None or not crowd.numel():
            continue
        regions = crowd.to(device=anchors.device, dtype=torch.float32).reshape(-1, 4)
        chunk = max(1, _IOU_BUDGET // regions.shape[0])
        for begin in range(0, anchors.shape[0], chunk):
            coverage[image, begin : begin + chunk] = box_ioa(anchors[begin : begin + chunk], regions).amax(dim=1)
    return coverage


def match_anchors_batched(
    anchors: Tensor | AnchorGrid,
    gt_boxes: Sequence[Tensor],
    fg_iou: float = AnchorTargetConfig.fg_iou,
    bg_iou: float = AnchorTargetConfig.bg_iou,
    allow_low_quality: bool = AnchorTargetConfig.allow_low_quality,
    *,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    allowed_border: float | None = None,
    crowd_boxes: Sequence[Tensor | None] | None = None,
    crowd_ioa: float | None = None,
    compact: bool = False,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """``(labels [B, N] in {1, 0, -1}, matched [B, N])`` int64 for a batch of images sharing anchors.

    ``anchors``: any ``[N, 4]`` tensor (an ``AnchorGrid`` stands for its ``.anchors``);
    ``gt_boxes``: one ``[G_i, 4]`` tensor per image (``G_i`` may be 0). ``allowed_border``
    needs ``image_sizes`` (``(h, w)`` per image); ``crowd_ioa`` with ``crowd_boxes`` (one
    ``[C_i, 4]`` or None per image) ignores covered anchors. ``compact``: labels int8 and
    matched int32. ``backend``: see the module docstring.
    """
    return _match(
        anchors, gt_boxes, fg_iou, bg_iou, allow_low_quality, image_sizes, allowed_border, crowd_boxes,
        crowd_ioa, compact, backend, "match_anchors_batched", lambda index: f"match_anchors_batched(gt_boxes[{index}])",
    )


def match_anchors(
    anchors: Tensor | AnchorGrid,
    gt_boxes: Tensor,
    fg_iou: float = AnchorTargetConfig.fg_iou,
    bg_iou: float = AnchorTargetConfig.bg_iou,
    allow_low_quality: bool = AnchorTargetConfig.allow_low_quality,
    *,
    image_size: tuple[int, int] | None = None,
    allowed_border: float | None = None,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Return ``(labels int64 [N] in {1, 0, -1}, matched int64 [N])`` for one image.

    ``anchors`` is any ``[N, 4]`` tensor (or an ``AnchorGrid``). ``G == 0`` gives all
    negatives with ``matched`` all 0. ``allowed_border`` needs ``image_size`` ``(h, w)``.
    """
    if not isinstance(gt_boxes, Tensor) or gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"match_anchors: gt_boxes must be [G, 4], got {_describe(gt_boxes)}")
    if allowed_border is not None and image_size is None:
        raise ValueError("match_anchors: allowed_border needs image_size=(h, w)")
    labels, matched = _match(
        anchors, [gt_boxes], fg_iou, bg_iou, allow_low_quality, None if image_size is None else [image_size],
        allowed_border, None, None, False, backend, "match_anchors", lambda _: "match_anchors(gt_boxes)",
    )
    return labels[0], matched[0]


def _match(
    anchors: Tensor | AnchorGrid,
    gt_boxes: Sequence[Tensor],
    fg_iou: float,
    bg_iou: float,
    allow_low_quality: bool,
    image_sizes: Sequence[tuple[int, int]] | None,
    allowed_border: float | None,
    crowd_boxes: Sequence[Tensor | None] | None,
    crowd_ioa: float | None,
    compact: bool,
    backend: Backend,
    name: str,
    where: Callable[[int], str],
) -> tuple[Tensor, Tensor]:
    """Shared body of the entry points: check the input, compute the statistics, apply the rule."""
    if not 0.0 <= bg_iou <= fg_iou <= 1.0:
        raise ValueError(f"{name}: need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
    if allowed_border is not None and (image_sizes is None or len(image_sizes) != len(gt_boxes)):
        raise ValueError(f"{name}: allowed_border needs image_sizes, one (h, w) per image")
    if crowd_boxes is not None and len(crowd_boxes) != len(gt_boxes):
        raise ValueError(f"{name}: {len(crowd_boxes)} crowd_boxes for {len(gt_boxes)} images")
    anchor_boxes = anchors.anchors if isinstance(anchors, AnchorGrid) else anchors
    if not isinstance(anchor_boxes, Tensor) or anchor_boxes.dim() != 2 or anchor_boxes.shape[1] != 4:
        raise ValueError(f"{name}: anchors must be [N, 4] or an AnchorGrid, got {_describe(anchor_boxes)}")
    anchor_boxes = anchor_boxes.float()  # itself when float32: the compiled index is cached per tensor
    resolve_backend(backend, anchor_boxes.device, name)
    device = anchor_boxes.device
    boxes = []
    for index, gt in enumerate(gt_boxes):
        if not isinstance(gt, Tensor) or gt.dim() != 2 or gt.shape[1] != 4:
            raise ValueError(f"{name}: gt_boxes[{index}] must be [G, 4], got {_describe(gt)}")
        boxes.append(gt.detach().to(device=device, dtype=torch.float32))
    check_gt_box_batch(boxes, where)
    with torch.no_grad():
        inside = None
        if allowed_border is not None:
            assert image_sizes is not None
            inside = torch.stack([anchors_inside_image(anchor_boxes, size, allowed_border) for size in image_sizes])
        stats = match_stats(anchor_boxes, boxes, inside, bg_iou, allow_low_quality, backend, name)
        coverage = None if crowd_ioa is None or crowd_boxes is None else crowd_coverage(anchor_boxes, crowd_boxes)
        return decide_labels(
            stats, [gt.shape[0] for gt in boxes], fg_iou, bg_iou, allow_low_quality,
            inside=inside, crowd_ioa=coverage, crowd_threshold=crowd_ioa, compact=compact,
        )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
