"""COCO annotation fields users get wrong: iscrowd as a string, unknown categories, reused ids,
a category filter that keeps nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.builders import basic_coco, write_coco

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.problems import DataError

IMAGES = [{"id": 7, "file_name": "img.png", "height": 40, "width": 60}]


def annotation(**fields: object) -> dict[str, object]:
    return {"id": 70, "image_id": 7, "bbox": [5, 5, 10, 10], "category_id": 1, **fields}


@pytest.mark.parametrize("value", ["0", "1", 2, -1, 0.5, 1.5, None, float("nan")])
def test_an_iscrowd_other_than_0_or_1_is_an_error_naming_the_annotation(tmp_path: Path, value: object) -> None:
    args = write_coco(tmp_path, IMAGES, [annotation(iscrowd=value)])
    with pytest.raises(DataError, match="iscrowd") as info:
        COCODetection(*args)
    assert "annotations.json, image 7, annotation 70" in str(info.value)
    skipped = COCODetection(*args, on_bad_annotation="skip")
    assert len(skipped.records[0].boxes) == 0 and len(skipped.records[0].crowd_boxes) == 0
    (problem,) = skipped.problems
    assert (problem.kind, problem.action, problem.severity, problem.annotation_id) == (
        "bad_iscrowd", "skipped", "error", 70)


@pytest.mark.parametrize("value, crowd", [(0, False), (1, True), (False, False), (True, True), (0.0, False), (1.0, True)])
def test_iscrowd_0_1_as_numbers_floats_or_booleans_is_accepted(tmp_path: Path, value: object, crowd: bool) -> None:
    ds = COCODetection(*write_coco(tmp_path, IMAGES, [annotation(iscrowd=value)]))
    assert (len(ds.records[0].crowd_boxes), len(ds.records[0].boxes)) == (int(crowd), int(not crowd))
    assert len(ds.problems) == 0


def test_a_category_missing_or_not_in_categories_is_a_warning_and_the_box_kept(tmp_path: Path) -> None:
    no_category = annotation(id=72)
    del no_category["category_id"]
    anns = [annotation(category_id=99), annotation(id=71, category_id="1"), no_category]
    ds = COCODetection(*write_coco(tmp_path, IMAGES, anns))
    assert len(ds.records[0].boxes) == 3
    assert [(p.kind, p.action, p.severity, p.image_id, p.annotation_id) for p in ds.problems] == [
        ("unknown_category", "kept", "warning", 7, a) for a in (70, 71, 72)]
    details = [p.detail for p in ds.problems]
    assert "category_id 99 is not an id of 'categories'" in details[0]
    assert "('categories' has 1)" in details[1] and "no category_id" in details[2]


def test_a_reused_annotation_id_is_a_warning_naming_it_and_both_images(tmp_path: Path) -> None:
    images = IMAGES + [{"id": 8, "file_name": "b.png", "height": 40, "width": 60}]
    ds = COCODetection(*write_coco(tmp_path, images, [annotation(), annotation(image_id=8)]))
    assert [len(r.boxes) for r in ds.records] == [1, 1]
    (problem,) = ds.problems
    assert (problem.kind, problem.action, problem.severity, problem.image_id, problem.annotation_id) == (
        "duplicate_annotation_id", "kept", "warning", 8, 70)
    assert "first by an annotation of image 7" in problem.detail


def test_a_category_filter_that_keeps_no_annotation_is_an_error_naming_the_file(tmp_path: Path) -> None:
    args = write_coco(tmp_path, IMAGES, [annotation(), annotation(id=71)])
    with pytest.raises(DataError, match=r"category_ids \(data.category_ids\) \[2\] keeps none of the file's 2 "
                                        r"annotations \(annotations per category_id: 1 \('cat'\): 2\)") as info:
        COCODetection(*args, category_ids=[2])
    assert str(info.value).startswith(str(args[1]))
    with pytest.raises(DataError, match="category_names"):
        COCODetection(*args, category_names=["dog"], on_bad_annotation="skip")


def test_a_filter_keeping_some_annotations_or_a_file_without_any_is_not_an_error(tmp_path: Path) -> None:
    assert sum(len(r.boxes) for r in COCODetection(*basic_coco(tmp_path / "a"), category_ids=[2]).records) == 1
    assert len(COCODetection(*write_coco(tmp_path / "b", IMAGES, []), category_ids=[2])) == 1


def test_a_category_filter_on_a_file_mixing_int_and_string_ids_names_the_known_ones(tmp_path: Path) -> None:
    # sorting the known ids for the message raised TypeError ('<' between str and int)
    categories = [{"id": 1, "name": "a"}, {"id": "4", "name": "b"}]
    args = write_coco(tmp_path, IMAGES, [annotation()], categories=categories)
    with pytest.raises(DataError, match=r"category_ids: 9 is not a category id; known: \['4', 1\]"):
        COCODetection(*args, category_ids=[9])


def test_an_image_id_that_is_a_list_is_an_error_not_a_type_error(tmp_path: Path) -> None:
    # a list (unhashable) as an annotation's image_id or an image's id raised TypeError
    args = write_coco(tmp_path, IMAGES, [annotation(image_id=[7])])
    with pytest.raises(DataError, match=r"annotation 70: annotation refers to image id \[7\], which"):
        COCODetection(*args)
    (problem,) = COCODetection(*args, on_bad_annotation="skip").problems
    assert (problem.kind, problem.annotation_id) == ("unknown_image", 70)
    args = write_coco(tmp_path, [{**IMAGES[0], "id": [7]}, {**IMAGES[0], "id": 8, "file_name": "b.png"}], [])
    with pytest.raises(DataError, match=r"image id \[7\] of 'img.png' is not a number or a string"):
        COCODetection(*args)
    skipped = COCODetection(*args, on_bad_annotation="skip")
    assert [r.image_id for r in skipped.records] == [8]
    assert [p.kind for p in skipped.problems] == ["bad_image_entry"]


@pytest.mark.parametrize("sized", [True, False])
def test_a_null_in_bbox_is_named_null_with_its_annotation_image_and_file(tmp_path: Path, sized: bool) -> None:
    # a null became NaN, so the error and the skip report quoted "bbox [10, nan, 20, 30]", a value the
    # file does not hold (and, for an image without width / height, only once the image was loaded)
    images = [IMAGES[0] if sized else {"id": 7, "file_name": "img.png"}]
    images_root, ann_file = write_coco(tmp_path, images, [annotation(bbox=[10, None, 20, 30]), annotation(id=71)],
                                       create_files=False)
    expected = "bbox [10, null, 20, 30] is not 4 numbers (x, y, w, h)"
    with pytest.raises(DataError) as info:
        COCODetection(images_root, ann_file)
    assert str(info.value) == (f"{ann_file}, image 7, annotation 70: {expected} "
                               "(set on_bad_annotation='skip' to drop it)")
    for policy in ("skip", "clip"):
        skipped = COCODetection(images_root, ann_file, on_bad_annotation=policy)
        assert skipped.records[0].annotation_ids == [71]
        (problem,) = skipped.problems
        assert (problem.kind, problem.action, problem.file, problem.image_id, problem.annotation_id) == (
            "malformed_bbox", "skipped", str(ann_file), 7, 70)
        assert problem.detail == expected
