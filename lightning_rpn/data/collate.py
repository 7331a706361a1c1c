"""The batch collate: pad, and assign anchor targets in the DataLoader workers.

Shapes: ``B`` images, ``Hp x Wp`` the padded size (the largest image rounded up to a
multiple of ``size_divisibility``), ``L`` levels, ``N`` anchors of an image (all levels),
``G`` / ``C`` ground-truth / crowd boxes of an image.

The anchors of a batch follow from its padded size alone: ``feature_shapes_for(Hp, Wp)`` gives
the feature size of every level, so the worker builds (and caches) the same anchors the model
will build from the backbone's features. Assignment (``assign_batch_targets(compact=True)``:
one matching pass for the whole batch) seeds sampling per image with ``sample_generator(seed, key, epoch)``,
``key`` being the item's position in its dataset (``RPNBatch.sampling_keys``: unique even when
a split lists an image twice), as the RPN's in-model path does, so both paths give identical
targets.

The epoch lives in a one-element shared-memory tensor: DataLoader workers (forked or spawned,
persistent or not) read the value the main process last gave :meth:`RPNCollate.set_epoch`
(``RPNModule`` calls :func:`set_sampling_epoch` at every training epoch start, before the
epoch's first batch indices reach the workers), and every batch records the epoch it was
sampled for (``RPNBatch.sampling_epoch``), so a batch prefetched before the epoch was set
(right after a resume) is recognised and its targets are assigned again in the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import torch

from lightning_rpn.core.anchors import AnchorGenerator, padded_size
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.cpu_kernels import load_kernels
from lightning_rpn.core.targets import AnchorTargetConfig, assign_batch_targets, sample_generator
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.sample import DetectionSample

__all__ = ["RPNCollate", "padded_size", "set_sampling_epoch"]


class RPNCollate:
    """Collate :class:`DetectionSample` s into an :class:`RPNBatch`; picklable (spawn-safe).

    Args:
        anchor_generator: when given (with ``assign_targets``), the batch carries
            ``anchor_labels`` / ``positive_deltas`` for the anchors of its padded size.
        target_config: matching and sampling settings (default ``AnchorTargetConfig()``).
        box_coder: encodes matched boxes (default ``BoxCoder()``).
        size_divisibility: pad height and width to a multiple of this; must be a multiple of
            the generator's largest stride (default: that stride, else 32).
        seed: seeds the per-image sampling generators; use the RPN's ``seed``.
        assign_targets: False collates boxes only (the model then assigns targets itself).

    :meth:`set_epoch` sets the epoch mixed into the sampling seeds (0 until then), in this
    process and in every DataLoader worker using this collate.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator | None = None,
        target_config: AnchorTargetConfig | None = None,
        box_coder: BoxCoder | None = None,
        size_divisibility: int | None = None,
        seed: int = 0,
        assign_targets: bool = True,
    ) -> None:
        largest_stride = max(anchor_generator.strides) if anchor_generator is not None else None
        if size_divisibility is None:
            size_divisibility = largest_stride or 32
        if not isinstance(size_divisibility, int) or size_divisibility <= 0:
            raise ValueError(f"RPNCollate: size_divisibility must be a positive int, got {size_divisibility!r}")
        if largest_stride is not None and size_divisibility % largest_stride != 0:
            raise ValueError(
                f"RPNCollate: size_divisibility={size_divisibility} is not a multiple of the anchor "
                f"generator's largest stride {largest_stride} (strides {anchor_generator.strides}); "
                "feature shapes derived from the padded size would not match the backbone's"
            )
        self.anchor_generator = anchor_generator
        self.target_config = target_config if target_config is not None else AnchorTargetConfig()
        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        self.size_divisibility = size_divisibility
        self.seed = seed
        self.assign_targets = assign_targets and anchor_generator is not None
        # shared memory: workers forked or spawned from this collate see later set_epoch calls
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        if self.assign_targets:
            load_kernels()  # now, so that forked DataLoader workers inherit the compiled kernels

    @property
    def epoch(self) -> int:
        """The epoch mixed into the sampling seeds of the next batches."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Sample the anchors of the batches collated from now on for ``epoch`` (a non-negative int)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"RPNCollate.set_epoch: epoch must be a non-negative int, got {epoch!r}")
        self._epoch.fill_(epoch)

    def __call__(self, samples: Sequence[DetectionSample]) -> RPNBatch:
        if len(samples) == 0:
            raise ValueError("RPNCollate: cannot collate an empty list of samples")
        sizes = [s.image_size for s in samples]
        pad_h, pad_w = padded_size(sizes, self.size_divisibility)
        images = torch.zeros((len(samples), 3, pad_h, pad_w), dtype=torch.uint8)
        pixels = images.numpy()  # the same memory; numpy copies from read-only arrays (np.asarray of a PIL image)
        for i, sample in enumerate(samples):
            h, w = sizes[i]
            pixels[i, :, :h, :w] = sample.image.transpose(2, 0, 1)
        # copies: dataset records must not share memory with batches the model may modify
        gt_boxes = [torch.tensor(s.boxes, dtype=torch.float32) for s in samples]
        crowd_boxes = [torch.tensor(s.crowd_boxes, dtype=torch.float32) for s in samples]
        areas = [None if s.annotation_areas is None else torch.tensor(s.annotation_areas, dtype=torch.float32)
                 for s in samples]
        batch = RPNBatch(
            images=images,
            image_sizes=sizes,
            original_sizes=[tuple(s.original_size) for s in samples],  # type: ignore[misc]
            image_ids=[s.image_id for s in samples],
            sampling_keys=[s.sampling_key for s in samples],
            gt_boxes=gt_boxes,
            crowd_boxes=crowd_boxes,
            sources=[s.source for s in samples],
            removed_boxes=sum(s.removed_boxes for s in samples),
            problems=[p for s in samples for p in s.problems],
            stand_ins=[s.stand_in for s in samples] if any(s.stand_in for s in samples) else [],
            annotation_areas=areas if any(a is not None for a in areas) else [],
        )
        if self.assign_targets:
            batch.sampling_epoch = self.epoch
            batch.anchor_labels, batch.positive_deltas = self._assign(batch, (pad_h, pad_w), batch.sampling_epoch)
        return batch

    def _assign(
        self, batch: RPNBatch, padded: tuple[int, int], epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor labels int8 ``[B, N]`` (sampled, seeded) and the positives' deltas ``[P, 4]``."""
        assert self.anchor_generator is not None
        grid = self.anchor_generator.grid(self.anchor_generator.feature_shapes_for(padded))
        return assign_batch_targets(
            grid,
            batch.gt_boxes,
            batch.image_sizes,
            self.target_config,
            self.box_coder,
            [sample_generator(self.seed, key, epoch) for key in batch.sampling_keys],
            [crowd if len(crowd) else None for crowd in batch.crowd_boxes],
            compact=True,
            image_ids=batch.image_ids,
        )


def set_sampling_epoch(loaders: Any, epoch: int) -> None:
    """``set_epoch(epoch)`` on the :class:`RPNCollate` of every DataLoader in ``loaders``.

    ``loaders``: a DataLoader, or a list, tuple or dict of them (what ``trainer.train_dataloader``
    and ``trainer.val_dataloaders`` hold); loaders with another collate are left alone.
    """
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for loader in loaders:
            set_sampling_epoch(loader, epoch)
        return
    collate = getattr(loaders, "collate_fn", None)
    if isinstance(collate, RPNCollate):
        collate.set_epoch(epoch)
