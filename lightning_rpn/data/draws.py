"""Training's random draws made from a seed and the item alone: each epoch's order, each item's augmentation.

A DataLoader shuffles from torch's global generator and albumentations draws from a stream per
worker process, so what an item looks like depends on which worker, process and run loads it: a
run resumed inside an epoch drew the rest of it in a new order with new augmentations, and
another ``num_workers`` trained other weights. Here every draw is a function of a run's seed and
the item's key instead:

- :class:`ShuffledEpochs` lists a dataset in a new order every epoch: item ``epoch * n + j`` is
  item ``order(epoch)[j]``, the order a permutation drawn from ``(seed, epoch)`` alone (the index
  is the draw, as in tiled training, so a sampler that skips an epoch's first items resumes it);
- :class:`SameItems` lists epoch 0's items in every epoch (``Trainer(overfit_batches=...)``)
  while the index, and with it every draw keyed by the index, still moves on with the epoch;
- :func:`item_seed` is the seed of one item's augmentation, from ``(seed, index)``;
  :func:`seed_pipeline` gives every transform and container of an albumentations pipeline a
  stream of its own from it (``Compose.set_random_seed`` gives them all the same seed, which
  would tie, for instance, a flip's coin to a colour jitter's).

Seeds are mixed with ``numpy.random.SeedSequence``: keys that differ in any entry give
independent streams.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_rpn.data.sample import DetectionSample

__all__ = ["SameItems", "ShuffledEpochs", "item_seed", "order_seed", "seed_pipeline"]

_ORDER_STREAM, _ITEM_STREAM = 0, 1  # keep the epoch orders' seeds apart from the items'


def _mixed(base: int, *keys: int) -> int:
    """A 32-bit seed from ``base`` and ``keys`` (non-negative ints; ``base`` taken modulo 2**64)."""
    return int(np.random.SeedSequence([int(base) % 2**64, *keys]).generate_state(1)[0])


def order_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s order under run seed ``seed``."""
    return _mixed(seed, _ORDER_STREAM, epoch)


def item_seed(seed: int, index: int) -> int:
    """The seed of the augmentation of item ``index`` (a loader's index: unique per epoch and draw) under ``seed``."""
    return _mixed(seed, _ITEM_STREAM, index)


def _nodes(pipeline: A.BasicTransform | A.BaseCompose) -> Iterator[A.BasicTransform | A.BaseCompose]:
    """``pipeline``, then its containers and transforms, parents before their children."""
    yield pipeline
    if isinstance(pipeline, A.BaseCompose):
        for child in pipeline.transforms:
            yield from _nodes(child)


def _seed_node(node: A.BasicTransform | A.BaseCompose, seed: int) -> None:
    """Seed ``node``'s own draws alone: a container's ``set_random_seed`` also seeds every node under
    it with the container's seed (what albumentations' ``BaseCompose.set_random_seed`` sets on the
    container itself is set here)."""
    if isinstance(node, A.BaseCompose):
        node.seed, node.random_generator, node.py_random = seed, np.random.default_rng(seed), random.Random(seed)
    else:
        node.set_random_seed(seed)


def seed_pipeline(pipeline: A.BasicTransform | A.BaseCompose, seed: int) -> None:
    """Seed every node of ``pipeline`` once, each with a stream of its own drawn from ``seed``
    (the ``k``-th node, parents before children, with the ``k``-th word of ``SeedSequence(seed)``)."""
    nodes = list(_nodes(pipeline))
    for node, state in zip(nodes, np.random.SeedSequence(seed).generate_state(len(nodes))):
        _seed_node(node, int(state))


class ShuffledEpochs(Dataset):
    """``dataset`` in a new order every epoch, the order drawn from ``(seed, epoch)`` alone.

    Item ``epoch * n + j`` (``n = len(dataset)``, which ``len()`` returns) is item
    ``order(epoch)[j]`` of ``dataset``. The last epoch's order is kept, so a worker draws each
    order once.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.num_items = len(dataset)  # type: ignore[arg-type]
        if self.num_items == 0:
            raise ValueError("ShuffledEpochs: the dataset has no items to order")
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.num_items

    def order(self, epoch: int) -> torch.Tensor:
        """The positions in ``dataset`` of epoch ``epoch``'s items, in the order they are drawn (int64 ``[n]``)."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(order_seed(self.seed, epoch))
            self._order = epoch, torch.randperm(self.num_items, generator=generator)
        return self._order[1]

    def __getitem__(self, index: int) -> DetectionSample:
        if index < 0:
            raise IndexError(f"ShuffledEpochs: index {index} is negative (item epoch * {self.num_items} + j)")
        epoch, position = divmod(int(index), self.num_items)
        return self.dataset[int(self.order(epoch)[position])]


class SameItems(Dataset):
    """Epoch 0's items in every epoch: item ``epoch * n + j`` is item ``j`` of ``dataset`` (``n = len(dataset)``).

    What training serves under ``Trainer(overfit_batches=...)``: the same images (or windows) every
    epoch, in the same order, as Lightning's sequential sampler gives a project of one's own, while
    the index, which seeds each item's augmentation and anchor sample, moves on with the epoch, so
    that each epoch draws its own augmentations as a random pipeline would in such a project.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.num_items = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> DetectionSample:
        if index < 0:
            raise IndexError(f"SameItems: index {index} is negative (item epoch * {self.num_items} + j)")
        return self.dataset[int(index) % self.num_items]
