"""bench/bench_cascade_targets.py: its boxes are the stated sizes, and every assignment it times runs."""

from __future__ import annotations

import pytest
from helpers.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/bench_cascade_targets.py", "bench_cascade_targets")


def test_the_boxes_are_15_to_70_px_inside_the_image(bench) -> None:
    gt = bench.boxes(256, 50)
    sides = gt[:, 2:] - gt[:, :2]
    assert gt.shape == (50, 4) and (sides >= 15).all() and (sides <= 70).all()
    assert (gt >= 0).all() and (gt <= 256).all()


def test_each_assignment_is_timed(bench) -> None:
    small = bench.measure(256, 5, repeats=1)
    assert set(small) == {"cascade stage 1", "plain RPN, match_anchors", "plain RPN, torchvision"}
    assert all(seconds > 0 and megabytes >= 0 for seconds, megabytes in small.values())
