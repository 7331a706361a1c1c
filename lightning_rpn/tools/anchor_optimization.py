"""A better anchor design for a dataset's boxes, with the same anchor count.

Shapes: ``G`` ground-truth boxes, ``K`` k-means clusters, ``L`` levels.

:func:`optimize_anchors` keeps the number of sizes and aspect ratios of every level (so the
anchor count and the head stay the same), starts from the best of the current design, a k-means
fit (distance ``1 - IoU`` of centre-aligned shapes) and a size/ratio quantile fit, and refines
sizes and ratios (or, with ``search_ratios=False``, sizes only) by a coordinate-wise local
search on the exact coverage of the real boxes (:mod:`lightning_rpn.core.coverage`, the
computation ``check-data`` reports). The fits see the box shapes clipped to their 1st-99th
percentile of size and ratio, so that one extreme box cannot claim an anchor shape of its own;
the values they and the search propose are rounded to significant digits (never to 0), no anchor
of a proposed design rounds to zero width or height, no level of it holds two equal anchors
(unless the current design's does), and the design returned covers no fewer boxes than the
current one at IoU 0.5, 0.7 or the model's ``fg_iou``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.coverage import COVERAGE_THRESHOLDS, GTBoxSet, level_best_iou, per_level_best_iou, row_max

__all__ = ["optimize_anchors"]

SIGNIFICANT_DIGITS = 3
"""Digits the sizes and ratios of a design keep: a positive value never rounds to 0, and the
rounding (at most 0.5%) stays below the search's finest step (1/16 octave, 4.4%)."""

FIT_PERCENTILES = (0.01, 0.99)
"""The range of box size and ratio quantiles the k-means and quantile fits see (clipped to it)."""


