"""Box <-> regression-delta transform of Faster R-CNN.

Shapes: ``N`` boxes (anchors and boxes paired row by row; leading dims broadcast).

With ``(x, y, w, h)`` the centre and size of a box and subscript ``a`` the anchor:
``t_x = wx (x - x_a) / w_a``, ``t_y = wy (y - y_a) / h_a``, ``t_w = ww log(w / w_a)``,
``t_h = wh log(h / h_a)``. Decoding clamps ``t_w / ww`` and ``t_h / wh`` from above at
``clamp`` before ``exp`` so that a wild prediction cannot overflow. All arithmetic runs in
float32 with autocast disabled: under bf16/fp16 autocast the log/exp would otherwise lose the
precision the targets need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BoxCoder"]


def _fp32_region(device: torch.device):
    """A context that turns autocast off on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cpu", enabled=False)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


class BoxCoder:
    """Encode boxes as ``(t_x, t_y, t_w, t_h)`` relative to anchors, and decode them back.

    Args:
        weights: ``(wx, wy, ww, wh)`` multipliers of the four deltas (all positive).
        clamp: upper bound on the decoded log-size deltas (``log(1000 / 16)`` by default).
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float = math.log(1000.0 / 16),
    ) -> None:
        weights = tuple(float(w) for w in weights)
        if len(weights) != 4 or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"BoxCoder: weights must be 4 positive numbers (wx, wy, ww, wh), got {weights!r}")
        if not math.isfinite(clamp) and clamp != math.inf:
            raise ValueError(f"BoxCoder: clamp must be a number or inf, got {clamp!r}")
        self.weights: tuple[float, float, float, float] = weights  # type: ignore[assignment]
        self.clamp = float(clamp)

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas ``[..., 4]`` (float32) that move each anchor onto its box."""
        _check_last_dim(boxes, "BoxCoder.encode(boxes)")
        _check_last_dim(anchors, "BoxCoder.encode(anchors)")
        _check_broadcast(boxes, anchors, "BoxCoder.encode: boxes", "anchors")
        with _fp32_region(boxes.device):
            boxes = boxes.float()
            anchors = anchors.to(device=boxes.device, dtype=torch.float32)
            ax, ay, aw, ah = _centre_size(anchors)
            bx, by, bw, bh = _centre_size(boxes)
            wx, wy, ww, wh = self.weights
            return torch.stack(
                (
                    wx * (bx - ax) / aw,
                    wy * (by - ay) / ah,
                    ww * torch.log(bw / aw),
                    wh * torch.log(bh / ah),
                ),
                dim=-1,
            )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` (float32, xyxy) obtained by applying ``deltas`` to ``anchors``."""
        _check_last_dim(deltas, "BoxCoder.decode(deltas)")
        _check_last_dim(anchors, "BoxCoder.decode(anchors)")
        _check_broadcast(deltas, anchors, "BoxCoder.decode: deltas", "anchors")
        with _fp32_region(deltas.device):
            deltas = deltas.float()
            anchors = anchors.to(device=deltas.device, dtype=torch.float32)
            ax, ay, aw, ah = _centre_size(anchors)
            wx, wy, ww, wh = self.weights
            log_w = (deltas[..., 2] / ww).clamp(max=self.clamp)
            log_h = (deltas[..., 3] / wh).clamp(max=self.clamp)
            cx = deltas[..., 0] / wx * aw + ax
            cy = deltas[..., 1] / wy * ah + ay
            half_w = 0.5 * (torch.exp(log_w) * aw)
            half_h = 0.5 * (torch.exp(log_h) * ah)
            return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={self.weights}, clamp={self.clamp})"


def _check_broadcast(first: Tensor, second: Tensor, first_name: str, second_name: str) -> None:
    """``ValueError`` naming both shapes when the two ``[..., 4]`` tensors' leading shapes do not
    broadcast (torch's own error names neither argument)."""
    try:
        torch.broadcast_shapes(first.shape[:-1], second.shape[:-1])
    except RuntimeError:
        raise ValueError(f"{first_name} {tuple(first.shape)} and {second_name} {tuple(second.shape)} do not "
                         "broadcast: give one row per anchor ([N, 4] and [N, 4]) or shapes that broadcast") from None


def _check_last_dim(tensor: Tensor, where: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor [..., 4], got {type(tensor).__name__}")
    if tensor.dim() == 0 or tensor.shape[-1] != 4:
        raise ValueError(f"{where}: expected shape [..., 4], got {tuple(tensor.shape)}")
