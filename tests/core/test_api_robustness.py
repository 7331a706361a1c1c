"""Public-API inputs a newcomer writes on day one: a backbone returning one tensor, proposal top-n
set in code as an int or torchvision's dict, a detection checkpoint as ``model.weights``, and a flat
``aspect_ratios`` / ``anchor_sizes`` on the command line."""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.backbone_interface import check_feature_strides
from lightning_rpn.core.backbones import build_backbone
from lightning_rpn.core.rpn import RPN

from helpers.model import collate_for, synthetic_samples


class C4(nn.Module):
    """A backbone returning one stride-8 tensor, as ``nn.Sequential(*list(resnet.children())[:-3])``."""

    def __init__(self, strides: tuple[int, ...] = (8,)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.out_channels, self.strides, self.size_divisibility = 8, strides, 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def _one_level_rpn() -> RPN:
    torch.manual_seed(0)
    return RPN(AnchorGenerator(((32,),), (0.5, 1.0, 2.0), (8,)), in_channels=8).eval()


@pytest.mark.parametrize("batch", [1, 2])
def test_rpn_takes_a_single_tensor_as_one_level(batch: int) -> None:
    rpn = _one_level_rpn()
    feature = torch.randn(batch, 8, 8, 8)
    sizes = [(64, 64)] * batch
    with torch.no_grad():
        from_tensor, _ = rpn(feature, sizes)
        from_list, _ = rpn([feature], sizes)
    assert len(from_tensor) == batch
    for (boxes, scores), (expected_boxes, expected_scores) in zip(from_tensor, from_list):
        torch.testing.assert_close(boxes, expected_boxes)
        torch.testing.assert_close(scores, expected_scores)


def test_a_feature_level_that_is_no_tensor_is_named() -> None:
    with pytest.raises(TypeError, match="RPN: feature level 1 is a str, not a Tensor"):
        _one_level_rpn()([torch.randn(1, 8, 8, 8), "p3"], [(64, 64)])


@pytest.mark.parametrize("batch", [1, 2])
def test_module_with_a_single_tensor_backbone_trains_and_proposes(batch: int) -> None:
    from lightning_rpn.training.module import RPNModule

    torch.manual_seed(0)
    model = RPNModule(backbone=C4(), anchor_sizes=((32,),), channels_last=False)
    images = collate_for(model)(synthetic_samples(batch))
    _, losses = model.train()(images, need_proposals=False)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_reg"} and all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        proposals, _ = model.eval()(images, with_targets=False)
    assert len(proposals) == batch


def test_a_single_tensor_against_two_declared_levels_counts_one_level() -> None:
    feature = torch.randn(2, 8, 16, 16)
    with pytest.raises(ValueError, match=r"returned 1 feature levels but declares strides \(8, 16\)"):
        check_feature_strides(C4(strides=(8, 16)), (128, 128), feature, "RPNModule")


def test_top_n_settings_take_an_int_or_torchvisions_dict() -> None:
    rpn = RPN(AnchorGenerator(((32,), (64,)), (0.5, 1.0, 2.0), (8, 16)), in_channels=8).eval()
    features = [torch.randn(1, 8, 128 // s, 128 // s) for s in (8, 16)]
    rpn.pre_nms_top_n = 5
    assert rpn.pre_nms_top_n == {"train": 5, "test": 5}
    with torch.no_grad():
        (boxes, _), = rpn(features, [(128, 128)])[0]
    assert len(boxes) <= 2 * 5  # 5 candidates per level
    rpn.post_nms_top_n = dict(training=2000, testing=3)  # torchvision's keys
    assert rpn.post_nms_top_n == {"train": 2000, "test": 3}
    with torch.no_grad():
        (boxes, _), = rpn(features, [(128, 128)])[0]
    assert len(boxes) == 3
    assert (rpn.proposal_config.pre_nms_top_n_test, rpn.proposal_config.post_nms_top_n_test) == (5, 3)
    rpn.post_nms_top_n["test"] = 4  # an entry changed in place (bench scripts, export) still counts
    assert int(rpn.post_nms_top_n["test"]) == rpn.proposal_config.post_nms_top_n_test == 4


@pytest.mark.parametrize("value", [0, "1000", {"test": 100}, {"train": 1, "test": 0}, {"train": 1, "training": 2}])
def test_a_top_n_setting_of_another_form_names_the_accepted_ones(value: object) -> None:
    rpn = _one_level_rpn()
    with pytest.raises(ValueError, match=r"RPN.post_nms_top_n must be a positive int \(both modes\), "
                                         r"\{'train': n, 'test': n\} or torchvision's \{'training': n, 'testing': n\}"):
        rpn.post_nms_top_n = value


def test_an_entry_changed_in_place_by_torchvisions_key_is_the_same_entry() -> None:
    """Code written for torchvision's ``rpn._pre_nms_top_n["testing"] = 50`` works on ours."""
    rpn = _one_level_rpn()
    rpn.pre_nms_top_n["testing"] = 50
    rpn.post_nms_top_n.update(training=np.int64(300))  # numpy ints are ints
    assert rpn.pre_nms_top_n == {"train": 2000, "test": 50} and rpn.pre_nms_top_n["testing"] == 50
    assert type(rpn.post_nms_top_n["train"]) is int and rpn.post_nms_top_n["train"] == 300
    assert rpn.proposal_config.pre_nms_top_n_test == 50 and rpn.proposal_config.post_nms_top_n_train == 300
    rpn.eval()
    with torch.no_grad():
        (boxes, _), = rpn(torch.randn(1, 8, 8, 8), [(64, 64)])[0]
    assert len(boxes) <= 50


@pytest.mark.parametrize(("edit", "error"), [
    (lambda top_n: top_n.__setitem__("val", 5), ValueError),
    (lambda top_n: top_n.__setitem__("test", 0), ValueError),
    (lambda top_n: top_n.__setitem__("testing", "500"), ValueError),
    (lambda top_n: top_n.update({"test": -1}), ValueError),
    (lambda top_n: top_n.pop("test"), TypeError),
    (lambda top_n: top_n.__delitem__("train"), TypeError),
    (lambda top_n: top_n.clear(), TypeError),
])
def test_a_bad_change_in_place_is_refused_where_it_is_made(edit, error) -> None:
    rpn = _one_level_rpn()
    with pytest.raises(error, match=r"RPN.pre_nms_top_n"):
        edit(rpn.pre_nms_top_n)
    assert rpn.pre_nms_top_n == {"train": 2000, "test": 1000}


def test_a_top_n_setting_survives_pickling_and_copies() -> None:
    rpn = _one_level_rpn()
    rpn.pre_nms_top_n["test"] = 70
    for copied in (pickle.loads(pickle.dumps(rpn)), copy.deepcopy(rpn)):
        assert copied.pre_nms_top_n == {"train": 2000, "test": 70}
        with pytest.raises(ValueError, match=r"RPN.pre_nms_top_n\['x'\]"):
            copied.pre_nms_top_n["x"] = 1


def _detection_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A Faster R-CNN-like state dict around a ResNet-18 (``backbone.body.*``, no ``fc``), saved to ``path``."""
    torch.manual_seed(1)
    body = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    state = {f"backbone.body.{k}": v for k, v in body.items()}
    state.update({f"backbone.fpn.inner_blocks.{i}.0.weight": torch.zeros(256, 64, 1, 1) for i in range(4)})
    state["rpn.head.conv.0.0.weight"] = torch.zeros(256, 256, 3, 3)
    torch.save(state, path)
    return body


def test_a_detection_checkpoint_as_weights_is_summed_up_with_the_prefix_to_strip(tmp_path: Path) -> None:
    path = tmp_path / "frcnn.pth"
    _detection_checkpoint(path)
    with pytest.raises(ValueError) as error:
        build_backbone("resnet18_fpn", weights=str(path))
    message = str(error.value)
    assert len(message) < 1200, message
    assert f"model.weights='{path}' do not fit ResNet" in message
    assert "100 missing key(s) (conv1.weight, bn1.weight, bn1.bias, ...)" in message
    assert "125 unexpected key(s) (backbone.body.conv1.weight," in message
    assert "under 'backbone.body.'" in message and "with the prefix stripped" in message
    assert "state_dict of torchvision's resnet18 classification network" in message


def test_a_stripped_detection_backbone_loads_without_the_classifier_head(tmp_path: Path) -> None:
    path = tmp_path / "frcnn.pth"
    body = _detection_checkpoint(path)
    stripped = tmp_path / "body.pth"
    torch.save(body, stripped)
    backbone = build_backbone("resnet18_fpn", weights=str(stripped))
    torch.testing.assert_close(backbone.stages[0][0].weight, body["conv1.weight"])
    torch.testing.assert_close(backbone.stages[4][0].conv1.weight, body["layer4.0.conv1.weight"])


def test_the_cli_takes_flat_aspect_ratios_and_anchor_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_rpn.cli import RPNLightningCLI

    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])

    def build(*overrides: str) -> RPNLightningCLI:
        return RPNLightningCLI(args=["--model.backbone", "tiny_fpn", "--model.weights", "null",
                                     "--trainer.logger", "false", *overrides],
                               run=False, save_config_callback=None)

    flat = build("--model.anchor_sizes", "[[16], [32], [64], [128]]", "--model.aspect_ratios", "[0.5, 1.0, 2.0]")
    assert flat.model.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 4
    assert build("--model.anchor_sizes", "[24, 48]").model.anchor_generator.sizes == ((24.0, 48.0),) * 4
    # the nested form, and a checkpoint's saved hyperparameters, parse as before
    nested = build("--model.anchor_sizes", "[[16], [32], [64], [128]]", "--model.aspect_ratios", "[[1.0]]")
    assert nested.model.anchor_generator.aspect_ratios == ((1.0,),) * 4
    saved = {"model": {"anchor_sizes": [[16.0], [32.0], [64.0], [128.0]], "aspect_ratios": [[0.5, 1.0, 2.0]]}}
    parsed = nested.parser.parse_object(saved, nested.config)
    assert parsed.model.anchor_sizes == ((16.0,), (32.0,), (64.0,), (128.0,))
    assert parsed.model.aspect_ratios == ((0.5, 1.0, 2.0),)


def test_a_single_tensor_backbone_exports_equal_to_eager() -> None:
    from lightning_rpn.tools.export import export_proposal_network
    from lightning_rpn.training.module import RPNModule

    torch.manual_seed(0)
    model = RPNModule(backbone=C4(), anchor_sizes=((32,),), channels_last=False).eval()
    program = export_proposal_network(model, (128, 160))
    images = torch.randint(0, 256, (1, 3, 128, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    boxes, scores = program.module()(images, torch.tensor([128, 160]))
    eager = model.predict_images([images[0].permute(1, 2, 0).numpy()])[0]
    assert len(boxes) > 0 and torch.allclose(boxes, eager["boxes"], atol=1e-3)
    assert torch.allclose(scores, eager["scores"], atol=1e-6)
