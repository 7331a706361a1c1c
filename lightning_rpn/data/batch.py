"""RPNBatch: what the collate hands to the model.

Shapes: ``B`` images, ``Hp x Wp`` the padded batch size (a multiple of the size
divisibility), ``N`` anchors of an image (all levels), ``G`` / ``C`` ground-truth / crowd boxes
of an image. Boxes are ``(x1, y1, x2, y2)`` float32 in pixels of the resized image.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lightning_rpn.data.problems import Problem
from lightning_rpn.targets import dense_target_deltas

__all__ = ["RPNBatch"]


@dataclass
class RPNBatch:
    """A padded batch with its boxes and, when the collate assigned them, anchor targets.

    ``images`` uint8 ``[B, 3, Hp, Wp]`` zero padded at the bottom and right (the model converts
    to float and normalises); ``image_sizes`` the ``(h, w)`` after resize and before padding;
    ``original_sizes`` the ``(h, w)`` as stored, to map predictions back
    (scale ``original / image_size`` when only resizing was applied);
    ``anchor_labels`` int8 ``[B, N]`` (1 / 0 / -1) and ``positive_deltas`` float32 ``[P, 4]``,
    the encoded targets of the positive anchors in the row-major order of
    ``anchor_labels == 1``, or ``None`` (compact: workers send a fraction of the dense
    ``target_deltas [B, N, 4]``, which is built on demand); ``removed_boxes`` counts ground-truth boxes the transforms removed in this
    batch and ``problems`` what was clipped or skipped while loading it (both reported by
    :class:`~lightning_rpn.data.datamodule.RPNDataModule`).
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    image_ids: list[int | str]
    gt_boxes: list[Tensor]
    crowd_boxes: list[Tensor]
    anchor_labels: Tensor | None = None
    positive_deltas: Tensor | None = None
    sources: list[str] = field(default_factory=list)
    removed_boxes: int = 0
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def targets(self) -> list[dict[str, Tensor]]:
        """Per-image ``{"boxes", "crowd_boxes"}``, the form ``RPN.forward(targets=...)`` takes."""
        return [{"boxes": g, "crowd_boxes": c} for g, c in zip(self.gt_boxes, self.crowd_boxes)]

    @property
    def target_deltas(self) -> Tensor | None:
        """Float32 ``[B, N, 4]``: ``positive_deltas`` at the positive anchors, 0 elsewhere (built now)."""
        if self.anchor_labels is None or self.positive_deltas is None:
            return None
        return dense_target_deltas(self.anchor_labels, self.positive_deltas)

    @property
    def anchor_targets(self) -> tuple[Tensor, Tensor] | None:
        """``(anchor_labels, target_deltas)`` or ``None``, for ``RPN.forward(anchor_targets=...)``."""
        deltas = self.target_deltas
        if self.anchor_labels is None or deltas is None:
            return None
        return self.anchor_labels, deltas

    def _map(self, fn: Any) -> RPNBatch:
        return replace(
            self,
            images=fn(self.images),
            gt_boxes=[fn(b) for b in self.gt_boxes],
            crowd_boxes=[fn(b) for b in self.crowd_boxes],
            anchor_labels=None if self.anchor_labels is None else fn(self.anchor_labels),
            positive_deltas=None if self.positive_deltas is None else fn(self.positive_deltas),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RPNBatch:
        """A copy with every tensor on ``device`` (Lightning calls this to move batches)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> RPNBatch:
        """A copy with every tensor in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())
