"""Balanced sampling of the anchors that enter the RPN loss.

Shapes: ``N`` anchors of an image.

Of the labelled anchors (1 positive, 0 negative), keep at most
``batch_size_per_image * positive_fraction`` random positives and fill the rest of the
mini-batch with random negatives; every other anchor becomes -1 (ignored). The random subsets
come from ``torch.randperm`` with the given generator, drawn on the generator's device (CPU by
default) whatever device ``labels`` lives on, so a seeded CPU generator gives the same sample
in a DataLoader worker and inside the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_anchors"]


def sample_anchors(
    labels: Tensor,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return a copy of ``labels`` (int64 ``[N]``) where unsampled anchors are -1."""
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise ValueError(f"sample_anchors: labels must be a 1-D tensor [N], got {_describe(labels)}")
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) or batch_size_per_image < 0:
        raise ValueError(
            f"sample_anchors: batch_size_per_image must be a non-negative int, got {batch_size_per_image!r}"
        )
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"sample_anchors: positive_fraction must be in [0, 1], got {positive_fraction!r}")

    positive = torch.nonzero(labels == 1).squeeze(1)
    negative = torch.nonzero(labels == 0).squeeze(1)
    num_positive = min(positive.numel(), int(batch_size_per_image * positive_fraction))
    num_negative = min(negative.numel(), batch_size_per_image - num_positive)

    sampled = torch.full_like(labels, -1, dtype=torch.int64)
    sampled[positive[_random_subset(positive.numel(), num_positive, generator, labels.device)]] = 1
    sampled[negative[_random_subset(negative.numel(), num_negative, generator, labels.device)]] = 0
    return sampled


def _random_subset(
    population: int, count: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``count`` distinct random indices below ``population``, on ``device``."""
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(population, generator=generator, device=source)[:count].to(device)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