def _shape_iou(wh: Tensor, centres: Tensor) -> Tensor:
    """``[G, K]`` IoU of centre-aligned shapes ``wh [G, 2]`` and ``centres [K, 2]``."""
    inter = torch.minimum(wh[:, None, 0], centres[None, :, 0]) * torch.minimum(wh[:, None, 1], centres[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (centres[:, 0] * centres[:, 1])[None] - inter
    return inter / union


def _kmeans_shapes(wh: Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> Tensor:
    """k-means of box shapes with distance ``1 - IoU`` (centre-aligned); ``[k, 2]`` centres.

    Seeded k-means++ initialisation; centres are the per-cluster medians (robust to outliers).
    """
    wh = wh.double()
    first = int(torch.randint(wh.shape[0], (1,), generator=generator))
    centres = [wh[first]]
    for _ in range(1, k):
        nearest, _ = row_max(_shape_iou(wh, torch.stack(centres)))
        distance = (1 - nearest).clamp(min=0) ** 2
        if float(distance.sum()) == 0.0:
            centres.append(wh[int(torch.randint(wh.shape[0], (1,), generator=generator))])
        else:
            centres.append(wh[int(torch.multinomial(distance, 1, generator=generator))])
    current = torch.stack(centres)
    for _ in range(iterations):
        _, assign = row_max(_shape_iou(wh, current))
        updated = current.clone()
        for cluster in range(k):
            members = wh[assign == cluster]
            if len(members):
                updated[cluster] = members.median(dim=0).values
        if torch.equal(updated, current):
            break
        current = updated
    return current


def _fit_shapes(wh: Tensor) -> Tensor:
    """``[G', 2]`` float64 shapes the fits see: boxes of positive, finite width and height, their
    log size and log ratio clipped to :data:`FIT_PERCENTILES` of the data, so that an outlier (a
    2500 x 1 px line among 50 px boxes) joins the nearest shapes rather than seeding a cluster
    (and an anchor) of its own."""
    wh = wh.double()
    wh = wh[torch.isfinite(wh).all(dim=1) & (wh > 0).all(dim=1)]
    if wh.shape[0] == 0:
        return wh
    log_size = 0.5 * torch.log(wh[:, 0] * wh[:, 1])
    log_ratio = torch.log(wh[:, 1] / wh[:, 0])
    q = torch.tensor(FIT_PERCENTILES, dtype=torch.float64)
    size_range, ratio_range = torch.quantile(log_size, q), torch.quantile(log_ratio, q)
    log_size = log_size.clamp(float(size_range[0]), float(size_range[1]))
    log_ratio = log_ratio.clamp(float(ratio_range[0]), float(ratio_range[1]))
    return torch.stack([torch.exp(log_size - 0.5 * log_ratio), torch.exp(log_size + 0.5 * log_ratio)], dim=1)


def _significant(value: float) -> float:
    """``value`` rounded to :data:`SIGNIFICANT_DIGITS` significant digits (positive stays positive)."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


def _round_design(sizes: Sequence, ratios: Sequence) -> tuple[list[list[float]], list[list[float]]]:
    """A fitted design's sizes and ratios to :data:`SIGNIFICANT_DIGITS` digits: short in the config
    snippet, and never 0 (a 1 / 3990 ratio rounded to 3 decimals was 0.0, which no generator accepts)."""
    return (
        [[_significant(s) for s in level] for level in sizes],
        [[_significant(r) for r in level] for level in ratios],
    )


def _distinct(cells: Tensor) -> int:
    """The number of different anchors among a level's ``cells [A, 4]`` (rounded to whole pixels)."""
    return int(torch.unique(cells, dim=0).shape[0])


def _wasteful(cells: Tensor, distinct: int) -> bool:
    """Whether a level's ``cells [A, 4]`` waste an anchor: one of zero width or height (the
    generator rounds them to whole pixels; it covers nothing), or fewer than ``distinct``
    different anchors (an anchor equal to another only adds cost: a few boxes made the fits
    repeat one shape, ratios ``[0.667, 0.667, 0.667]``). The search never proposes either."""
    return bool((cells[:, 2:] <= cells[:, :2]).any()) or _distinct(cells) < distinct


def _kmeans_design(
    wh: Tensor, reference: AnchorGenerator, generator: torch.Generator
) -> tuple[list[list[float]], list[list[float]]]:
    """Sizes and ratios per level with the reference's counts, fitted by shape k-means.

    ``sum_l S_l * R_l`` clusters are sorted by area and handed out to the levels finest first;
    a level's cluster shapes, sorted by ratio, give its ratios (geometric means of ``S_l``
    consecutive shapes) and, sorted by area, its sizes (geometric means of ``R_l`` shapes).
    """
    counts = [(len(s), len(r)) for s, r in zip(reference.sizes, reference.aspect_ratios)]
    total = sum(s * r for s, r in counts)
    k = min(total, wh.shape[0])
    centres = _kmeans_shapes(wh, k, generator)
    if k < total:  # fewer boxes than anchor shapes: repeat the biggest ones
        centres = torch.cat([centres, centres[-1:].expand(total - k, 2)])
    areas = centres[:, 0] * centres[:, 1]
    centres = centres[areas.argsort()]
    sizes, ratios = [], []
    start = 0
    for num_sizes, num_ratios in counts:
        chunk = centres[start : start + num_sizes * num_ratios]
        start += num_sizes * num_ratios
        log_size = 0.5 * torch.log(chunk[:, 0] * chunk[:, 1])
        log_ratio = torch.log(chunk[:, 1] / chunk[:, 0])
        sizes.append(torch.exp(log_size.sort().values.view(num_sizes, num_ratios).mean(1)).tolist())
        ratios.append(torch.exp(log_ratio.sort().values.view(num_ratios, num_sizes).mean(1)).tolist())
    return sizes, ratios


def _quantile_design(wh: Tensor, reference: AnchorGenerator) -> tuple[list[list[float]], list[list[float]]]:
    """Sizes at evenly spaced quantiles of sqrt(area) (finest level first) and, on every level,
    ratios at evenly spaced quantiles of h / w; the reference's counts."""
    log_size = 0.5 * torch.log(wh[:, 0].double() * wh[:, 1].double())
    log_ratio = torch.log(wh[:, 1].double() / wh[:, 0].double())
    counts = [(len(s), len(r)) for s, r in zip(reference.sizes, reference.aspect_ratios)]
    total = sum(s for s, _ in counts)
    size_q = torch.quantile(log_size, (torch.arange(total, dtype=torch.float64) + 0.5) / total).exp().tolist()
    sizes, ratios, start = [], [], 0
    for num_sizes, num_ratios in counts:
        sizes.append(size_q[start : start + num_sizes])
        start += num_sizes
        q = (torch.arange(num_ratios, dtype=torch.float64) + 0.5) / num_ratios
        ratios.append(torch.quantile(log_ratio, q).exp().tolist())
    return sizes, ratios


def _covered(best: Tensor, thresholds: Sequence[float]) -> list[int]:
    """Boxes whose best anchor IoU ``best [G]`` reaches each of ``thresholds``."""
    return [int((best >= t).sum()) for t in thresholds]


def _objective(per_level: Tensor, floor: dict[float, int]) -> float:
    """Coverage at IoU 0.5 plus coverage at 0.7, plus a tenth of the mean best IoU (which makes the
    search surface smoother); ``-inf`` where fewer boxes reach an IoU of ``floor`` than it says
    (the current design's counts; empty: no floor)."""
    best, _ = row_max(per_level)
    if any(c < f for c, f in zip(_covered(best, list(floor)), floor.values())):
        return float("-inf")
    return float(sum(_covered(best, COVERAGE_THRESHOLDS)) / best.shape[0] + 0.1 * best.mean())


def optimize_anchors(
    boxes: GTBoxSet,
    anchor_generator: AnchorGenerator,
    max_boxes: int = 20000,
    seed: int = 0,
    max_passes: int = 4,
    fg_iou: float | None = None,
    search_ratios: bool = True,
) -> AnchorGenerator:
    """Sizes and ratios per level that maximise the anchors' coverage of ``boxes``.

    Keeps the strides, offset, anchor stride and the number of sizes and ratios of each level
    (same anchor count, same head). Starts from the best of the current design, a shape k-means
    fit (``1 - IoU`` distance) and a quantile fit (both of the shapes clipped to their 1st-99th
    percentile of size and ratio), then a coordinate-wise local search multiplies one size or
    ratio at a time by ``2^(+-step)`` (steps 1/2 down to 1/16 octave) and keeps any change that
    raises the objective: coverage at IoU 0.5 + coverage at 0.7 + 0.1 x mean best IoU, evaluated
    exactly on (at most ``max_boxes``, a seeded sample of) the real boxes. The values the fits and
    the search propose are rounded to :data:`SIGNIFICANT_DIGITS` significant digits, and a design
    with a zero-width or zero-height anchor, or with fewer different anchors on a level than the
    current design has there (two equal anchors), is never proposed.

    The search runs twice, free and floored (no step below the current design's coverage at IoU
    0.5, 0.7 or ``fg_iou``, the model's positive threshold where given); the better result of the
    two that covers at least as many of the boxes searched as the current design at each of these
    IoUs is returned, so none of these coverages drops. Deterministic for a seed.

    ``search_ratios=False`` searches the sizes only: every design (the fits' included) keeps the
    current design's ratios, as a head that takes one square anchor per location needs
    (``model.head: cascade``).
    """
    if len(boxes) == 0:
        raise ValueError("optimize_anchors: no ground-truth boxes to fit the anchors to")
    if fg_iou is not None and not 0.0 <= fg_iou <= 1.0:
        raise ValueError(f"optimize_anchors: fg_iou must be in [0, 1], got {fg_iou!r}")
    generator = torch.Generator().manual_seed(seed)
    if len(boxes) > max_boxes:
        boxes = boxes.subset(torch.randperm(len(boxes), generator=generator)[:max_boxes])
    shapes = _fit_shapes(boxes.wh)
    if shapes.shape[0] == 0:
        raise ValueError("optimize_anchors: no ground-truth box has a positive, finite width and height")

    def build(sizes: Sequence, ratios: Sequence) -> AnchorGenerator:
        return AnchorGenerator(
            tuple(tuple(level) for level in sizes),
            tuple(tuple(level) for level in ratios),
            anchor_generator.strides,
            offset=anchor_generator.offset,
            anchor_stride=anchor_generator.anchor_stride,
        )

    current_iou, _ = per_level_best_iou(boxes, anchor_generator)
    kept = sorted(set(COVERAGE_THRESHOLDS) if fg_iou is None else {*COVERAGE_THRESHOLDS, float(fg_iou)})
    floor = dict(zip(kept, _covered(row_max(current_iou)[0], kept)))
    starts = [([list(s) for s in anchor_generator.sizes], [list(r) for r in anchor_generator.aspect_ratios],
               current_iou)]
    distinct = [_distinct(cells) for cells in anchor_generator.cell_anchors]
    for sizes, ratios in (
        _round_design(*_kmeans_design(shapes, anchor_generator, generator)),
        _round_design(*_quantile_design(shapes, anchor_generator)),
    ):
        ratios = ratios if search_ratios else [list(r) for r in anchor_generator.aspect_ratios]
        candidate = build(sizes, ratios)
        if not any(_wasteful(cells, d) for cells, d in zip(candidate.cell_anchors, distinct)):
            starts.append((sizes, ratios, per_level_best_iou(boxes, candidate)[0]))
    # The free search often ends above the floor by a path that dips below it; where it ends below,
    # the floored one (which can always keep the current design) gives the answer.
    results = [_local_search(boxes, build, starts, bound, max_passes, search_ratios) for bound in ({}, floor)]
    sizes, ratios, _ = max(results, key=lambda result: _objective(result[2], floor))
    return build(sizes, ratios)


def _local_search(
    boxes: GTBoxSet,
    build: Callable[[Sequence, Sequence], AnchorGenerator],
    starts: list[tuple[list[list[float]], list[list[float]], Tensor]],
    floor: dict[float, int],
    max_passes: int,
    search_ratios: bool = True,
) -> tuple[list[list[float]], list[list[float]], Tensor]:
    """From the best of ``starts`` (sizes, ratios, ``[G, L]`` best IoU per level) under ``floor``,
    multiply one size or ratio (only sizes without ``search_ratios``) at a time by ``2^(+-step)``
    (steps 1/2 down to 1/16 octave) while that raises :func:`_objective` and wastes no anchor
    (:func:`_wasteful`: no step makes two anchors of a level equal); the design reached and its
    ``[G, L]`` best IoU per level."""
    best_score, sizes, ratios, per_level = max(
        ((_objective(per_level, floor), sizes, ratios, per_level) for sizes, ratios, per_level in starts),
        key=lambda item: item[0],
    )
    sizes = [list(s) for s in sizes]
    ratios = [list(r) for r in ratios]
    distinct = [_distinct(cells) for cells in build(sizes, ratios).cell_anchors]
    for step in (0.5, 0.25, 0.125, 0.0625):
        factor = 2.0**step
        for _ in range(max_passes):
            improved = False
            for level in range(len(sizes)):
                for values in (sizes[level], ratios[level]) if search_ratios else (sizes[level],):
                    for index in range(len(values)):
                        for scale in (factor, 1.0 / factor):
                            old = values[index]
                            values[index] = _significant(old * scale)
                            candidate = build(sizes, ratios)
                            score = float("-inf")
                            if not _wasteful(candidate.cell_anchors[level], distinct[level]):
                                level_iou, _ = level_best_iou(boxes, candidate, level)
                                trial = per_level.clone()
                                trial[:, level] = level_iou
                                score = _objective(trial, floor)
                            if score > best_score + 1e-12:
                                best_score, per_level, improved = score, trial, True
                                distinct[level] = _distinct(candidate.cell_anchors[level])
                                break
                            values[index] = old
            if not improved:
                break
    return sizes, ratios, per_level
