"""match_anchors: decisions identical to torchvision's Matcher + RPN label mapping.

Both implementations (grid path via AnchorGrid, dense path via a plain tensor) are compared
with the real torchvision Matcher on random and adversarial inputs.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou as tv_box_iou

from lightning_rpn import matching
from lightning_rpn.anchors import AnchorGenerator
from lightning_rpn.matching import match_anchors

IMAGE = (256, 320)
FPN = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))


@pytest.fixture(autouse=True)
def _always_take_the_grid_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small problems normally go to the dense path; test the grid path at every size."""
    monkeypatch.setattr(matching, "_SMALL_PROBLEM", 0)


def torchvision_match(anchors, gt, fg=0.7, bg=0.3, low_quality=True):
    matcher = det_utils.Matcher(fg, bg, allow_low_quality_matches=low_quality)
    idx = matcher(tv_box_iou(gt, anchors))
    labels = (idx >= 0).long()
    labels[idx == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
    return labels, idx.clamp(min=0)


def random_gt(n: int, seed: int, image=IMAGE, max_size: float = 200.0, integer: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = image
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 2.0, h - 2.0])
    wh = torch.rand(n, 2, generator=g) ** 2 * max_size + 1.0
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 2] = boxes[:, 2].clamp(max=w)
    boxes[:, 3] = boxes[:, 3].clamp(max=h)
    return boxes.round() if integer else boxes


def assert_same_as_torchvision(grid, gt, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    tv_kwargs = {k: v for k, v in kwargs.items() if k in ("fg", "bg", "low_quality")}
    ours_kwargs = dict(
        fg_iou=kwargs.get("fg", 0.7), bg_iou=kwargs.get("bg", 0.3), allow_low_quality=kwargs.get("low_quality", True)
    )
    expected = torchvision_match(grid.anchors, gt, **tv_kwargs)
    fast = match_anchors(grid, gt, **ours_kwargs)
    dense = match_anchors(grid.anchors, gt, **ours_kwargs)
    for labels, matched in (fast, dense):
        assert labels.dtype == matched.dtype == torch.int64
        assert torch.equal(labels, expected[0])
        assert torch.equal(matched, expected[1])
    return fast


@pytest.mark.parametrize(("num_gt", "seed"), [(1, 0), (7, 1), (40, 2), (300, 3)])
def test_random_boxes_match_torchvision(num_gt: int, seed: int) -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    labels, _ = assert_same_as_torchvision(grid, random_gt(num_gt, seed))
    assert (labels == 1).any()


@pytest.mark.parametrize(
    ("fg", "bg", "low_quality"), [(0.5, 0.4, True), (0.7, 0.3, False), (0.5, 0.5, True), (0.6, 0.0, True)]
)
def test_other_thresholds_match_torchvision(fg: float, bg: float, low_quality: bool) -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    assert_same_as_torchvision(grid, random_gt(60, 4), fg=fg, bg=bg, low_quality=low_quality)


def test_integer_boxes_with_many_exact_ties() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    gt = random_gt(200, 5, integer=True)
    # Duplicates (ties between gt indices) and boxes centred between grid points
    # (ties between anchors of the same gt).
    between = torch.tensor([[30.0, 30.0, 64.0, 64.0], [2.0, 2.0, 36.0, 20.0], [100.0, 100.0, 164.0, 132.0]])
    gt = torch.cat([gt, gt[:20], between, between])
    labels, matched = assert_same_as_torchvision(grid, gt)
    # A duplicated box never wins: its first copy has the lower index.
    assert not torch.isin(matched[labels == 1], torch.arange(200, 220)).any()


def test_boxes_equal_to_anchors_and_exact_iou_thresholds() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    g = torch.Generator().manual_seed(6)
    picks = torch.randint(0, grid.num_anchors, (50,), generator=g)
    gt = grid.anchors[picks].clone()
    # Boxes whose IoU with a 32x32 anchor at the origin grid is exactly 0.7 / 0.3-ish.
    gt = torch.cat([gt, torch.tensor([[-16.0, -16.0, 16.0, 16.0 * 0.7 * 2 - 16.0]])])
    labels, matched = assert_same_as_torchvision(grid, gt)
    assert (labels[picks] == 1).all()


def test_tiny_huge_and_border_boxes() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    h, w = IMAGE
    gt = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # 1 px at the corner
            [100.0, 100.0, 100.5, 103.0],  # sub-pixel width
            [0.0, 0.0, float(w), float(h)],  # the whole image
            [-300.0, -200.0, w + 300.0, h + 200.0],  # bigger than the image
            [w - 3.0, h - 40.0, float(w), float(h)],  # hugging the bottom-right border
            [-20.0, 50.0, 10.0, 90.0],  # partly outside
            [10.0, 120.0, 310.0, 124.0],  # very elongated
        ]
    )
    assert_same_as_torchvision(grid, gt)


