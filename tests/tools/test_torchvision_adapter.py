"""TorchvisionRPN: drop-in for torchvision's RegionProposalNetwork in a real Faster R-CNN, with our
RPN or a CascadeRPN inside."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.cascade import CascadeRPN
from lightning_rpn.core.targets import AnchorTargetConfig
from lightning_rpn.tools.torchvision_adapter import TorchvisionRPN

TV_LOSS_KEYS = {"loss_objectness", "loss_rpn_box_reg"}


def _detector(**kwargs) -> torch.nn.Module:
    """A random-init Faster R-CNN on 128 px inputs (padded size a multiple of every stride)."""
    return fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128, **kwargs
    )


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.rand(3, 128, 128, generator=generator), torch.rand(3, 96, 128, generator=generator)]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[5.0, 30.0, 40.0, 90.0]]), "labels": torch.tensor([1])},
    ]


@pytest.fixture(scope="module")
def detector_and_features():
    torch.manual_seed(0)
    with torch.no_grad():
        model = _detector().eval()
        image_list, targets = model.transform(_images(), _targets())
        features = model.backbone(image_list.tensors)
    return model, image_list, targets, features


def test_from_detector_copies_settings_and_measures_strides(detector_and_features) -> None:
    model, *_ = detector_and_features
    adapter = TorchvisionRPN.from_detector(model)
    rpn = adapter.rpn
    assert rpn.anchor_generator.strides == (4, 8, 16, 32, 64)
    assert rpn.anchor_generator.sizes == ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
    assert rpn.pre_nms_top_n == {"train": 2000, "test": 1000}
    assert rpn.post_nms_top_n == {"train": 2000, "test": 1000}
    assert (rpn.target_config.fg_iou, rpn.target_config.bg_iou) == (0.7, 0.3)
    assert rpn.target_config.batch_size_per_image == 256
    assert rpn.box_coder.clamp == pytest.approx(math.log(1000.0 / 16))
    assert torch.equal(rpn.head.cls_logits.weight, model.rpn.head.cls_logits.weight)
    assert torch.equal(rpn.head.bbox_deltas.bias, model.rpn.head.bbox_pred.bias)
    assert torch.equal(rpn.head.conv[0].weight, model.rpn.head.conv[0][0].weight)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # torchvision's defaults: 1000 / 1000, NMS 0.7
        {"pre": 100, "post": 40, "nms_thresh": 0.5, "score_thresh": 0.2},
    ],
)
def test_eval_proposals_identical_to_torchvision(detector_and_features, settings) -> None:
    model, image_list, _, features = detector_and_features
    tv_rpn = model.rpn
    saved = (dict(tv_rpn._pre_nms_top_n), dict(tv_rpn._post_nms_top_n), tv_rpn.nms_thresh, tv_rpn.score_thresh)
    try:
        if settings:
            tv_rpn._pre_nms_top_n["testing"] = settings["pre"]
            tv_rpn._post_nms_top_n["testing"] = settings["post"]
            tv_rpn.nms_thresh, tv_rpn.score_thresh = settings["nms_thresh"], settings["score_thresh"]
        adapter = TorchvisionRPN.from_torchvision(tv_rpn, strides=(4, 8, 16, 32, 64)).eval()
        with torch.no_grad():
            theirs, their_losses = tv_rpn(image_list, features)
            ours, our_losses = adapter(image_list, features, _targets())
            scored = adapter.rpn(list(features.values()), image_list.image_sizes)[0]
    finally:
        tv_rpn._pre_nms_top_n, tv_rpn._post_nms_top_n, tv_rpn.nms_thresh, tv_rpn.score_thresh = saved
    assert our_losses == their_losses == {}
    assert len(ours) == len(theirs) == 2
    for boxes, tv_boxes, (_, scores) in zip(ours, theirs, scored):
        # No exactly-equal scores, so torchvision's unstable tie order cannot differ from ours.
        assert scores.unique().numel() == scores.numel() > 10
        assert torch.equal(boxes, tv_boxes)
    if settings:
        assert all(boxes.shape[0] <= settings["post"] for boxes in ours)


@pytest.mark.parametrize("empty_second_image", [False, True])
def test_train_losses_equal_torchvision_without_sampling(detector_and_features, empty_second_image) -> None:
    """With a sampler budget above the anchor count nothing is random: same labels, same losses."""
    model, image_list, targets, features = detector_and_features
    if empty_second_image:  # an image without objects: all its anchors are negatives
        targets = [targets[0], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    tv_rpn = model.rpn
    saved = tv_rpn.fg_bg_sampler.batch_size_per_image
    tv_rpn.fg_bg_sampler.batch_size_per_image = 10**6
    try:
        adapter = TorchvisionRPN.from_torchvision(tv_rpn, strides=(4, 8, 16, 32, 64))
        tv_rpn.train()
        adapter.train()
        with torch.no_grad():
            theirs, their_losses = tv_rpn(image_list, features, targets)
            ours, our_losses = adapter(image_list, features, targets)
    finally:
        tv_rpn.fg_bg_sampler.batch_size_per_image = saved
        tv_rpn.eval()
    assert set(our_losses) == set(their_losses) == TV_LOSS_KEYS
    for key in TV_LOSS_KEYS:
        torch.testing.assert_close(our_losses[key], their_losses[key], rtol=1e-5, atol=1e-7)
    assert our_losses["loss_rpn_box_reg"] > 0
    assert [b.shape[0] for b in ours] == [b.shape[0] for b in theirs]  # train top-k settings (2000)
    for boxes, tv_boxes in zip(ours, theirs):
        assert torch.equal(boxes, tv_boxes)


def test_faster_rcnn_with_the_adapter_trains() -> None:
    torch.manual_seed(0)
    model = _detector(box_batch_size_per_image=64)  # small RoI batch: CPU time goes to the RPN
    model.backbone.body.requires_grad_(False)
    model.rpn = TorchvisionRPN.from_detector(model)
    # a notebook cell run twice: "expected a detector with a RegionProposalNetwork, got FasterRCNN"
    with pytest.raises(TypeError, match="this FasterRCNN's rpn is a TorchvisionRPN already"):
        TorchvisionRPN.from_detector(model)
    model.train()
    head_before = model.rpn.rpn.head.cls_logits.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    rpn_losses = []
    for _ in range(3):
        losses = model(_images(), _targets())
        assert set(losses) == TV_LOSS_KEYS | {"loss_classifier", "loss_box_reg"}
        assert all(torch.isfinite(value) for value in losses.values())
        rpn_losses.append((losses["loss_objectness"] + losses["loss_rpn_box_reg"]).item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert not torch.equal(model.rpn.rpn.head.cls_logits.weight, head_before)
    assert rpn_losses[-1] < rpn_losses[0]
    model.eval()
    with torch.no_grad():
        detections = model(_images())
    assert len(detections) == 2 and all(set(d) == {"boxes", "labels", "scores"} for d in detections)


def test_errors_name_the_problem(detector_and_features) -> None:
    model, image_list, _, features = detector_and_features
    adapter = TorchvisionRPN.from_torchvision(model.rpn, strides=(4, 8, 16, 32, 64)).train()
    with pytest.raises(ValueError, match="targets are required in training mode"):
        adapter(image_list, features)
    wrong = TorchvisionRPN.from_torchvision(model.rpn, strides=(4, 8, 16, 32, 32)).eval()
    with pytest.raises(ValueError, match=r"feature level 4 \('pool'\)"):
        wrong(image_list, features)
    with pytest.raises(ValueError, match="5 levels"):
        TorchvisionRPN.from_torchvision(model.rpn, strides=(4, 8, 16, 32))
    with pytest.raises(TypeError, match="RegionProposalNetwork"):
        TorchvisionRPN.from_torchvision(adapter, strides=(4,))
    with pytest.raises(TypeError, match="rpn must be a lightning_rpn RPN or CascadeRPN .* got RegionProposalNetwork"):
        TorchvisionRPN(model.rpn)



@pytest.mark.parametrize("size_divisible, identical", [(32, False), (64, True)])
def test_eval_proposals_are_identical_when_the_padded_size_is_a_multiple_of_64(
    size_divisible: int, identical: bool
) -> None:
    """A 100 x 150 image becomes 85 x 128, padded to 96 x 128 by torchvision's default (32): its
    P6 map is 2 x 2 and torchvision places P6 anchors 96 // 2 = 48 px apart vertically, ours 64
    (the README says so); padded to a multiple of 64 both place every level alike. Anchors of
    16-96 px, so that P6's are not all clipped to the whole image."""
    torch.manual_seed(0)
    sizes = ((16,), (24,), (32,), (64,), (96,))
    model = _detector(rpn_anchor_generator=TorchvisionAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)).eval()
    model.transform.size_divisible = size_divisible
    adapter = TorchvisionRPN.from_detector(model).eval()
    with torch.no_grad():
        image_list, _ = model.transform([torch.rand(3, 100, 150, generator=torch.Generator().manual_seed(5))])
        features = model.backbone(image_list.tensors)
        (theirs,), _ = model.rpn(image_list, features)
        (ours,), _ = adapter(image_list, features)
    assert tuple(image_list.tensors.shape[-2:]) == ((96, 128) if size_divisible == 32 else (128, 128))
    assert (ours.shape == theirs.shape and torch.equal(ours, theirs)) == identical


