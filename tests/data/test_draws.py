"""Training's draws from a seed and the item alone (``lightning_rpn.data.draws``): each epoch's
order, each item's augmentation, every node of a pipeline on a stream of its own."""

from __future__ import annotations

import pickle
import random

import albumentations as A
import numpy as np
import pytest

from lightning_rpn.data.draws import SameItems, ShuffledEpochs, item_seed, order_seed, seed_pipeline
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.transforms import DetectionTransform, ResizePolicy


def test_each_epoch_lists_every_item_once_in_an_order_of_its_own() -> None:
    items = ShuffledEpochs(list(range(50)), seed=3)
    epochs = [[items[epoch * 50 + j] for j in range(50)] for epoch in range(3)]
    assert all(sorted(epoch) == list(range(50)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2] != list(range(50))
    again = pickle.loads(pickle.dumps(ShuffledEpochs(list(range(50)), seed=3)))  # a worker's copy
    assert [again[50 + j] for j in range(50)] == epochs[1]  # the order is the seed's and the epoch's alone
    assert [ShuffledEpochs(list(range(50)), seed=4)[j] for j in range(50)] != epochs[0]


def test_shuffled_epochs_refuse_what_has_no_item() -> None:
    with pytest.raises(ValueError, match="no items"):
        ShuffledEpochs([], seed=0)
    with pytest.raises(IndexError, match="negative"):
        ShuffledEpochs([1, 2], seed=0)[-1]


def test_seeds_of_orders_and_items_are_apart() -> None:
    assert order_seed(0, 5) != item_seed(0, 5)
    assert len({item_seed(0, i) for i in range(1000)}) == 1000
    assert item_seed(2**64 + 7, 3) == item_seed(7, 3)  # a 64-bit torch seed is taken modulo 2**64


def test_every_node_of_a_pipeline_draws_from_a_stream_of_its_own() -> None:
    flip_and_flop = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)

    def flips(seed_fn) -> list[tuple[bool, bool]]:
        out = []
        for seed in range(64):
            seed_fn(flip_and_flop, seed)
            result = flip_and_flop(image=image)["image"]
            out.append((bool(result[0, 0, 0] in (image[0, 1, 0], image[1, 1, 0])),
                        bool(result[0, 0, 0] in (image[1, 0, 0], image[1, 1, 0]))))
        return out

    # albumentations' own set_random_seed gives both the same seed: one coin for both flips
    tied = flips(lambda pipeline, seed: pipeline.set_random_seed(seed))
    assert all(horizontal == vertical for horizontal, vertical in tied)
    ours = flips(seed_pipeline)
    assert sum(h != v for h, v in ours) > 16 and 16 < sum(h for h, _ in ours) < 48


NESTED = A.Compose([A.HorizontalFlip(p=0.5),
                    A.OneOf([A.RandomBrightnessContrast(), A.HueSaturationValue()]),
                    A.SomeOf([A.OneOf([A.Blur(), A.GaussNoise()]), A.ToGray(), A.CLAHE()], n=1)])


def _nodes_in_order(node) -> list:
    return [node, *(n for child in getattr(node, "transforms", ()) for n in _nodes_in_order(child))]


def test_every_node_of_a_nested_pipeline_is_seeded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # a container's set_random_seed seeds every node under it: seeding parents, then children, seeded
    # a node at depth d d + 1 times (30 generators for these 11 nodes)
    real = np.random.default_rng
    made: list[object] = []

    def counted(seed: object) -> np.random.Generator:
        made.append(seed)
        return real(seed)

    monkeypatch.setattr(np.random, "default_rng", counted)
    seed_pipeline(NESTED, 5)
    monkeypatch.undo()
    nodes = _nodes_in_order(NESTED)
    assert len(nodes) == 11 and len(made) == len(nodes)
    # node k draws from the k-th word of SeedSequence(seed), parents before children, as before the change
    for node, word in zip(nodes, np.random.SeedSequence(5).generate_state(len(nodes))):
        assert node.seed == int(word)
        assert np.array_equal(node.random_generator.integers(2**62, size=4), real(int(word)).integers(2**62, size=4))
        assert node.py_random.random() == random.Random(int(word)).random()


def test_same_items_serve_epoch_zeros_items_at_every_epochs_indices() -> None:
    items = ShuffledEpochs(list(range(5)), seed=3)
    same = SameItems(items)
    assert len(same) == 5
    assert [same[epoch * 5 + j] for epoch in range(3) for j in range(5)] == [items[j] for j in range(5)] * 3
    with pytest.raises(IndexError, match="negative"):
        same[-1]


def _sample() -> DetectionSample:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    return DetectionSample(image=image, boxes=np.array([[5, 5, 40, 30]], np.float32), image_id=1, source="x")


def test_a_seeded_transform_draws_from_its_seed_alone() -> None:
    spec = [{"HorizontalFlip": {"p": 0.5}}, {"RandomBrightnessContrast": {"p": 0.5}}]
    transform = DetectionTransform(spec, resize=ResizePolicy("shortest_edge", (30, 40, 50, 60), 1000), train=True)
    first = [transform(_sample(), seed=item_seed(1, i)) for i in range(12)]
    transform(_sample())  # an unseeded call in between moves no seeded draw
    second = [transform(_sample(), seed=item_seed(1, i)) for i in reversed(range(12))][::-1]
    for a, b in zip(first, second):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert len({a.image.shape for a in first}) > 1  # the resize's choice varies with the seed
    assert len({a.image.tobytes() for a in first}) > 6  # 16 outcomes (4 sizes, 2 coins) for 12 seeds
