"""COCO's annotation ``area``: read for each ground-truth box, refused when it is no area, dropped
for a whole file that lacks some, and carried row for row with the boxes through the transforms,
the collate and the batch."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.builders import write_coco

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.transforms import DetectionTransform, ResizePolicy

IMAGES = [{"id": 7, "file_name": "img.png", "height": 40, "width": 60},
          {"id": 8, "file_name": "b.png", "height": 40, "width": 60}]


def annotation(ann_id: int = 70, image_id: int = 7, bbox: Any = (5, 5, 10, 10), **fields: Any) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "bbox": list(bbox), "category_id": 1, **fields}


def areas_of(ds: COCODetection) -> dict[Any, list[float]]:
    assert ds.annotation_areas is not None
    return {image_id: areas.tolist() for image_id, areas in ds.annotation_areas.items()}


def test_each_ground_truth_box_gets_its_annotation_area_in_box_order(tmp_path: Path) -> None:
    anns = [annotation(70, 8, area=12.5), annotation(71, 7, (1, 1, 8, 8), area=40),
            annotation(72, 7, (0, 0, 20, 20), area=300, iscrowd=1),  # a crowd box: no area kept
            annotation(73, 7, (30, 2, 9, 9), area=0)]
    ds = COCODetection(*write_coco(tmp_path, IMAGES, anns))
    assert areas_of(ds) == {7: [40.0, 0.0], 8: [12.5]} and len(ds.problems) == 0
    sample = ds[0]
    assert sample.annotation_areas.dtype == np.float32 and sample.annotation_areas.tolist() == [40.0, 0.0]
    assert len(sample.crowd_boxes) == 1


def test_a_clean_file_with_areas_takes_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[Any] = []
    original = COCODetection._annotation_problem
    monkeypatch.setattr(COCODetection, "_annotation_problem", lambda self, ann, *a: checked.append(ann) or
                        original(self, ann, *a))
    anns = [annotation(70 + i, 7 + i % 2, area=area) for i, area in enumerate([1, 2.5, 0, 1e300, 3])]
    ds = COCODetection(*write_coco(tmp_path, IMAGES, anns, create_files=False))
    assert checked == [] and areas_of(ds) == {7: [1.0, 0.0, 3.0], 8: [2.5, 1e300]}


@pytest.mark.parametrize("value, kind", [
    (-1, "negative"), (-0.5, "negative"), (float("nan"), "not finite"), (float("inf"), "not finite"),
    pytest.param(10**400, "too large", id="10**400"), ("12", "a string"), (None, "not a number"),
    (True, "not a number"), ([4], "not a number"),
])
def test_a_bad_area_keeps_its_box_and_the_file_sorts_by_box_area_with_a_warning(
        tmp_path: Path, value: Any, kind: str) -> None:
    # the area sorts boxes into AR_small / medium / large only: a bad one (a signed polygon formula
    # writes negative areas) must not stop the load nor drop a good box from training
    images_root, ann_file = write_coco(tmp_path, IMAGES, [annotation(71, area=5), annotation(area=value)],
                                       create_files=False)
    for policy in ("raise", "skip", "clip"):
        dataset = COCODetection(images_root, ann_file, on_bad_annotation=policy)
        assert dataset.records[0].annotation_ids == [71, 70] and dataset.annotation_areas is None
        (problem,) = dataset.problems
        assert (problem.kind, problem.action, problem.file, problem.image_id, problem.annotation_id) == (
            "bad_area", "kept", str(ann_file), 7, 70)
        assert problem.detail.startswith("area ") and f" is {kind}, and 1 annotation(s) of the file" in problem.detail
        assert problem.severity == "warning"


def test_a_bad_area_of_a_crowd_annotation_is_a_warning_too(tmp_path: Path) -> None:
    dataset = COCODetection(*write_coco(tmp_path, IMAGES, [annotation(area=-3, iscrowd=1)], create_files=False))
    (problem,) = dataset.problems
    assert (problem.kind, problem.action) == ("bad_area", "kept") and "area -3 is negative" in problem.detail


def test_a_file_lacking_some_areas_sorts_all_its_boxes_by_box_area_and_says_so(tmp_path: Path) -> None:
    anns = [annotation(70, 8, area=12.5), annotation(71, 7), annotation(72, 7, area=3), annotation(73, 8),
            annotation(74, 7, iscrowd=1, area=9)]
    ds = COCODetection(*write_coco(tmp_path, IMAGES, anns))
    assert ds.annotation_areas is None and ds[0].annotation_areas is None
    (problem,) = ds.problems
    assert (problem.kind, problem.action, problem.image_id, problem.annotation_id) == ("missing_area", "kept", 7, 71)
    assert problem.detail.startswith("2 of the file's 4 ground-truth annotations (this one first) have no 'area'")
    assert problem.severity == "warning"  # the file's data is used: check-data exits 0 without --strict


def test_a_file_without_any_area_or_lacking_only_crowd_areas_needs_no_word(tmp_path: Path) -> None:
    ds = COCODetection(*write_coco(tmp_path / "none", IMAGES, [annotation(70), annotation(71, iscrowd=1)]))
    assert ds.annotation_areas is None and ds[0].annotation_areas is None and len(ds.problems) == 0
    ds = COCODetection(*write_coco(tmp_path / "crowd", IMAGES, [annotation(70, area=4), annotation(71, iscrowd=1)]))
    assert areas_of(ds) == {7: [4.0], 8: []} and len(ds.problems) == 0


@pytest.mark.parametrize("policy, kept", [("skip", [10.0, 30.0]), ("clip", [10.0, 20.0, 30.0])])
def test_the_areas_of_boxes_the_checks_drop_go_with_them(tmp_path: Path, policy: str, kept: list[float]) -> None:
    # the second box reaches far outside the image: skipped, or clipped (it keeps its area)
    anns = [annotation(70, area=10), annotation(71, bbox=(50, 30, 20, 20), area=20), annotation(72, area=30)]
    ds = COCODetection(*write_coco(tmp_path, IMAGES, anns), on_bad_annotation=policy)
    sample = ds[0]
    assert len(sample.boxes) == len(kept) and sample.annotation_areas.tolist() == kept


def test_an_image_checked_at_load_keeps_the_areas_of_its_kept_boxes(tmp_path: Path) -> None:
    # no size in the file: the boxes are checked when the image is decoded (60 x 40)
    images = [{"id": 7, "file_name": "img.png"}]
    write_coco(tmp_path, [{**IMAGES[0]}], [])  # the image file, 60 x 40
    anns = [annotation(70, bbox=(70, 1, 5, 5), area=1), annotation(71, area=2)]
    ds = COCODetection(*write_coco(tmp_path, images, anns, create_files=False), on_bad_annotation="skip")
    sample = ds[0]
    assert sample.annotation_areas.tolist() == [2.0] and len(sample.boxes) == 1


def test_the_transforms_keep_each_kept_box_area_unscaled(tmp_path: Path) -> None:
    anns = [annotation(70, bbox=(2, 2, 10, 10), area=11), annotation(71, bbox=(40, 5, 10, 10), area=22),
            annotation(72, bbox=(25, 20, 10, 10), area=33), annotation(73, bbox=(0, 0, 60, 40), area=44, iscrowd=1),
            annotation(74, bbox=(15, 25, 10, 10), area=55)]
    sample = COCODetection(*write_coco(tmp_path, IMAGES, anns))[0]
    resized = DetectionTransform(resize=ResizePolicy("fixed", fixed_size=(80, 120)), pixel_only=True)(sample)
    assert resized.annotation_areas.tolist() == [11.0, 22.0, 33.0, 55.0]  # original-image pixels: not scaled
    # a crop keeping the first and last boxes whole, 30 % of the third (dropped) and none of the second
    crop = DetectionTransform([{"Crop": {"x_min": 0, "y_min": 0, "x_max": 28, "y_max": 40}}], min_visibility=0.4,
                              train=True)
    out = crop(sample, seed=0)
    assert out.boxes.tolist() == [[2, 2, 12, 12], [15, 25, 25, 35]] and out.annotation_areas.tolist() == [11.0, 55.0]
    assert crop(replace(sample), seed=0).annotation_areas is None  # a sample without areas gets none


def test_replace_leaves_the_areas_out_and_a_wrong_count_is_refused() -> None:
    sample = SyntheticShapes(1, min_size=48, max_size=48, max_shapes=3, split="areas")[0]
    assert sample.annotation_areas is None
    sample.set_annotation_areas(np.arange(len(sample.boxes)))
    assert replace(sample).annotation_areas is None  # boxes changed by code unaware of areas: none
    with pytest.raises(ValueError, match=rf"{len(sample.boxes) + 1} annotation areas for {len(sample.boxes)} boxes"):
        sample.set_annotation_areas(np.zeros(len(sample.boxes) + 1))


def test_the_collate_and_the_batch_carry_the_areas(tmp_path: Path) -> None:
    anns = [annotation(70, area=11), annotation(71, bbox=(20, 20, 5, 5), area=22)]
    annotated = COCODetection(*write_coco(tmp_path, IMAGES, anns))[0]
    plain = SyntheticShapes(1, min_size=48, max_size=48, max_shapes=3, split="areas")[0]
    collate = RPNCollate()
    batch = collate([annotated, plain])
    assert [None if a is None else a.tolist() for a in batch.annotation_areas] == [[11.0, 22.0], None]
    for copy in (pickle.loads(pickle.dumps(batch)), batch.to("cpu")):  # a worker's batch, a moved one
        assert [None if a is None else a.tolist() for a in copy.annotation_areas] == [[11.0, 22.0], None]
        assert [g.tolist() for g in copy.gt_boxes] == [g.tolist() for g in batch.gt_boxes]
    assert collate([plain]).annotation_areas == []

