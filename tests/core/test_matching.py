"""match_anchors: decisions identical to torchvision's Matcher + RPN label mapping, on every backend.

Every test runs with ``backend="compiled"`` (the CPU spatial-index kernel) and
``backend="torch"`` (the chunked tensor backend of other devices), selected by parameter, on
plain anchor tensors of several layouts.
"""

from __future__ import annotations

import pytest
import torch

from lightning_rpn import cpu_kernels, matching
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.matching import anchors_inside_image, match_anchors, match_anchors_batched

from helpers.matching import IMAGE, random_gt, torchvision_match

FPN = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
BACKENDS = ["compiled", "torch"]


def fpn_anchors(image=IMAGE) -> torch.Tensor:
    """torchvision-style plain anchors: the per-level tensors concatenated (a fresh tensor)."""
    return torch.cat(FPN(FPN.feature_shapes_for(image)))



def assert_same_as_torchvision(anchors, gt, backend, fg=0.7, bg=0.3, low_quality=True):
    expected = torchvision_match(anchors, gt, fg, bg, low_quality)
    labels, matched = match_anchors(anchors, gt, fg, bg, low_quality, backend=backend)
    assert labels.dtype == matched.dtype == torch.int64
    assert torch.equal(labels, expected[0])
    assert torch.equal(matched, expected[1])
    return labels, matched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("num_gt", "seed"), [(1, 0), (7, 1), (40, 2), (300, 3)])
