"""generate_proposals: same boxes as torchvision's filter_proposals, exact early-stopping NMS."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import batched_nms

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.head import objectness_logits
from lightning_rpn.core.proposals import (
    _nms_all_levels_top,
    _nms_per_level_top,
    generate_proposals,
    proposal_candidates,
    select_image_proposals,
)


IMAGE_SIZES = [(256, 320), (200, 288)]  # two images of different sizes, padded to 256 x 320


def _inputs(seed: int, batch_sizes=IMAGE_SIZES, delta_scale: float = 0.6):
    generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
    anchors = generator(generator.feature_shapes_for((256, 320)))
    counts = [a.shape[0] for a in anchors]
    rng = torch.Generator().manual_seed(seed)
    batch = len(batch_sizes)
    objectness = [torch.randn(batch, n, generator=rng) * 2 for n in counts]
    deltas = [torch.randn(batch, n, 4, generator=rng) * delta_scale for n in counts]
    return objectness, deltas, anchors, counts


def _torchvision(objectness, deltas, anchors, counts, image_sizes, pre, post, nms, min_size, score):
    rpn = RegionProposalNetwork(
        None, TVRPNHead(1, 1), 0.7, 0.3, 256, 0.5,
        {"training": pre, "testing": pre}, {"training": post, "testing": post}, nms, score_thresh=score,
    ).eval()
    rpn.min_size = min_size
    batch = len(image_sizes)
    all_deltas = torch.cat(deltas, dim=1).reshape(-1, 4)
    all_anchors = torch.cat(anchors).repeat(batch, 1)
    proposals = rpn.box_coder.decode_single(all_deltas, all_anchors).view(batch, -1, 4)
    boxes, scores = rpn.filter_proposals(proposals, torch.cat(objectness, dim=1), image_sizes, counts)
    return list(zip(boxes, scores))


def _canonical(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Boxes by descending score, equal scores ordered by coordinates (torchvision's tie order
    comes from an unstable sort; see the proposals module docstring)."""
    order = torch.arange(boxes.shape[0])
    for column in (3, 2, 1, 0):
        order = order[boxes[order, column].sort(stable=True).indices]
    order = order[scores[order].sort(descending=True, stable=True).indices]
    return boxes[order]


def _assert_same(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for (boxes, scores), (tv_boxes, tv_scores) in zip(ours, theirs):
        assert boxes.dtype == scores.dtype == torch.float32
        assert torch.equal(scores, tv_scores)  # same scores, same order
        assert torch.equal(_canonical(boxes, scores), _canonical(tv_boxes, tv_scores))


SETTINGS = [
    # pre_nms_top_n, post_nms_top_n, nms_thresh, min_size, score_thresh
    (1000, 1000, 0.7, 1e-3, 0.0),
    (2000, 300, 0.7, 1e-3, 0.0),
    (300, 500, 0.5, 8.0, 0.0),
    (150, 100, 0.7, 1e-3, 0.6),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("settings", SETTINGS)
def test_same_boxes_as_torchvision_filter_proposals(seed: int, settings) -> None:
    pre, post, nms, min_size, score = settings
    objectness, deltas, anchors, counts = _inputs(seed)
    ours = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, pre, post, nms, min_size, score)
    theirs = _torchvision(objectness, deltas, anchors, counts, IMAGE_SIZES, pre, post, nms, min_size, score)
    _assert_same(ours, theirs)
    assert all(b.shape[0] > 0 for b, _ in ours)


@pytest.mark.parametrize("settings", SETTINGS[:2])
@pytest.mark.parametrize("nms_method", ["early_stop", "batched", "per_level"])
def test_every_nms_method_gives_torchvisions_boxes(settings, nms_method: str) -> None:
    objectness, deltas, anchors, counts = _inputs(5)
    ours = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, *settings, nms_method=nms_method)
    _assert_same(ours, _torchvision(objectness, deltas, anchors, counts, IMAGE_SIZES, *settings))


