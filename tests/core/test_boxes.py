"""Box utilities: bitwise parity with torchvision's ops and clear input errors."""

from __future__ import annotations

import pytest
import torch
from torchvision import ops

from lightning_rpn.core.boxes import (
    aligned_giou,
    box_area,
    box_iou,
    check_gt_boxes,
    clip_boxes_to_image,
)


def _random_boxes(n: int, scale: float = 100.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * scale + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def test_box_area_matches_torchvision() -> None:
    boxes = _random_boxes(40)
    assert torch.equal(box_area(boxes), ops.box_area(boxes))


def test_box_iou_is_bitwise_torchvision_and_fp32() -> None:
    a, b = _random_boxes(30, seed=1), _random_boxes(50, seed=2)
    assert torch.equal(box_iou(a, b), ops.box_iou(a, b))
    half = box_iou(a.half(), b.half())
    assert half.dtype == torch.float32
    assert torch.equal(half, ops.box_iou(a.half().float(), b.half().float()))


def test_box_iou_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"box_iou\(boxes2\).*\[N, 4\]"):
        box_iou(_random_boxes(3), torch.zeros(3, 5))


def test_clip_boxes_to_image_matches_torchvision_on_batched_input() -> None:
    boxes = _random_boxes(20, scale=300.0).sub(50).reshape(4, 5, 4)
    clipped = clip_boxes_to_image(boxes, (120, 200))
    assert clipped.shape == boxes.shape
    assert torch.equal(clipped.reshape(-1, 4), ops.clip_boxes_to_image(boxes.reshape(-1, 4), (120, 200)))
    assert clipped[..., 0::2].max() <= 200 and clipped[..., 1::2].max() <= 120 and clipped.min() >= 0


def test_aligned_giou_is_the_diagonal_of_torchvision_giou() -> None:
    a, b = _random_boxes(25, seed=3), _random_boxes(25, seed=4)
    expected = ops.generalized_box_iou(a, b).diagonal()
    torch.testing.assert_close(aligned_giou(a, b), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(aligned_giou(a, a), torch.ones(25))


def test_aligned_giou_row_mismatch_names_both_counts() -> None:
    with pytest.raises(ValueError, match="3 rows.*4"):
        aligned_giou(_random_boxes(3), _random_boxes(4))


def test_check_gt_boxes_accepts_valid_and_empty() -> None:
    check_gt_boxes(_random_boxes(5), "image 1")
    check_gt_boxes(torch.zeros(0, 4), "image 2")


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ([1.0, 2.0, 1.0, 5.0], r"img 7: gt box 2 = \[1.0, 2.0, 1.0, 5.0\] is empty"),
        ([1.0, 6.0, 3.0, 5.0], r"img 7: gt box 2 .*y2 > y1"),
        ([float("nan"), 0.0, 1.0, 1.0], r"img 7: gt box 2 has non-finite"),
    ],
)
def test_check_gt_boxes_names_where_row_and_values(row: list[float], pattern: str) -> None:
    boxes = torch.cat([_random_boxes(2), torch.tensor([row]), _random_boxes(2)])
    with pytest.raises(ValueError, match=pattern):
        check_gt_boxes(boxes, "img 7")


def test_check_gt_boxes_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"ann.json: .*\[G, 4\].*\(3, 5\)"):
        check_gt_boxes(torch.zeros(3, 5), "ann.json")
