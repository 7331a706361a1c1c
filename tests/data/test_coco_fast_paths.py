"""COCO loading's fast paths (clean annotations, plain file names, boxes checked per image size)
give the results and problems of the detailed checks: a file mixing clean annotations with every
kind of problem, against expectations written out here."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lightning_rpn.data.annotated as annotated
import lightning_rpn.data.coco as coco
from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.problems import DataError, UnsafePathError

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
SIZE_60_40 = {"width": 60, "height": 40}


def write(root: Path, images: list[Any], annotations: list[Any], categories: list[Any] = CATEGORIES) -> Path:
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def ann(ann_id: Any, image_id: Any, bbox: Any = (1, 2, 3, 4), category_id: Any = 1, **fields: Any) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": list(bbox) if isinstance(bbox, tuple) else bbox, **fields}


def mixed_file(root: Path, with_bad_image: bool) -> Path:
    """Clean annotations between one of each kind of problem (see the expectations below)."""
    images = [{"id": 1, "file_name": "a.jpg", **SIZE_60_40}, {"id": 2, "file_name": "sub/b.jpg", **SIZE_60_40},
              {"id": "3", "file_name": "c.jpg", "width": 30, "height": 20}, {"id": 4, "file_name": "d.jpg"}]
    if with_bad_image:
        images.append({"id": 6, "file_name": "f.jpg", "width": 0, "height": 40})
    annotations = [
        ann(10, 1, iscrowd=0),
        ann(11, 2, (5.5, 6, 10, 10), category_id=2),  # no iscrowd
        ann(12, 99),  # unknown image
        ann(13, "1"),  # near-miss string id
        ann(14, 3),  # near-miss int id
        ann(15, 1, [1, 2, 3]),  # malformed bbox
        ann(16, 1, [1, "2", 3, 4]),  # malformed bbox
        ann(17, 1, [None, 2, 3, 4]),  # a null: not a number, named as the file writes it
        ann(18, 1, iscrowd=2),
        ann(19, 1, iscrowd="1"),
        ann(10, 2, (1, 1, 2, 2)),  # duplicate annotation id: kept, a warning
        ann(20, 2, (0, 0, 5, 5), category_id=7),  # unknown category: kept, a warning
        {"id": 21, "image_id": 2, "bbox": [10, 10, 5, 5]},  # no category_id: kept, a warning
        ann(22, 2, (20, 20, 5, 5), category_id="1"),  # near-miss category: kept, a warning
        ann(23, 1, (0, 0, 10, 10), iscrowd=1),
        ann(24, 1, (2, 2, 4, 4), iscrowd=True),
        ann(25, 4, (1, 1, 100, 100)),  # image without a size: converted, checked when loaded
        ann(26, 1, (50, 30, 20, 20)),  # outside by more than the tolerance
        ann(27, 1, (1, 2, 0, 4)),  # empty
        "oops",  # not an object
        ann(29, 1, [True, 2, 3, 4]),  # a bool is a number (1)
        ann(30, "3", (27, 0, 4, 5)),  # slightly outside: clipped, a warning
        ann(31, "3", (1, 1, 2, 2)),
        ann(32, 6),  # its image entry is skipped (or absent): nothing to report
    ]
    return write(root, images, annotations)


def problem_rows(ds: COCODetection) -> list[tuple[Any, ...]]:
    return [(p.kind, p.action, p.image_id, p.annotation_id, p.detail) for p in ds.problems]


UNKNOWN_IMAGE = "annotation refers to image id {}, which is not in 'images'"
NOT_4_NUMBERS = "bbox {} is not 4 numbers (x, y, w, h)"
ISCROWD = "iscrowd {} is {}; expected the number 0 or 1 (or false / true)"
ONE_CLASS = "every category is one class"

ANNOTATION_PROBLEMS = [
    ("unknown_image", "skipped", 99, 12, UNKNOWN_IMAGE.format(99)),
    ("unknown_image", "skipped", "1", 13, UNKNOWN_IMAGE.format("'1'") + " ('images' has 1)"),
    ("unknown_image", "skipped", 3, 14, UNKNOWN_IMAGE.format(3) + " ('images' has '3')"),
    ("malformed_bbox", "skipped", 1, 15, NOT_4_NUMBERS.format("[1, 2, 3]")),
    ("malformed_bbox", "skipped", 1, 16, NOT_4_NUMBERS.format("[1, '2', 3, 4]")),
    ("malformed_bbox", "skipped", 1, 17, NOT_4_NUMBERS.format("[null, 2, 3, 4]")),
    ("bad_iscrowd", "skipped", 1, 18, ISCROWD.format(2, "not 0 or 1")),
    ("bad_iscrowd", "skipped", 1, 19, ISCROWD.format("'1'", "a string")),
    ("duplicate_annotation_id", "kept", 2, 10, "annotation id 10 is used again (first by an annotation of image 1), "
     "so problems naming it are ambiguous; give each annotation its own id"),
    ("unknown_category", "kept", 2, 20, f"category_id 7 is not an id of 'categories'; {ONE_CLASS}"),
    ("unknown_category", "kept", 2, 21, f"the annotation has no category_id; {ONE_CLASS}"),
    ("unknown_category", "kept", 2, 22,
     f"category_id '1' is not an id of 'categories' ('categories' has 1); {ONE_CLASS}"),
    ("bad_annotation_entry", "skipped", None, None, "annotations[19] is 'oops', not an object with image_id and bbox"),
]


def box_problems(policy: str) -> list[tuple[Any, ...]]:
    """The box checks' problems, image by image in file order, after every annotation's."""
    outside = "bbox [50, 30, 20, 20] (x, y, w, h) extends outside the 60x40 image by more than the tolerance"
    return [
        ("outside_image", "clipped" if policy == "clip" else "skipped", 1, 26, outside),
        ("empty_box", "skipped", 1, 27, "bbox [1, 2, 0, 4] (x, y, w, h) is empty; expected w > 0 and h > 0"),
        ("slightly_outside", "clipped", "3", 30, "bbox [27, 0, 4, 5] (x, y, w, h) extends outside the 30x20 image"),
    ]


@pytest.mark.parametrize("policy", ["skip", "clip"])
def test_a_mixed_file_gives_every_problem_in_order_and_the_clean_boxes(tmp_path: Path, policy: str) -> None:
    ds = COCODetection(tmp_path / "images", mixed_file(tmp_path, with_bad_image=True), on_bad_annotation=policy)
    bad_image = ("bad_image_entry", "skipped", 6, None, "image width/height 0/40 must be positive numbers")
    assert problem_rows(ds) == [bad_image, *ANNOTATION_PROBLEMS, *box_problems(policy)]
    assert all(p.file == str(tmp_path / "instances.json") for p in ds.problems)

    first, second, third, fourth = ds.records
    assert [r.image_id for r in ds.records] == [1, 2, "3", 4]
    assert first.annotation_ids == [10, 26, 27, 29] and first.crowd_annotation_ids == [23, 24]
    np.testing.assert_array_equal(first.written_boxes, [[1, 2, 3, 4], [50, 30, 20, 20], [1, 2, 0, 4], [1, 2, 3, 4]])
    clipped = [[50, 30, 60, 40]] if policy == "clip" else []
    np.testing.assert_array_equal(first.boxes, [[1, 2, 4, 6], *clipped, [1, 2, 4, 6]])
    np.testing.assert_array_equal(first.crowd_boxes, [[0, 0, 10, 10], [2, 2, 6, 6]])
    assert second.annotation_ids == [11, 10, 20, 21, 22] and second.crowd_annotation_ids == []
    np.testing.assert_array_equal(second.boxes, [[5.5, 6, 15.5, 16], [1, 1, 3, 3], [0, 0, 5, 5], [10, 10, 15, 15],
                                                 [20, 20, 25, 25]])
    assert third.annotation_ids == [30, 31]
    np.testing.assert_array_equal(third.boxes, [[27, 0, 30, 5], [1, 1, 3, 3]])
    np.testing.assert_array_equal(fourth.boxes, [[1, 1, 101, 101]])
    for record in ds.records:
        assert record.boxes.dtype == np.float32 and record.crowd_boxes.dtype == np.float32
        assert record.written_boxes.dtype == np.float64 and record.written_boxes.shape[1:] == (4,)
        assert record.crowd_boxes.shape[1:] == (4,) and record.checked == (record.size is not None)
    assert fourth.size is None and third.size == (20, 30)


def test_a_mixed_file_under_raise_stops_at_its_first_problem(tmp_path: Path) -> None:
    path = mixed_file(tmp_path, with_bad_image=False)
    with pytest.raises(DataError) as caught:
        COCODetection(tmp_path / "images", path)
    assert str(caught.value) == (f"{path}, image 99, annotation 12: {UNKNOWN_IMAGE.format(99)} "
                                 "(set on_bad_annotation='skip' to drop it)")


FIX_ANNOTATION = "(set on_bad_annotation='skip' to drop it)"
FIX_BOX = "(set on_bad_annotation='skip' or 'clip' to drop or repair such boxes)"


@pytest.mark.parametrize("bad, where, message", [
    (ann(12, 99), "image 99, annotation 12", f"{UNKNOWN_IMAGE.format(99)} {FIX_ANNOTATION}"),
    (ann(13, "1"), "image '1', annotation 13", f"{UNKNOWN_IMAGE.format(repr('1'))} ('images' has 1) {FIX_ANNOTATION}"),
    (ann(15, 1, [1, 2, 3]), "image 1, annotation 15", f"{NOT_4_NUMBERS.format('[1, 2, 3]')} {FIX_ANNOTATION}"),
    (ann(16, 1, {"x": 1}), "image 1, annotation 16", f"{NOT_4_NUMBERS.format(repr({'x': 1}))} {FIX_ANNOTATION}"),
    (ann(18, 1, iscrowd=0.5), "image 1, annotation 18", f"{ISCROWD.format(0.5, 'not 0 or 1')} {FIX_ANNOTATION}"),
    ("oops", "", f"annotations[2] is 'oops', not an object with image_id and bbox {FIX_ANNOTATION}"),
    (ann(17, 1, [None, 2, 3, 4]), "image 1, annotation 17",
     f"{NOT_4_NUMBERS.format('[null, 2, 3, 4]')} {FIX_ANNOTATION}"),
    (ann(19, 1, None), "image 1, annotation 19", f"{NOT_4_NUMBERS.format('null')} {FIX_ANNOTATION}"),
    ({"id": 28, "image_id": 1, "category_id": 1}, "image 1, annotation 28",
     f"the annotation has no bbox; expected 4 numbers (x, y, w, h) {FIX_ANNOTATION}"),
    (ann(29, 1, [1, 2, float("nan"), 4]), "image 1, annotation 29",
     f"bbox [1, 2, nan, 4] (x, y, w, h) has non-finite coordinates {FIX_BOX}"),
    (ann(27, 1, [1, 2, 0, 4]), "image 1, annotation 27",
     f"bbox [1, 2, 0, 4] (x, y, w, h) is empty; expected w > 0 and h > 0 {FIX_BOX}"),
    (ann(26, 2, [50, 30, 20, 20]), "image 2, annotation 26",
     f"bbox [50, 30, 20, 20] (x, y, w, h) extends outside the 60x40 image by more than the tolerance {FIX_BOX}"),
])
def test_under_raise_each_problem_names_its_file_image_and_annotation(
    tmp_path: Path, bad: Any, where: str, message: str
) -> None:
    images = [{"id": 1, "file_name": "a.jpg", **SIZE_60_40}, {"id": 2, "file_name": "b.jpg", **SIZE_60_40}]
    path = write(tmp_path, images, [ann(10, 1), ann(11, 2), bad, ann(40, 2)])
    with pytest.raises(DataError) as caught:
        COCODetection(tmp_path / "images", path)
    assert str(caught.value) == f"{path}{', ' + where if where else ''}: {message}"


def test_under_raise_warnings_are_recorded_and_their_boxes_kept(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.jpg", **SIZE_60_40}]
    path = write(tmp_path, images, [ann(10, 1), ann(10, 1, (2, 2, 2, 2)), ann(11, 1, (3, 3, 3, 3), category_id=9),
                                    {"id": 12, "image_id": 1, "bbox": [4, 4, 4, 4]}, ann(13, 1, (59, 0, 2, 2))])
    ds = COCODetection(tmp_path / "images", path)
    assert problem_rows(ds) == [
        ("duplicate_annotation_id", "kept", 1, 10, "annotation id 10 is used again (first by an annotation of "
         "image 1), so problems naming it are ambiguous; give each annotation its own id"),
        ("unknown_category", "kept", 1, 11, f"category_id 9 is not an id of 'categories'; {ONE_CLASS}"),
        ("unknown_category", "kept", 1, 12, f"the annotation has no category_id; {ONE_CLASS}"),
        ("slightly_outside", "clipped", 1, 13, "bbox [59, 0, 2, 2] (x, y, w, h) extends outside the 60x40 image"),
    ]
    np.testing.assert_array_equal(ds.records[0].boxes, [[1, 2, 4, 6], [2, 2, 4, 4], [3, 3, 6, 6], [4, 4, 8, 8],
                                                        [59, 0, 60, 2]])
    assert ds.records[0].annotation_ids == [10, 10, 11, 12, 13]


def test_a_category_filter_drops_before_checking_and_counts_what_it_saw(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.jpg", **SIZE_60_40}]
    annotations = [
        ann(40, 1, category_id=2),
        ann(41, 1, category_id=1),  # left out: not a problem
        ann(42, 1, [1, 2, 3], category_id=1),  # left out before its bbox is checked
        ann(43, 1, [1, 2, 3], category_id=2),
        ann(44, 1, category_id=7),
        ann(40, 1, category_id=1),  # its id is checked before the filter
        ann(45, 99, category_id=2),
        ann(46, 1, (2, 2, 2, 2), category_id=2, iscrowd=1),
    ]
    path = write(tmp_path, images, annotations)
    ds = COCODetection(tmp_path / "images", path, category_names=["dog"], on_bad_annotation="skip")
    assert problem_rows(ds) == [
        ("malformed_bbox", "skipped", 1, 43, NOT_4_NUMBERS.format("[1, 2, 3]")),
        ("unknown_category", "skipped", 1, 44, "category_id 7 is not an id of 'categories'; not a category "
         "the filter selects"),
        ("duplicate_annotation_id", "kept", 1, 40, "annotation id 40 is used again (first by an annotation of "
         "image 1), so problems naming it are ambiguous; give each annotation its own id"),
        ("unknown_image", "skipped", 99, 45, UNKNOWN_IMAGE.format(99)),
    ]
    np.testing.assert_array_equal(ds.records[0].boxes, [[1, 2, 4, 6]])
    np.testing.assert_array_equal(ds.records[0].crowd_boxes, [[2, 2, 4, 4]])
    with pytest.raises(DataError) as caught:
        COCODetection(tmp_path / "images", path, category_ids=[3], on_bad_annotation="skip")
    assert str(caught.value) == (
        f"{path}: the category filter category_ids (data.category_ids) [3] keeps none of the file's 8 annotations "
        "(annotations per category_id: 2 ('dog'): 4, 1 ('cat'): 3, 7: 1); choose categories that the annotations use"
    )


def test_crowd_boxes_are_dropped_with_include_crowd_false(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.jpg", **SIZE_60_40}]
    crowd = [ann(1, 1, iscrowd=1), ann(3, 1, iscrowd=True), ann(4, 1, [float("nan"), 1, 1, 1], iscrowd=1)]
    path = write(tmp_path, images, [crowd[0], ann(2, 1), *crowd[1:]])
    ds = COCODetection(tmp_path / "images", path, include_crowd=False)
    assert ds.records[0].annotation_ids == [2] and ds.records[0].crowd_annotation_ids == []
    assert ds.records[0].crowd_boxes.shape == (0, 4) and len(ds.problems) == 0


@pytest.mark.parametrize("name, expected", [
    ("a.jpg", "a.jpg"), ("sub/dir/b.jpg", "sub/dir/b.jpg"), ("é-1_2.JPG", "é-1_2.JPG"),
    ("./x.jpg", "x.jpg"), ("a//b.jpg", "a/b.jpg"), ("a/./b.jpg", "a/b.jpg"), ("a\\b.jpg", "a/b.jpg"),
    ("a/../b.jpg", "b.jpg"), (".hidden.jpg", ".hidden.jpg"), ("a b.jpg", "a b.jpg"),
])
def test_image_file_names_resolve_under_the_root_as_before(tmp_path: Path, name: str, expected: str) -> None:
    path = write(tmp_path, [{"id": 1, "file_name": name}], [])
    assert COCODetection(tmp_path / "images", path).records[0].file == tmp_path / "images" / expected


@pytest.mark.parametrize("name, error", [
    ("../x.jpg", UnsafePathError), ("a/../../x.jpg", UnsafePathError), ("/abs/x.jpg", UnsafePathError),
    ("C:x.jpg", UnsafePathError), ("..", UnsafePathError), ("", DataError), (5, DataError),
])
def test_unsafe_or_invalid_image_file_names_are_still_refused(tmp_path: Path, name: Any, error: type) -> None:
    path = write(tmp_path, [{"id": 1, "file_name": name}], [])
    with pytest.raises(error):
        COCODetection(tmp_path / "images", path)


def test_a_clean_file_takes_the_fast_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the load time: no per-annotation detailed check, no per-name path check, one box
    check per image size (not two per image) for a clean file."""
    calls = {"sanitize_boxes": 0, "resolve_image_path": 0, "_annotation_problem": 0}

    def counted(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    counted(annotated, "sanitize_boxes")
    counted(coco, "resolve_image_path")
    counted(COCODetection, "_annotation_problem")
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 60 + i % 2, "height": 40} for i in range(20)]
    annotations = [ann(100 + i, i % 20, (i % 7, 1.5, 10, 10), category_id=1 + i % 3, iscrowd=int(i % 9 == 0))
                   for i in range(60)]
    ds = COCODetection(tmp_path / "images", write(tmp_path, images, annotations))
    assert calls == {"sanitize_boxes": 2, "resolve_image_path": 0, "_annotation_problem": 0}
    assert len(ds.problems) == 0 and sum(len(r.boxes) + len(r.crowd_boxes) for r in ds.records) == 60
    first = ds.records[0]
    np.testing.assert_array_equal(first.boxes, [[6, 1.5, 16, 11.5], [5, 1.5, 15, 11.5]])
    assert first.annotation_ids == [120, 140] and first.crowd_annotation_ids == [100]
    np.testing.assert_array_equal(first.crowd_boxes, [[0, 1.5, 10, 11.5]])


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_left_as_it_was_after_a_load_or_an_error(tmp_path: Path, enabled: bool) -> None:
    images = [{"id": 1, "file_name": "a.jpg", **SIZE_60_40}]
    was_enabled = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        COCODetection(tmp_path / "images", write(tmp_path, images, [ann(1, 1)]))
        assert gc.isenabled() == enabled
        with pytest.raises(DataError, match="image id 99"):
            COCODetection(tmp_path / "images", write(tmp_path, images, [ann(1, 99)]))
        assert gc.isenabled() == enabled
        with pytest.raises(DataError, match="non-finite"):  # raised by the box check
            COCODetection(tmp_path / "images", write(tmp_path, images, [ann(1, 1, [float("nan"), 1, 1, 1])]))
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was_enabled else gc.disable)()