def test_proposals_are_clipped_sorted_probabilities() -> None:
    objectness, deltas, anchors, _ = _inputs(4, delta_scale=2.0)
    results = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, 500, 400)
    for (boxes, scores), (h, w) in zip(results, IMAGE_SIZES):
        assert boxes.shape == (400, 4) and scores.shape == (400,)
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        assert ((scores > 0) & (scores < 1)).all()
        assert (scores[:-1] >= scores[1:]).all()


def _reference_top(boxes, scores, levels, iou, keep):
    kept = batched_nms(boxes, scores, levels, iou)
    return kept[scores[kept].sort(descending=True, stable=True).indices][:keep]


@pytest.mark.parametrize("max_keep", [1, 7, 40, 1000])
def test_early_stopping_nms_equals_full_nms(max_keep: int) -> None:
    # Dense clusters of near-duplicates: most boxes are suppressed, so the window must grow.
    rng = torch.Generator().manual_seed(5)
    counts = [300, 200, 100]
    boxes, logits = [], []
    for count in counts:
        centres = torch.rand(8, 2, generator=rng) * 200
        pick = torch.randint(0, 8, (count,), generator=rng)
        xy = centres[pick] + torch.randn(count, 2, generator=rng)
        size = 20 + torch.rand(count, 1, generator=rng) * 4
        boxes.append(torch.cat((xy, xy + size), dim=1))
        logits.append(torch.randn(count, generator=rng).sort(descending=True).values)
    boxes_all, logits_all = torch.cat(boxes), torch.cat(logits)
    levels = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    expected = _reference_top(boxes_all, logits_all, levels, 0.5, max_keep)
    assert torch.equal(_nms_per_level_top(boxes_all, logits_all, counts, 0.5, max_keep), expected)
    # The one-call variant used on CUDA keeps the same boxes in the same order.
    assert torch.equal(_nms_all_levels_top(boxes_all, logits_all, levels, 0.5, max_keep), expected)


def test_empty_results_when_everything_is_filtered() -> None:
    objectness, deltas, anchors, _ = _inputs(0)
    results = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, score_thresh=1.0)
    for boxes, scores in results:
        assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_no_gradients_and_softmax_pairs() -> None:
    objectness, deltas, anchors, _ = _inputs(2)
    pairs = [torch.stack((torch.zeros_like(o), o), dim=-1).requires_grad_(True) for o in objectness]
    logits = [objectness_logits(p) for p in pairs]
    from_pairs = generate_proposals(logits, deltas, anchors, IMAGE_SIZES, 200, 100)
    direct = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, 200, 100)
    for (b1, s1), (b2, s2) in zip(from_pairs, direct):
        assert not b1.requires_grad and not s1.requires_grad
        assert torch.equal(b1, b2) and torch.equal(s1, s2)


def test_custom_box_coder_is_used() -> None:
    objectness, deltas, anchors, _ = _inputs(3)
    plain = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, 50, 20)
    weighted = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, 50, 20, box_coder=BoxCoder((10, 10, 5, 5)))
    assert not torch.equal(plain[0][0], weighted[0][0])


def test_bad_inputs_are_named() -> None:
    objectness, deltas, anchors, _ = _inputs(0)
    with pytest.raises(ValueError, match="objectness_logits"):
        generate_proposals([o[..., None].expand(-1, -1, 2) for o in objectness], deltas, anchors, IMAGE_SIZES)
    with pytest.raises(ValueError, match=r"objectness\[0\] has 2 images but image_sizes has 1"):
        generate_proposals(objectness, deltas, anchors, IMAGE_SIZES[:1])
    with pytest.raises(ValueError, match=r"anchors\[1\]"):
        generate_proposals(objectness, deltas, [anchors[0], anchors[0], *anchors[2:]], IMAGE_SIZES)
    with pytest.raises(ValueError, match="levels"):
        generate_proposals(objectness, deltas[:-1], anchors, IMAGE_SIZES)
    with pytest.raises(ValueError, match=r"nms_thresh must be in \[0, 1\], got 1.5"):  # suppressed nothing
        generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, nms_thresh=1.5)


