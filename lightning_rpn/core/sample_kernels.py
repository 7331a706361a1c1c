"""The compiled sampling kernels: random subsets from few draws, and sampling a batch's labels.

Shapes: ``B`` images, ``N`` anchors of an image, ``k`` of ``n`` indices drawn.

``random_subset`` draws ``k`` of ``n`` indices with Floyd's algorithm driven by ``k`` uniforms
from the image's generator: a uniformly random subset from ``O(k)`` random draws where
``torch.randperm`` makes ``n``. Every sampling path draws an image's uniforms in one call, the
positives' first, then the negatives' (on a CPU generator the same numbers as two calls), so
they agree; ``sample_cpu`` counts the candidates and marks the chosen ones in one scan each,
instead of materialising the index lists. They serve the ``"compiled"`` backend of
:func:`~lightning_rpn.core.sampling.sample_anchors_batched`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .compiled import jit as _jit

__all__ = ["bad_labels_error", "draw_uniforms", "random_subset", "sample_cpu", "subset_of_uniforms"]


def sample_cpu(
    labels: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generators: Sequence[torch.Generator | None],
    where: str = "sample_cpu",
) -> tuple[Tensor, Tensor]:
    """Overwrite int8 or int64 CPU ``[B, N]`` ``labels`` with ``sample_anchors`` of each row (row
    ``i`` with ``generators[i]``); return the sampled positives as ``(rows, anchors)``, row-major.

    A label other than -1, 0 and 1 is a :func:`bad_labels_error` naming ``where``, ``labels`` left
    as they were (the scan that counts the candidates finds them).
    """
    labels_np = labels.numpy()
    counts = _count_batch(labels_np)
    if counts[:, 2].any():
        raise bad_labels_error(where, labels)
    keep = np.empty_like(counts[:, :2])
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


def bad_labels_error(where: str, labels: Tensor) -> ValueError:
    """The error of ``labels`` holding values other than -1, 0 and 1, naming ``where`` and the first few."""
    wide = labels if labels.is_floating_point() else labels.to(torch.int64)  # uint8 holds no -1 to compare with
    values = torch.unique(wide[(wide != -1) & (wide != 0) & (wide != 1)]).tolist()
    listed = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
    return ValueError(f"{where}: labels must be -1 (ignored), 0 (negative) or 1 (positive), got {listed}")


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
    """``[B, 3]``: positives, negatives and labels other than -1 / 0 / 1 of each row of ``labels``."""
    counts = np.zeros((labels.shape[0], 3), dtype=np.int64)
    for row in range(labels.shape[0]):
        positives = negatives = others = 0
        for n in range(labels.shape[1]):  # branch-free, so that it vectorises
            label = labels[row, n]
            positives += label == 1
            negatives += label == 0
            others += (label < -1) | (label > 1)
        counts[row, 0] = positives
        counts[row, 1] = negatives
        counts[row, 2] = others
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
