"""The RPN head: a small conv net shared by every pyramid level.

Shapes: ``B`` images, ``L`` levels, ``A`` anchors per location, ``H_l x W_l`` the size of level
``l``'s feature map (after the head's ``anchor_stride``), ``N_l = H_l * W_l * A``.

For each level the head runs ``conv_depth`` 3x3 convolutions (+ ReLU; the first one at stride
``anchor_stride``, padding 1) followed by two sibling 1x1 convolutions: objectness and box
deltas. Outputs are flattened in ``(y, x, anchor)`` order, the order of
:class:`~lightning_rpn.core.anchors.AnchorGenerator`, so prediction ``j`` of a level belongs to
anchor ``j`` of that level.

Objectness comes in two flavours:

- ``"sigmoid"``: ``A`` logits per location, one binary logit per anchor -> ``[B, N_l]``.
- ``"softmax"``: ``2A`` logits per location, a (background, object) pair per anchor, as in the
  source document's head -> ``[B, N_l, 2]``. :func:`objectness_logits` turns a pair into the
  equivalent binary logit so that proposals and scores work the same for both flavours.

With ``quality`` (the OLN idea, :mod:`~lightning_rpn.core.quality`), a third sibling 1x1 convolution
predicts ``Q`` localisation-quality logits per anchor (``"centerness"``, ``"iou"`` or both, in
the order named) and ``forward`` returns them as a third list, ``[B, N_l, Q]`` per level.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .config import OBJECTNESS_MODES, check_choice
from .quality import parse_quality

__all__ = ["RPNHead", "objectness_logits", "OBJECTNESS_MODES"]

ObjectnessMode = Literal["sigmoid", "softmax"]


def objectness_logits(pred_objectness: Tensor) -> Tensor:
    """Binary object logit from a ``[..., 2]`` (background, object) softmax pair.

    ``softmax(l)[1] = 1 / (1 + exp(l0 - l1)) = sigmoid(l1 - l0)``, so ``l1 - l0`` is the logit
    of the object probability, ``[..., 2] -> [...]``.
    """
    if pred_objectness.shape[-1:] != (2,):
        raise ValueError(
            "objectness_logits: expected softmax pairs of shape [..., 2], "
            f"got {tuple(pred_objectness.shape)}"
        )
    return pred_objectness[..., 1] - pred_objectness[..., 0]


class RPNHead(nn.Module):
    """Shared 3x3 conv tower + sibling 1x1 objectness / box-delta convolutions.

    Args:
        in_channels: channels of every input feature map.
        num_anchors: ``A``, anchors per location (``AnchorGenerator.num_anchors_per_location()``).
        conv_channels: channels of the 3x3 convolutions (``None`` -> ``in_channels``).
        conv_depth: number of 3x3 conv + ReLU layers (>= 1).
        objectness: ``"sigmoid"`` (``A`` logits) or ``"softmax"`` (``2A`` logits).
        anchor_stride: stride of the first 3x3 conv; must equal the anchor generator's
            ``anchor_stride`` so that there is one prediction per anchor.
        quality: ``None`` or localisation-quality branches, ``"centerness"``, ``"iou"`` or
            ``"centerness+iou"`` (see the module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        conv_channels: int | None = None,
        conv_depth: int = 1,
        objectness: ObjectnessMode = "sigmoid",
        anchor_stride: int = 1,
        quality: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("in_channels", in_channels, 1),
            ("num_anchors", num_anchors, 1),
            ("conv_depth", conv_depth, 1),
            ("anchor_stride", anchor_stride, 1),
        ):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"RPNHead: {name} must be an int >= {minimum}, got {value!r}")
        if conv_channels is None:
            conv_channels = in_channels
        if not isinstance(conv_channels, int) or conv_channels < 1:
            raise ValueError(f"RPNHead: conv_channels must be an int >= 1 or None, got {conv_channels!r}")
        check_choice(objectness, OBJECTNESS_MODES, "RPNHead: objectness")

        self.in_channels = in_channels
        self.num_anchors = num_anchors
        self.objectness = objectness
        self.anchor_stride = anchor_stride
        self.quality = parse_quality(quality, "RPNHead: quality")

        layers: list[nn.Module] = []
        channels = in_channels
        for depth in range(conv_depth):
            stride = anchor_stride if depth == 0 else 1
            layers += [nn.Conv2d(channels, conv_channels, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]
            channels = conv_channels
        self.conv = nn.Sequential(*layers)
        self._cls_per_anchor = 1 if objectness == "sigmoid" else 2
        self.cls_logits = nn.Conv2d(conv_channels, num_anchors * self._cls_per_anchor, 1)
        self.bbox_deltas = nn.Conv2d(conv_channels, num_anchors * 4, 1)
        if self.quality:
            self.quality_logits = nn.Conv2d(conv_channels, num_anchors * len(self.quality), 1)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def _flatten(self, x: Tensor, per_anchor: int) -> Tensor:
        """``[B, A * C, H, W] -> [B, H * W * A, C]`` (channel ``a * C + c`` is anchor a, value c)."""
        b, _, h, w = x.shape
        x = x.view(b, self.num_anchors, per_anchor, h, w).permute(0, 3, 4, 1, 2)
        return x.reshape(b, h * w * self.num_anchors, per_anchor)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], ...]:
        """Per-level objectness (``[B, N_l]`` or ``[B, N_l, 2]``) and deltas ``[B, N_l, 4]``,
        plus the quality logits ``[B, N_l, Q]`` when the head has quality branches."""
        if isinstance(features, Tensor):
            raise TypeError("RPNHead.forward: expected a list of [B, C, H, W] tensors (one per level), got a Tensor")
        objectness: list[Tensor] = []
        deltas: list[Tensor] = []
        quality: list[Tensor] = []
        for level, feature in enumerate(features):
            if feature.dim() != 4 or feature.shape[1] != self.in_channels:
                raise ValueError(
                    f"RPNHead.forward: features[{level}] has shape {tuple(feature.shape)}, "
                    f"expected [B, {self.in_channels}, H, W]"
                )
            hidden = self.conv(feature)
            logits = self._flatten(self.cls_logits(hidden), self._cls_per_anchor)
            objectness.append(logits.squeeze(-1) if self.objectness == "sigmoid" else logits)
            deltas.append(self._flatten(self.bbox_deltas(hidden), 4))
            if self.quality:
                quality.append(self._flatten(self.quality_logits(hidden), len(self.quality)))
        return (objectness, deltas, quality) if self.quality else (objectness, deltas)
