"""match_anchors_batched and assign_batch_targets: row by row equal to the per-image functions,
and the compiled and torch backends equal to each other (selected by parameter)."""

from __future__ import annotations

import pytest
import torch

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.matching import match_anchors, match_anchors_batched
from lightning_rpn.core.targets import (
    AnchorTargetConfig,
    assign_anchor_targets,
    assign_batch_targets,
    dense_target_deltas,
    sample_generator,
)
from helpers.matching import random_gt, torchvision_match

FPN = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
PADDED = (256, 320)
BACKENDS = ["compiled", "torch"]


def anchors_for(size=PADDED) -> torch.Tensor:
    return torch.cat(FPN(FPN.feature_shapes_for(size)))


def batch_of_boxes(seed: int, integer: bool = False) -> list[torch.Tensor]:
    counts = [3, 0, 11, 1, 7, 0, 25]
    return [random_gt(n, seed * 100 + i, integer=integer) for i, n in enumerate(counts)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("integer", [False, True])  # integer boxes: many exact IoU ties
@pytest.mark.parametrize("seed", range(3))
def test_rows_equal_match_anchors_and_torchvision(seed: int, integer: bool, backend: str) -> None:
    anchors = anchors_for()
    boxes = batch_of_boxes(seed, integer)
    labels, matched = match_anchors_batched(anchors, boxes, backend=backend)
    assert labels.shape == matched.shape == (len(boxes), anchors.shape[0])
    assert labels.dtype == matched.dtype == torch.int64
    for row, gt in enumerate(boxes):
        if len(gt):  # torchvision has no answer for G == 0 (it raises)
            expected = torchvision_match(anchors, gt)
            assert torch.equal(labels[row], expected[0]) and torch.equal(matched[row], expected[1])
        else:
            assert (labels[row] == 0).all() and (matched[row] == 0).all()
    compact = match_anchors_batched(anchors, boxes, backend=backend, compact=True)
    assert compact[0].dtype == torch.int8 and compact[1].dtype == torch.int32
    assert torch.equal(compact[0].long(), labels) and torch.equal(compact[1].long(), matched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fg_iou=0.5, bg_iou=0.4, allow_low_quality=False),
        dict(fg_iou=0.6, bg_iou=0.0),
        dict(fg_iou=0.0, bg_iou=0.0),  # every anchor positive, also those without statistics
        dict(fg_iou=0.7, bg_iou=0.3, allowed_border=0.0),
        dict(fg_iou=0.7, bg_iou=0.3, allowed_border=16.0),
    ],
)
def test_thresholds_and_border_filter_match_the_per_image_function(kwargs: dict, backend: str) -> None:
    anchors = anchors_for()
    boxes = batch_of_boxes(7)
    sizes = [(200 + 7 * i, 320 - 11 * i) for i in range(len(boxes))]
    labels, matched = match_anchors_batched(anchors, boxes, image_sizes=sizes, backend=backend, **kwargs)
    for row, gt in enumerate(boxes):
        expected = match_anchors(anchors, gt, image_size=sizes[row], backend="torch", **kwargs)
        assert torch.equal(labels[row], expected[0]) and torch.equal(matched[row], expected[1])


@pytest.mark.parametrize("integer", [False, True])
def test_dense_scene_backends_agree(integer: bool) -> None:
    anchors = anchors_for()
    boxes = [random_gt(800, 11, max_size=40.0, integer=integer), random_gt(300, 12, max_size=300.0)]
    compiled = match_anchors_batched(anchors, boxes, backend="compiled")
    torch_backend = match_anchors_batched(anchors, boxes, backend="torch")
    assert torch.equal(compiled[0], torch_backend[0]) and torch.equal(compiled[1], torch_backend[1])
    assert (compiled[0] == 1).sum() > 500