def test_hundreds_of_boxes_on_other_layouts() -> None:
    # Single level (C4, VGG-like) with 9 anchors, offset and anchor_stride on another.
    c4 = AnchorGenerator((128, 256, 512), (0.5, 1.0, 2.0), 16)
    assert_same_as_torchvision(c4.grid([(16, 20)]), random_gt(400, 7, max_size=300.0))
    strided = AnchorGenerator(((24, 40), (80, 120)), (0.4, 1.0, 2.5), (6, 12), offset=0.5, anchor_stride=2)
    grid = strided.grid(strided.feature_shapes_for(IMAGE))
    assert_same_as_torchvision(grid, random_gt(250, 8))


def test_single_box_and_no_box() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    labels, _ = assert_same_as_torchvision(grid, torch.tensor([[50.0, 60.0, 90.0, 140.0]]))
    assert (labels == 1).sum() >= 1
    for anchors in (grid, grid.anchors):
        labels, matched = match_anchors(anchors, torch.zeros(0, 4))
        assert torch.equal(labels, torch.zeros(grid.num_anchors, dtype=torch.int64))
        assert torch.equal(matched, torch.zeros(grid.num_anchors, dtype=torch.int64))


def test_arbitrary_anchor_tensor_uses_dense_path() -> None:
    anchors = random_gt(500, 9, max_size=120.0)
    gt = random_gt(30, 10)
    expected = torchvision_match(anchors, gt)
    labels, matched = match_anchors(anchors, gt)
    assert torch.equal(labels, expected[0]) and torch.equal(matched, expected[1])


def test_chunked_paths_give_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    image = (96, 128)
    grid = FPN.grid(FPN.feature_shapes_for(image))
    gt = random_gt(80, 11, image=image, max_size=60.0)
    expected = match_anchors(grid, gt)
    assert torch.equal(expected[0], torchvision_match(grid.anchors, gt)[0])
    monkeypatch.setattr(matching, "_PAIR_BUDGET", 64)
    monkeypatch.setattr(matching, "_DENSE_BUDGET", 8000)
    monkeypatch.setattr(matching, "_TILE_SIZE", 3)
    for anchors in (grid, grid.anchors):
        labels, matched = match_anchors(anchors, gt)
        assert torch.equal(labels, expected[0]) and torch.equal(matched, expected[1])


def test_half_precision_gt_is_matched_in_fp32() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    gt = random_gt(20, 12).half()
    labels, matched = match_anchors(grid, gt)
    expected = torchvision_match(grid.anchors, gt.float())
    assert torch.equal(labels, expected[0]) and torch.equal(matched, expected[1])


def test_box_overlapping_no_anchor_makes_no_low_quality_match() -> None:
    """The documented deviation: torchvision marks every zero-IoU anchor positive."""
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    gt = random_gt(10, 13)
    far = torch.tensor([[5000.0, 5000.0, 5010.0, 5010.0]])
    with_far = torch.cat([gt, far])
    tv_labels, _ = torchvision_match(grid.anchors, with_far)
    assert (tv_labels == 1).sum() > grid.num_anchors // 2  # the flood we avoid
    expected = torchvision_match(grid.anchors, gt)
    for anchors in (grid, grid.anchors):
        labels, matched = match_anchors(anchors, with_far)
        assert torch.equal(labels, expected[0]) and torch.equal(matched, expected[1])


