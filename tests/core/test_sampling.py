"""sample_anchors (per image and batched): counts, positive fraction, ignored anchors, seeding."""

from __future__ import annotations

import pytest
import torch

from lightning_rpn import sampling
from lightning_rpn.core.cpu_kernels import random_subset
from lightning_rpn.core.sampling import sample_anchors


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


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_batched_rows_equal_per_row_sampling(backend: str) -> None:
    labels = torch.stack([_labels(p, n, i, seed=k) for k, (p, n, i) in enumerate([(5, 900, 95), (300, 600, 100),
                                                                                  (0, 1000, 0), (0, 0, 1000)])])
    generators = lambda: [torch.Generator().manual_seed(k) for k in range(4)]  # noqa: E731
    rows = sampling.sample_anchors_batched(labels, 256, 0.5, generators(), backend=backend)
    other = "torch" if backend == "compiled" else "compiled"
    for k in range(4):
        expected = sample_anchors(labels[k], 256, 0.5, torch.Generator().manual_seed(k), backend=other)
        assert torch.equal(rows[k], expected)
    sampled, image, anchor = sampling.sample_anchors_with_positives(labels, 256, 0.5, generators(), backend=backend)
    assert torch.equal(sampled, rows)
    flat = (image * labels.shape[1] + anchor).sort().values  # the positives, in any order
    assert torch.equal(flat, torch.nonzero(rows.view(-1) == 1).squeeze(1))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64])
def test_inplace_sampling_overwrites_the_labels(dtype: torch.dtype) -> None:
    labels = torch.stack([_labels(40, 900, 60, seed=1), _labels(3, 50, 947, seed=2)]).to(dtype)
    expected = sampling.sample_anchors_batched(labels.long(), 64, 0.5, [torch.Generator().manual_seed(k) for k in range(2)])
    for backend in ("compiled", "torch"):
        copy = labels.clone()
        sampled, _, _ = sampling.sample_anchors_with_positives(
            copy, 64, 0.5, [torch.Generator().manual_seed(k) for k in range(2)], inplace=True, backend=backend
        )
        assert sampled is copy and copy.dtype == dtype and torch.equal(copy.long(), expected)


def test_batched_sampling_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        sampling.sample_anchors_batched(torch.zeros(1, 10, dtype=torch.int64), 8, 0.5, [None], backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sampling.sample_anchors_batched(torch.zeros(3, 10, dtype=torch.int64), 8, 0.5, [None, None])
    with pytest.raises(ValueError, match=r"labels must be a 2-D tensor \[B, N\]"):
        sampling.sample_anchors_batched(torch.zeros(10, dtype=torch.int64), 8, 0.5, [None])


def test_random_subset_is_distinct_in_range_seeded_and_uniform() -> None:
    subset = random_subset(10_000, 300, torch.Generator().manual_seed(1))
    assert subset.dtype == torch.int64 and subset.shape == (300,)
    assert subset.unique().numel() == 300 and 0 <= int(subset.min()) and int(subset.max()) < 10_000
    assert torch.equal(subset, random_subset(10_000, 300, torch.Generator().manual_seed(1)))
    assert torch.equal(random_subset(7, 7, torch.Generator()).sort().values, torch.arange(7))
    assert random_subset(0, 0, None).numel() == 0
    g = torch.Generator().manual_seed(2)
    counts = torch.bincount(torch.cat([random_subset(10, 3, g) for _ in range(2000)]), minlength=10)
    # each index is drawn with probability 3/10: 600 +- 4 sigma (sigma ~ 20.5)
    assert counts.min() > 518 and counts.max() < 682
    with pytest.raises(ValueError, match="count=4, population=3"):
        random_subset(3, 4, None)


ALLOWED = r"labels must be -1 \(ignored\), 0 \(negative\) or 1 \(positive\), got "


@pytest.mark.parametrize("backend", ["compiled", "torch"])
@pytest.mark.parametrize(("labels", "got"), [
    (torch.tensor([2, 1, 0]), "2"),  # was sampled as if ignored
    (torch.tensor([1, -2, 0, 0, 2, -2], dtype=torch.int8), "-2, 2"),
    (torch.tensor([3, 4, 5, 6, 7, 8, 1]), "3, 4, 5, 6, 7, ..."),
    (torch.tensor([1.0, 0.5, 0.0]), "0.5"),  # was truncated to 0: a negative
    (torch.tensor([1.0, float("nan")]), "nan"),
])
def test_labels_other_than_minus_one_zero_one_are_refused(labels: torch.Tensor, got: str, backend: str) -> None:
    with pytest.raises(ValueError, match=f"^sample_anchors: {ALLOWED}{got}$"):
        sample_anchors(labels, 256, 0.5, backend=backend)
    with pytest.raises(ValueError, match=f"^sample_anchors_batched: {ALLOWED}{got}$"):
        sampling.sample_anchors_batched(labels[None], 256, 0.5, [None], backend=backend)


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_refused_labels_are_left_as_they_were_inplace(backend: str) -> None:
    labels = torch.tensor([[1, 0, -1, 0], [0, 1, 5, -1]], dtype=torch.int8)
    before = labels.clone()
    with pytest.raises(ValueError, match=f"^sample_anchors_batched: {ALLOWED}5$"):
        sampling.sample_anchors_with_positives(labels, 8, 0.5, [None, None], inplace=True, backend=backend)
    assert torch.equal(labels, before)


def test_boolean_and_empty_labels_are_still_sampled() -> None:
    for backend in ("compiled", "torch"):
        assert torch.equal(sample_anchors(torch.tensor([True, False]), 8, 0.5, backend=backend), torch.tensor([1, 0]))
        assert sample_anchors(torch.zeros(0, dtype=torch.int64), 8, 0.5, backend=backend).shape == (0,)