def test_bad_input_is_named() -> None:
    anchors = anchors_for()
    with pytest.raises(ValueError, match=r"gt_boxes\[1\] must be \[G, 4\]"):
        match_anchors_batched(anchors, [torch.zeros(0, 4), torch.zeros(3)])
    with pytest.raises(ValueError, match="non-finite"):
        match_anchors_batched(anchors, [torch.tensor([[0.0, 0.0, float("nan"), 5.0]])])
    good = torch.tensor([[4.0, 4.0, 40.0, 50.0]])
    flipped = torch.tensor([[4.0, 4.0, 40.0, 50.0], [4.0, 4.0, 40.0, 50.0], [50.0, 4.0, 40.0, 50.0]])
    with pytest.raises(ValueError, match=r"gt_boxes\[2\]\): gt box 2 = \[50.0, 4.0, 40.0, 50.0\] is empty"):
        match_anchors_batched(anchors, [good, torch.zeros(0, 4), flipped, good])
    with pytest.raises(ValueError, match="bg_iou <= fg_iou"):
        match_anchors_batched(anchors, [torch.zeros(0, 4)], fg_iou=0.3, bg_iou=0.5)
    with pytest.raises(ValueError, match="needs image_sizes"):
        match_anchors_batched(anchors, [torch.zeros(0, 4)], allowed_border=0.0)
    with pytest.raises(ValueError, match="1 crowd_boxes for 2 images"):
        match_anchors_batched(anchors, [good, good], crowd_boxes=[None], crowd_ioa=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "config",
    [
        AnchorTargetConfig(),
        AnchorTargetConfig(batch_size_per_image=64, positive_fraction=0.25, allowed_border=0.0),
        AnchorTargetConfig(crowd_ioa=0.5, batch_size_per_image=10**6, positive_fraction=1.0),
    ],
)
def test_batch_targets_equal_per_image_targets(config: AnchorTargetConfig, backend: str) -> None:
    anchors = anchors_for()
    boxes = batch_of_boxes(2)
    sizes = [(256 - 3 * i, 320 - 9 * i) for i in range(len(boxes))]
    crowd = [torch.tensor([[0.0, 100.0, 160.0, 256.0]]) if i % 3 == 0 else None for i in range(len(boxes))]
    ids = [f"img{i}" for i in range(len(boxes))]
    labels, deltas = assign_batch_targets(
        anchors, boxes, sizes, config, BoxCoder(), [sample_generator(5, i) for i in ids], crowd, backend=backend
    )
    assert labels.shape == (len(boxes), anchors.shape[0]) and deltas.shape == (len(boxes), anchors.shape[0], 4)
    for row, gt in enumerate(boxes):
        other = "torch" if backend == "compiled" else "compiled"
        expected = assign_anchor_targets(
            anchors, gt, sizes[row], config, BoxCoder(), sample_generator(5, ids[row]), crowd[row], backend=other
        )
        assert torch.equal(labels[row], expected[0]) and torch.equal(deltas[row], expected[1])
    assert (labels == 1).any() and (deltas != 0).any()


def test_batch_targets_need_one_generator_per_image() -> None:
    with pytest.raises(ValueError, match="2 gt_boxes, 2 image_sizes, 1 generators"):
        assign_batch_targets(anchors_for(), [torch.zeros(0, 4)] * 2, [PADDED] * 2, AnchorTargetConfig(), BoxCoder(), [None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_targets_hold_the_dense_deltas_of_the_positives(backend: str) -> None:
    boxes = batch_of_boxes(3)
    args = (anchors_for(), boxes, [PADDED] * len(boxes), AnchorTargetConfig(), BoxCoder())
    generators = lambda: [sample_generator(1, i) for i in range(len(boxes))]  # noqa: E731
    labels, positive_deltas = assign_batch_targets(*args, generators(), compact=True, backend=backend)
    dense_labels, dense = assign_batch_targets(*args, generators(), backend=backend)
    assert labels.dtype == torch.int8 and dense_labels.dtype == torch.int64
    assert torch.equal(labels.long(), dense_labels) and (labels == 1).sum() == positive_deltas.shape[0] > 0
    assert torch.equal(positive_deltas, dense[dense_labels == 1])
    assert torch.equal(dense_target_deltas(labels, positive_deltas), dense)
    with pytest.raises(ValueError, match=r"positive_deltas has shape \(\d+, 4\); expected"):
        dense_target_deltas(labels, positive_deltas[:-1])
