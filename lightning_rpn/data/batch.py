"""RPNBatch: what the collate hands to the model.

Shapes: ``B`` images, ``Hp x Wp`` the padded batch size (a multiple of the size
divisibility), ``N`` anchors of an image (all levels), ``G`` / ``C`` ground-truth / crowd boxes
of an image. Boxes are ``(x1, y1, x2, y2)`` float32 in pixels of the resized image.

Pickling (how a DataLoader worker hands a batch to the main process) packs every tensor but
the images into one byte buffer and restores them as views of it: each tensor crossing a
process boundary costs a shared-memory segment and a file-descriptor round trip, which for a
batch of small box tensors (two per image) took more time than the boxes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lightning_rpn.core.targets import dense_target_deltas
from lightning_rpn.data.problems import Problem

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
    ``target_deltas [B, N, 4]``, which is built on demand); ``sampling_epoch`` the epoch the
    collate sampled those targets for (``None`` without targets; see :meth:`anchor_targets_for`);
    ``sampling_keys`` what seeds each image's anchor sampling with the seed and the epoch (its
    position in its dataset, else its image id; see ``DetectionSample.sampling_key``);
    ``removed_boxes`` counts ground-truth boxes the transforms removed in this
    batch and ``problems`` what was clipped or skipped while loading it (both reported by
    :class:`~lightning_rpn.training.datamodule.RPNDataModule`); ``stand_ins`` marks the images
    that stand in for unusable ones (``DetectionSample.stand_in``; empty: none), which
    evaluation leaves out (:attr:`evaluated`); ``annotation_areas`` gives, per image, its gt
    boxes' annotated areas in original-image pixels (float32 ``[G]``, ``DetectionSample.annotation_areas``;
    ``None`` for an image whose source gives none; empty: no image of the batch has them), which
    sort the boxes into the recall's area ranges.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    image_ids: list[int | str]
    gt_boxes: list[Tensor]
    crowd_boxes: list[Tensor]
    anchor_labels: Tensor | None = None
    positive_deltas: Tensor | None = None
    sampling_epoch: int | None = None
    sampling_keys: list[int | str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    removed_boxes: int = 0
    problems: list[Problem] = field(default_factory=list)
    stand_ins: list[bool] = field(default_factory=list)
    annotation_areas: list[Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def evaluated(self) -> list[int]:
        """Positions of the images that evaluation counts: all but the stand-ins."""
        return [i for i in range(len(self)) if not (self.stand_ins and self.stand_ins[i])]

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

    def anchor_targets_for(self, epoch: int) -> tuple[Tensor, Tensor] | None:
        """:attr:`anchor_targets` if they were sampled for ``epoch``, else ``None``.

        A batch prefetched before the collate learnt the epoch (the first batches after a
        resume) has targets of another epoch; ``None`` makes the RPN assign them again from
        the boxes, with the same result the collate gives for ``epoch``.
        """
        return self.anchor_targets if self.sampling_epoch == epoch else None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        small = [*self.gt_boxes, *self.crowd_boxes]
        small += [t for t in (self.anchor_labels, self.positive_deltas) if t is not None]
        small += [t for t in self.annotation_areas if t is not None]
        packed, layout = _pack(small)
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in ("gt_boxes", "crowd_boxes", "anchor_labels", "positive_deltas"):
            fields[name] = fields[name] is not None  # placeholders; restored from ``packed``
        fields["annotation_areas"] = [t is not None for t in self.annotation_areas]
        return _unpack_batch, (fields, packed, layout)

    def _map(self, fn: Any) -> RPNBatch:
        return replace(
            self,
            images=fn(self.images),
            gt_boxes=[fn(b) for b in self.gt_boxes],
            crowd_boxes=[fn(b) for b in self.crowd_boxes],
            anchor_labels=None if self.anchor_labels is None else fn(self.anchor_labels),
            positive_deltas=None if self.positive_deltas is None else fn(self.positive_deltas),
            annotation_areas=[None if t is None else fn(t) for t in self.annotation_areas],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RPNBatch:
        """A copy with every tensor on ``device`` (Lightning calls this to move batches)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> RPNBatch:
        """A copy with every tensor in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())


_Layout = list[tuple[torch.dtype, tuple[int, ...], int]]


def _pack(tensors: list[Tensor]) -> tuple[Tensor, _Layout]:
    """One uint8 buffer holding ``tensors`` (each at an 8-byte aligned offset) and their layout."""
    parts, layout, offset = [], [], 0
    device = tensors[0].device if tensors else torch.device("cpu")
    for tensor in tensors:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        layout.append((tensor.dtype, tuple(tensor.shape), offset))
        padding = -raw.numel() % 8
        parts += [raw, torch.zeros(padding, dtype=torch.uint8, device=device)]
        offset += raw.numel() + padding
    packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    return packed, layout


def _unpack_batch(fields: dict[str, Any], packed: Tensor, layout: _Layout) -> RPNBatch:
    """The ``RPNBatch`` that ``RPNBatch.__reduce__`` packed; its small tensors are views of ``packed``."""
    tensors = []
    for dtype, shape, offset in layout:
        count = 1
        for size in shape:
            count *= size
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        tensors.append(packed[offset : offset + nbytes].view(dtype).view(shape))
    images = len(fields["image_sizes"])
    fields["gt_boxes"], fields["crowd_boxes"] = tensors[:images], tensors[images : 2 * images]
    rest = iter(tensors[2 * images :])
    for name in ("anchor_labels", "positive_deltas"):
        fields[name] = next(rest) if fields[name] else None
    fields["annotation_areas"] = [next(rest) if given else None for given in fields["annotation_areas"]]
    return RPNBatch(**fields)
