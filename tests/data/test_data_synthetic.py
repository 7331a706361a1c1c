"""SyntheticShapes: determinism and variety (its speed: bench/bench_dataloader.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_rpn.core.boxes import box_iou
from lightning_rpn.data.synthetic import SyntheticShapes


def test_same_seed_same_items_different_seed_or_split_different() -> None:
    a, b = SyntheticShapes(10, seed=3), SyntheticShapes(10, seed=3)
    for i in (0, 7):
        np.testing.assert_array_equal(a[i].image, b[i].image)
        np.testing.assert_array_equal(a[i].boxes, b[i].boxes)
    # the order of access does not matter (no shared generator state)
    np.testing.assert_array_equal(SyntheticShapes(10, seed=3)[7].image, a[7].image)
    assert not np.array_equal(SyntheticShapes(10, seed=4)[0].image, a[0].image)
    assert not np.array_equal(SyntheticShapes(10, seed=3, split="val")[0].image, a[0].image)


def test_variety_of_sizes_shapes_and_aspect_ratios() -> None:
    ds = SyntheticShapes(300, min_size=128, max_size=192, max_shapes=6, seed=0)
    items = [ds[i] for i in range(len(ds))]
    heights = {s.image.shape[0] for s in items}
    widths = {s.image.shape[1] for s in items}
    assert min(heights) >= 128 and max(heights) <= 192 and len(heights) > 30 and len(widths) > 30
    counts = np.array([len(s.boxes) for s in items])
    assert counts.max() <= 6 and (counts == 0).sum() >= 3 and len(set(counts.tolist())) >= 5
    boxes = np.concatenate([s.boxes for s in items])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (w > 0).all() and (h > 0).all()
    assert np.percentile(np.minimum(w, h), 10) < 14 and np.maximum(w, h).max() > 100
    aspect = w / h
    assert aspect.min() < 0.4 and aspect.max() > 2.5 and 0.2 <= aspect.min() and aspect.max() <= 5
    for s in items:
        height, width = s.image_size
        assert (s.boxes[:, [0, 1]] >= 0).all() and (s.boxes[:, 2] <= width).all() and (s.boxes[:, 3] <= height).all()
    assert items[0].image.std() > 10
    overlapping = 0
    for s in items:
        if len(s.boxes) > 1:
            iou = box_iou(torch.from_numpy(s.boxes), torch.from_numpy(s.boxes)).fill_diagonal_(0)
            overlapping += int((iou > 0).any())
    assert overlapping >= 20  # shapes overlap and occlude each other in many images


def test_boxes_are_tight_around_drawn_pixels() -> None:
    ds = SyntheticShapes(20, max_shapes=1, empty_fraction=0.0, seed=1)
    for i in range(20):
        item = ds[i]
        assert len(item.boxes) == 1
        x1, y1, x2, y2 = item.boxes[0].astype(int)
        assert 8 <= min(x2 - x1, y2 - y1)


def test_invalid_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="min_size"):
        SyntheticShapes(min_size=200, max_size=100)
    with pytest.raises(ValueError, match="max_shapes"):
        SyntheticShapes(max_shapes=1000)
    with pytest.raises(IndexError, match="index 5"):
        SyntheticShapes(5)[5]


def test_shape_kinds_choose_what_is_drawn() -> None:
    from lightning_rpn.training.datamodule import RPNDataModule
    from lightning_rpn.data.synthetic import SHAPE_KINDS

    default = SyntheticShapes(4, seed=5)
    explicit = SyntheticShapes(4, seed=5, shape_kinds=SHAPE_KINDS)
    rectangles = SyntheticShapes(4, seed=5, shape_kinds=("rectangle",))
    triangles = SyntheticShapes(4, seed=5, shape_kinds=["triangle"])
    assert all(np.array_equal(default[i].image, explicit[i].image) for i in range(4))
    assert not all(np.array_equal(rectangles[i].image, triangles[i].image) for i in range(4))
    with pytest.raises(ValueError, match="shape_kinds"):
        SyntheticShapes(4, shape_kinds=["hexagon"])
    dm = RPNDataModule(synthetic_train_images=2, synthetic_shape_kinds=["triangle"], num_workers=0)
    assert dm.build_dataset("train").shape_kinds == ("triangle",)


def test_unannotated_kinds_are_drawn_without_boxes() -> None:
    from lightning_rpn.training.datamodule import RPNDataModule
    from lightning_rpn.data.synthetic import SHAPE_KINDS

    # same kinds in the same order: the same pixels; the triangles lose their boxes only
    everything = SyntheticShapes(40, seed=3, shape_kinds=SHAPE_KINDS)
    unlabelled = SyntheticShapes(40, seed=3, shape_kinds=("rectangle", "ellipse"), unannotated_kinds=("triangle",))
    missing = 0
    for index in range(40):
        full, partial = everything[index], unlabelled[index]
        assert np.array_equal(full.image, partial.image)
        kept = {tuple(box) for box in partial.boxes.tolist()}
        assert kept <= {tuple(box) for box in full.boxes.tolist()}
        missing += len(full.boxes) - len(partial.boxes)
    total = sum(len(everything[i].boxes) for i in range(40))
    assert 0.15 * total < missing < 0.5 * total  # about a third of the shapes are triangles
    with pytest.raises(ValueError, match="unannotated_kinds"):
        SyntheticShapes(4, shape_kinds=["triangle"], unannotated_kinds=["triangle"])
    dm = RPNDataModule(synthetic_train_images=2, synthetic_shape_kinds=["rectangle"],
                       synthetic_unannotated_kinds=["triangle"], num_workers=0)
    assert dm.build_dataset("train").unannotated_kinds == ("triangle",)


def test_outlined_shapes_can_be_held_out_as_an_unseen_style() -> None:
    from lightning_rpn.training.datamodule import RPNDataModule

    default, explicit = SyntheticShapes(30, seed=4), SyntheticShapes(30, seed=4, outlined_fraction=0.3)
    unlabelled = SyntheticShapes(30, seed=4, unannotated_outlined=True)
    missing = 0
    for index in range(30):
        assert np.array_equal(default[index].image, explicit[index].image)
        assert np.array_equal(default[index].boxes, explicit[index].boxes)
        assert np.array_equal(default[index].image, unlabelled[index].image)  # the same pixels, fewer boxes
        kept = {tuple(box) for box in unlabelled[index].boxes.tolist()}
        assert kept <= {tuple(box) for box in default[index].boxes.tolist()}
        missing += len(default[index].boxes) - len(unlabelled[index].boxes)
    total = sum(len(default[i].boxes) for i in range(30))
    assert 0.1 * total < missing < 0.5 * total  # about 30% of the shapes are outlined
    # every shape outlined: a filled shape covers its whole box, an outline leaves its centre open
    outlined, filled = SyntheticShapes(30, seed=4, outlined_fraction=1.0), SyntheticShapes(30, seed=4, outlined_fraction=0.0)
    assert sum(len(outlined[i].boxes) for i in range(30)) > 0
    assert all(len(SyntheticShapes(30, seed=4, outlined_fraction=1.0, unannotated_outlined=True)[i].boxes) == 0
               for i in range(30))
    assert any(not np.array_equal(outlined[i].image, filled[i].image) for i in range(30))
    with pytest.raises(ValueError, match=r"outlined_fraction=1.5 must be in \[0, 1\]"):
        SyntheticShapes(4, outlined_fraction=1.5)
    dm = RPNDataModule(synthetic_train_images=2, synthetic_outlined_fraction=0.0, synthetic_unannotated_outlined=True,
                       num_workers=0)
    train = dm.build_dataset("train")
    assert (train.outlined_fraction, train.unannotated_outlined) == (0.0, True)


def test_textured_shapes_can_be_held_out_as_an_unseen_texture() -> None:
    from lightning_rpn.training.datamodule import RPNDataModule

    one_colour = SyntheticShapes(30, seed=4, outlined_fraction=0.0)
    textured = SyntheticShapes(30, seed=4, outlined_fraction=0.0, textured_fraction=1.0)
    mixed = SyntheticShapes(30, seed=4, textured_fraction=0.3)
    unlabelled = SyntheticShapes(30, seed=4, textured_fraction=0.3, unannotated_textured=True)
    default = SyntheticShapes(30, seed=4)
    missing = 0
    for index in range(30):
        # texture changes the fill only: the layout, the kinds, the colours and so the boxes stay
        assert np.array_equal(textured[index].boxes, one_colour[index].boxes)
        assert np.array_equal(mixed[index].boxes, default[index].boxes)
        assert np.array_equal(mixed[index].image, unlabelled[index].image)  # the same pixels, fewer boxes
        kept = {tuple(box) for box in unlabelled[index].boxes.tolist()}
        assert kept <= {tuple(box) for box in default[index].boxes.tolist()}
        missing += len(default[index].boxes) - len(unlabelled[index].boxes)
        if len(textured[index].boxes):
            assert not np.array_equal(textured[index].image, one_colour[index].image)
    total = sum(len(default[i].boxes) for i in range(30))
    assert 0.05 * total < missing < 0.45 * total  # about 30% of the filled shapes (70% of all) are textured
    # a textured shape holds two colours in a checkerboard: many more colour edges inside its box
    image, box = textured[0].image.astype(np.int32), textured[0].boxes[0].astype(int)
    x1, y1, x2, y2 = box
    inside = image[y1 + (y2 - y1) // 3:y2 - (y2 - y1) // 3, x1 + (x2 - x1) // 3:x2 - (x2 - x1) // 3]
    flat = one_colour[0].image.astype(np.int32)[y1 + (y2 - y1) // 3:y2 - (y2 - y1) // 3,
                                                x1 + (x2 - x1) // 3:x2 - (x2 - x1) // 3]
    assert np.abs(np.diff(inside, axis=1)).mean() > 3 * np.abs(np.diff(flat, axis=1)).mean()
    with pytest.raises(ValueError, match=r"textured_fraction=-0.1 must be in \[0, 1\]"):
        SyntheticShapes(4, textured_fraction=-0.1)
    dm = RPNDataModule(synthetic_train_images=2, synthetic_textured_fraction=0.3, synthetic_unannotated_textured=True,
                       num_workers=0)
    train = dm.build_dataset("train")
    assert (train.textured_fraction, train.unannotated_textured) == (0.3, True)