def _cascade(**kwargs) -> CascadeRPN:
    """A small cascade over torchvision's ResNet-FPN levels: one 32-512 px anchor per location."""
    torch.manual_seed(0)
    generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((1.0,),), (4, 8, 16, 32, 64))
    settings = dict(in_channels=256, conv_channels=16, target_config=AnchorTargetConfig(fg_iou=0.5),
                    post_nms_top_n_train=300, post_nms_top_n_test=200)
    return CascadeRPN(generator, **{**settings, **kwargs})


def test_cascade_gives_torchvision_losses_in_training_and_its_proposals_in_eval(detector_and_features) -> None:
    _, image_list, targets, features = detector_and_features
    adapter = TorchvisionRPN(_cascade()).train()
    boxes, losses = adapter(image_list, features, targets)
    assert set(losses) == TV_LOSS_KEYS and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in adapter.rpn.parameters())
    assert len(boxes) == 2 and all(b.shape[1:] == (4,) and 0 < b.shape[0] <= 300 and not b.requires_grad for b in boxes)
    adapter.eval()
    with torch.no_grad():
        boxes, losses = adapter(image_list, features, targets)
        own = adapter.rpn(list(features.values()), image_list.image_sizes)[0]
    assert losses == {} and len(boxes) == len(own) == 2
    for ours, (expected, _), (height, width) in zip(boxes, own, image_list.image_sizes):
        assert ours.dtype == torch.float32 and 0 < ours.shape[0] <= 200 and torch.equal(ours, expected)
        assert (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all() and (ours[:, :2] >= 0).all()


def test_faster_rcnn_with_a_cascade_trains_and_detects() -> None:
    torch.manual_seed(0)
    model = _detector(box_batch_size_per_image=64)
    model.backbone.body.requires_grad_(False)
    model.rpn = TorchvisionRPN(_cascade())
    model.train()
    last_stage = model.rpn.rpn.stages[-1].cls_logits.weight
    before = last_stage.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(2):
        losses = model(_images(), _targets())
        assert set(losses) == TV_LOSS_KEYS | {"loss_classifier", "loss_box_reg"}
        assert all(torch.isfinite(value) for value in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert not torch.equal(last_stage, before)
    model.eval()
    with torch.no_grad():
        detections = model(_images())
    assert len(detections) == 2 and all(set(d) == {"boxes", "labels", "scores"} for d in detections)


def test_a_float64_detector_runs_with_the_adapter_and_gets_torchvision_s_proposal_dtype() -> None:
    """roi_align needs proposals in the features' dtype: our float32 proposals failed a ``.double()`` detector."""
    torch.manual_seed(0)
    model = _detector().eval()
    tv_rpn = model.rpn
    model.rpn = TorchvisionRPN.from_detector(model)
    model.double()
    tv_rpn.double()
    images = [image.double() for image in _images()]
    with torch.no_grad():
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        theirs, _ = tv_rpn(image_list, features)
        ours, _ = model.rpn(image_list, features)
        from_float64 = TorchvisionRPN.from_torchvision(tv_rpn, strides=(4, 8, 16, 32, 64))  # head stays float64
        copied, _ = from_float64(image_list, features)
        detections = model(images)
    assert [b.dtype for b in ours] == [b.dtype for b in copied] == [b.dtype for b in theirs] == [torch.float64] * 2
    assert [b.shape for b in ours] == [b.shape for b in copied] == [b.shape for b in theirs]
    assert len(detections) == 2 and all(d["boxes"].dtype == torch.float64 for d in detections)


def test_proposals_under_bf16_autocast_have_torchvision_s_dtype(detector_and_features) -> None:
    model, image_list, _, _ = detector_and_features
    adapter = TorchvisionRPN.from_detector(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(image_list.tensors)
        theirs, _ = model.rpn(image_list, features)
        ours, _ = adapter(image_list, features)
    assert [b.dtype for b in ours] == [b.dtype for b in theirs] == [torch.bfloat16] * 2


def test_the_adapter_starts_in_the_mode_of_the_rpn_it_replaces(detector_and_features) -> None:
    """A detector put in eval mode before the drop-in detects (the new module started in train mode)."""
    model = copy.deepcopy(detector_and_features[0])  # eval mode
    model.rpn = TorchvisionRPN.from_detector(model)
    assert not model.rpn.training
    with torch.no_grad():
        detections = model(_images())
    assert len(detections) == 2
    model.rpn.train()  # as a module of one's own assigned to an eval-mode detector
    with torch.no_grad(), pytest.raises(ValueError, match=r"targets are required in training mode.*detector\.eval\(\)"):
        model(_images())
    tv_rpn = detector_and_features[0].rpn
    tv_rpn.train()
    try:
        assert TorchvisionRPN.from_torchvision(tv_rpn, strides=(4, 8, 16, 32, 64)).training
    finally:
        tv_rpn.eval()


_TORCHVISION_EDITS: dict[str, Callable[[torch.nn.Module], None]] = {
    "_post_nms_top_n": lambda rpn: setattr(rpn, "_post_nms_top_n", {"training": 2000, "testing": 5}),
    "_post_nms_top_n testing only": lambda rpn: setattr(rpn, "_post_nms_top_n", {"testing": 5}),
    "_post_nms_top_n entry": lambda rpn: rpn._post_nms_top_n.__setitem__("testing", 7),
    "_pre_nms_top_n": lambda rpn: setattr(rpn, "_pre_nms_top_n", {"training": 2000, "testing": 2}),
    "_pre_nms_top_n entry": lambda rpn: rpn._pre_nms_top_n.__setitem__("testing", 3),
    "nms_thresh": lambda rpn: setattr(rpn, "nms_thresh", 0.2),
    "score_thresh": lambda rpn: setattr(rpn, "score_thresh", 0.5),
    "min_size": lambda rpn: setattr(rpn, "min_size", 20.0),
}


@pytest.mark.parametrize("edit", list(_TORCHVISION_EDITS))
def test_torchvision_style_tuning_changes_the_proposals_alike(detector_and_features, edit: str) -> None:
    """Set on ``detector.rpn`` as on torchvision's RPN, a setting reaches the wrapped network (it
    was set on the wrapper and ignored)."""
    model, image_list, _, features = detector_and_features
    tv_rpn = copy.deepcopy(model.rpn)
    adapter = TorchvisionRPN.from_torchvision(tv_rpn, strides=(4, 8, 16, 32, 64))
    with torch.no_grad():
        before, _ = adapter(image_list, features)
        _TORCHVISION_EDITS[edit](tv_rpn)
        _TORCHVISION_EDITS[edit](adapter)
        theirs, _ = tv_rpn(image_list, features)
        ours, _ = adapter(image_list, features)
    assert [b.shape[0] for b in ours] != [b.shape[0] for b in before]
    assert [b.shape[0] for b in ours] == [b.shape[0] for b in theirs]
    assert all(torch.equal(b, tv_b) for b, tv_b in zip(ours, theirs))
    assert (adapter.pre_nms_top_n(), adapter.post_nms_top_n()) == (tv_rpn.pre_nms_top_n(), tv_rpn.post_nms_top_n())
    adapter.train()  # the training entries are kept ({"testing": 5} drops torchvision's)
    assert (adapter.pre_nms_top_n(), adapter.post_nms_top_n()) == (2000, 2000)
    assert (adapter.nms_thresh, adapter.score_thresh, adapter.min_size) == (
        tv_rpn.nms_thresh, tv_rpn.score_thresh, tv_rpn.min_size)


def test_torchvision_style_top_n_edits_are_checked(detector_and_features) -> None:
    adapter = TorchvisionRPN.from_torchvision(detector_and_features[0].rpn, strides=(4, 8, 16, 32, 64))
    with pytest.raises(ValueError, match=r"TorchvisionRPN._post_nms_top_n\['test_n'\]"):
        adapter._post_nms_top_n = {"test_n": 5}
    with pytest.raises(ValueError, match="TorchvisionRPN._pre_nms_top_n must be a positive int"):
        adapter._pre_nms_top_n = 0
    adapter._pre_nms_top_n = 300  # an int: both modes
    assert adapter.rpn.pre_nms_top_n == {"train": 300, "test": 300}
    assert adapter.rpn.post_nms_top_n == {"train": 2000, "test": 1000}


def test_a_detector_with_the_adapter_loads_the_torchvision_detectors_checkpoint() -> None:
    """After ``detector.rpn = TorchvisionRPN.from_detector(detector)``, a state dict saved from the
    torchvision detector failed: its keys are ``rpn.head.conv.0.0.weight``, ours ``rpn.rpn.head.*``."""
    torch.manual_seed(1)
    trained = _detector().state_dict()
    torch.manual_seed(2)
    detector = _detector().eval()
    detector.rpn = TorchvisionRPN.from_detector(detector).eval()
    detector.load_state_dict(trained)
    reference = _detector().eval()
    reference.load_state_dict(trained)
    with torch.no_grad():
        ours, theirs = detector(_images()), reference(_images())
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine["boxes"], expected["boxes"])
    again = _detector().eval()
    again.rpn = TorchvisionRPN.from_detector(again)
    again.load_state_dict(detector.state_dict())  # its own keys load as before
    torch.testing.assert_close(again.rpn.rpn.head.bbox_deltas.weight, trained["rpn.head.bbox_pred.weight"])
