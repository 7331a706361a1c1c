"""Listing a training split several times per epoch, so that batches are full.

A data module iterates its files once per epoch. With random crops of a few large images
(four orthophotos, ``batch_size: 8``), that gives batches of four crops: half the data per
step that the configured batch size (and a plain loop drawing eight crops) implies.
:class:`RepeatedDataset` lists every item ``times`` times; item ``i`` is item ``i % n`` of the
wrapped dataset; the data module's training loader draws each listing as an item of its own
(its index, the ``dataset_index`` that keys its anchor sampling and its augmentation's seed), so
two copies of an image in one epoch draw different anchors as well as different crops.
"""

from __future__ import annotations

import math

from torch.utils.data import Dataset

from lightning_rpn.data.sample import DetectionSample

__all__ = ["RepeatedDataset", "repeats_to_fill"]


def repeats_to_fill(num_items: int, batch_size: int, world_size: int = 1) -> int:
    """The fewest listings of ``num_items`` that give every process at least one full batch."""
    if num_items <= 0:
        return 1
    return max(1, math.ceil(batch_size * world_size / num_items))


class RepeatedDataset(Dataset):
    """``dataset`` listed ``times`` times in a row (``len = times * len(dataset)``)."""

    def __init__(self, dataset: Dataset, times: int) -> None:
        if times < 1:
            raise ValueError(f"RepeatedDataset: times={times} must be >= 1")
        self.dataset = dataset
        self.times = times
        self.num_items = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.times * self.num_items

    def __getitem__(self, index: int) -> DetectionSample:
        if not 0 <= index < len(self):
            raise IndexError(f"RepeatedDataset: index {index} out of range for {len(self)} items")
        return self.dataset[index % self.num_items]
