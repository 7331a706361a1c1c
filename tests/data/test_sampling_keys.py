"""Anchor sampling is keyed by an item's position in its dataset, not by its image id alone.

A split that lists an image twice (the usual way to take several random crops of a large image
per epoch) must draw an independent sample for each listing, in the workers and in the model
alike; before, both listings drew from the same seeded stream and so picked the same anchor
ranks every time.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.transforms import TransformedDataset
from lightning_rpn.training.module import RPNModule
from helpers.rpn_probes import in_model_anchor_labels

TINY = dict(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)))


class _Repeated(Dataset):
    """Every item is image 0 of a synthetic split: one image listed ``count`` times."""

    def __init__(self, count: int) -> None:
        self.image = SyntheticShapes(1, min_size=96, max_size=96, max_shapes=6, split="repeat")[0]
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> DetectionSample:
        return DetectionSample(image=self.image.image.copy(), boxes=self.image.boxes.copy(), image_id="scene",
                               source="repeat")


def _batch(model: RPNModule, count: int = 2):
    items = TransformedDataset(_Repeated(count), None)
    collate = RPNCollate(model.anchor_generator, model.target_config, model.box_coder, model.size_divisibility,
                         seed=model.rpn.seed)
    return collate([items[i] for i in range(count)])


def test_an_image_listed_twice_draws_two_samples() -> None:
    model = RPNModule(**TINY)
    batch = _batch(model)
    assert batch.image_ids == ["scene", "scene"] and batch.sampling_keys == [0, 1]
    first, second = batch.anchor_labels
    # same image, same matches: the same counts of sampled positives and negatives, other anchors
    assert (first == 1).sum() == (second == 1).sum() and (first == 0).sum() == (second == 0).sum()
    assert not torch.equal(first, second)


def test_in_model_sampling_uses_the_same_keys_as_the_workers() -> None:
    torch.manual_seed(0)
    model = RPNModule(**TINY).train()
    batch = _batch(model)
    assert torch.equal(in_model_anchor_labels(model, batch), batch.anchor_labels.to(torch.int64))
