"""Balanced sampling of the anchors that enter the RPN loss.

Shapes: ``B`` images, ``N`` anchors of an image.

Of the labelled anchors (1 positive, 0 negative), keep at most
``batch_size_per_image * positive_fraction`` random positives and fill the rest of the
mini-batch with random negatives; every other anchor becomes -1 (ignored); a label other than
-1, 0 and 1 is an error naming it. The random subsets come from Floyd's algorithm
(:func:`~lightning_rpn.core.cpu_kernels.random_subset`), driven by one draw of uniforms per image
(the positives' first) from the given generator, on the generator's device (CPU by default)
whatever device ``labels`` lives on, so a seeded CPU generator gives the same sample in a
DataLoader worker and inside the model.

``backend`` chooses how the chosen anchors are marked, with identical results: ``"compiled"``
(CPU) one compiled scan per batch (``cpu_kernels.sample_cpu``), ``"torch"`` (any device) one
pass of tensor ops over the whole batch, ``"auto"`` the first on the CPU, the second elsewhere.
:func:`sample_anchors` is :func:`sample_anchors_batched` for a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .config import AnchorTargetConfig
from .cpu_kernels import draw_uniforms, sample_cpu, subset_of_uniforms
from .matching import Backend, resolve_backend
from .sample_kernels import bad_labels_error

__all__ = ["sample_anchors", "sample_anchors_batched", "sample_anchors_with_positives"]


def sample_anchors(
    labels: Tensor,
    batch_size_per_image: int = AnchorTargetConfig.batch_size_per_image,
    positive_fraction: float = AnchorTargetConfig.positive_fraction,
    generator: torch.Generator | None = None,
    *,
    backend: Backend = "auto",
) -> Tensor:
    """Return a copy of ``labels`` (int64 ``[N]``: -1, 0 or 1) where unsampled anchors are -1."""
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise ValueError(f"sample_anchors: labels must be a 1-D tensor [N], got {_describe(labels)}")
    sampled, _, _ = _sample("sample_anchors", labels[None], batch_size_per_image, positive_fraction, [generator],
                            False, backend)
    return sampled[0]


def sample_anchors_batched(
    labels: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generators: Sequence[torch.Generator | None],
    *,
    backend: Backend = "auto",
) -> Tensor:
    """``sample_anchors`` for every row of int64 ``[B, N]`` labels, row ``i`` with ``generators[i]``.

    The same result as sampling row by row (each generator draws the same subsets in the same
    order), without a per-row list of candidate indices.
    """
    return sample_anchors_with_positives(labels, batch_size_per_image, positive_fraction, generators, backend=backend)[0]


def sample_anchors_with_positives(
    labels: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generators: Sequence[torch.Generator | None],
    inplace: bool = False,
    *,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """``sample_anchors_batched``'s labels and the sampled positives as ``(rows, anchors)`` int64 ``[P]``.

    The positives come in no particular order. With ``inplace``, int8 or int64 ``labels`` are
    overwritten with the result (on the CPU without a second ``[B, N]`` tensor) and returned;
    otherwise the result is int64.
    """
    return _sample("sample_anchors_batched", labels, batch_size_per_image, positive_fraction, generators, inplace,
                   backend)


def _sample(
    where: str,
    labels: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generators: Sequence[torch.Generator | None],
    inplace: bool,
    backend: Backend,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sample_anchors_with_positives`, its errors naming ``where`` (the function called).

    A label other than -1, 0 and 1 is an error, found at little cost (on 200k labels): by the
    compiled kernel as it counts the candidates (about 2% of a call), by one reduction on the torch
    path (``aminmax``, about 5%); a float label is compared with each value (int64 truncates 0.5 to 0).
    """
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        raise ValueError(f"{where}: labels must be a 2-D tensor [B, N], got {_describe(labels)}")
    if len(generators) != labels.shape[0]:
        raise ValueError(f"{where}: {len(generators)} generators for {labels.shape[0]} rows of labels")
    _check_sizes(where, batch_size_per_image, positive_fraction)
    if inplace and labels.dtype not in (torch.int8, torch.int64):
        raise TypeError(f"{where}: inplace sampling needs int8 or int64 labels, got {labels.dtype}")
    compiled = resolve_backend(backend, labels.device, where) == "compiled"
    if labels.is_floating_point():
        if ((labels != labels.round()) | (labels.abs() > 1)).any():
            raise bad_labels_error(where, labels)
    elif not compiled and labels.numel() and labels.dtype != torch.bool:  # (a bool is 0 or 1)
        low, high = torch.aminmax(labels)
        if int(low) < -1 or int(high) > 1:
            raise bad_labels_error(where, labels)
    if compiled:
        sampled = labels if inplace else labels.to(torch.int64, copy=True)
        return (sampled, *sample_cpu(sampled, batch_size_per_image, positive_fraction, generators, where))
    result, rows, anchors = _sample_tensors(labels.to(torch.int64), batch_size_per_image, positive_fraction, generators)
    if inplace:
        labels.copy_(result)
        return labels, rows, anchors
    return result, rows, anchors


def _sample_tensors(
    labels: Tensor,
    batch_size_per_image: int,
    positive_fraction: float,
    generators: Sequence[torch.Generator | None],
) -> tuple[Tensor, Tensor, Tensor]:
    """The tensor-pass version of ``sample_anchors_with_positives`` (int64 labels, any device)."""
    sampled = torch.full_like(labels, -1)
    positive = torch.nonzero(labels == 1)  # [P, 2] (row, anchor), row-major: ascending per row
    negative = torch.nonzero(labels == 0)
    count = labels.shape[0]
    positive_counts = torch.bincount(positive[:, 0], minlength=count).tolist()
    negative_counts = torch.bincount(negative[:, 0], minlength=count).tolist()
    chosen_positive, chosen_negative = [], []
    positive_start = negative_start = 0
    for row, generator in enumerate(generators):
        num_positive = min(positive_counts[row], int(batch_size_per_image * positive_fraction))
        num_negative = min(negative_counts[row], batch_size_per_image - num_positive)
        draws = draw_uniforms(num_positive + num_negative, generator)  # as sample_cpu: positives' first
        subset = subset_of_uniforms(positive_counts[row], draws[:num_positive]).to(labels.device)
        chosen_positive.append(subset + positive_start)
        subset = subset_of_uniforms(negative_counts[row], draws[num_positive:]).to(labels.device)
        chosen_negative.append(subset + negative_start)
        positive_start += positive_counts[row]
        negative_start += negative_counts[row]
    picked_positive = positive[torch.cat(chosen_positive)]
    picked_negative = negative[torch.cat(chosen_negative)]
    sampled[picked_positive[:, 0], picked_positive[:, 1]] = 1
    sampled[picked_negative[:, 0], picked_negative[:, 1]] = 0
    return sampled, picked_positive[:, 0], picked_positive[:, 1]


def _check_sizes(where: str, batch_size_per_image: int, positive_fraction: float) -> None:
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) or batch_size_per_image < 0:
        raise ValueError(f"{where}: batch_size_per_image must be a non-negative int, got {batch_size_per_image!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"{where}: positive_fraction must be in [0, 1], got {positive_fraction!r}")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
