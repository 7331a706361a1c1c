"""match_anchors_batched and assign_batch_targets: row by row equal to the per-image functions."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou as tv_box_iou

from lightning_rpn import batch_matching
from lightning_rpn.anchors import AnchorGenerator
from lightning_rpn.batch_matching import match_anchors_batched
from lightning_rpn.box_coder import BoxCoder
from lightning_rpn.matching import match_anchors
from lightning_rpn.targets import (
    AnchorTargetConfig,
    assign_anchor_targets,
    assign_batch_targets,
    assign_compact_targets,
    dense_target_deltas,
    sample_generator,
)
from test_matching import random_gt

FPN = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
PADDED = (256, 320)


@pytest.fixture(autouse=True, params=["kernel", "tensors"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test with the compiled CPU kernel and with the tensor passes (other devices)."""
    monkeypatch.setattr(batch_matching, "CPU_KERNEL", request.param == "kernel")
    return request.param


def batch_of_boxes(seed: int, integer: bool = False) -> list[torch.Tensor]:
    counts = [3, 0, 11, 1, 7, 0, 25]
    return [random_gt(n, seed * 100 + i, integer=integer) for i, n in enumerate(counts)]


@pytest.mark.parametrize("integer", [False, True])  # integer boxes: many exact IoU ties
@pytest.mark.parametrize("seed", range(3))
def test_rows_equal_match_anchors_and_torchvision(seed: int, integer: bool) -> None:
    grid = FPN.grid(FPN.feature_shapes_for(PADDED))
    boxes = batch_of_boxes(seed, integer)
    labels, matched = match_anchors_batched(grid, boxes)
    assert labels.shape == matched.shape == (len(boxes), grid.num_anchors)
    assert labels.dtype == matched.dtype == torch.int64
    matcher = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)
    for row, gt in enumerate(boxes):
        expected = match_anchors(grid, gt)
        assert torch.equal(labels[row], expected[0]) and torch.equal(matched[row], expected[1])
        if len(gt):  # torchvision has no answer for G == 0 (it raises)
            index = matcher(tv_box_iou(gt, grid.anchors))
            assert torch.equal(labels[row] == 1, index >= 0)
            assert torch.equal(matched[row], index.clamp(min=0))
        else:
            assert (labels[row] == 0).all() and (matched[row] == 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fg_iou=0.5, bg_iou=0.4, allow_low_quality=False),
        dict(fg_iou=0.6, bg_iou=0.0),
        dict(fg_iou=0.7, bg_iou=0.3, allowed_border=0.0),
        dict(fg_iou=0.7, bg_iou=0.3, allowed_border=16.0),
    ],
)
def test_thresholds_and_border_filter_match_the_per_image_function(kwargs: dict) -> None:
    grid = FPN.grid(FPN.feature_shapes_for(PADDED))
    boxes = batch_of_boxes(7)
    sizes = [(200 + 7 * i, 320 - 11 * i) for i in range(len(boxes))]
    labels, matched = match_anchors_batched(grid, boxes, image_sizes=sizes, **kwargs)
    for row, gt in enumerate(boxes):
        expected = match_anchors(grid, gt, image_size=sizes[row], **kwargs)
        assert torch.equal(labels[row], expected[0]) and torch.equal(matched[row], expected[1])


@pytest.mark.parametrize("offset, anchor_stride", [(0.5, 1), (0.0, 2), (0.25, 3)])
def test_offset_and_anchor_stride_grids(offset: float, anchor_stride: int) -> None:
    generator = AnchorGenerator(((24, 48),), (0.25, 1.0, 4.0), (16,), offset=offset, anchor_stride=anchor_stride)
    grid = generator.grid(generator.feature_shapes_for((224, 288)))
    boxes = [random_gt(n, 50 + n, image=(224, 288), max_size=120.0) for n in (1, 4, 9)]
    labels, matched = match_anchors_batched(grid, boxes)
    for row, gt in enumerate(boxes):
        expected = match_anchors(grid.anchors, gt)
        assert torch.equal(labels[row], expected[0]) and torch.equal(matched[row], expected[1])


def test_small_budget_splits_the_batch_and_sends_dense_images_to_the_grid_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch_matching, "CPU_KERNEL", False)  # the kernel has no IoU blocks
    grid = FPN.grid(FPN.feature_shapes_for(PADDED))
    boxes = batch_of_boxes(4)
    expected = match_anchors_batched(grid, boxes)
    # 8 boxes' worth of IoU per chunk: the 11- and 25-box images exceed it on their own
    monkeypatch.setattr(batch_matching, "_IOU_BUDGET", 8 * grid.num_anchors)
    calls = []
    real = batch_matching.match_anchors
    monkeypatch.setattr(batch_matching, "match_anchors", lambda *a, **k: calls.append(1) or real(*a, **k))
    split = match_anchors_batched(grid, boxes)
    assert len(calls) == 2
    assert torch.equal(split[0], expected[0]) and torch.equal(split[1], expected[1])


