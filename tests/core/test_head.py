"""RPNHead: output shapes, (y, x, anchor) order, anchor_stride, init, softmax pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.head import RPNHead, objectness_logits


def _features(channels: int = 8) -> list[torch.Tensor]:
    return [torch.randn(2, channels, 10, 12), torch.randn(2, channels, 5, 6), torch.randn(2, channels, 3, 3)]


@pytest.mark.parametrize("mode, per_anchor", [("sigmoid", None), ("softmax", 2)])
def test_shapes_per_level(mode: str, per_anchor: int | None) -> None:
    head = RPNHead(8, 3, objectness=mode)
    objectness, deltas = head(_features())
    assert len(objectness) == len(deltas) == 3
    for (h, w), obj, dlt in zip([(10, 12), (5, 6), (3, 3)], objectness, deltas):
        expected = (2, h * w * 3) if per_anchor is None else (2, h * w * 3, per_anchor)
        assert tuple(obj.shape) == expected
        assert tuple(dlt.shape) == (2, h * w * 3, 4)
    assert head.cls_logits.out_channels == 3 * (1 if per_anchor is None else 2)
    assert head.bbox_deltas.out_channels == 12


def _replace_output(module: nn.Module, make) -> None:
    module.register_forward_hook(lambda _m, _inp, out: make(out))


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_outputs_are_ordered_y_x_anchor(mode: str) -> None:
    num_anchors, height, width = 3, 4, 5
    head = RPNHead(2, num_anchors, objectness=mode)
    per_anchor = 1 if mode == "sigmoid" else 2
    ys = torch.arange(height).view(1, 1, height, 1)
    xs = torch.arange(width).view(1, 1, 1, width)

    def code(out: torch.Tensor, per: int) -> torch.Tensor:
        # channel a * per + c at (y, x) -> 1000 y + 100 x + 10 a + c
        channel = torch.arange(out.shape[1]).view(1, -1, 1, 1)
        a, c = channel // per, channel % per
        return (1000 * ys + 100 * xs + 10 * a + c).float().expand_as(out).clone()

    _replace_output(head.cls_logits, lambda out: code(out, per_anchor))
    _replace_output(head.bbox_deltas, lambda out: code(out, 4))
    objectness, deltas = head([torch.zeros(1, 2, height, width)])
    obj, dlt = objectness[0][0], deltas[0][0]
    for y in range(height):
        for x in range(width):
            for a in range(num_anchors):
                j = (y * width + x) * num_anchors + a
                base = 1000 * y + 100 * x + 10 * a
                if mode == "sigmoid":
                    assert obj[j].item() == base
                else:
                    assert obj[j].tolist() == [base, base + 1]
                assert dlt[j].tolist() == [base, base + 1, base + 2, base + 3]


@pytest.mark.parametrize("anchor_stride", [1, 2, 3])
def test_one_prediction_per_anchor_with_anchor_stride(anchor_stride: int) -> None:
    generator = AnchorGenerator(((32,), (64,)), (0.5, 1.0, 2.0), (8, 16), anchor_stride=anchor_stride)
    head = RPNHead(4, generator.num_anchors_per_location(), anchor_stride=anchor_stride)
    features = [torch.randn(1, 4, 11, 13), torch.randn(1, 4, 6, 7)]
    anchors = generator([f.shape[-2:] for f in features])
    objectness, deltas = head(features)
    for level, anc in enumerate(anchors):
        assert objectness[level].shape[1] == deltas[level].shape[1] == anc.shape[0]
    assert head.conv[0].stride == (anchor_stride, anchor_stride)


def test_conv_tower_depth_channels_and_init() -> None:
    head = RPNHead(16, 3, conv_channels=32, conv_depth=3)
    convs = [m for m in head.conv if isinstance(m, nn.Conv2d)]
    relus = [m for m in head.conv if isinstance(m, nn.ReLU)]
    assert len(convs) == len(relus) == 3
    assert [c.in_channels for c in convs] == [16, 32, 32]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert head.cls_logits.kernel_size == head.bbox_deltas.kernel_size == (1, 1)
    assert RPNHead(16, 3).conv[0].out_channels == 16
    for conv in [*convs, head.cls_logits, head.bbox_deltas]:
        assert torch.count_nonzero(conv.bias) == 0
        assert 0.005 < conv.weight.std().item() < 0.015


def test_shared_weights_across_levels() -> None:
    head = RPNHead(4, 1)
    feature = torch.randn(1, 4, 6, 6)
    objectness, _ = head([feature, feature.clone()])
    assert torch.equal(objectness[0], objectness[1])


def test_objectness_logits_matches_softmax_probability() -> None:
    pairs = torch.randn(7, 2) * 4
    probability = pairs.softmax(dim=-1)[:, 1]
    assert torch.allclose(objectness_logits(pairs).sigmoid(), probability, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        objectness_logits(torch.randn(7, 3))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="objectness"):
        RPNHead(4, 3, objectness="tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="conv_depth"):
        RPNHead(4, 3, conv_depth=0)
    with pytest.raises(ValueError, match=r"features\[1\]"):
        RPNHead(4, 3)([torch.randn(1, 4, 5, 5), torch.randn(1, 5, 5, 5)])
