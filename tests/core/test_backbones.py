"""Backbones: levels, strides and channels read from the networks; weights; freezing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from lightning_rpn.core.backbones import (
    BACKBONES,
    batch_norm_layer,
    build_backbone,
    check_backbone,
    infer_strides,
    weights_from_checkpoint,
)


EXPECTED = {
    "resnet18_fpn": (256, (4, 8, 16, 32, 64), 64),
    "resnet34_fpn": (256, (4, 8, 16, 32, 64), 64),
    "resnet50_fpn": (256, (4, 8, 16, 32, 64), 64),
    "mobilenet_v3_large_fpn": (256, (8, 16, 32, 64), 64),
    "vgg16_c4": (512, (16,), 16),
    "tiny_fpn": (32, (4, 8, 16, 32), 32),
}


def test_every_builtin_backbone_is_covered() -> None:
    assert set(BACKBONES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_metadata_and_feature_shapes(name: str) -> None:
    backbone = build_backbone(name).eval()
    channels, strides, divisibility = EXPECTED[name]
    check_backbone(backbone, where=name)  # raises naming a missing piece of the interface
    assert (backbone.out_channels, backbone.strides, backbone.size_divisibility) == (
        channels,
        strides,
        divisibility,
    )
    height, width = divisibility, 3 * divisibility  # a padded, non-square batch
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, height, width))
    assert [tuple(f.shape) for f in features] == [
        (2, channels, height // s, width // s) for s in strides
    ]


def test_vgg16_c4_gives_the_14x14x512_map_of_a_224_input() -> None:
    backbone = build_backbone("vgg16_c4").eval()
    with torch.no_grad():
        (feature,) = backbone(torch.randn(1, 3, 224, 224))
    assert tuple(feature.shape) == (1, 512, 14, 14)


def _trainable(backbone: nn.Module) -> list[bool]:
    return [any(p.requires_grad for p in stage.parameters()) for stage in backbone.stages]


def test_trainable_layers_freeze_the_lower_stages_only() -> None:
    with weights_from_checkpoint():  # pretrained weights, not downloaded
        backbone = build_backbone("resnet18_fpn", weights="ResNet18_Weights.IMAGENET1K_V1", trainable_layers=2)
    assert _trainable(backbone) == [False, False, False, True, True]
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    with pytest.raises(ValueError, match="trainable_layers must be in \\[0, 5\\]"):
        build_backbone("tiny_fpn", trainable_layers=6)


def test_trainable_layers_without_weights_are_ignored_with_a_warning() -> None:
    # freezing applies to pretrained weights: a frozen random stage never learns
    with pytest.warns(UserWarning, match=r"resnet18_fpn: trainable_layers=2 is ignored: without pretrained weights "
                                         r"\(model.weights null\) all 5 stages train"):
        backbone = build_backbone("resnet18_fpn", trainable_layers=2)
    assert _trainable(backbone) == [True] * 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a value that freezes nothing is no mistake
        assert _trainable(build_backbone("tiny_fpn", trainable_layers=5)) == [True] * 5


def test_batch_norm_follows_the_weights_unless_frozen_bn_is_given() -> None:
    assert batch_norm_layer("resnet18_fpn", "ResNet18_Weights.IMAGENET1K_V1", None) is FrozenBatchNorm2d
    assert batch_norm_layer("resnet18_fpn", None, None) is nn.BatchNorm2d
    assert batch_norm_layer("mobilenet_v3_large_fpn", None, True) is FrozenBatchNorm2d
    assert batch_norm_layer("resnet50_fpn", "w.pth", False) is nn.BatchNorm2d
    assert batch_norm_layer("tiny_fpn", "w.pth", None) is nn.BatchNorm2d
    assert batch_norm_layer("vgg16_c4", "VGG16_Weights.IMAGENET1K_V1", None) is None
    with pytest.raises(ValueError, match="tiny_fpn: frozen_bn=True is not supported"):
        batch_norm_layer("tiny_fpn", None, True)


def test_one_training_image_with_a_1x1_last_stage_is_a_clear_error() -> None:
    backbone = build_backbone("tiny_fpn").train()
    with pytest.raises(ValueError, match=r"a training batch of 1 image of 32x32 px leaves a 1x1 map at stride 32, "
                                         r"one value per channel, .* batches of 2 or more images \(data.batch_size.*"
                                         r"images larger than 32 px on a side"):
        backbone(torch.randn(1, 3, 32, 32))
    backbone(torch.randn(2, 3, 32, 32))  # batch statistics of 2 values
    backbone(torch.randn(1, 3, 64, 32))
    with torch.no_grad():
        backbone.eval()(torch.randn(1, 3, 32, 32))  # running statistics
    build_backbone("resnet18_fpn", frozen_bn=True).train()(torch.randn(1, 3, 32, 32))  # no batch statistics


def test_frozen_bn_option_and_default_without_weights() -> None:
    plain = build_backbone("resnet18_fpn")
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())
    frozen = build_backbone("resnet18_fpn", frozen_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())


def test_local_checkpoint_is_loaded_and_defaults_to_frozen_bn(tmp_path) -> None:
    torch.manual_seed(123)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    backbone = build_backbone("resnet18_fpn", weights=str(path))
    stem_conv = backbone.stages[0][0]
    torch.testing.assert_close(stem_conv.weight, reference.conv1.weight)
    frozen_bn = backbone.stages[0][1]
    assert isinstance(frozen_bn, FrozenBatchNorm2d)
    torch.testing.assert_close(frozen_bn.running_var, reference.bn1.running_var)
    trainable = [any(p.requires_grad for p in stage.parameters()) for stage in backbone.stages]
    assert trainable == [False, False, True, True, True]  # default 3 with weights


def test_checkpoint_of_the_wrong_network_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(ValueError, match="mobilenet.pth.*do not fit ResNet"):
        build_backbone("resnet18_fpn", weights=str(path))


def test_weight_names_are_resolved_and_checked_against_the_architecture() -> None:
    with pytest.raises(ValueError, match="ResNet50_Weights.*resnet18 backbone needs ResNet18_Weights"):
        build_backbone("resnet18_fpn", weights="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="not an existing file"):
        build_backbone("resnet18_fpn", weights="no/such/file.pth")
    with pytest.raises(ValueError, match=r"weights='None': for no pretrained weights write null"):
        build_backbone("resnet18_fpn", weights="None")  # `--model.weights None` is a string


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="backbone='resnet7'.*resnet18_fpn"):
        build_backbone("resnet7")


class _TwoLevel(nn.Module):
    """A user's own backbone: two levels at strides 8 and 16 with 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(3, 32, 3, stride=8, padding=1)
        self.c4 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.out_channels = 32
        self.size_divisibility = 16
        self.strides = infer_strides(self)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.c3(images)
        return [c3, self.c4(c3)]