def test_random_boxes_match_torchvision(num_gt: int, seed: int, backend: str) -> None:
    labels, _ = assert_same_as_torchvision(fpn_anchors(), random_gt(num_gt, seed), backend)
    assert (labels == 1).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("fg", "bg", "low_quality"),
    [(0.5, 0.4, True), (0.7, 0.3, False), (0.5, 0.5, True), (0.6, 0.0, True), (0.0, 0.0, True), (0.9, 0.05, True)],
)
def test_other_thresholds_match_torchvision(fg: float, bg: float, low_quality: bool, backend: str) -> None:
    assert_same_as_torchvision(fpn_anchors(), random_gt(60, 4), backend, fg, bg, low_quality)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_boxes_with_many_exact_ties(backend: str) -> None:
    gt = random_gt(200, 5, integer=True)
    # Duplicates (ties between gt indices) and boxes centred between grid points
    # (ties between anchors of the same gt).
    between = torch.tensor([[30.0, 30.0, 64.0, 64.0], [2.0, 2.0, 36.0, 20.0], [100.0, 100.0, 164.0, 132.0]])
    gt = torch.cat([gt, gt[:20], between, between])
    labels, matched = assert_same_as_torchvision(fpn_anchors(), gt, backend)
    # A duplicated box never wins: its first copy has the lower index.
    assert not torch.isin(matched[labels == 1], torch.arange(200, 220)).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes_equal_to_anchors_and_exact_iou_thresholds(backend: str) -> None:
    anchors = fpn_anchors()
    picks = torch.randint(0, anchors.shape[0], (50,), generator=torch.Generator().manual_seed(6))
    gt = torch.cat([anchors[picks], torch.tensor([[-16.0, -16.0, 16.0, 16.0 * 0.7 * 2 - 16.0]])])
    labels, _ = assert_same_as_torchvision(anchors, gt, backend)
    assert (labels[picks] == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_huge_and_border_boxes(backend: str) -> None:
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
    assert_same_as_torchvision(fpn_anchors(), gt, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_generator_layouts(backend: str) -> None:
    # Single level (C4, VGG-like) with 9 anchors, offset and anchor_stride on another.
    c4 = AnchorGenerator((128, 256, 512), (0.5, 1.0, 2.0), 16)
    assert_same_as_torchvision(torch.cat(c4([(16, 20)])), random_gt(400, 7, max_size=300.0), backend)
    strided = AnchorGenerator(((24, 40), (80, 120)), (0.4, 1.0, 2.5), (6, 12), offset=0.5, anchor_stride=2)
    assert_same_as_torchvision(torch.cat(strided(strided.feature_shapes_for(IMAGE))), random_gt(250, 8), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_anchor_order(backend: str) -> None:
    anchors = fpn_anchors()
    order = torch.randperm(anchors.shape[0], generator=torch.Generator().manual_seed(20))
    gt = random_gt(80, 21, integer=True)
    labels, matched = assert_same_as_torchvision(anchors[order], gt, backend)
    plain = match_anchors(anchors, gt, backend=backend)
    assert torch.equal(labels, plain[0][order]) and torch.equal(matched, plain[1][order])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_generators_concatenated(backend: str) -> None:
    other = AnchorGenerator(((20, 28),), (0.3, 1.0, 3.0), (10,), offset=0.5)
    anchors = torch.cat([fpn_anchors(), torch.cat(other(other.feature_shapes_for(IMAGE)))])
    assert_same_as_torchvision(anchors, random_gt(150, 22), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_anchors_outside_the_image_and_degenerate(backend: str) -> None:
    # Anchors scattered far outside the image, of any size and aspect, some with zero area.
    g = torch.Generator().manual_seed(23)
    xy = torch.rand(3000, 2, generator=g) * 1400.0 - 500.0
    wh = torch.exp(torch.rand(3000, 2, generator=g) * 7.0)
    anchors = torch.cat([xy, xy + wh], dim=1)
    anchors[:40, 2] = anchors[:40, 0]  # zero width
    anchors = torch.cat([anchors, anchors[:100]])  # duplicated anchors: ties between anchors
    assert_same_as_torchvision(anchors, random_gt(120, 24, max_size=300.0), backend)
    assert_same_as_torchvision(anchors, random_gt(60, 25, integer=True), backend, 0.5, 0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_quality_anchor_takes_its_best_gt_from_a_much_larger_box(backend: str) -> None:
    """An anchor that is a tiny box's best (IoU 0.035) overlaps a large box more (IoU 0.1):
    the large box's pairs with anchors of that size can reach neither bg_iou nor its own best,
    so the compiled kernel skips them, and still the anchor is matched to the large box."""
    anchors = fpn_anchors()
    gt = torch.tensor([[100.0, 100.0, 200.0, 200.0], [125.0, 125.0, 131.0, 131.0]])
    labels, matched = assert_same_as_torchvision(anchors, gt, backend)
    tiny_best = torchvision_match(anchors, gt[1:])[0] == 1
    assert tiny_best.any() and (labels[tiny_best] == 1).all() and (matched[tiny_best] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_five_thousand_boxes(backend: str) -> None:
    anchors = fpn_anchors((96, 128))  # small, so that torchvision's dense matrix stays small
    gt = torch.cat([random_gt(4000, 26, image=(96, 128), max_size=60.0), random_gt(1000, 27, image=(96, 128), integer=True)])
    assert_same_as_torchvision(anchors, gt, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_box_and_no_box(backend: str) -> None:
    anchors = fpn_anchors()
    labels, _ = assert_same_as_torchvision(anchors, torch.tensor([[50.0, 60.0, 90.0, 140.0]]), backend)
    assert (labels == 1).sum() >= 1
    for fg, bg in ((0.7, 0.3), (0.0, 0.0)):  # all negatives, whatever the thresholds
        labels, matched = match_anchors(anchors, torch.zeros(0, 4), fg, bg, backend=backend)
        assert torch.equal(labels, torch.zeros(anchors.shape[0], dtype=torch.int64))
        assert torch.equal(matched, torch.zeros(anchors.shape[0], dtype=torch.int64))
    labels, _ = match_anchors(torch.zeros(0, 4), random_gt(3, 28), backend=backend)
    assert labels.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_gt_is_matched_in_fp32(backend: str) -> None:
    anchors = fpn_anchors()
    gt = random_gt(20, 12).half()
    labels, matched = match_anchors(anchors, gt, backend=backend)
    expected = torchvision_match(anchors, gt.float())
    assert torch.equal(labels, expected[0]) and torch.equal(matched, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_overlapping_no_anchor_makes_no_low_quality_match(backend: str) -> None:
    """The documented deviation: torchvision marks every zero-IoU anchor positive."""
    anchors = fpn_anchors()
    gt = random_gt(10, 13)
    with_far = torch.cat([gt, torch.tensor([[5000.0, 5000.0, 5010.0, 5010.0]])])
    tv_labels, _ = torchvision_match(anchors, with_far)
    assert (tv_labels == 1).sum() > anchors.shape[0] // 2  # the flood we avoid
    expected = torchvision_match(anchors, gt)
    labels, matched = match_anchors(anchors, with_far, backend=backend)
    assert torch.equal(labels, expected[0]) and torch.equal(matched, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("border", [0.0, 8.0])
def test_border_filter_ignores_crossing_anchors_and_excludes_them_from_matching(backend: str, border: float) -> None:
    anchors = fpn_anchors()
    gt = random_gt(25, 14)
    inside = anchors_inside_image(anchors, IMAGE, border)
    assert 0 < inside.sum() < anchors.shape[0]
    expected_labels, expected_matched = torchvision_match(anchors[inside], gt)
    labels, matched = match_anchors(anchors, gt, image_size=IMAGE, allowed_border=border, backend=backend)
    assert (labels[~inside] == -1).all() and (matched[~inside] == 0).all()
    assert torch.equal(labels[inside], expected_labels)
    assert torch.equal(matched[inside], expected_matched)
    labels, _ = match_anchors(anchors, torch.zeros(0, 4), image_size=IMAGE, allowed_border=border, backend=backend)
    assert (labels[~inside] == -1).all() and (labels[inside] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_crowd_regions_ignore_covered_non_positive_anchors(backend: str) -> None:
    anchors = fpn_anchors()
    gt = random_gt(15, 29)
    crowd = torch.tensor([[0.0, 150.0, 140.0, 256.0], [200.0, 0.0, 320.0, 60.0]])
    labels, matched = match_anchors_batched(anchors, [gt], crowd_boxes=[crowd], crowd_ioa=0.7, backend=backend)
    plain, plain_matched = torchvision_match(anchors, gt)
    a = anchors[:, None]
    inter_w = (torch.minimum(a[..., 2], crowd[:, 2]) - torch.maximum(a[..., 0], crowd[:, 0])).clamp(min=0)
    inter_h = (torch.minimum(a[..., 3], crowd[:, 3]) - torch.maximum(a[..., 1], crowd[:, 1])).clamp(min=0)
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    covered = (inter_w * inter_h / area[:, None]).amax(dim=1) >= 0.7
    assert covered.any() and (plain[covered] == 1).any()
    expected = plain.masked_fill(covered & (plain != 1), -1)  # crowd never touches positives
    assert torch.equal(labels[0], expected) and torch.equal(matched[0], plain_matched)
    unused, _ = match_anchors_batched(anchors, [gt], crowd_boxes=[crowd], backend=backend)  # no crowd_ioa
    assert torch.equal(unused[0], plain)


def test_the_index_is_cached_by_value_and_rebuilt_after_an_in_place_change() -> None:
    anchors = fpn_anchors()
    gt = random_gt(30, 30)
    first = match_anchors(anchors, gt, backend="compiled")
    index = cpu_kernels.anchor_index(anchors)
    assert cpu_kernels.anchor_index(anchors) is index
    assert cpu_kernels.anchor_index(anchors.clone()) is index  # torchvision's generator: new tensors each call
    anchors.add_(7.0)  # new values: a new index, and labels for the new anchors
    assert cpu_kernels.anchor_index(anchors) is not index
    moved = match_anchors(anchors, gt, backend="compiled")
    assert torch.equal(moved[0], torchvision_match(anchors, gt)[0]) and not torch.equal(moved[0], first[0])


@pytest.mark.parametrize("write", ["numpy: rows reversed", "numpy: one anchor moved", ".data: shifted"])
def test_a_write_the_version_counter_misses_still_rebuilds_the_index(write: str) -> None:
    anchors = fpn_anchors()  # as torch.from_numpy(buffer): writes to the buffer reach the tensor
    gt = random_gt(30, 32)
    match_anchors(anchors, gt, backend="compiled")  # caches the index of the values before the write
    version = anchors._version
    if write == "numpy: rows reversed":  # same values, other rows: the sum does not change
        anchors.numpy()[:] = anchors.numpy()[::-1].copy()
    elif write == "numpy: one anchor moved":
        anchors.numpy()[len(anchors) // 3] = gt[0].numpy()
    else:
        anchors.data.add_(7.0)
    assert anchors._version == version  # the tensor's version counter did not see the write
    labels, matched = match_anchors(anchors, gt, backend="compiled")
    expected = match_anchors(anchors, gt, backend="torch")
    assert torch.equal(labels, expected[0]) and torch.equal(matched, expected[1])


def test_an_inference_tensor_reuses_its_index_until_its_values_change() -> None:
    with torch.inference_mode():
        anchors = fpn_anchors()
        index = cpu_kernels.anchor_index(anchors)
        assert cpu_kernels.anchor_index(anchors) is index
        anchors.add_(7.0)  # inference tensors have no version counter
        assert cpu_kernels.anchor_index(anchors) is not index


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_anchors_match_through_the_torch_backend(backend: str) -> None:
    anchors, gt = fpn_anchors(), random_gt(200, 31, integer=True)
    labels, matched = match_anchors(anchors.cuda(), gt.cuda(), backend=backend)
    expected = match_anchors(anchors, gt, backend="compiled")
    assert labels.is_cuda and torch.equal(labels.cpu(), expected[0]) and torch.equal(matched.cpu(), expected[1])


def test_invalid_arguments() -> None:
    anchors = fpn_anchors()
    gt = random_gt(3, 15)
    with pytest.raises(ValueError, match=r"bg_iou <= fg_iou.*bg_iou=0.8, fg_iou=0.7"):
        match_anchors(anchors, gt, bg_iou=0.8)
    with pytest.raises(ValueError, match="allowed_border needs image_size"):
        match_anchors(anchors, gt, allowed_border=0.0)
    with pytest.raises(ValueError, match=r"gt_boxes must be \[G, 4\], got a tensor of shape \(3, 5\)"):
        match_anchors(anchors, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"anchors must be \[N, 4\] or an AnchorGrid, got a tensor of shape \(4,\)"):
        match_anchors(torch.zeros(4), gt)
    with pytest.raises(ValueError, match="non-finite"):
        match_anchors(anchors, torch.tensor([[0.0, 0.0, float("inf"), 5.0]]))
    with pytest.raises(ValueError, match="backend must be one of .* got 'numba'"):
        match_anchors(anchors, gt, backend="numba")  # type: ignore[arg-type]
    bad = anchors.clone()
    bad[3, 1] = float("nan")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="match_anchors: anchors must be finite"):
            match_anchors(bad, gt, backend=backend)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='compiled' runs on the CPU"):
            matching.resolve_backend("compiled", torch.device("meta"), "match_anchors")


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


def test_an_anchor_grid_stands_for_its_anchors() -> None:
    grid = FPN.grid(FPN.feature_shapes_for(IMAGE))
    gt = random_gt(40, 32)
    via_grid = match_anchors(grid, gt)
    via_tensor = match_anchors(grid.anchors.clone(), gt)
    assert torch.equal(via_grid[0], via_tensor[0]) and torch.equal(via_grid[1], via_tensor[1])
