"""Every default once: the signatures of the parts read the frozen config objects' values."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from lightning_rpn import RPN, AnchorGenerator, RPNModule, generate_proposals, match_anchors, rpn_loss, sample_anchors
from lightning_rpn.core.cascade import CascadeRPN
from lightning_rpn.core.config import AnchorConfig, AnchorTargetConfig, LossConfig, OptimConfig, ProposalConfig


def _defaults(function) -> dict[str, object]:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _fields(config) -> dict[str, object]:
    return {field.name: field.default for field in dataclasses.fields(config)}


def test_rpn_cascade_and_module_share_the_proposal_and_loss_defaults() -> None:
    proposals = _fields(ProposalConfig)
    loss = {("loss_normalization" if k == "normalization" else k): v for k, v in _fields(LossConfig).items()}
    for part in (RPN, CascadeRPN, RPNModule):
        defaults = _defaults(part.__init__)
        assert {k: defaults[k] for k in proposals} == proposals, part.__name__
    for part in (RPN, RPNModule):
        defaults = _defaults(part.__init__)
        assert {k: defaults[k] for k in loss} == loss, part.__name__
    # the documented recipe (detectron2 rpn_R_50_FPN_1x): 1000 proposals per training image, L1
    assert _defaults(RPN.__init__)["post_nms_top_n_train"] == 1000
    assert _defaults(RPN.__init__)["box_loss"] == _defaults(rpn_loss)["box_loss"] == "l1"


def test_functions_and_module_share_the_target_and_anchor_defaults() -> None:
    targets = _fields(AnchorTargetConfig)
    module = _defaults(RPNModule.__init__)
    assert {k: module[k] for k in targets} == targets
    assert {k: _defaults(match_anchors)[k] for k in ("fg_iou", "bg_iou", "allow_low_quality")} == {
        k: targets[k] for k in ("fg_iou", "bg_iou", "allow_low_quality")}
    assert _defaults(sample_anchors)["batch_size_per_image"] == targets["batch_size_per_image"]
    anchors = _fields(AnchorConfig)
    assert (module["anchor_sizes"], module["aspect_ratios"]) == (anchors["sizes"], anchors["aspect_ratios"])
    assert _defaults(AnchorGenerator.__init__)["offset"] == module["anchor_offset"] == anchors["offset"]
    proposal = _defaults(generate_proposals)
    assert (proposal["pre_nms_top_n"], proposal["post_nms_top_n"]) == (
        ProposalConfig.pre_nms_top_n_test, ProposalConfig.post_nms_top_n_test)
    optim = _fields(OptimConfig)
    assert {k: module[k] for k in optim} == optim


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"optimizer": "adam"}, "model.optimizer must be one of"),
        ({"lr_schedule": "step"}, "model.lr_schedule must be one of"),
        ({"milestones": (80000, 60000)}, "model.milestones must be increasing"),
        ({"post_nms_top_n_test": 0}, "post_nms_top_n_test must be a positive int"),
        ({"box_loss": "ciou"}, "box_loss must be one of"),
        ({"reg_weight": float("nan")}, "reg_weight must be a finite number >= 0"),
        ({"reg_weight": -1.0}, "reg_weight must be a finite number >= 0"),
    ],
)
def test_bad_settings_fail_when_the_module_is_built(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RPNModule(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)), **settings)


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ProposalConfig().nms_thresh = 0.5  # type: ignore[misc]
