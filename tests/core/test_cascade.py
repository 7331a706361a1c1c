"""Cascade refinement: adaptive-convolution offsets and centre-region assignment by hand, the stages.

Its export and the torchvision drop-in are tested with those (tests/tools/).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from lightning_rpn.core.adaptive_conv import adaptive_conv2d
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.cascade import (
    CascadeRPN, adaptive_offsets, assign_centre_region, best_levels, gt_levels, own_level_positives,
)
from lightning_rpn.core.config import ProposalConfig
from lightning_rpn.core.loss import NonFiniteLossError
from lightning_rpn.core.matching import match_anchors_batched
from lightning_rpn.core.targets import AnchorTargetConfig


def test_adaptive_offsets_by_hand() -> None:
    # level of stride 4, origin 0, a 2 x 3 map; every location holds the box (4, 0, 20, 8) pixels,
    # in feature coordinates (1, 0, 5, 2): centre (x 3, y 1), half sizes (2, 1).
    boxes = torch.tensor([4.0, 0, 20, 8]).expand(1, 6, 4)
    offsets = adaptive_offsets(boxes, 2, 3, 4.0, 0.0)
    assert offsets.shape == (1, 18, 2, 3)
    # location (y 0, x 1): point (i, j) goes to (1 + i, 3 + 2 j) from (0 + i, 1 + j): dy 1, dx 2 + j
    expected = torch.tensor([[1.0, 1 + 1 * j] for _ in range(3) for j in (0, 1, 2)]).reshape(18)
    torch.testing.assert_close(offsets[0, :, 0, 1], expected)
    # with origin 2 (anchor offset 0.5) the box is (0.5, -0.5, 4.5, 1.5): centre (2.5, 0.5)
    shifted = adaptive_offsets(boxes, 2, 3, 4.0, 2.0)
    torch.testing.assert_close(shifted[0, 0::2, 0, 1], torch.full((9,), 0.5))
    torch.testing.assert_close(shifted[0, 1::2, 0, 1], torch.tensor([0.5, 1.5, 2.5] * 3))


@pytest.mark.parametrize("conv", [lambda *a: deform_conv2d(*a, padding=(1, 1)), adaptive_conv2d],
                         ids=["deform_conv2d", "adaptive_conv2d"])
def test_adaptive_convolution_samples_the_box_points(conv) -> None:
    # value 10 y + x; location (0, 1) with the box above samples (y, x) = (1 + i, 3 + 2 j)
    image = (10 * torch.arange(4.0)[:, None] + torch.arange(6.0)[None]).reshape(1, 1, 4, 6)
    offsets = adaptive_offsets(torch.tensor([4.0, 0, 20, 8]).expand(1, 24, 4), 4, 6, 4.0, 0.0)
    for (i, j), value in {(-1, 1): 5.0, (1, -1): 21.0, (0, 0): 13.0}.items():
        weight = torch.zeros(1, 1, 3, 3)
        weight[0, 0, i + 1, j + 1] = 1.0
        out = conv(image, offsets, weight)
        assert out[0, 0, 0, 1].item() == pytest.approx(value)


def _grid():
    generator = AnchorGenerator(((16,), (32,)), ((1.0,),), (4, 8))
    return generator, generator.grid([(8, 8), (4, 4)])


def test_centre_region_assignment_by_hand() -> None:
    _, grid = _grid()
    gt = torch.tensor([
        [0.0, 0, 16, 16],  # size 16 -> level 0; centre (8, 8)
        [2, 2, 30, 30],  # size 28 -> level 1 (|log2 28/32| < |log2 28/16|); region +-2.8 -> (16, 16)
        [13, 13, 15, 15],  # size 2 -> level 0; no centre in +-0.2: the nearest, round(14 / 4) = 4
        [6, 6, 10, 10],  # size 4 -> level 0; region +-0.4 -> (8, 8), which box 0 claims too
    ])
    positive, matched = assign_centre_region(grid, gt, 0.2)
    # ratio 0.2: box 0's region is +-1.6 -> (8, 8) only, where box 3 (smaller) wins
    expected = {2 * 8 + 2: 3, 64 + 2 * 4 + 2: 1, 4 * 8 + 4: 2}
    assert sorted(torch.nonzero(positive).squeeze(1).tolist()) == sorted(expected)
    assert {row: int(matched[row]) for row in expected} == expected
    wide, which = assign_centre_region(grid, gt[:1], 0.5)  # region +-4 -> x, y in {4, 8, 12}
    rows = [y * 8 + x for y in (1, 2, 3) for x in (1, 2, 3)]
    assert torch.nonzero(wide).squeeze(1).tolist() == rows and which[rows].eq(0).all()
    none, _ = assign_centre_region(grid, torch.zeros(0, 4), 0.2)
    assert not none.any()


def _dense_centre_region(grid, gt_boxes, centre_ratio):
    """The centre-region rule written out over every box x location of a level (what
    assign_centre_region computed until 2026-12-07, ``[G, H, W]`` memory per level)."""
    positive = torch.zeros(grid.anchors.shape[0], dtype=torch.bool)
    matched = torch.zeros(grid.anchors.shape[0], dtype=torch.int64)
    gt = gt_boxes.float()
    width, height = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    centre_x, centre_y = (gt[:, 0] + gt[:, 2]) * 0.5, (gt[:, 1] + gt[:, 3]) * 0.5
    level_of = gt_levels(grid, gt)
    for index, level in enumerate(grid.levels):
        chosen = torch.nonzero(level_of == index).squeeze(1)
        if chosen.numel() == 0:
            continue
        xs = level.origin + torch.arange(level.width, dtype=torch.float32) * level.step
        ys = level.origin + torch.arange(level.height, dtype=torch.float32) * level.step
        in_x = (xs[None] - centre_x[chosen, None]).abs() <= centre_ratio * width[chosen, None] * 0.5
        in_y = (ys[None] - centre_y[chosen, None]).abs() <= centre_ratio * height[chosen, None] * 0.5
        inside = in_y[:, :, None] & in_x[:, None, :]
        near_x = ((centre_x[chosen] - level.origin) / level.step).round().clamp(0, level.width - 1).long()
        near_y = ((centre_y[chosen] - level.origin) / level.step).round().clamp(0, level.height - 1).long()
        inside[torch.arange(chosen.numel()), near_y, near_x] = True
        claimed = torch.where(inside, (width * height)[chosen, None, None], torch.tensor(float("inf")))
        smallest, which = claimed.reshape(chosen.numel(), -1).min(dim=0)
        rows = level.start + torch.arange(level.height * level.width)
        hit = torch.isfinite(smallest)
        positive[rows[hit]] = True
        matched[rows[hit]] = chosen[which[hit]]
    return positive, matched


@pytest.mark.parametrize("centre_ratio", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_centre_region_assignment_agrees_with_the_rule_over_every_location(centre_ratio: float, seed: int) -> None:
    """Windows around each region give the rule's result over all locations: boxes across the
    border and outside the image, empty ones, copies and equal areas (the first box wins a tie)."""
    generator = torch.Generator().manual_seed(seed)
    anchors = AnchorGenerator(((16,), (32,), (64,)), ((1.0,),), (4, 8, 16))
    grid = anchors.grid([(30, 41), (15, 21), (8, 11)])  # a 120 x 164 image, origin 0
    corner = torch.rand(60, 2, generator=generator) * torch.tensor([190.0, 150.0]) - 15
    size = torch.rand(60, 2, generator=generator) ** 2 * 90
    gt = torch.cat([corner, corner + size], 1)
    gt[5:10] = gt[0]  # copies: equal areas at the same locations
    gt[10:15, 2:] = gt[10:15, :2]  # empty boxes
    gt[15:20] = gt[20:25] + torch.tensor([3.0, 0, 3, 0])  # equal areas, overlapping regions
    positive, matched = assign_centre_region(grid, gt, centre_ratio)
    expected_positive, expected_matched = _dense_centre_region(grid, gt, centre_ratio)
    assert positive.sum() > 20
    assert torch.equal(positive, expected_positive) and torch.equal(matched, expected_matched)


def test_own_level_positives_by_hand() -> None:
    _, grid = _grid()
    gt = torch.tensor([[0.0, 0, 16, 16], [2, 2, 30, 30], [0, 0, 8, 8]])
    assert gt_levels(grid, gt).tolist() == [0, 1, 0]  # sizes 16, 28, 8 against anchors 16 and 32
    levels = torch.tensor([0, 0, 0, 1, 1, 1])
    positive = torch.tensor([True, False, True, True, True, True])
    matched = torch.tensor([0, 0, 1, 0, 1, 2])
    # gt 0 (level 0): row 0 kept, row 3 (level 1) dropped; gt 1 (level 1): row 4 kept, row 2 dropped;
    # gt 2 (level 0) has its only positive on level 1 (row 5): kept
    own = own_level_positives(positive, matched, levels, gt_levels(grid, gt))
    assert own.tolist() == [True, False, False, False, True, True]
    assert own_level_positives(positive, matched, levels, torch.zeros(0, dtype=torch.int64)).equal(positive)


def test_best_levels_by_hand() -> None:
    levels = torch.tensor([0, 0, 1, 1, 2])
    positive = torch.tensor([True, True, True, False, True])
    matched = torch.tensor([0, 1, 0, 1, 1])
    ious = torch.tensor([0.6, 0.9, 0.8, 0.99, 0.7])  # row 3's 0.99 is not a positive
    # gt 0: rows 0 (0.6, level 0) and 2 (0.8, level 1) -> 1; gt 1: rows 1 (0.9, level 0) and 4 -> 0; gt 2: none
    assert best_levels(positive, matched, ious, levels, 3).tolist() == [1, 0, -1]
    own = own_level_positives(positive, matched, levels, best_levels(positive, matched, ious, levels, 3))
    assert own.tolist() == [False, True, True, False, False]
    nothing = torch.zeros(5, dtype=torch.bool)
    assert best_levels(nothing, torch.zeros(5, dtype=torch.int64), ious, levels, 0).shape == (0,)


def _cascade(**kwargs) -> CascadeRPN:
    generator, _ = _grid()
    settings = dict(in_channels=8, target_config=AnchorTargetConfig(fg_iou=0.5, batch_size_per_image=64),
                    post_nms_top_n_test=30, seed=5)
    return CascadeRPN(generator, **{**settings, **kwargs})


TARGETS = [{"boxes": torch.tensor([[4.0, 6, 20, 24], [14, 2, 30, 18]])}, {"boxes": torch.tensor([[8.0, 8, 24, 20]])}]


@pytest.mark.parametrize("stages", [2, 3])
def test_every_stage_trains_and_proposals_come_from_the_last(stages: int) -> None:
    torch.manual_seed(0)
    rpn = _cascade(num_stages=stages).train()
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    proposals, losses = rpn(features, [(32, 32), (32, 32)], TARGETS, image_ids=[0, 1])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_reg"} and all(v.isfinite() for v in losses.values())
    (losses["loss_rpn_cls"] + losses["loss_rpn_reg"]).backward()
    assert len(rpn.stages) == stages and all(p.grad is not None and p.grad.abs().sum() > 0 for p in rpn.parameters())
    assert rpn.stages[-1].cls_logits is not None and all(s.cls_logits is None for s in rpn.stages[:-1])
    assert [tuple(b.shape[1:]) for b, _ in proposals] == [(4,), (4,)]
    rpn.eval()
    again, _ = rpn(features, [(32, 32), (32, 32)], proposal_logits=True)
    assert len(again[0]) == 3 and again[0][0].shape[0] <= 30


@pytest.mark.parametrize("mode", ["size", "best"])
def test_own_level_objectness_changes_only_the_objectness_labels(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    import lightning_rpn.core.cascade as cascade

    labels_seen: list[torch.Tensor] = []
    original = cascade.F.binary_cross_entropy_with_logits

    def spy(logits, labels, *args, **kwargs):
        labels_seen.append(labels.clone())
        return original(logits, labels, *args, **kwargs)

    monkeypatch.setattr(cascade.F, "binary_cross_entropy_with_logits", spy)
    features = [torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1)),
                torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))]
    # fg IoU 0.4, so that the near-anchor stage-1 boxes of both levels match these boxes: image 0's
    # (size 22, own level 0) has 9 positives on level 0 and 1 on level 1, image 1's (size 24,
    # own level 1) 9 on level 0 and 5 on level 1
    targets = [{"boxes": torch.tensor([[5.0, 5, 27, 27]])}, {"boxes": torch.tensor([[4.0, 4, 28, 28]])}]
    losses = {}
    empty = [{"boxes": torch.zeros(0, 4)}, targets[0]]
    assert _cascade(objectness_level=mode).train()(features, [(32, 32)] * 2, empty, image_ids=[0, 1])[1]["loss_rpn_cls"].isfinite()
    labels_seen.clear()
    for level in ("any", mode):
        torch.manual_seed(0)
        rpn = _cascade(objectness_level=level, target_config=AnchorTargetConfig(fg_iou=0.4, bg_iou=0.3)).train()
        losses[level] = rpn(features, [(32, 32), (32, 32)], targets, image_ids=[0, 1], need_proposals=False)[1]
    every_level, own_level = labels_seen
    assert losses[mode]["loss_rpn_reg"].item() == pytest.approx(losses["any"]["loss_rpn_reg"].item())
    assert own_level.numel() == every_level.numel() and (own_level <= every_level).all()
    # "size": 9 + 5 stay positive; "best": one level's per image, so fewer than all 24
    assert own_level.sum().item() == 9 + 5 if mode == "size" else 0 < own_level.sum().item() < 24
    with pytest.raises(ValueError, match=r"objectness_level must be one of \('any', 'size', 'best'\), got 'own'"):
        _cascade(objectness_level="own")


def test_box_losses_over_every_iou_positive_leave_the_objectness_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_rpn.core.cascade as cascade

    box_counts: list[int] = []
    labels_seen: list[torch.Tensor] = []
    original_iou, original_bce = cascade.aligned_iou, cascade.F.binary_cross_entropy_with_logits

    def iou_spy(pred, target):
        box_counts.append(pred.shape[0])
        return original_iou(pred, target)

    def bce_spy(logits, labels, *args, **kwargs):
        labels_seen.append(labels.clone())
        return original_bce(logits, labels, *args, **kwargs)

    monkeypatch.setattr(cascade, "aligned_iou", iou_spy)
    monkeypatch.setattr(cascade.F, "binary_cross_entropy_with_logits", bce_spy)
    features = [torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1)),
                torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))]
    # the boxes of the ownership test: 10 and 14 IoU-0.4 positives in stage 2; a sampler of 4
    # boxes an image keeps at most 2 of them
    targets = [{"boxes": torch.tensor([[5.0, 5, 27, 27]])}, {"boxes": torch.tensor([[4.0, 4, 28, 28]])}]
    config = AnchorTargetConfig(fg_iou=0.4, bg_iou=0.3, batch_size_per_image=4)
    losses = {}
    for which in ("sampled", "all"):
        torch.manual_seed(0)
        rpn = _cascade(box_loss_positives=which, target_config=config).train()
        losses[which] = rpn(features, [(32, 32), (32, 32)], targets, image_ids=[0, 1], need_proposals=False)[1]
    sampled_counts, all_counts = box_counts[:2], box_counts[2:]
    assert sampled_counts[0] == all_counts[0]  # stage 1: the centre region, never sampled
    assert sampled_counts[1] <= 4 and all_counts[1] == 24
    torch.testing.assert_close(labels_seen[0], labels_seen[1])
    assert losses["all"]["loss_rpn_cls"].item() == pytest.approx(losses["sampled"]["loss_rpn_cls"].item())
    assert losses["all"]["loss_rpn_reg"].item() != pytest.approx(losses["sampled"]["loss_rpn_reg"].item())
    # with one level per object (its best level picked among every positive), the same sampled
    # boxes, some positives turned negative
    torch.manual_seed(0)
    best = _cascade(box_loss_positives="all", objectness_level="best", target_config=config).train()
    assert all(v.isfinite() for v in best(features, [(32, 32)] * 2, targets, image_ids=[0, 1], need_proposals=False)[1].values())
    assert labels_seen[2].shape == labels_seen[1].shape and (labels_seen[2] <= labels_seen[1]).all()
    with pytest.raises(ValueError, match=r"box_loss_positives must be one of \('sampled', 'all'\), got 'every'"):
        _cascade(box_loss_positives="every")


def test_test_iterations_refine_the_last_boxes_again_in_eval_only() -> None:
    torch.manual_seed(0)
    rpn = _cascade(num_stages=2)
    for parameter in rpn.parameters():  # boxes that move at every pass
        torch.nn.init.normal_(parameter, std=0.1)
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    anchors = rpn.anchor_generator([(8, 8), (4, 4)])
    with torch.no_grad():
        once = rpn.eval().predict(features, anchors)
        rpn.test_iterations = 1
        twice = rpn.predict(features, anchors)
        trained = rpn.train().predict(features, anchors)
    refined = rpn.box_coder.decode(once.deltas[-1], once.boxes[-1])
    torch.testing.assert_close(twice.boxes[-1], refined)  # the last pass starts from the first's boxes
    hand = rpn._run_stage(rpn.stages[-1], [rpn.stages[0](f)[0] for f in features], refined, once.per_level)[1]
    torch.testing.assert_close(twice.deltas[-1], hand)
    assert not torch.allclose(twice.deltas[-1], once.deltas[-1])
    torch.testing.assert_close(twice.scores, once.scores)  # ranked by the first pass
    torch.testing.assert_close(trained.deltas[-1], once.deltas[-1])  # training is unchanged
    with pytest.raises(ValueError, match="test_iterations must be an int >= 0, got -1"):
        _cascade(test_iterations=-1)


def test_train_iterations_add_a_box_loss_on_the_last_stages_own_boxes() -> None:
    from torchvision.ops import box_iou

    config = AnchorTargetConfig(fg_iou=0.5, bg_iou=0.3, allow_low_quality=False, batch_size_per_image=64)
    features = [torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1)),
                torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))]
    targets = [{"boxes": torch.tensor([[5.0, 5, 27, 27], [2, 12, 14, 30]])}, {"boxes": torch.tensor([[4.0, 4, 28, 28]])}]
    networks = {}
    for iterations in (0, 1):
        torch.manual_seed(0)
        networks[iterations] = _cascade(num_stages=2, train_iterations=iterations, box_loss_positives="all",
                                        target_config=config)
        for parameter in networks[iterations].parameters():  # boxes that move at every pass
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(parameter.numel()))
    once, twice = networks[0].train(), networks[1].train()
    anchors = once.anchor_generator([(8, 8), (4, 4)])
    with torch.no_grad():
        plain, iterated = once.predict(features, anchors), twice.predict(features, anchors)
    assert len(plain.boxes) == 2 and len(iterated.boxes) == 3
    refined = twice.box_coder.decode(iterated.deltas[1], iterated.boxes[1])
    torch.testing.assert_close(iterated.boxes[2], refined)  # the pass starts from the last stage's boxes
    hand = twice._run_stage(twice.stages[-1], [twice.stages[0](f)[0] for f in features], refined, plain.per_level)[1]
    torch.testing.assert_close(iterated.deltas[2], hand)
    torch.testing.assert_close(iterated.scores, plain.scores)
    plain_losses = once(features, [(32, 32)] * 2, targets, image_ids=[0, 1], need_proposals=False)[1]
    iterated_losses = twice(features, [(32, 32)] * 2, targets, image_ids=[0, 1], need_proposals=False)[1]
    # the objectness learns from the first pass; the box loss gains the pass's 1 - IoU over its positives
    torch.testing.assert_close(iterated_losses["loss_rpn_cls"], plain_losses["loss_rpn_cls"])
    extra = []
    for image, target in enumerate(targets):
        best_iou, best_gt = box_iou(refined[image], target["boxes"]).max(dim=1)
        positive = best_iou >= 0.5
        output = twice.box_coder.decode(hand[image][positive], refined[image][positive])
        extra.append(1 - box_iou(output, target["boxes"][best_gt[positive]]).diagonal())
    expected = plain_losses["loss_rpn_reg"] + torch.cat(extra).mean()  # reg_weight 1
    assert torch.cat(extra).numel() > 4
    torch.testing.assert_close(iterated_losses["loss_rpn_reg"], expected)
    with torch.no_grad():  # eval mode: no training pass
        torch.testing.assert_close(twice.eval().predict(features, anchors).boxes[-1], once.eval().predict(features, anchors).boxes[-1])
    with pytest.raises(ValueError, match="train_iterations must be an int >= 0, got -1"):
        _cascade(train_iterations=-1)


def test_evaluation_losses_with_test_iterations_are_the_training_losses() -> None:
    # the objectness was scored against targets of the refined boxes it never saw (the pass replaced them)
    torch.manual_seed(0)
    rpn = _cascade(num_stages=2, train_iterations=1, test_iterations=1, box_loss_positives="all")
    for parameter in rpn.parameters():  # boxes that move at every pass
        torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(parameter.numel()))
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    with torch.no_grad():
        training = rpn.train()(features, [(32, 32)] * 2, TARGETS, image_ids=[0, 1], need_proposals=False)[1]
        evaluation = rpn.eval()(features, [(32, 32)] * 2, TARGETS, image_ids=[0, 1], need_proposals=False)[1]
        prediction = rpn.predict(features, rpn.anchor_generator([(8, 8), (4, 4)]))
    for key in ("loss_rpn_cls", "loss_rpn_reg"):
        torch.testing.assert_close(evaluation[key], training[key])
    assert len(prediction.boxes) == 3  # anchors, stage 2's boxes, the test iteration's (the proposals refine it)


def test_test_iterations_beyond_the_training_ones_leave_the_evaluation_losses_alone() -> None:
    # shapes_cascade.yaml (train 0, test 1): val/loss_rpn_reg summed one box loss more than
    # train/loss_rpn_reg, and 3 test iterations raised it from 2.9 to 5.7 with the same weights
    torch.manual_seed(0)
    rpn = _cascade(num_stages=2, box_loss_positives="all")
    for parameter in rpn.parameters():  # boxes that move at every pass
        torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(parameter.numel()))
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    losses = {}
    with torch.no_grad():
        training = rpn.train()(features, [(32, 32)] * 2, TARGETS, image_ids=[0, 1], need_proposals=False)[1]
        for iterations in (0, 3):
            rpn.test_iterations = iterations
            losses[iterations] = rpn.eval()(features, [(32, 32)] * 2, TARGETS, image_ids=[0, 1],
                                            need_proposals=False)[1]
    for key in ("loss_rpn_cls", "loss_rpn_reg"):
        torch.testing.assert_close(losses[3][key], training[key])
        torch.testing.assert_close(losses[0][key], training[key])


def test_stage_two_reuses_the_matching_rule_on_the_stage_one_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_rpn.core.cascade as cascade

    seen: list[torch.Tensor] = []

    def spy(anchors, gt, *args, **kwargs):
        seen.append(anchors.clone())
        return match_anchors_batched(anchors, gt, *args, **kwargs)

    monkeypatch.setattr(cascade, "match_anchors_batched", spy)
    torch.manual_seed(0)
    rpn = _cascade().train()
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    rpn(features, [(32, 32), (32, 32)], TARGETS, image_ids=[0, 1], need_proposals=False)
    generator, grid = _grid()
    deltas = torch.cat([rpn.stages[0](f)[1] for f in features], dim=1)
    stage_one = rpn.box_coder.decode(deltas, grid.anchors.expand(2, -1, -1))
    assert len(seen) == 2
    for image in range(2):
        torch.testing.assert_close(seen[image], stage_one[image])


def test_delta_scales_multiply_each_stages_raw_deltas() -> None:
    torch.manual_seed(0)
    plain = _cascade()
    scales = ((0.1, 0.1, 0.5, 0.5), (0.05, 0.05, 0.1, 0.1))
    scaled = _cascade(delta_scales=scales)
    scaled.load_state_dict(plain.state_dict())  # the scales are settings, not in the state dict
    assert set(plain.state_dict()) == set(scaled.state_dict())
    features = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]
    anchors = scaled.anchor_generator([(8, 8), (4, 4)], device=torch.device("cpu"))
    ours, theirs = scaled.predict(features, anchors), plain.predict(features, anchors)
    torch.testing.assert_close(ours.deltas[0], theirs.deltas[0] * torch.tensor(scales[0]))
    # stage 2 sees other boxes (stage 1 decoded its scaled deltas), so check it on its own
    hidden = scaled.stages[0](features[0])[0]
    offsets = torch.zeros(1, 18, 8, 8)
    torch.testing.assert_close(scaled.stages[1](hidden, offsets)[1], plain.stages[1](hidden, offsets)[1] * torch.tensor(scales[1]))
    with pytest.raises(ValueError, match=r"delta_scales needs one \(sx, sy, sw, sh\) per stage \(2\), got 1"):
        _cascade(delta_scales=scales[:1])
    with pytest.raises(ValueError, match="delta_scales: CascadeStage: delta_scale must be 4 positive numbers"):
        _cascade(delta_scales=((0.1, 0.1, 0.5, 0.5), (0.1, 0.0, 0.1, 0.1)))


def test_proposal_settings_and_target_checks_are_the_rpns() -> None:
    generator, _ = _grid()
    rpn = CascadeRPN(generator, in_channels=8, post_nms_top_n_test=12, nms_thresh=0.5, min_size=2.0)
    assert rpn.proposal_config == ProposalConfig(post_nms_top_n_test=12, nms_thresh=0.5, min_size=2.0)
    assert (rpn.post_nms_top_n["test"], rpn.nms_thresh, rpn.min_size) == (12, 0.5, 2.0)
    with pytest.raises(ValueError, match="CascadeRPN: ProposalConfig: post_nms_top_n_test must be a positive int"):
        CascadeRPN(generator, in_channels=8, post_nms_top_n_test=0)
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    with pytest.raises(ValueError, match=r"CascadeRPN targets\[1\] \(image_id='b'\): the 'boxes' entry"):
        rpn(features, [(32, 32)] * 2, [TARGETS[0], {}], image_ids=["a", "b"])
    with pytest.raises(ValueError, match="CascadeRPN: 1 image_ids and 1 sampling_keys for a batch of 2"):
        rpn(features, [(32, 32)] * 2, TARGETS, image_ids=["a"])
    with pytest.raises(ValueError, match="CascadeRPN: got 1 feature levels but the anchor generator has 2"):
        rpn(features[:1], [(32, 32)] * 2)


def test_errors_name_the_problem() -> None:
    for weight in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="reg_weight must be a finite number >= 0"):
            _cascade(reg_weight=weight)
    with pytest.raises(ValueError, match="one anchor per location"):
        CascadeRPN(AnchorGenerator(((16,), (32,)), (0.5, 1.0), (4, 8)), in_channels=8)
    # one anchor per location, but stretched (what `analyze-anchors --optimize` used to write)
    with pytest.raises(ValueError, match=r"one square anchor per location \(model.aspect_ratios \[\[1.0\]\]\), "
                                         r"got model.aspect_ratios \[\[0.672\], \[2.14\]\]; set model.aspect_ratios"):
        CascadeRPN(AnchorGenerator(((16,), (32,)), ((0.672,), (2.14,)), (4, 8)), in_channels=8)
    with pytest.raises(ValueError, match="num_stages must be an int >= 2"):
        _cascade(num_stages=1)
    with pytest.raises(ValueError, match="pass targets, not only anchor_targets"):
        _cascade()([torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)], [(32, 32)],
                   anchor_targets=(torch.zeros(1, 80, dtype=torch.long), torch.zeros(1, 80, 4)))


def test_module_option_builds_and_trains_a_cascade() -> None:
    from helpers.model import collate_for, synthetic_samples, tiny_model

    one_anchor = dict(head="cascade", aspect_ratios=((1.0,),), anchor_sizes=((32,), (64,), (128,), (256,)))
    model = tiny_model(**one_anchor, cascade_stages=3)
    assert isinstance(model.rpn, CascadeRPN) and len(model.rpn.stages) == 3
    scaled = tiny_model(**one_anchor, cascade_delta_scales=((0.1, 0.1, 0.5, 0.5), (0.05, 0.05, 0.1, 0.1)))
    assert scaled.rpn.stages[1].delta_scale.tolist() == pytest.approx([0.05, 0.05, 0.1, 0.1])
    assert tiny_model(**one_anchor, cascade_objectness_level="best").rpn.objectness_level == "best"
    assert tiny_model(**one_anchor, cascade_box_loss_positives="all").rpn.box_loss_positives == "all"
    assert tiny_model(**one_anchor, cascade_test_iterations=1).rpn.test_iterations == 1
    iterated = tiny_model(**one_anchor, cascade_train_iterations=2)
    assert iterated.rpn.train_iterations == 2
    batch = collate_for(model, assign_targets=False)(synthetic_samples())
    proposals, losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_reg"} and len(proposals) == len(batch)
    assert all(value.isfinite() for value in iterated(batch)[1].values())
    with pytest.raises(ValueError, match=r"model.head='cascade' does not support \{'model.objectness': 'softmax'\}"):
        tiny_model(**one_anchor, objectness="softmax")
    with pytest.raises(ValueError, match=r"does not support \{'model.crowd_ioa': 0.5, 'model.allowed_border': 0\}"):
        tiny_model(**one_anchor, crowd_ioa=0.5, allowed_border=0)  # its targets would ignore them
    scored = tiny_model(**one_anchor, quality="iou", proposal_score="geometric_mean")
    assert (scored.rpn.quality, scored.rpn.proposal_score) == (("iou",), "geometric_mean")
    proposals, losses = scored(batch)
    assert all(value.isfinite() for value in losses.values()) and len(proposals) == len(batch)


def _with_quality(quality: str, proposal_score: str) -> tuple[CascadeRPN, CascadeRPN]:
    """A cascade with quality branches and the same cascade without them (the shared weights copied)."""
    torch.manual_seed(0)
    scored = _cascade(quality=quality, proposal_score=proposal_score).train()
    plain = _cascade().train()
    missing = plain.load_state_dict(scored.state_dict(), strict=False)
    assert missing.missing_keys == [] and all("quality_logits" in key for key in missing.unexpected_keys)
    return scored, plain


def test_quality_branches_train_on_the_last_stages_positives(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_rpn.core.cascade as cascade
    from lightning_rpn.core.quality import aligned_iou, quality_loss

    calls = []
    monkeypatch.setattr(cascade, "quality_loss", lambda *args: calls.append(args) or quality_loss(*args))
    scored, plain = _with_quality("centerness+iou", "geometric_mean")
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    _, ours = scored(features, [(32, 32)] * 2, TARGETS, image_ids=[0, 1], need_proposals=False)
    _, theirs = plain(features, [(32, 32)] * 2, TARGETS, image_ids=[0, 1], need_proposals=False)
    (branches, input_boxes, pred_boxes, gt_boxes), = calls
    assert set(branches) == {"centerness", "iou"} and input_boxes.shape[0] > 0
    # the positives are the last stage's: its input boxes match their gt boxes at IoU >= fg_iou 0.5
    assert (aligned_iou(input_boxes, gt_boxes) >= 0.5).all()
    torch.testing.assert_close(ours["loss_rpn_reg"], theirs["loss_rpn_reg"])
    torch.testing.assert_close(ours["loss_rpn_cls"], theirs["loss_rpn_cls"] + quality_loss(branches, input_boxes, pred_boxes, gt_boxes))


def test_quality_alone_ranks_and_leaves_the_objectness_untrained() -> None:
    from lightning_rpn.core.quality import score_logits

    scored, _ = _with_quality("iou", "quality")
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    _, losses = scored(features, [(32, 32)] * 2, TARGETS, image_ids=[0, 1], need_proposals=False)
    losses["loss_rpn_cls"].backward()
    last = scored.stages[-1]
    assert last.cls_logits.weight.grad.abs().sum() == 0 and last.quality_logits.weight.grad.abs().sum() > 0
    anchors = scored.anchor_generator([(8, 8), (4, 4)], device=torch.device("cpu"))
    prediction = scored.predict(features, anchors)
    assert prediction.quality.shape == (2, 80, 1)
    torch.testing.assert_close(prediction.scores, prediction.quality[..., 0])
    scored.proposal_score = "geometric_mean"
    both = scored.predict(features, anchors)
    torch.testing.assert_close(both.scores, score_logits([both.logits, both.quality[..., 0]]))
    scored.eval()
    proposals, _ = scored(features, [(32, 32)] * 2, proposal_logits=True)
    logits = proposals[0][-1]  # ranked by the geometric mean, best first
    assert (logits[:-1] >= logits[1:]).all() and logits[0] == both.scores[0].max()
    with pytest.raises(ValueError, match="CascadeRPN: proposal_score='quality' needs quality branches"):
        _cascade(proposal_score="quality")
    with pytest.raises(ValueError, match="CascadeRPN: quality: expected None or"):
        _cascade(quality="objectness")


@pytest.mark.parametrize("where", ["stage 1 deltas", "stage 2 deltas", "features"])
def test_a_diverged_cascade_is_a_non_finite_loss_for_the_policy(where: str) -> None:
    # matching refuses non-finite boxes as bad input; a diverged network must reach the non-finite
    # policy (raise with its hint, or skip the batch) instead
    torch.manual_seed(0)
    rpn = _cascade().train()
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    if where == "features":
        features[0][0, 0, 0, 0] = float("inf")
    else:
        with torch.no_grad():
            rpn.stages[0 if where == "stage 1 deltas" else 1].bbox_deltas.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"CascadeRPN: non-finite .* of pass [12]; check the learning rate"):
        rpn(features, [(32, 32), (32, 32)], TARGETS, image_ids=[0, 1])