@pytest.mark.parametrize("integer", [False, True])
def test_dense_scene(integer: bool) -> None:
    grid = FPN.grid(FPN.feature_shapes_for(PADDED))
    boxes = [random_gt(800, 11, max_size=40.0, integer=integer), random_gt(300, 12, max_size=300.0)]
    labels, matched = match_anchors_batched(grid, boxes)
    for row, gt in enumerate(boxes):
        expected = match_anchors(grid, gt)
        assert torch.equal(labels[row], expected[0]) and torch.equal(matched[row], expected[1])
    assert (labels == 1).sum() > 500


def test_bad_input_is_named() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(PADDED))
    with pytest.raises(ValueError, match=r"gt_boxes\[1\] must be \[G, 4\]"):
        match_anchors_batched(grid, [torch.zeros(0, 4), torch.zeros(3)])
    with pytest.raises(ValueError, match="non-finite"):
        match_anchors_batched(grid, [torch.tensor([[0.0, 0.0, float("nan"), 5.0]])])
    good = torch.tensor([[4.0, 4.0, 40.0, 50.0]])
    flipped = torch.tensor([[4.0, 4.0, 40.0, 50.0], [4.0, 4.0, 40.0, 50.0], [50.0, 4.0, 40.0, 50.0]])
    with pytest.raises(ValueError, match=r"gt_boxes\[2\]\): gt box 2 = \[50.0, 4.0, 40.0, 50.0\] is empty"):
        match_anchors_batched(grid, [good, torch.zeros(0, 4), flipped, good])
    with pytest.raises(ValueError, match="bg_iou <= fg_iou"):
        match_anchors_batched(grid, [torch.zeros(0, 4)], fg_iou=0.3, bg_iou=0.5)
    with pytest.raises(ValueError, match="needs image_sizes"):
        match_anchors_batched(grid, [torch.zeros(0, 4)], allowed_border=0.0)


@pytest.mark.parametrize(
    "config",
    [
        AnchorTargetConfig(),
        AnchorTargetConfig(batch_size_per_image=64, positive_fraction=0.25, allowed_border=0.0),
        AnchorTargetConfig(crowd_ioa=0.5, batch_size_per_image=10**6, positive_fraction=1.0),
    ],
)
def test_batch_targets_equal_per_image_targets(config: AnchorTargetConfig) -> None:
    grid = FPN.grid(FPN.feature_shapes_for(PADDED))
    boxes = batch_of_boxes(2)
    sizes = [(256 - 3 * i, 320 - 9 * i) for i in range(len(boxes))]
    crowd = [torch.tensor([[0.0, 100.0, 160.0, 256.0]]) if i % 3 == 0 else None for i in range(len(boxes))]
    ids = [f"img{i}" for i in range(len(boxes))]
    labels, deltas = assign_batch_targets(
        grid, boxes, sizes, config, BoxCoder(), [sample_generator(5, i) for i in ids], crowd
    )
    assert labels.shape == (len(boxes), grid.num_anchors) and deltas.shape == (len(boxes), grid.num_anchors, 4)
    for row, gt in enumerate(boxes):
        expected = assign_anchor_targets(
            grid, gt, sizes[row], config, BoxCoder(), sample_generator(5, ids[row]), crowd[row]
        )
        assert torch.equal(labels[row], expected[0]) and torch.equal(deltas[row], expected[1])
    assert (labels == 1).any() and (deltas != 0).any()


def test_batch_targets_need_one_generator_per_image() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(PADDED))
    with pytest.raises(ValueError, match="2 gt_boxes, 2 image_sizes, 1 generators"):
        assign_batch_targets(grid, [torch.zeros(0, 4)] * 2, [PADDED] * 2, AnchorTargetConfig(), BoxCoder(), [None])


def test_compact_targets_hold_the_dense_deltas_of_the_positives() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(PADDED))
    boxes = batch_of_boxes(3)
    args = (grid, boxes, [PADDED] * len(boxes), AnchorTargetConfig(), BoxCoder())
    labels, positive_deltas = assign_compact_targets(*args, [sample_generator(1, i) for i in range(len(boxes))])
    dense_labels, dense = assign_batch_targets(*args, [sample_generator(1, i) for i in range(len(boxes))])
    assert torch.equal(labels, dense_labels) and (labels == 1).sum() == positive_deltas.shape[0] > 0
    assert torch.equal(positive_deltas, dense[labels == 1])
    assert torch.equal(dense_target_deltas(labels, positive_deltas), dense)
    assert torch.equal(dense_target_deltas(labels.to(torch.int8), positive_deltas), dense)
    with pytest.raises(ValueError, match=r"positive_deltas has shape \(\d+, 4\); expected"):
        dense_target_deltas(labels, positive_deltas[:-1])
