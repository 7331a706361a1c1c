"""Transform specs as users write them: size-setting train transforms under resize ``none``, the
``transform_to_spec`` round trip of every transform, boxes split into fragments, and specs given
as a mapping or as albumentations objects."""

from __future__ import annotations

import inspect
import warnings

import albumentations as A
import numpy as np
import pytest
import torch

from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.transforms import (
    DetectionTransform,
    ResizePolicy,
    TransformSpecError,
    build_transform,
    dump_transform_spec,
    load_transform_spec,
    transform_to_spec,
)
from lightning_rpn.training.datamodule import RPNDataModule

LONGEST_AND_PAD = [{"LongestMaxSize": {"max_size": 64}}, {"PadIfNeeded": {"min_height": 64, "min_width": 64}}]


def _size_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "resizes the training images" in str(w.message)]


def _train_transform(spec: list, resize: ResizePolicy | None = None) -> list[str]:
    """The size warnings of building ``spec`` as a training pipeline."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        DetectionTransform(spec, 0.3, resize or ResizePolicy(), train=True)
    return _size_warnings(record)


# --- a size-setting train transform under resize "none"


def test_size_setting_train_transform_under_resize_none_warns_once_naming_entry_and_setting() -> None:
    messages = _train_transform(LONGEST_AND_PAD)
    assert len(messages) == 1
    assert "data.train_transforms" in messages[0] and "[0] LongestMaxSize" in messages[0]
    assert "PadIfNeeded" not in messages[0]  # padding keeps the objects' scale
    assert "data.resize is 'none'" in messages[0] and "predict size images by data.resize" in messages[0]


def test_size_setting_transform_inside_a_container_is_named_with_its_entry() -> None:
    spec = [{"HorizontalFlip": {}},
            {"OneOf": {"transforms": [{"Blur": {}}, {"RandomResizedCrop": {"size": [64, 64]}}]}}]
    (message,) = _train_transform(spec)
    assert "[1] OneOf holding RandomResizedCrop" in message


@pytest.mark.parametrize("resize", [ResizePolicy("shortest_edge", (64,), 64),
                                    ResizePolicy("fixed", fixed_size=(64, 64))])
def test_no_size_warning_when_a_resize_policy_is_set(resize: ResizePolicy) -> None:
    assert _train_transform(LONGEST_AND_PAD, resize) == []


def test_no_size_warning_for_crops_pads_and_scale_jitter() -> None:
    spec = [{"RandomCrop": {"height": 32, "width": 32}}, {"PadIfNeeded": {"min_height": 64, "min_width": 64}},
            {"RandomScale": {"scale_limit": 0.2}}, {"HorizontalFlip": {}}]
    assert _train_transform(spec) == []


def test_data_module_with_the_albumentations_resize_recipe_warns_once() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        RPNDataModule(train_transforms=LONGEST_AND_PAD)
    assert len(_size_warnings(record)) == 1


# --- transform_to_spec gives a spec that builds the same pipeline


def _constructible_transforms() -> list:
    """Every albumentations transform a pipeline here accepts, with its defaults (crops, resizes: a size)."""
    sizes = {"RandomCrop": {"height": 40, "width": 40}, "CenterCrop": {"height": 40, "width": 40},
             "Crop": {"x_max": 40, "y_max": 40}, "RandomSizedBBoxSafeCrop": {"height": 40, "width": 40},
             "Resize": {"height": 40, "width": 40}, "RandomResizedCrop": {"size": [40, 40]},
             "RandomSizedCrop": {"min_max_height": [20, 40], "size": [40, 40]},
             "AtLeastOneBBoxRandomCrop": {"height": 40, "width": 40},
             "GridElasticDeform": {"num_grid_xy": [4, 4], "magnitude": 5},
             "PadIfNeeded": {"min_height": 100, "min_width": 100}}
    bases = (A.BasicTransform, A.DualTransform, A.ImageOnlyTransform)
    names = []
    for name, cls in sorted(vars(A).items()):
        if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform) or cls in bases:
            continue
        if inspect.isabstract(cls) or name == "Lambda":  # Lambda holds functions: albumentations cannot serialise it
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_transform([{name: dict(sizes.get(name, {}), p=1.0)}])
        except TransformSpecError:
            continue
        names.append(pytest.param(name, sizes.get(name, {}), id=name))
    return names


TRANSFORMS = _constructible_transforms()


def test_the_round_trip_covers_the_transforms_that_once_failed() -> None:
    names = {entry.values[0] for entry in TRANSFORMS}
    assert len(names) >= 80
    assert {"PadIfNeeded", "RGBShift", "SafeRotate", "FrequencyMasking", "TimeMasking"} <= names


def test_the_comparison_sees_the_random_draws() -> None:
    built = build_transform([{"RGBShift": {"p": 1.0}}])
    assert not np.array_equal(_run(built, 7)["image"], _run(built, 8)["image"])


def _run(compose: A.Compose, seed: int) -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    boxes = np.array([[5, 6, 40, 30], [30, 20, 70, 60]], np.float32)
    compose.set_random_seed(seed)
    return compose(image=image, bboxes=boxes, box_kind=[0, 0], box_visible=[1.0, 1.0], box_origin=[0, 1])


@pytest.mark.parametrize("name, sizes", TRANSFORMS)
def test_spec_of_a_built_pipeline_builds_the_same_pipeline(name: str, sizes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = build_transform([{name: dict(sizes, p=1.0)}])
        rebuilt = build_transform(load_transform_spec(dump_transform_spec(transform_to_spec(built))))
        try:
            first = _run(built, 7)
        except ValueError as error:  # e.g. albumentations 2.0.0's PixelDropout with boxes
            pytest.skip(f"albumentations {A.__version__} cannot run {name} itself: {error}")
        again = _run(rebuilt, 7)
    np.testing.assert_array_equal(again["image"], first["image"])
    np.testing.assert_allclose(np.asarray(again["bboxes"]), np.asarray(first["bboxes"]))


def test_spec_refuses_an_inherited_attribute_its_arguments_do_not_give() -> None:
    built = build_transform([{"PadIfNeeded": {"min_height": 100, "min_width": 100}}])
    if "padding" not in A.to_dict(built.transforms[0])["transform"]:
        pytest.skip(f"albumentations {A.__version__}'s PadIfNeeded writes no inherited padding")
    built.transforms[0].padding = 5
    with pytest.raises(TransformSpecError, match="PadIfNeeded has padding=5"):
        transform_to_spec(built)


def test_spec_of_a_users_own_compose_a_transform_or_a_list() -> None:
    compose = A.Compose([A.HorizontalFlip(p=0.5), A.PadIfNeeded(64, 64)], bbox_params=A.BboxParams(format="coco"))
    spec = transform_to_spec(compose)
    assert [next(iter(entry)) for entry in spec] == ["HorizontalFlip", "PadIfNeeded"]
    assert transform_to_spec([A.HorizontalFlip(p=0.2)]) == transform_to_spec(A.HorizontalFlip(p=0.2)) \
        == [{"HorizontalFlip": {"p": 0.2}}]
    build_transform(spec)


# --- boxes split into fragments


def _grid_shuffle(spec: list) -> list[DetectionSample]:
    torch.manual_seed(0)
    transform = DetectionTransform(spec, 0.0, ResizePolicy(), train=True)
    image = np.zeros((120, 120, 3), np.uint8)
    boxes = np.array([[20, 20, 50, 50], [100, 100, 115, 115]], np.float32)
    return [transform(DetectionSample(image=image, boxes=boxes, image_id=1, source="x.png")) for _ in range(5)]


def test_fragments_of_a_split_box_are_not_counted_as_negative_removals() -> None:
    outs = _grid_shuffle([{"RandomGridShuffle": {"grid": [3, 3], "p": 1.0}}])
    assert max(len(out.boxes) for out in outs) > 2  # boxes were split
    assert [out.removed_boxes for out in outs] == [0] * len(outs)


def test_a_box_removed_beside_a_split_one_counts_once() -> None:
    spec = [{"Crop": {"x_max": 90, "y_max": 90}}, {"RandomGridShuffle": {"grid": [3, 3], "p": 1.0}}]
    outs = _grid_shuffle(spec)
    assert max(len(out.boxes) for out in outs) > 1  # the kept box was split
    assert [out.removed_boxes for out in outs] == [1] * len(outs)


# --- specs given as a mapping or as albumentations objects


def test_a_mapping_is_refused_with_the_list_form() -> None:
    with pytest.raises(TransformSpecError) as error:
        RPNDataModule(train_transforms={"HorizontalFlip": {"p": 0.5}})
    message = str(error.value)
    assert "data.train_transforms: expected a list of single-key mappings" in message
    assert "[{'HorizontalFlip': {'p': 0.5}}]" in message


@pytest.mark.parametrize("given, where", [
    (A.Compose([A.HorizontalFlip()], bbox_params=A.BboxParams(format="pascal_voc")), "data.train_transforms:"),
    (A.HorizontalFlip(), "data.train_transforms:"),
    ([A.HorizontalFlip()], "data.train_transforms[0]:"),
    ([{"OneOf": {"transforms": [A.Blur()]}}], "data.train_transforms[0].OneOf.transforms[0]:"),
])
def test_albumentations_objects_are_refused_naming_transform_to_spec(given: object, where: str) -> None:
    with pytest.raises(TransformSpecError) as error:
        DetectionTransform(given, train=True)  # type: ignore[arg-type]
    message = str(error.value)
    assert message.startswith(where)
    assert "specs are data" in message and "transform_to_spec(obj)" in message
