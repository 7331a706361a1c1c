"""Repeated training splits: full batches from few images, distinct sampling per copy."""

from __future__ import annotations

import pytest
import torch

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.data.repeat import RepeatedDataset, repeats_to_fill
from lightning_rpn.data.scenes import DenseScenes
from lightning_rpn.training.datamodule import RPNDataModule

ANCHORS = AnchorGenerator(((16,), (32,), (64,)), (0.5, 1.0, 2.0), (8, 16, 32))


def few_images(**kwargs: object) -> RPNDataModule:
    args = dict(synthetic_train_images=3, synthetic_val_images=2, batch_size=8, num_workers=0,
                anchor_generator=ANCHORS, seed=3)
    return RPNDataModule(**{**args, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(("items", "batch", "world", "expected"),
                         [(3, 8, 1, 3), (8, 8, 1, 1), (20, 8, 1, 1), (4, 8, 2, 4), (5, 4, 2, 2), (0, 8, 1, 1)])
def test_repeats_to_fill(items: int, batch: int, world: int, expected: int) -> None:
    assert repeats_to_fill(items, batch, world) == expected


def test_repeated_dataset_lists_items_in_order() -> None:
    scenes = DenseScenes(2, 96, density=400, seed=1)
    repeated = RepeatedDataset(scenes, 3)
    assert len(repeated) == 6
    assert [repeated[i].image_id for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert torch.equal(torch.from_numpy(repeated[4].image), torch.from_numpy(scenes[0].image))
    with pytest.raises(IndexError):
        repeated[6]
    with pytest.raises(ValueError, match="times=0"):
        RepeatedDataset(scenes, 0)


def test_few_images_fill_a_whole_batch(caplog: pytest.LogCaptureFixture) -> None:
    dm = few_images(train_transforms=[])  # no augmentation: copies differ by their anchor sample only
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch.images.shape[0] == 8  # not 3
    assert len(set(batch.sampling_keys)) == 8 and set(batch.sampling_keys) <= set(range(9))
    by_image: dict = {}
    for index, image_id in enumerate(batch.image_ids):
        by_image.setdefault(image_id, []).append(index)
    copies = next(indices for indices in by_image.values() if len(indices) > 1)
    first, second = batch.anchor_labels[copies[0]], batch.anchor_labels[copies[1]]
    assert torch.equal(batch.images[copies[0]], batch.images[copies[1]])
    assert not torch.equal(first, second)  # the same image, another anchor sample
    assert (first == 1).sum() == (second == 1).sum() and (first >= 0).sum() == (second >= 0).sum()


def test_repeats_is_explicit_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    dm = few_images(repeats=2)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6
    dm = few_images(batch_size=2)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3  # enough images for a batch: listed once
    with pytest.raises(ValueError, match="repeats=0"):
        few_images(repeats=0)
    with pytest.raises(ValueError, match="not used with tiles"):
        few_images(repeats=2, tiles={"size": 64, "per_epoch": 8})
