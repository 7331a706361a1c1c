"""A better anchor design for a dataset's boxes, with the same anchor count.

Shapes: ``G`` ground-truth boxes, ``K`` k-means clusters, ``L`` levels.

:func:`optimize_anchors` keeps the number of sizes and aspect ratios of every level (so the
anchor count and the head stay the same), starts from the better of the current design, a
k-means fit (distance ``1 - IoU`` of centre-aligned shapes) and a size/ratio quantile fit, and
refines sizes and ratios by a coordinate-wise local search on the exact coverage of the real
boxes (:mod:`lightning_rpn.core.coverage`, the computation ``check-data`` reports).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.coverage import GTBoxSet, level_best_iou, per_level_best_iou, row_max

__all__ = ["optimize_anchors"]


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


def _round_design(sizes: list[list[float]], ratios: list[list[float]]) -> tuple[tuple[tuple[float, ...], ...], ...]:
    return (
        tuple(tuple(round(float(s), 1) for s in level) for level in sizes),
        tuple(tuple(round(float(r), 3) for r in level) for level in ratios),
    )


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


def _objective(per_level: Tensor) -> float:
    """Coverage at IoU 0.7 plus coverage at 0.5 (neither is traded away for the other), plus a
    tenth of the mean best IoU, which makes the search surface smoother."""
    best, _ = row_max(per_level)
    return float((best >= 0.7).float().mean() + (best >= 0.5).float().mean() + 0.1 * best.mean())


def optimize_anchors(
    boxes: GTBoxSet,
    anchor_generator: AnchorGenerator,
    max_boxes: int = 20000,
    seed: int = 0,
    max_passes: int = 4,
) -> AnchorGenerator:
    """Sizes and ratios per level that maximise the anchors' coverage of ``boxes``.

    Keeps the strides, offset, anchor stride and the number of sizes and ratios of each level
    (same anchor count, same head). Starts from the better of the current design and a shape
    k-means fit (``1 - IoU`` distance) and a quantile fit, then a coordinate-wise local search multiplies one size
    or ratio at a time by ``2^(+-step)`` (steps 1/2 down to 1/16 octave) and keeps any change
    that raises the objective: coverage at IoU 0.7 + coverage at 0.5 + 0.1 x mean best IoU,
    evaluated exactly on (at most ``max_boxes``, a seeded sample of) the real boxes. The result
    never scores below the current design on the boxes searched. Deterministic for a seed.
    """
    if len(boxes) == 0:
        raise ValueError("optimize_anchors: no ground-truth boxes to fit the anchors to")
    generator = torch.Generator().manual_seed(seed)
    if len(boxes) > max_boxes:
        boxes = boxes.subset(torch.randperm(len(boxes), generator=generator)[:max_boxes])

    def build(sizes: Sequence, ratios: Sequence) -> AnchorGenerator:
        rounded_sizes, rounded_ratios = _round_design(list(sizes), list(ratios))
        return AnchorGenerator(
            rounded_sizes,
            rounded_ratios,
            anchor_generator.strides,
            offset=anchor_generator.offset,
            anchor_stride=anchor_generator.anchor_stride,
        )

    start_sizes = [list(s) for s in anchor_generator.sizes]
    start_ratios = [list(r) for r in anchor_generator.aspect_ratios]
    candidates = [
        (start_sizes, start_ratios),
        _kmeans_design(boxes.wh, anchor_generator, generator),
        _quantile_design(boxes.wh, anchor_generator),
    ]
    scored = []
    for sizes, ratios in candidates:
        per_level, _ = per_level_best_iou(boxes, build(sizes, ratios))
        scored.append((_objective(per_level), sizes, ratios, per_level))
    best_score, sizes, ratios, per_level = max(scored, key=lambda item: item[0])
    sizes = [list(s) for s in sizes]
    ratios = [list(r) for r in ratios]

    for step in (0.5, 0.25, 0.125, 0.0625):
        factor = 2.0**step
        for _ in range(max_passes):
            improved = False
            for level in range(anchor_generator.num_levels):
                for values in (sizes[level], ratios[level]):
                    for index in range(len(values)):
                        for scale in (factor, 1.0 / factor):
                            old = values[index]
                            values[index] = old * scale
                            candidate = build(sizes, ratios)
                            level_iou, _ = level_best_iou(boxes, candidate, level)
                            trial = per_level.clone()
                            trial[:, level] = level_iou
                            score = _objective(trial)
                            if score > best_score + 1e-12:
                                best_score, per_level, improved = score, trial, True
                                break
                            values[index] = old
            if not improved:
                break
    return build(sizes, ratios)
