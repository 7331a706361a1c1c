"""Transform specs refused when built (evaluation geometry, output formats, missing inputs, containers),
the box rules (crowd boxes, visibility across transforms) and the one-line CLI error."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from lightning_rpn.cli import USAGE_ERROR, main
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.tiles import cut_window
from lightning_rpn.data.transforms import (
    DetectionTransform,
    TransformSpecError,
    build_transform,
    transform_to_spec,
)
from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.predict import to_original_coordinates


def item(boxes: list, crowd: list | None = None, h: int = 100, w: int = 100) -> DetectionSample:
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3)).astype(np.uint8)
    return DetectionSample(image=image, boxes=np.array(boxes, np.float32), image_id=7, source="images/a.jpg",
                           crowd_boxes=np.array(crowd if crowd is not None else [], np.float32).reshape(-1, 4))


def small_data(**kwargs: object) -> RPNDataModule:
    return RPNDataModule(dataset="synthetic", synthetic_train_images=2, synthetic_val_images=3, synthetic_min_size=64,
                         synthetic_max_size=96, batch_size=1, num_workers=0, assign_targets=False, **kwargs)


# ---- 1. evaluation transforms change pixel values only -------------------------------------------------

@pytest.mark.parametrize("spec, where, name", [
    ([{"HorizontalFlip": {"p": 1.0}}], "data.val_transforms[0]", "HorizontalFlip"),
    ([{"CenterCrop": {"height": 48, "width": 48}}], "data.val_transforms[0]", "CenterCrop"),
    ([{"RandomBrightnessContrast": {}}, {"LongestMaxSize": {"max_size": 64}}], "data.val_transforms[1]", "LongestMaxSize"),
    ([{"OneOf": {"transforms": [{"Blur": {}}, {"PadIfNeeded": {"min_height": 128, "min_width": 128}}]}}],
     "data.val_transforms[0].OneOf.transforms[1]", "PadIfNeeded"),
])
def test_val_transforms_that_move_pixels_or_boxes_are_refused(spec: list, where: str, name: str) -> None:
    """predict maps proposals back by the resize alone: a flip in val_transforms put them up to 59 px off."""
    with pytest.raises(TransformSpecError) as caught:
        small_data(val_transforms=spec)
    message = str(caught.value)
    assert message.startswith(f"{where}: {name} moves pixels")
    for part in ("only change pixel values", "data.resize", "model.sliding_window"):
        assert part in message


def test_pixel_val_transforms_keep_predict_in_original_coordinates() -> None:
    dm = small_data(val_transforms=[{"RandomBrightnessContrast": {"p": 1.0}}, {"Blur": {"p": 1.0}}],
                    resize="fixed", fixed_size=[80, 80])
    dm.setup("predict")
    raw = dm.datasets["predict"].dataset
    for i, batch in enumerate(dm.predict_dataloader()):
        mapped = to_original_coordinates(batch.gt_boxes[0], batch.image_sizes[0], batch.original_sizes[0])
        torch.testing.assert_close(mapped, torch.from_numpy(raw[i].boxes), atol=1e-3, rtol=0)


def test_training_transforms_may_still_move_pixels() -> None:
    small_data(train_transforms=[{"HorizontalFlip": {"p": 0.5}}, {"RandomCrop": {"height": 48, "width": 48}}])


# ---- 2. refused when built: output formats, inputs the pipeline never supplies --------------------------

@pytest.mark.parametrize("entry, made", [
    ({"Normalize": {}}, "float images or tensors"),
    ({"ToTensorV2": {}}, "float images or tensors"),
    ({"ToFloat": {}}, "float images or tensors"),
    ({"FromFloat": {}}, "float images or tensors"),
    ({"ToGray": {"num_output_channels": 1, "p": 1.0}}, "1-channel images"),
])
def test_transforms_that_change_the_image_format_are_refused_when_built(entry: dict, made: str) -> None:
    """They failed at the first batch, in a worker, naming neither the transform nor the setting."""
    name = next(iter(entry))
    if not hasattr(A, name):
        pytest.skip(f"albumentations {A.__version__} has no {name} at the top level")
    with pytest.raises(TransformSpecError) as caught:
        DetectionTransform([{"HorizontalFlip": {"p": 0.5}}, entry], train=True)
    message = str(caught.value)
    assert message.startswith(f"data.train_transforms[1]: {name} makes {made}")
    assert "H x W x 3 uint8" in message and "normalises images itself" in message


@pytest.mark.parametrize("entry, needs", [
    ({"MaskDropout": {"p": 1.0}}, "mask"),
    ({"RandomCropNearBBox": {}}, "cropping_bbox"),
    ({"OverlayElements": {}}, "overlay_metadata"),
    ({"Mosaic": {}}, "mosaic_metadata"),
])
def test_transforms_needing_inputs_the_pipeline_never_supplies_are_refused_when_built(entry: dict, needs: str) -> None:
    name = next(iter(entry))
    if not hasattr(A, name):
        pytest.skip(f"albumentations {A.__version__} has no {name}")
    with pytest.raises(TransformSpecError, match=rf"^data\.train_transforms\[0\]: {name} needs {needs} besides the image"):
        DetectionTransform([entry], train=True)


def test_volume_transforms_are_refused_when_built() -> None:
    with pytest.raises(TransformSpecError, match=r"CenterCrop3D works on .*volume.*, not on images"):
        DetectionTransform([{"CenterCrop3D": {"size": [2, 8, 8]}}], train=True)


def test_a_wrong_image_at_call_time_names_the_setting_and_the_image() -> None:
    """A transform the build checks do not know (here put in by hand) that returns another format."""
    transform = DetectionTransform([{"Blur": {}}], train=True)
    transform.compose = A.Compose([A.Normalize(p=1.0)], bbox_params=transform.compose.processors["bboxes"].params)
    with pytest.raises(DataError) as caught:
        transform(item([[5, 5, 40, 40]]))
    message = str(caught.value)
    for part in ("images/a.jpg", "image 7", "data.train_transforms", "100x100 (w x h)", "float32",
                 "H x W x 3 uint8", "Normalize"):
        assert part in message


# ---- 3. containers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", [
    {"RandomOrder": {"transforms": [{"HorizontalFlip": {"p": 1.0}}, {"Blur": {}}], "n": 2}},
    {"OneOrOther": {"first": {"HorizontalFlip": {"p": 1.0}}, "second": {"VerticalFlip": {"p": 1.0}}, "p": 1.0}},
    {"SelectiveChannelTransform": {"transforms": [{"Blur": {"p": 1.0}}], "channels": [0]}},
])
def test_every_albumentations_container_builds_runs_and_round_trips(entry: dict) -> None:
    """RandomOrder and OneOrOther(first, second) failed with AttributeError: 'dict' object has no attribute ..."""
    transform = DetectionTransform([entry], train=True)
    out = transform(item([[5, 5, 30, 30]]))
    assert out.image.shape == (100, 100, 3) and len(out.boxes) == 1
    spec = transform_to_spec(transform.compose)
    assert next(iter(spec[0])) == next(iter(entry))
    assert transform_to_spec(build_transform(spec)) == spec
    given = {key: value for key, value in entry[next(iter(entry))].items() if key not in ("transforms", "first", "second")}
    assert given.items() <= spec[0][next(iter(entry))].items()  # SelectiveChannelTransform lost its channels


@pytest.mark.parametrize("spec, match", [
    ([{"ReplayCompose": {"transforms": [{"HorizontalFlip": {}}]}}],
     r"^data\.train_transforms\[0\]: 'ReplayCompose' is a whole pipeline"),
    ([{"OneOrOther": {"first": {"HorizontalFlp": {}}, "second": {"Blur": {}}}}],
     r"^data\.train_transforms\[0\]\.OneOrOther\.first: 'HorizontalFlp' is not an albumentations transform"),
    ([{"OneOrOther": {"first": {"Normalize": {}}, "second": {"Blur": {}}}}],
     r"^data\.train_transforms\[0\]\.OneOrOther\.first: Normalize makes"),
    ([{"OneOrOther": {"p": 0.5}}], r"^data\.train_transforms\[0\]: cannot build OneOrOther"),
])
def test_container_problems_name_the_entry(spec: list, match: str) -> None:
    with pytest.raises(TransformSpecError, match=match):
        DetectionTransform(spec, train=True)


# ---- 4, 5. the box rules -------------------------------------------------------------------------------

def test_a_crop_keeps_crowd_boxes_that_still_reach_into_the_image_as_tiles_do() -> None:
    """The crop dropped the crowd region under min_visibility, so anchors on its visible strip became negatives."""
    sample = item([[60, 60, 90, 90], [30, 10, 55, 20]], crowd=[[0, 0, 60, 100], [0, 0, 10, 10]])
    window = (48, 0, 100, 100)
    crop = DetectionTransform([{"Crop": {"x_min": 48, "y_min": 0, "x_max": 100, "y_max": 100}}],
                              min_visibility=0.3, train=True)(sample)
    tiles = cut_window(sample, window, min_visibility=0.3)
    np.testing.assert_allclose(crop.crowd_boxes, [[0, 0, 12, 100]], atol=1e-4)
    np.testing.assert_allclose(crop.crowd_boxes, tiles.crowd_boxes, atol=1e-4)
    np.testing.assert_allclose(crop.boxes, tiles.boxes, atol=1e-4)  # ground truth: 7 / 25 visible, removed
    assert crop.removed_boxes == tiles.removed_boxes == 1


def test_min_visibility_is_measured_against_the_box_before_all_transforms() -> None:
    """Two crops keeping 55 % each left a 30 %-visible box that min_visibility 0.4 kept."""
    first = {"Crop": {"x_min": 18, "y_min": 0, "x_max": 100, "y_max": 100}}  # keeps 22 of 40 px: 55 %
    second = {"Crop": {"x_min": 10, "y_min": 0, "x_max": 82, "y_max": 100}}  # keeps 12 of 22: 55 % again
    twice = DetectionTransform([first, second], min_visibility=0.4, train=True)(item([[0, 0, 40, 40]]))
    assert len(twice.boxes) == 0 and twice.removed_boxes == 1
    once = DetectionTransform([first], min_visibility=0.4, train=True)(item([[0, 0, 40, 40]]))
    np.testing.assert_allclose(once.boxes, [[0, 0, 22, 40]], atol=1e-4)
    kept = DetectionTransform([first, second], min_visibility=0.25, train=True)(item([[0, 0, 40, 40]]))
    np.testing.assert_allclose(kept.boxes, [[0, 0, 12, 40]], atol=1e-4)


@pytest.mark.parametrize("after", [
    {"PadIfNeeded": {"min_height": 100, "min_width": 100, "position": "center"}},
    {"Rotate": {"limit": [90, 90], "p": 1.0}},
])
def test_a_box_a_crop_removed_does_not_come_back_over_padding_or_rotation(after: dict) -> None:
    """Why boxes are still clipped after every transform (albumentations' check_each_transform=False did bring it back)."""
    spec = [{"Crop": {"x_min": 40, "y_min": 0, "x_max": 100, "y_max": 100}}, after]
    out = DetectionTransform(spec, min_visibility=0.3, train=True)(item([[0, 40, 30, 60]], crowd=[[0, 0, 30, 10]]))
    assert len(out.boxes) == 0 and len(out.crowd_boxes) == 0 and out.removed_boxes == 1


@pytest.mark.parametrize("min_visibility", [0.3, 0.9])
def test_one_crop_then_flips_keeps_exactly_the_boxes_albumentations_keeps(min_visibility: float) -> None:
    """The shipped pipelines (scenes.yaml: RandomCrop then flips) keep the same boxes as before, draw for draw."""
    spec = [{"RandomCrop": {"height": 64, "width": 64}}, {"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}}]
    ours = DetectionTransform(spec, min_visibility=min_visibility, train=True)
    plain = A.Compose([A.RandomCrop(64, 64), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)],
                      bbox_params=A.BboxParams(format="pascal_voc", label_fields=["kind"], clip=True,
                                               min_visibility=min_visibility))
    ours._seed_for_process()
    ours.compose.set_random_seed(3)
    plain.set_random_seed(3)
    shapes = SyntheticShapes(60, seed=1)
    kept = 0
    for i in range(len(shapes)):
        sample = shapes[i]
        expected = plain(image=sample.image, bboxes=sample.boxes, kind=[0] * len(sample.boxes))
        boxes = np.asarray(expected["bboxes"], np.float32).reshape(-1, 4)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        out = ours(sample)
        np.testing.assert_array_equal(out.image, expected["image"])
        np.testing.assert_array_equal(out.boxes, boxes)
        kept += len(boxes)
    assert kept > 0


# ---- 6. the CLI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, setting, spec, expected", [
    ("fit", "train_transforms", "[{HorizontalFlp: {p: 0.5}}]",
     "lightning-rpn: data.train_transforms[0]: 'HorizontalFlp' is not an albumentations transform"),
    ("check-data", "val_transforms", "[{HorizontalFlip: {p: 1.0}}]",
     "lightning-rpn: data.val_transforms[0]: HorizontalFlip moves pixels"),
])
def test_the_cli_prints_a_transform_spec_error_as_one_line(
    command: str, setting: str, spec: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It printed a 60-line traceback naming train_transforms[0] without the data. prefix."""
    monkeypatch.chdir(tmp_path)
    code = main([command, "--model.backbone", "tiny_fpn", "--model.anchor_sizes", "[[16], [32], [64], [128]]",
                 "--data.synthetic_train_images", "2",
                 "--data.synthetic_val_images", "1", "--data.num_workers", "0", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path), f"--data.{setting}", spec])
    err = capsys.readouterr().err
    assert code == USAGE_ERROR
    assert err.strip().splitlines()[-1].startswith(expected), err
    assert "Traceback" not in err and err.count(f"data.{setting}") == 1