def test_border_filter_ignores_crossing_anchors_and_excludes_them_from_matching() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    gt = random_gt(25, 14)
    inside = matching.anchors_inside_image(grid.anchors, IMAGE, 8.0)
    assert 0 < inside.sum() < grid.num_anchors
    expected_labels, expected_matched = torchvision_match(grid.anchors[inside], gt)
    for anchors in (grid, grid.anchors):
        labels, matched = match_anchors(anchors, gt, image_size=IMAGE, allowed_border=8.0)
        assert (labels[~inside] == -1).all()
        assert torch.equal(labels[inside], expected_labels)
        assert torch.equal(matched[inside], expected_matched)
    labels, _ = match_anchors(grid, torch.zeros(0, 4), image_size=IMAGE, allowed_border=0.0)
    assert (labels[~matching.anchors_inside_image(grid.anchors, IMAGE, 0.0)] == -1).all()


def test_invalid_arguments() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    gt = random_gt(3, 15)
    with pytest.raises(ValueError, match=r"bg_iou <= fg_iou.*bg_iou=0.8, fg_iou=0.7"):
        match_anchors(grid, gt, bg_iou=0.8)
    with pytest.raises(ValueError, match="allowed_border needs image_size"):
        match_anchors(grid, gt, allowed_border=0.0)
    with pytest.raises(ValueError, match=r"gt_boxes must be \[G, 4\], got a tensor of shape \(3, 5\)"):
        match_anchors(grid, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="non-finite"):
        match_anchors(grid, torch.tensor([[0.0, 0.0, float("inf"), 5.0]]))


@pytest.mark.parametrize(
    "bad, problem",
    [
        ([30.0, 10.0, 20.0, 40.0], "is empty; expected x2 > x1"),  # x2 < x1
        ([10.0, 10.0, 40.0, 10.0], "is empty; expected x2 > x1"),  # zero height
        ([10.0, 10.0, 10.0, 10.0], "is empty; expected x2 > x1"),  # a point
        ([0.0, 0.0, float("nan"), 5.0], "has non-finite coordinates"),
    ],
)
def test_malformed_gt_box_names_its_index_and_value(bad: list[float], problem: str) -> None:
    """They used to give all-negative labels silently; the data layer raises for them too."""
    gt = torch.tensor([[4.0, 4.0, 40.0, 50.0], [60.0, 8.0, 90.0, 30.0], bad])
    for anchors in (FPN.grid(FPN.feature_shapes_for(IMAGE)), torch.tensor([[0.0, 0.0, 32.0, 32.0]])):
        with pytest.raises(ValueError, match=rf"match_anchors\(gt_boxes\): gt box 2 = \[.*\] {problem}") as caught:
            match_anchors(anchors, gt)
        if bad[2] == bad[2]:  # not NaN: the message shows the coordinates as given
            assert str(bad) in str(caught.value)


def test_small_problems_take_the_dense_path_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    gt = random_gt(2, 16)
    via_grid = match_anchors(grid, gt)
    monkeypatch.setattr(matching, "_SMALL_PROBLEM", 1 << 16)
    calls = []
    monkeypatch.setattr(matching, "_grid_summary", lambda *args: calls.append(args))
    via_dense = match_anchors(grid, gt)
    assert not calls
    assert torch.equal(via_grid[0], via_dense[0]) and torch.equal(via_grid[1], via_dense[1])


@pytest.mark.parametrize("budget", [64, 1 << 22])
def test_tiled_best_gt_equals_brute_force(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    monkeypatch.setattr(matching, "_DENSE_BUDGET", budget)
    monkeypatch.setattr(matching, "_TILE_PAIR_BUDGET", budget)
    anchors = random_gt(400, 17, max_size=60.0).round()
    gt = random_gt(40, 18, integer=True)
    gt = torch.cat([gt, gt[:5]])  # duplicates: ties between gt indices
    iou = tv_box_iou(gt, anchors)
    overlapping = iou.amax(0) > 0
    expected = iou[:, overlapping].max(dim=0).indices
    assert torch.equal(matching._best_gt_by_tiles(anchors[overlapping], gt), expected)
