"""Hand-edited COCO files: an entry of 'annotations' that is no object, values quoted as the file
writes them (null, true), and values that crashed the reader (Infinity, integers past float64,
'categories' that is no list) are one-line errors naming the file, image and annotation, or
skip reports under on_bad_annotation 'skip' / 'clip'."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.problems import as_written
from lightning_rpn.data.problems import DataError

IMAGE = {"id": 7, "file_name": "a.jpg", "width": 60, "height": 40}
NULL_ID_IMAGE = {"id": None, "file_name": "n.jpg", "width": 60, "height": 40}
CATEGORIES = [{"id": 1, "name": "cat"}]
SKIP_IT = "(set on_bad_annotation='skip' to drop it)"
HUGE = 10 ** 400  # written out as an integer of 401 digits: past float64, as 1e400 is not (that reads as inf)


def write(root: Path, images: list[Any], annotations: list[Any], **top: Any) -> Path:
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES, **top}))
    return path


def ann(ann_id: Any = 70, image_id: Any = 7, **fields: Any) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [5, 5, 10, 10], **fields}


def rows(ds: COCODetection) -> list[tuple[Any, ...]]:
    return [(p.kind, p.action, p.image_id, p.annotation_id, p.detail) for p in ds.problems]


@pytest.mark.parametrize("entry, quoted", [
    ("oops", "'oops'"), ("bbox", "'bbox'"), ([1, 2, 3, 4], "[1, 2, 3, 4]"), (["bbox"], "['bbox']"),
    (5, "5"), (1.5, "1.5"), (None, "null"), (True, "true"), (list(range(40)), "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, "
                                                                              "11, 12, 13, 14, 15, 16..."),
])
@pytest.mark.parametrize("with_null_image_id", [False, True])
def test_an_annotation_entry_that_is_no_object_is_a_problem_naming_its_position(
    tmp_path: Path, entry: Any, quoted: str, with_null_image_id: bool
) -> None:
    # with an image entry of id null, such an entry was looked up as that image's annotation: a bare
    # TypeError ("argument of type 'int' is not iterable", "string indices must be integers") or "no
    # bbox"; without one, "annotation refers to image id None"
    images = [IMAGE, NULL_ID_IMAGE] if with_null_image_id else [IMAGE]
    path = write(tmp_path, images, [ann(70), entry, ann(71)])
    detail = f"annotations[1] is {quoted}, not an object with image_id and bbox"
    if not with_null_image_id:
        with pytest.raises(DataError) as caught:
            COCODetection(tmp_path / "images", path)
        assert str(caught.value) == f"{path}: {detail} {SKIP_IT}"
    for policy in ("skip", "clip"):
        ds = COCODetection(tmp_path / "images", path, on_bad_annotation=policy)
        assert [(r.image_id, r.annotation_ids) for r in ds.records] == [(7, [70, 71])]
        null_image = [("bad_image_entry", "skipped", None, None, "image id null of 'n.jpg' is not a number or a "
                       "string")] if with_null_image_id else []
        assert rows(ds) == [*null_image, ("bad_annotation_entry", "skipped", None, None, detail)]
        assert all(p.file == str(path) for p in ds.problems)


def test_an_image_id_null_is_refused_and_annotations_without_image_id_are_not_given_to_it(tmp_path: Path) -> None:
    # the entry was kept under the id None, and an annotation without image_id (or with image_id null)
    # was taken as one of its boxes
    no_image_id = ann(71)
    del no_image_id["image_id"]
    path = write(tmp_path, [IMAGE, NULL_ID_IMAGE], [ann(70), no_image_id, ann(72, None)])
    with pytest.raises(DataError) as caught:
        COCODetection(tmp_path / "images", path)
    assert str(caught.value) == f"{path}: image id null of 'n.jpg' is not a number or a string"
    ds = COCODetection(tmp_path / "images", path, on_bad_annotation="skip")
    assert [(r.image_id, r.annotation_ids) for r in ds.records] == [(7, [70])]
    assert rows(ds) == [
        ("bad_image_entry", "skipped", None, None, "image id null of 'n.jpg' is not a number or a string"),
        ("unknown_image", "skipped", None, 71, "the annotation has no image_id; expected the id of an entry of "
         "'images'"),
        ("unknown_image", "skipped", None, 72, "annotation refers to image id null, which is not in 'images'"),
    ]


@pytest.mark.parametrize("images, annotation, expected", [
    ([IMAGE], ann(iscrowd=None), ("bad_iscrowd", 7, 70, "iscrowd null is not 0 or 1; expected the number 0 or 1 "
                                                        "(or false / true)")),
    ([IMAGE], ann(iscrowd={"a": None}), ("bad_iscrowd", 7, 70, "iscrowd {'a': null} is not 0 or 1; expected the "
                                                               "number 0 or 1 (or false / true)")),
    ([IMAGE], ann(bbox=True), ("malformed_bbox", 7, 70, "bbox true is not 4 numbers (x, y, w, h)")),
    ([IMAGE], ann(bbox=[1, 2, {"w": None}, False]),
     ("malformed_bbox", 7, 70, "bbox [1, 2, {'w': null}, false] is not 4 numbers (x, y, w, h)")),
    ([IMAGE], ann(image_id=[7]), ("unknown_image", "[7]", 70, "annotation refers to image id [7], which is not in "
                                                              "'images'")),
    ([IMAGE], ann(image_id=False), ("unknown_image", False, 70, "annotation refers to image id false, which is not "
                                                                "in 'images'")),
    ([{**IMAGE, "width": None}], ann(), ("bad_image_entry", 7, None, "image width/height null/40 must be positive "
                                                                     "numbers")),
    ([{**IMAGE, "height": False}], ann(), ("bad_image_entry", 7, None, "image width/height 60/false must be "
                                                                       "positive numbers")),
])
def test_values_are_quoted_as_the_file_writes_them(
    tmp_path: Path, images: list[Any], annotation: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    kind, image_id, ann_id, detail = expected
    path = write(tmp_path, images, [annotation])
    with pytest.raises(DataError) as caught:
        COCODetection(tmp_path / "images", path)
    assert str(caught.value).startswith(f"{path}, image {as_written(image_id)}") and detail in str(caught.value)
    ds = COCODetection(tmp_path / "images", path, on_bad_annotation="skip")
    assert rows(ds) == [(kind, "skipped", image_id, ann_id, detail)]


def test_warnings_and_the_category_messages_quote_null_and_true(tmp_path: Path) -> None:
    path = write(tmp_path, [IMAGE], [ann(True), ann(True), ann(70, category_id=None), ann(71, category_id=True)])
    ds = COCODetection(tmp_path / "images", path)
    assert rows(ds) == [
        ("duplicate_annotation_id", "kept", 7, True, "annotation id true is used again (first by an annotation of "
         "image 7), so problems naming it are ambiguous; give each annotation its own id"),
        ("unknown_category", "kept", 7, 70, "category_id null is not an id of 'categories'; every category is one "
         "class"),
    ]  # a category_id true is the category 1, as a true in a bbox is 1
    with_null = [{"id": 1, "name": "cat"}, {"id": None, "name": None}]
    path = write(tmp_path, [IMAGE], [ann(70, category_id=None)], categories=with_null)
    with pytest.raises(DataError, match=r"\(annotations per category_id: null \(null\): 1\)"):
        COCODetection(tmp_path / "images", path, category_names=["cat"])
    with pytest.raises(DataError, match=r"category_names: 'dog' is not a category; known: \['cat', null\]"):
        COCODetection(tmp_path / "images", path, category_names=["dog"])
    with pytest.raises(DataError, match=r"category_ids: 9 is not a category id; known: \[1, null\]"):
        COCODetection(tmp_path / "images", path, category_ids=[9])


def test_an_annotation_without_id_is_named_by_its_position(tmp_path: Path) -> None:
    no_id = ann(bbox=[1, 2, 3])
    del no_id["id"]
    path = write(tmp_path, [IMAGE], [ann(70), no_id, ann(None, category_id=5)])
    with pytest.raises(DataError) as caught:
        COCODetection(tmp_path / "images", path)
    assert str(caught.value) == (f"{path}, image 7: annotations[1] (no id): bbox [1, 2, 3] is not 4 numbers "
                                 f"(x, y, w, h) {SKIP_IT}")
    ds = COCODetection(tmp_path / "images", path, on_bad_annotation="skip")
    assert rows(ds) == [
        ("malformed_bbox", "skipped", 7, None, "annotations[1] (no id): bbox [1, 2, 3] is not 4 numbers (x, y, w, h)"),
        ("unknown_category", "kept", 7, None, "annotations[2] (no id): category_id 5 is not an id of 'categories'; "
         "every category is one class"),
    ]


@pytest.mark.parametrize("field", ["width", "height"])
@pytest.mark.parametrize("value, quoted", [(float("inf"), "Infinity"), (float("-inf"), "-Infinity"),
                                           (float("nan"), "NaN"), (HUGE, str(HUGE)[:57] + "...")])
def test_an_infinite_or_huge_image_size_is_a_bad_image_entry(
    tmp_path: Path, field: str, value: Any, quoted: str
) -> None:
    # Infinity (which Python's json reads) raised OverflowError from int(), an integer past float64
    # OverflowError from the box checks
    sizes = {"width": 60, "height": 40, field: value}
    path = write(tmp_path, [{**IMAGE, **sizes}, {**IMAGE, "id": 8, "file_name": "b.jpg"}], [ann(70), ann(71, 8)])
    detail = f"image width/height {quoted if field == 'width' else 60}/{quoted if field == 'height' else 40} " \
             "must be positive numbers"
    with pytest.raises(DataError) as caught:
        COCODetection(tmp_path / "images", path)
    assert str(caught.value) == f"{path}, image 7: {detail}"
    ds = COCODetection(tmp_path / "images", path, on_bad_annotation="skip")
    assert [(r.image_id, r.annotation_ids) for r in ds.records] == [(8, [71])]
    assert rows(ds) == [("bad_image_entry", "skipped", 7, None, detail)]


@pytest.mark.parametrize("sized", [True, False])
@pytest.mark.parametrize("checked", [False, True])  # a clean annotation otherwise, or one the detailed checks take
def test_an_integer_past_float64_in_a_bbox_is_a_non_finite_box(tmp_path: Path, sized: bool, checked: bool) -> None:
    # raised OverflowError ("int too large to convert to float") when the boxes were stored
    image = IMAGE if sized else {"id": 7, "file_name": "a.jpg"}
    bad = ann(70, bbox=[1, HUGE, 3, 4], category_id=5 if checked else 1)
    path = write(tmp_path, [image], [bad, ann(71)])
    if not sized:
        ds = COCODetection(tmp_path / "images", path)  # checked when the image is loaded, as any box of it
        np.testing.assert_array_equal(ds.records[0].written_boxes, [[1, np.inf, 3, 4], [5, 5, 10, 10]])
        return
    with pytest.raises(DataError) as caught:
        COCODetection(tmp_path / "images", path)
    assert str(caught.value) == (f"{path}, image 7, annotation 70: bbox [1, inf, 3, 4] (x, y, w, h) has non-finite "
                                 "coordinates (set on_bad_annotation='skip' or 'clip' to drop or repair such boxes)")
    ds = COCODetection(tmp_path / "images", path, on_bad_annotation="clip")
    assert ds.records[0].annotation_ids == [70, 71]
    np.testing.assert_array_equal(ds.records[0].boxes, [[5, 5, 15, 15]])
    assert [row[:4] for row in rows(ds)][-1] == ("non_finite", "skipped", 7, 70)


@pytest.mark.parametrize("categories, quoted", [(5, "5"), ("cat", "'cat'"), ({"1": "cat"}, "{'1': 'cat'}"),
                                                (True, "true")])
def test_categories_that_is_no_list_is_an_error_naming_the_file(tmp_path: Path, categories: Any, quoted: str) -> None:
    # a number raised TypeError ("'int' object is not iterable"); a string or an object was read as no categories
    path = write(tmp_path, [IMAGE], [ann()], categories=categories)
    for policy in ("raise", "skip"):
        with pytest.raises(DataError) as caught:
            COCODetection(tmp_path / "images", path, on_bad_annotation=policy)
        assert str(caught.value) == (f"{path}: non-list 'categories' ({quoted}); expected a list of objects with "
                                     "'id' and 'name'")


def test_null_or_no_categories_still_mean_none(tmp_path: Path) -> None:
    for top in ({"categories": None}, {}):
        path = tmp_path / "instances.json"
        path.write_text(json.dumps({"images": [IMAGE], "annotations": [ann(category_id=9)], **top}))
        ds = COCODetection(tmp_path / "images", path)
        assert ds.records[0].annotation_ids == [70] and len(ds.problems) == 0