@pytest.mark.parametrize("settings", [(1000, 1000, 0.7, 1e-3, 0.0), (300, 40, 0.5, 8.0, 0.6)])
def test_nms_methods_select_the_same_proposals(settings) -> None:
    # The exported program's "per_level" form and the eager "early_stop" / "batched" forms.
    pre, post, nms, min_size, score = settings
    objectness, deltas, anchors, _ = _inputs(6)
    sizes = torch.tensor(IMAGE_SIZES)
    boxes, logits, probs, valid, counts = proposal_candidates(
        objectness, deltas, anchors, sizes, pre, min_size, score, BoxCoder()
    )
    assert boxes.shape[:2] == logits.shape == probs.shape == valid.shape and sum(counts) == boxes.shape[1]
    assert 0 < int(valid.sum()) < valid.numel()
    eager = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, pre, post, nms, min_size, score)
    for image, (eager_boxes, eager_scores) in enumerate(eager):
        chosen = [
            select_image_proposals(boxes[image], logits[image], valid[image], counts, nms, post, method)
            for method in ("early_stop", "batched", "per_level")
        ]
        assert chosen[0].numel() > 0
        assert all(torch.equal(c, chosen[0]) for c in chosen[1:])
        assert torch.equal(boxes[image, chosen[0]], eager_boxes) and torch.equal(probs[image, chosen[0]], eager_scores)
    with pytest.raises(ValueError, match="nms_method must be one of .* got 'greedy'"):
        select_image_proposals(boxes[0], logits[0], valid[0], counts, nms, post, "greedy")


class _PerLevel(torch.nn.Module):
    """One image's ``per_level`` selection over two levels of ``K / 2`` candidates each."""

    def forward(self, boxes: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        half = boxes.shape[0] // 2
        return select_image_proposals(boxes, logits, valid, [half, boxes.shape[0] - half], 0.5, 10, "per_level")


@pytest.mark.filterwarnings("ignore:`create_unbacked_symint` is deprecated:FutureWarning")
def test_exported_per_level_nms_runs_when_a_level_keeps_fewer_than_two_boxes() -> None:
    """torchvision's fake nms kernel declares >= 2 kept boxes, which the program asserts at run time."""
    rng = torch.Generator().manual_seed(0)
    corners = torch.rand(12, 2, generator=rng) * 40
    boxes = torch.cat((corners, corners + 8), dim=1)
    logits = torch.randn(2, 6, generator=rng).sort(dim=1, descending=True).values.reshape(12)  # as candidates come
    size = torch.export.Dim("half", min=2, max=100) * 2
    program = torch.export.export(
        _PerLevel(), (boxes, logits, torch.ones(12, dtype=torch.bool)),
        dynamic_shapes={"boxes": {0: size}, "logits": {0: size}, "valid": {0: size}},
    ).module()
    same = torch.tensor([[5.0, 5.0, 20.0, 20.0]]).repeat(8, 1)  # level 0 keeps 1; level 1 none valid
    cases = [
        (boxes, logits, torch.ones(12, dtype=torch.bool)),
        (same, torch.arange(8.0).flip(0), torch.tensor([True] * 4 + [False] * 4)),
        (same, torch.arange(8.0).flip(0), torch.zeros(8, dtype=torch.bool)),
    ]
    for case_boxes, case_logits, case_valid in cases:
        expected = select_image_proposals(case_boxes, case_logits, case_valid, [len(case_valid) // 2] * 2, 0.5, 10,
                                          "early_stop")
        assert torch.equal(program(case_boxes, case_logits, case_valid), expected)
    assert [len(select_image_proposals(*case, [len(case[2]) // 2] * 2, 0.5, 10, "early_stop")) for case in cases] == [
        10, 1, 0
    ]
