"""Albumentations YAML specs (round trip, errors), resize policy, removed-box counting."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_rpn.data.problems import DataError
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.transforms import (
    DetectionTransform,
    ResizePolicy,
    TransformedDataset,
    build_transform,
    dump_transform_spec,
    load_transform_spec,
    transform_to_spec,
)

YAML = """
- HorizontalFlip: {p: 0.5}
- OneOf:
    transforms:
      - RandomBrightnessContrast: {p: 1.0}
      - HueSaturationValue: {}
    p: 0.3
- RandomCrop: {height: 32, width: 32, p: 0.5}
"""


def sample(boxes: list, h: int = 40, w: int = 60) -> DetectionSample:
    image = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    return DetectionSample(image=image, boxes=np.array(boxes, np.float32), image_id=1, source="mem")


def test_yaml_round_trip(tmp_path: Path) -> None:
    spec = load_transform_spec(YAML)
    built = build_transform(spec, min_visibility=0.2)
    full = transform_to_spec(built)
    assert [next(iter(e)) for e in full] == ["HorizontalFlip", "OneOf", "RandomCrop"]
    assert full[1]["OneOf"]["transforms"][0]["RandomBrightnessContrast"]["p"] == 1.0
    path = tmp_path / "aug.yaml"
    path.write_text(dump_transform_spec(full))
    again = transform_to_spec(build_transform(load_transform_spec(path)))
    assert again == full
    params = built.processors["bboxes"].params
    assert (params.format, params.clip, params.min_visibility) == ("pascal_voc", True, 0.2)


@pytest.mark.parametrize("spec, match", [
    ([{"NoSuchTransform": {}}], "NoSuchTransform"),
    ([{"HorizontalFlip": {"p": 0.5}, "VerticalFlip": {}}], "single-key"),
    ({"HorizontalFlip": {}}, "list"),
    ([{"RandomCrop": {"height": 10}}], "RandomCrop"),
    # albumentations only warns about an unknown argument and builds the transform without it
    ([{"RandomBrightnessContrast": {"brightness_limt": 0.9}}],
     r"transforms\[0\]: RandomBrightnessContrast has no argument\(s\) 'brightness_limt' \(albumentations .*brightness_limit"),
    ([{"GaussNoise": {"var_limit": [10, 50]}}], "GaussNoise has no argument.* 'var_limit'"),  # albumentations 1.x's name
    ([{"OneOf": {"transforms": [{"Blur": {"blur_limt": 3}}]}}], r"OneOf\.transforms\[0\]: Blur has no argument\(s\) 'blur_limt'"),
    ([{"HorizontalFlip": {"always_apply": True}}], "HorizontalFlip has no argument.* 'always_apply'"),
    ([{"HorizontalFlip": 0.5}], "arguments of 'HorizontalFlip' must be a mapping"),
    ([{"HorizontalFlip": [1, 2]}], "arguments of 'HorizontalFlip' must be a mapping"),
])
def test_bad_specs_name_the_entry(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_transform(spec)  # type: ignore[arg-type]


def test_flip_moves_boxes_and_crop_removal_is_counted() -> None:
    flipped = DetectionTransform([{"HorizontalFlip": {"p": 1.0}}])(sample([[0, 0, 10, 20]]))
    np.testing.assert_allclose(flipped.boxes, [[50, 0, 60, 20]], atol=1e-4)
    assert flipped.removed_boxes == 0
    crop = DetectionTransform([{"Crop": {"x_min": 0, "y_min": 0, "x_max": 30, "y_max": 40}}], min_visibility=0.5)
    out = crop(sample([[0, 0, 10, 10], [25, 0, 45, 10], [40, 0, 50, 10]]))
    # box 2 keeps 25% (< 0.5) and box 3 nothing: both removed and counted
    assert out.image.shape == (40, 30, 3) and out.removed_boxes == 2
    np.testing.assert_allclose(out.boxes, [[0, 0, 10, 10]], atol=1e-4)


def test_crowd_boxes_follow_the_transform_without_counting() -> None:
    item = sample([[0, 0, 10, 10]])
    item.crowd_boxes = np.array([[5, 5, 15, 15]], np.float32)
    out = DetectionTransform([{"HorizontalFlip": {"p": 1.0}}])(item)
    np.testing.assert_allclose(out.crowd_boxes, [[45, 5, 55, 15]], atol=1e-4)


def test_shortest_edge_resize_with_max_size_and_fixed() -> None:
    policy = ResizePolicy("shortest_edge", (80,), max_size=100)
    assert policy.target_size((40, 60), train=False) == (67, 100)  # 60 * 2 = 120 > 100 -> long side 100
    assert ResizePolicy("shortest_edge", (60,), 1000).target_size((40, 60), False) == (60, 90)
    torch.manual_seed(0)
    picks = {ResizePolicy("shortest_edge", (50, 60, 70), 1000).target_size((40, 40), True)[0] for _ in range(40)}
    assert picks == {50, 60, 70}
    assert ResizePolicy("shortest_edge", (50, 60, 70), 1000).target_size((40, 40), False) == (70, 70)
    out = DetectionTransform(resize=ResizePolicy("fixed", fixed_size=(20, 120)))(sample([[10, 10, 30, 20]]))
    assert out.image.shape == (20, 120, 3) and out.original_size == (40, 60)
    np.testing.assert_allclose(out.boxes, [[20, 5, 60, 10]])
    with pytest.raises(ValueError, match="fixed_size"):
        ResizePolicy("fixed")
    with pytest.raises(ValueError, match="mode"):
        ResizePolicy("biggest")  # type: ignore[arg-type]


def test_transform_pickles_and_keeps_behaviour() -> None:
    transform = DetectionTransform(load_transform_spec(YAML), 0.3, ResizePolicy("shortest_edge", (48,), 64), train=True)
    clone = pickle.loads(pickle.dumps(transform))
    out = clone(sample([[1, 1, 30, 30]]))
    assert min(out.image.shape[:2]) <= 48 and out.image.dtype == np.uint8


def test_a_transform_that_cannot_apply_names_the_image_its_size_and_what_to_do() -> None:
    """RandomCrop larger than the image: albumentations' CropSizeError named no file."""
    small = DetectionSample(image=np.zeros((30, 40, 3), np.uint8), boxes=np.array([[1, 1, 20, 20]], np.float32),
                            image_id=7, source="images/small.jpg")
    dataset = TransformedDataset([small], DetectionTransform([{"RandomCrop": {"height": 96, "width": 96}}],
                                                             train=True))
    with pytest.raises(DataError) as caught:
        dataset[0]
    message = str(caught.value)
    for part in ("images/small.jpg", "image 7", "40x30 (w x h)", "data.train_transforms", "CropSizeError",
                 "PadIfNeeded", "smaller crop", "data.tiles"):
        assert part in message
    assert caught.value.file == "images/small.jpg" and caught.value.image_id == 7
    assert type(caught.value.__cause__).__name__ == "CropSizeError"
