"""DenseScenes: generated aerial-like scenes (deterministic, dense, small objects, two families)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_rpn.data import DenseScenes, RPNDataModule


def test_scenes_are_deterministic_dense_and_small() -> None:
    scenes = DenseScenes(2, size=400, density=250.0, seed=3, split="train")
    first, again = scenes[0], DenseScenes(2, size=400, density=250.0, seed=3, split="train")[0]
    assert np.array_equal(first.image, again.image) and np.array_equal(first.boxes, again.boxes)
    assert not np.array_equal(first.image, DenseScenes(1, size=400, seed=3, split="val")[0].image)
    boxes = first.boxes
    assert first.image.shape == (400, 400, 3) and 25 <= len(boxes) <= 60  # ~250 per 1000 x 1000 px
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    inside = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < 400) & (boxes[:, 3] < 400)
    assert (sides[inside] >= 12).all() and (sides <= 75).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 400).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_objects_touch_and_have_low_contrast() -> None:
    scene = DenseScenes(1, size=500, density=400.0, seed=0)[0]
    boxes = scene.boxes
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    overlapping = ((x2 > x1) & (y2 > y1)).sum() - len(boxes)
    assert overlapping > 0  # some boxes overlap their neighbours
    x1, y1, x2, y2 = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))].astype(int)
    centre = scene.image[(y1 + y2) // 2, (x1 + x2) // 2].astype(float)
    assert np.abs(centre - scene.image.reshape(-1, 3).mean(0)).max() < 120


def test_families_differ_and_bad_arguments_are_named() -> None:
    crowns = DenseScenes(1, size=200, objects="crowns", background="field")[0]
    roofs = DenseScenes(1, size=200, objects="roofs", background="urban")[0]
    assert not np.array_equal(crowns.image, roofs.image)
    with pytest.raises(ValueError, match="objects='trees'"):
        DenseScenes(1, objects="trees")
    with pytest.raises(ValueError, match="max_object_size"):
        DenseScenes(1, size=100, max_object_size=200)


def test_datamodule_builds_scenes_and_names_bad_options() -> None:
    data = RPNDataModule(dataset="scenes", scene_options={"size": 128}, synthetic_train_images=3,
                         synthetic_val_images=1, num_workers=0)
    train = data.build_dataset("train")
    assert isinstance(train, DenseScenes) and len(train) == 3 and train.size == 128
    with pytest.raises(ValueError, match="scene_options"):
        RPNDataModule(dataset="scenes", scene_options={"sizes": 128}).build_dataset("train")
    with pytest.raises(ValueError, match="scene_options"):
        RPNDataModule(dataset="synthetic", scene_options={"size": 128})


def test_scenes_are_drawn_once_within_the_cache_budget() -> None:
    scenes = DenseScenes(3, size=128, seed=1)
    first = scenes[0]
    first.image[:] = 0  # a caller's change must not reach the cache
    again = scenes[0]
    assert again.image.any() and np.array_equal(again.image, DenseScenes(3, size=128, seed=1)[0].image)
    assert len(scenes._cache) == 1
    uncached = DenseScenes(3, size=128, seed=1, cache_bytes=0)
    assert np.array_equal(uncached[0].image, again.image) and not uncached._cache


def test_owners_map_each_box_to_what_stays_visible_of_its_object() -> None:
    from lightning_rpn.data.scenes import SceneStyle, draw_dense_scene

    style = SceneStyle(density=900.0, overlap=0.4)
    image, boxes = draw_dense_scene(np.random.default_rng(5), 160, 160, style)
    owners = np.full((160, 160), 7, np.int64)
    same_image, same_boxes = draw_dense_scene(np.random.default_rng(5), 160, 160, style, owners=owners)
    assert np.array_equal(image, same_image) and np.array_equal(boxes, same_boxes)  # the same scene
    assert owners.min() == -1 and set(np.unique(owners[owners >= 0])) <= set(range(len(boxes)))
    occluded = 0
    for index, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        ys, xs = np.nonzero(owners == index)
        if len(xs) == 0:
            occluded += 1
            continue
        assert x1 <= xs.min() and y1 <= ys.min() and xs.max() < x2 and ys.max() < y2
        occluded += (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) != (x1, y1, x2, y2)
    assert (owners[owners >= 0] == len(boxes) - 1).any()  # the last object drawn is whole
    assert occluded > 0  # at this density some objects are partly drawn over
    with pytest.raises(ValueError, match=r"owners has shape \(10, 10\), expected \(160, 160\)"):
        draw_dense_scene(np.random.default_rng(5), 160, 160, style, owners=np.zeros((10, 10), np.int64))


def test_a_scenes_owner_map_is_that_of_its_drawing() -> None:
    from lightning_rpn.data.scenes import draw_dense_scene

    scenes = DenseScenes(2, size=128, density=600.0, seed=3, split="val")
    owners = np.empty((128, 128), np.int64)
    _, boxes = draw_dense_scene(np.random.default_rng([3, scenes._split_key, 1]), 128, 128, scenes.style, owners=owners)
    assert np.array_equal(scenes.owners(1), owners) and np.array_equal(scenes.owners(-1), owners)
    assert np.array_equal(scenes[1].boxes, boxes)
    with pytest.raises(IndexError, match=r"DenseScenes\('val'\): index 2 out of range for 2 scenes"):
        scenes.owners(2)
