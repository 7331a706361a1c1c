"""Compiled CPU kernels for anchor-target assignment: matching statistics and sampling a batch.

They serve the ``"compiled"`` backends of :func:`~lightning_rpn.core.matching.match_anchors_batched`
and :func:`~lightning_rpn.core.sampling.sample_anchors_batched`, above all in DataLoader workers,
where a few dozen small tensor ops per image cost more than their arithmetic: one kernel call
per batch does all of its images. One module per idea:

- :mod:`~lightning_rpn.core.anchor_index`: the spatial index over an anchor tensor (cached);
- :mod:`~lightning_rpn.core.match_kernel`: ``match_stats_cpu``, the statistics of the label rule;
- :mod:`~lightning_rpn.core.sample_kernels`: ``random_subset`` (Floyd's algorithm) and ``sample_cpu``;
- :mod:`~lightning_rpn.core.compiled`: numba's settings (compiled on first call, cached on disk).

This module loads them all before DataLoader workers fork (:func:`load_kernels`), and names
them for code importing them from here.
"""

from __future__ import annotations

import torch

from .anchor_index import AnchorIndex, anchor_index
from .match_kernel import match_stats_cpu
from .sample_kernels import draw_uniforms, random_subset, sample_cpu, subset_of_uniforms

__all__ = [
    "AnchorIndex", "anchor_index", "load_kernels", "match_stats_cpu", "random_subset", "sample_cpu",
    "draw_uniforms", "subset_of_uniforms",
]


def load_kernels() -> None:
    """Compile (or load from the disk cache) every kernel now, with a call on a tiny input.

    Call it in a process before it forks DataLoader workers: they inherit the compiled code
    instead of each loading it again at every epoch's start (about 0.2-0.5 s per worker).
    """
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 12.0, 12.0]])
    boxes = [torch.tensor([[0.0, 0.0, 6.0, 6.0]]), torch.zeros(0, 4)]
    for inside in (None, torch.ones(2, 2, dtype=torch.bool)):
        match_stats_cpu(anchors, boxes, inside, 0.3, True)
    # a generator of its own: torch's RNG is the caller's, and whether the kernels were loaded
    # already (a collate built before) must not change what the caller draws next
    generator = torch.Generator().manual_seed(0)
    for labels in (torch.zeros(2, 2, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int64)):
        sample_cpu(labels, 2, 0.5, [generator, generator])
    random_subset(4, 2, generator)
