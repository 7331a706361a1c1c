"""sample_anchors: counts, positive fraction, ignored anchors, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from lightning_rpn.sampling import sample_anchors


def _labels(num_pos: int, num_neg: int, num_ignored: int, seed: int = 0) -> torch.Tensor:
    labels = torch.cat(
        [torch.ones(num_pos), torch.zeros(num_neg), torch.full((num_ignored,), -1.0)]
    ).long()
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def test_counts_follow_batch_size_and_fraction() -> None:
    labels = _labels(400, 5000, 300)
    sampled = sample_anchors(labels, 256, 0.5, torch.Generator().manual_seed(1))
    assert sampled.dtype == torch.int64 and sampled.shape == labels.shape
    assert (sampled == 1).sum() == 128 and (sampled == 0).sum() == 128
    # Only relabelling towards -1: sampled anchors keep their label.
    kept = sampled != -1
    assert torch.equal(sampled[kept], labels[kept])


def test_few_positives_are_all_kept_and_negatives_fill_the_batch() -> None:
    labels = _labels(10, 5000, 0)
    sampled = sample_anchors(labels, 256, 0.25)
    assert (sampled == 1).sum() == 10 and (sampled == 0).sum() == 246


def test_few_anchors_of_both_kinds() -> None:
    labels = _labels(3, 20, 50)
    sampled = sample_anchors(labels, 256, 0.5)
    assert torch.equal(sampled, labels)


def test_ignored_anchors_stay_ignored() -> None:
    labels = _labels(100, 100, 100)
    sampled = sample_anchors(labels, 64, 0.5)
    assert (sampled[labels == -1] == -1).all()


def test_seeded_generator_is_deterministic_and_seed_dependent() -> None:
    labels = _labels(500, 5000, 10)
    first = sample_anchors(labels, 256, 0.5, torch.Generator().manual_seed(7))
    again = sample_anchors(labels, 256, 0.5, torch.Generator().manual_seed(7))
    other = sample_anchors(labels, 256, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_is_uniform_over_positives() -> None:
    labels = _labels(20, 0, 0)
    g = torch.Generator().manual_seed(3)
    hits = sum((sample_anchors(labels, 10, 1.0, g) == 1).long() for _ in range(400))
    # Each positive is kept with probability 1/2: 200 +- 4 sigma (sigma = 10).
    assert hits.min() > 160 and hits.max() < 240


def test_zero_fraction_and_zero_batch() -> None:
    labels = _labels(50, 50, 0)
    assert (sample_anchors(labels, 32, 0.0) == 1).sum() == 0
    assert (sample_anchors(labels, 0, 0.5) == -1).all()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(batch_size_per_image=-1), "batch_size_per_image must be a non-negative int, got -1"),
        (dict(positive_fraction=1.5), r"positive_fraction must be in \[0, 1\], got 1.5"),
    ],
)
def test_invalid_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        sample_anchors(_labels(5, 5, 0), **kwargs)


def test_labels_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match=r"1-D tensor \[N\], got a tensor of shape \(2, 5\)"):
        sample_anchors(torch.zeros(2, 5, dtype=torch.int64))