def test_custom_backbone_meets_the_interface() -> None:
    custom = _TwoLevel()
    assert custom.strides == (8, 16)
    check_backbone(custom)


def test_check_backbone_names_the_missing_attribute() -> None:
    custom = _TwoLevel()
    del custom.size_divisibility
    with pytest.raises(TypeError, match="_TwoLevel.size_divisibility must be int"):
        check_backbone(custom, where="RPNModule(backbone=...)")
    custom.size_divisibility = 24
    with pytest.raises(ValueError, match="size_divisibility=24 is not a multiple of its largest stride 16"):
        check_backbone(custom)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        check_backbone("resnet18_fpn")  # type: ignore[arg-type]


def test_infer_strides_probes_a_float64_backbone_in_its_dtype() -> None:
    assert infer_strides(_TwoLevel().double()) == (8, 16)  # a float32 probe failed in the first conv


def test_infer_strides_rejects_a_probe_smaller_than_the_stride() -> None:
    with pytest.raises(ValueError, match="level 1 .* one integer stride"):
        infer_strides(_TwoLevel(), size=24)


@pytest.fixture
def no_internet(monkeypatch):
    """torch.hub's downloads fail as on a machine without internet; the calls are counted."""
    from urllib.error import URLError

    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    return calls


def test_a_failed_download_names_model_weights_and_the_way_out(no_internet) -> None:
    with pytest.raises(ValueError, match=r"model.weights='ResNet18_Weights.IMAGENET1K_V1': downloading them failed "
                                         r"\(.*Name or service not known.*--model.weights null"):
        build_backbone("resnet18_fpn", weights="ResNet18_Weights.IMAGENET1K_V1")


def test_weights_a_checkpoint_replaces_are_not_downloaded_but_shape_the_network(no_internet, tmp_path) -> None:
    with weights_from_checkpoint():
        backbone = build_backbone("resnet18_fpn", weights="ResNet18_Weights.IMAGENET1K_V1")
    path = tmp_path / "another-network.pth"
    assert no_internet == []
    # the network of the pretrained case: frozen batch norm, the default 3 trainable stages
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    trainable = [any(p.requires_grad for p in stage.parameters()) for stage in backbone.stages]
    assert trainable == [False, False, True, True, True]
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)  # would not fit: never read
    with weights_from_checkpoint():
        build_backbone("resnet18_fpn", weights=str(path))
    with pytest.raises(ValueError, match="downloading them failed"):  # outside the context: downloaded
        build_backbone("resnet18_fpn", weights="ResNet18_Weights.IMAGENET1K_V1")


def test_tiny_fpn_weights_a_checkpoint_replaces_are_not_read(tmp_path) -> None:
    with weights_from_checkpoint():  # the file is gone (another machine): validate --ckpt_path still builds
        backbone = build_backbone("tiny_fpn", weights=str(tmp_path / "gone.pth"))
    assert _trainable(backbone) == [False, False, True, True, True]
