"""Localisation-quality scoring (OLN): targets and losses by hand, head outputs, RPN scoring."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.head import RPNHead
from lightning_rpn.core.loss import rpn_loss
from lightning_rpn.core.quality import aligned_iou, centerness_targets, parse_quality, quality_loss, score_logits
from lightning_rpn.core.rpn import RPN
from lightning_rpn.core.targets import AnchorTargetConfig


def _bce(logit: float, target: float) -> float:
    return -(target * math.log(1 / (1 + math.exp(-logit))) + (1 - target) * math.log(1 / (1 + math.exp(logit))))


def test_centerness_targets_by_hand() -> None:
    anchors = torch.tensor([[2.0, 2, 6, 4], [3, 0, 7, 4], [20, 20, 24, 24]])  # centres (4, 3), (5, 2), (22, 22)
    gt = torch.tensor([[0.0, 0, 10, 4], [0, 0, 10, 4], [0, 0, 10, 4]])
    # (4, 3): l 4, r 6, t 3, b 1 -> sqrt(4/6 * 1/3); (5, 2): the box centre -> 1; outside -> 0
    expected = torch.tensor([math.sqrt(4 / 6 * 1 / 3), 1.0, 0.0])
    torch.testing.assert_close(centerness_targets(anchors, gt), expected)


def test_aligned_iou_by_hand() -> None:
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 4, 4], [1, 1, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 4, 4], [1, 1, 1, 1]])
    # inter 1 / union 7; identical boxes 1; degenerate (zero union) 0
    torch.testing.assert_close(aligned_iou(a, b), torch.tensor([1 / 7, 1.0, 0.0]))


def test_parse_quality_names_and_errors() -> None:
    assert parse_quality(None) == ()
    assert parse_quality("centerness+iou") == ("centerness", "iou")
    assert parse_quality("iou") == ("iou",)
    for bad in ("ctr", "iou+iou", ""):
        with pytest.raises(ValueError, match="model.quality: expected None or"):
            parse_quality(bad, "model.quality")


def test_quality_loss_by_hand() -> None:
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 4, 4]])
    gt = torch.tensor([[0.0, 0, 10, 10], [2, 0, 6, 4]])  # centerness 1 and 0 (centre on the left side)
    pred = torch.tensor([[0.0, 0, 10, 5], [2, 0, 6, 4]])  # IoU 0.5 and 1
    logits = {"centerness": torch.tensor([0.3, -0.2]), "iou": torch.tensor([1.0, 2.0])}
    loss = quality_loss(logits, anchors, pred, gt)
    expected = (_bce(0.3, 1) + _bce(-0.2, 0)) / 2 + (_bce(1.0, 0.5) + _bce(2.0, 1.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros(0, 4)
    zero = quality_loss({"iou": torch.zeros(0, requires_grad=True)}, empty, empty, empty)
    assert zero.item() == 0.0


def test_rpn_loss_adds_quality_to_the_score_loss() -> None:
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 1, 1], [0, 0, 4, 4]])
    labels = torch.tensor([[1, 0, 1]])
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 1, 1], [2, 0, 6, 4]])
    target = coder.encode(gt, anchors)[None]
    pred = torch.zeros(1, 3, 4)  # decode to the anchors: IoU with gt 1 and 1/2 ([0,0,4,4] vs [2,0,6,4]: 8 / 24 -> 1/3)
    logits = torch.tensor([[1.0, -1.0, 0.0]])
    quality = torch.tensor([[[0.5, 1.5], [9.0, 9.0], [-0.5, 0.25]]])
    plain = rpn_loss(logits, pred, labels, target, box_loss="iou", anchors=anchors, box_coder=coder)
    # IoU loss: 1 - 1 and 1 - 1/3 over 3 sampled anchors
    assert plain["loss_rpn_reg"].item() == pytest.approx((0 + 2 / 3) / 3, rel=1e-5)
    cls = (math.log(1 + math.exp(-1.0)) * 2 + math.log(2.0)) / 3
    quality_part = (_bce(0.5, 1) + _bce(-0.5, 0)) / 2 + (_bce(1.5, 1) + _bce(0.25, 1 / 3)) / 2
    kwargs = dict(box_loss="iou", anchors=anchors, box_coder=coder, pred_quality=quality, quality="centerness+iou")
    both = rpn_loss(logits, pred, labels, target, **kwargs)
    assert both["loss_rpn_cls"].item() == pytest.approx(cls + quality_part, rel=1e-5)
    assert both["loss_rpn_reg"].item() == plain["loss_rpn_reg"].item()
    alone = rpn_loss(logits, pred, labels, target, objectness_weight=0.0, **kwargs)
    assert alone["loss_rpn_cls"].item() == pytest.approx(quality_part, rel=1e-5)
    with pytest.raises(ValueError, match="pred_quality and quality go together"):
        rpn_loss(logits, pred, labels, target, pred_quality=quality, anchors=anchors, box_coder=coder)
    with pytest.raises(ValueError, match=r"pred_quality has shape \(1, 3, 2\), expected \[1, 3, 1\]"):
        rpn_loss(logits, pred, labels, target, pred_quality=quality, quality="iou", anchors=anchors, box_coder=coder)
    with pytest.raises(ValueError, match="anchors and box_coder"):
        rpn_loss(logits, pred, labels, target, pred_quality=quality, quality="centerness+iou")


def test_score_logits_is_the_geometric_mean_and_keeps_the_ranking() -> None:
    a, b = torch.tensor([0.5, -2.0, 3.0]), torch.tensor([1.0, 0.0, -1.0])
    combined = score_logits([a, b])
    torch.testing.assert_close(combined.sigmoid(), (a.sigmoid() * b.sigmoid()).sqrt())
    assert score_logits([a]) is a
    high = score_logits([torch.tensor([40.0, 50.0]), torch.tensor([60.0, 60.0])])
    assert torch.isfinite(high).all() and high[1] > high[0]  # both probabilities round to 1


def test_head_quality_branch_shapes_and_order() -> None:
    torch.manual_seed(0)
    head = RPNHead(8, 3, quality="centerness+iou")
    features = [torch.randn(2, 8, 5, 6), torch.randn(2, 8, 3, 3)]
    objectness, deltas, quality = head(features)
    assert [tuple(q.shape) for q in quality] == [(2, 5 * 6 * 3, 2), (2, 3 * 3 * 3, 2)]
    # location (y=1, x=2), anchor 1, branch "iou" (1) is channel a * Q + q of the conv output
    raw = head.quality_logits(head.conv(features[0]))
    assert quality[0][0, (1 * 6 + 2) * 3 + 1, 1] == raw[0, 1 * 2 + 1, 1, 2]
    assert len(RPNHead(8, 3)(features)) == 2  # no quality: the plain head's two lists


def _quality_rpn(score: str) -> RPN:
    generator = AnchorGenerator(((16,), (32,)), (0.5, 1.0, 2.0), (4, 8))
    return RPN(generator, in_channels=8, target_config=AnchorTargetConfig(batch_size_per_image=64),
               post_nms_top_n_test=20, quality="centerness+iou", proposal_score=score, box_loss="iou", seed=3)


@pytest.mark.parametrize("score", ["objectness", "quality", "geometric_mean"])
def test_rpn_ranks_proposals_by_the_chosen_score(score: str) -> None:
    torch.manual_seed(0)
    rpn = _quality_rpn(score).eval()
    features = [torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8)]
    [(boxes, probs, _)], _ = rpn(features, [(64, 64)], proposal_logits=True)
    objectness, deltas, quality = rpn.head(features)
    scores = {
        "objectness": torch.cat(objectness, 1).sigmoid(),
        "quality": torch.cat(quality, 1).sigmoid().prod(-1).sqrt(),
        "geometric_mean": (torch.cat(objectness, 1).sigmoid() * torch.cat(quality, 1).sigmoid().prod(-1)) ** (1 / 3),
    }[score][0]
    anchors = torch.cat(rpn.anchor_generator([(16, 16), (8, 8)]))
    decoded = rpn.box_coder.decode(torch.cat(deltas, 1)[0], anchors).clamp(0, 64)
    best = int(scores.argmax())
    torch.testing.assert_close(boxes[0], decoded[best])
    torch.testing.assert_close(probs[0], scores[best])


def test_quality_score_trains_no_classifier_and_targets_agree() -> None:
    torch.manual_seed(0)
    rpn = _quality_rpn("quality").train()
    features = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]])}, {"boxes": torch.tensor([[10.0, 10.0, 26.0, 22.0]])}]
    _, losses = rpn(features, [(64, 64), (64, 64)], targets, image_ids=[0, 1], need_proposals=False)
    (losses["loss_rpn_cls"] + losses["loss_rpn_reg"]).backward()
    assert rpn.head.cls_logits.weight.grad.abs().sum() == 0  # OLN: no objectness classifier
    assert rpn.head.quality_logits.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="proposal_score='quality' needs quality branches"):
        RPN(rpn.anchor_generator, in_channels=8, proposal_score="quality")
    with pytest.raises(ValueError, match=r"head.quality=\(\) but the RPN expects \('iou',\)"):
        RPN(rpn.anchor_generator, head=RPNHead(8, 3), quality="iou")


def test_module_option_worker_and_in_model_targets_give_the_same_loss() -> None:
    from helpers.model import collate_for, synthetic_samples, tiny_model

    model = tiny_model(quality="centerness+iou", proposal_score="geometric_mean", box_loss="iou").eval()
    samples = synthetic_samples()
    _, from_workers = model(collate_for(model, assign_targets=True)(samples), need_proposals=False)
    proposals, in_model = model(collate_for(model, assign_targets=False)(samples))
    assert set(from_workers) == {"loss_rpn_cls", "loss_rpn_reg"}
    for key in from_workers:
        torch.testing.assert_close(from_workers[key], in_model[key])
    assert all(scores.le(1).all() and scores.ge(0).all() for _, scores in proposals)


def test_the_torchvision_drop_in_takes_quality_scoring() -> None:
    """(The export of a quality head is tested in tests/tools/test_export.py.)"""
    from torchvision.models.detection.image_list import ImageList

    from lightning_rpn.tools.torchvision_adapter import TorchvisionRPN

    # the drop-in takes an RPN with quality scoring as it is: torchvision's loss keys, its proposals
    torch.manual_seed(0)
    adapter = TorchvisionRPN(_quality_rpn("geometric_mean")).train()
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    features = {"p2": torch.randn(1, 8, 16, 16), "p3": torch.randn(1, 8, 8, 8)}
    boxes, losses = adapter(images, features, [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]])}])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"} and boxes[0].shape[1] == 4
