"""COCO loading and every bad-input case (tiny datasets written to tmp dirs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers.builders import basic_coco, save_image, write_coco

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.problems import DataError, UnsafePathError, severity_of


def one_image(root: Path, bbox: list, height: int = 40, width: int = 60, **ann: object) -> tuple[Path, Path]:
    images = [{"id": 7, "file_name": "img.png", "height": height, "width": width}]
    return write_coco(root, images, [{"id": 70, "image_id": 7, "bbox": bbox, "category_id": 1, **ann}])


def test_loads_boxes_as_xyxy_with_crowd_apart_and_empty_images(tmp_path: Path) -> None:
    ds = COCODetection(*basic_coco(tmp_path))
    assert len(ds) == 3
    first = ds[0]
    assert first.image.shape == (40, 60, 3) and first.image.dtype == np.uint8
    np.testing.assert_array_equal(first.boxes, [[5, 6, 15, 26], [30, 2, 55, 32]])
    np.testing.assert_array_equal(first.crowd_boxes, [[0, 0, 20, 20]])
    assert first.boxes.dtype == np.float32 and first.image_id == 1
    assert first.source.endswith("a.png")
    assert ds[1].source.endswith("sub/b.png") and len(ds[1].boxes) == 1
    empty = ds[2]
    assert empty.boxes.shape == (0, 4) and empty.crowd_boxes.shape == (0, 4)
    assert len(ds.problems) == 0


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    """Windows tools write one; json.load refused it ("Unexpected UTF-8 BOM"), as VOC lists do not."""
    images_root, ann = basic_coco(tmp_path)
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())
    ds = COCODetection(images_root, ann)
    assert len(ds) == 3 and len(ds[0].boxes) == 2


def test_category_filter_by_id_and_by_name(tmp_path: Path) -> None:
    args = basic_coco(tmp_path)
    by_id = COCODetection(*args, category_ids=[2])
    assert [len(by_id[i].boxes) for i in range(3)] == [0, 1, 0]
    by_name = COCODetection(*args, category_names=["cat"])
    assert [len(by_name[i].boxes) for i in range(3)] == [2, 0, 0]
    with pytest.raises(DataError, match="'horse' is not a category"):
        COCODetection(*args, category_names=["horse"])


def test_crowd_can_be_dropped(tmp_path: Path) -> None:
    ds = COCODetection(*basic_coco(tmp_path), include_crowd=False)
    assert ds[0].crowd_boxes.shape == (0, 4) and len(ds[0].boxes) == 2


@pytest.mark.parametrize("bbox, kind", [
    ([1, 2, float("nan"), 4], "non-finite"),
    ([1, 2, float("inf"), 4], "non-finite"),
    ([1, 2, 0, 4], "empty"),
    ([1, 2, -3, 4], "empty"),
    ([40, 2, 1e-6, 4], "empty"),  # x2 > x1 in float64 only: empty as stored (float32)
    ([100, 2, 10, 10], "entirely outside"),
    ([30, 10, 50, 10], "extends outside"),
])
def test_bad_boxes_raise_by_default_naming_file_image_and_annotation(tmp_path: Path, bbox: list, kind: str) -> None:
    args = one_image(tmp_path, bbox)
    with pytest.raises(DataError, match=kind) as info:
        COCODetection(*args)
    message = str(info.value)
    assert "annotations.json" in message and "image 7" in message and "annotation 70" in message
    skipped = COCODetection(*args, on_bad_annotation="skip")
    assert len(skipped[0].boxes) == 0
    assert [(p.kind, p.action, p.image_id, p.annotation_id) for p in skipped.problems][0][1:] == ("skipped", 7, 70)


def test_slightly_outside_is_clipped_and_reported(tmp_path: Path) -> None:
    ds = COCODetection(*one_image(tmp_path, [50, 30, 11, 11]))  # x2 = 61 > 60 by 1 px
    np.testing.assert_array_equal(ds[0].boxes, [[50, 30, 60, 40]])
    (problem,) = ds.problems
    assert (problem.kind, problem.action, problem.annotation_id) == ("slightly_outside", "clipped", 70)
    assert "annotations.json" in str(problem)


def test_far_outside_is_clipped_under_clip_policy(tmp_path: Path) -> None:
    ds = COCODetection(*one_image(tmp_path, [30, 10, 50, 10]), on_bad_annotation="clip")
    np.testing.assert_array_equal(ds[0].boxes, [[30, 10, 60, 20]])
    assert ds.problems.counts()[("outside_image", "clipped")] == 1


def test_unknown_image_id_raises_or_is_skipped(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}]
    anns = [{"id": 5, "image_id": 99, "bbox": [1, 1, 5, 5], "category_id": 1}]
    args = write_coco(tmp_path, images, anns)
    with pytest.raises(DataError, match="image id 99"):
        COCODetection(*args)
    ds = COCODetection(*args, on_bad_annotation="skip")
    assert len(ds) == 1 and ds.problems.problems[0].kind == "unknown_image"
    # 1 and "1" are different ids in JSON: the message names the near miss
    args = write_coco(tmp_path, images, [{"id": 6, "image_id": "1", "bbox": [1, 1, 5, 5], "category_id": 1}])
    with pytest.raises(DataError, match=r"image id '1', which is not in 'images' \('images' has 1\)"):
        COCODetection(*args)


def test_a_duplicate_image_id_names_both_files(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 20},
              {"id": 1, "file_name": "b.png", "height": 20, "width": 20}]
    with pytest.raises(DataError, match=r"image 1: duplicate image id: 'b.png' has the id of 'a.png'"):
        COCODetection(*write_coco(tmp_path, images, []))


def test_missing_and_corrupt_image_files(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "gone.png", "height": 20, "width": 20},
              {"id": 2, "file_name": "bad.png", "height": 20, "width": 20},
              {"id": 3, "file_name": "ok.png", "height": 20, "width": 20}]
    images_root, ann = write_coco(tmp_path, images, [], create_files=False)
    (images_root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    save_image(images_root / "ok.png", 20, 20)
    ds = COCODetection(images_root, ann)
    with pytest.raises(DataError, match="gone.png.*does not exist"):
        ds[0]
    with pytest.raises(DataError, match="bad.png.*corrupt"):
        ds[1]
    with pytest.raises(DataError, match="does not exist"):
        COCODetection(images_root, ann, verify_images=True)
    verified = COCODetection(images_root, ann, verify_images=True, on_bad_annotation="skip")
    assert [r.image_id for r in verified.records] == [3]
    assert sorted(p.image_id for p in verified.problems) == [1, 2]


def test_image_size_disagreeing_with_annotation(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}]
    anns = [{"id": 5, "image_id": 1, "bbox": [10, 30, 30, 10], "category_id": 1}]
    images_root, ann = write_coco(tmp_path, images, anns, create_files=False)
    save_image(images_root / "a.png", 35, 60)  # file is shorter than annotated
    with pytest.raises(DataError, match="60x35 .* annotation says 60x40"):
        COCODetection(images_root, ann)[0]
    clipped = COCODetection(images_root, ann, on_bad_annotation="clip")[0]
    np.testing.assert_array_equal(clipped.boxes, [[10, 30, 40, 35]])
    assert {p.kind for p in clipped.problems} == {"size_mismatch", "outside_image"}
    skipped = COCODetection(images_root, ann, on_bad_annotation="skip", verify_images=True)
    assert len(skipped) == 0 and skipped.problems.problems[0].kind == "size_mismatch"


def test_a_file_listed_under_two_image_ids_is_a_warning(tmp_path: Path) -> None:
    # trained and evaluated twice without a word (check-data: 0 problems); VOC refuses a repeated id
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
              {"id": 2, "file_name": "a.png", "height": 40, "width": 60},
              {"id": 3, "file_name": "b.png", "height": 40, "width": 60}]
    anns = [{"id": 10 + i, "image_id": i, "bbox": [5, 5, 10, 10], "category_id": 1} for i in (1, 2, 3)]
    images_root, ann = write_coco(tmp_path, images, anns)
    dataset = COCODetection(images_root, ann)
    assert len(dataset) == 3  # kept: each id is an image of the split
    (problem,) = dataset.problems
    assert (problem.kind, problem.action, problem.image_id, severity_of(problem.kind)) == (
        "file_listed_twice", "kept", 2, "warning")
    assert f"{images_root / 'a.png'} is listed under 2 image ids (1, 2)" in problem.detail


def test_a_swapped_annotation_size_is_named_as_such_not_as_boxes_outside_it(tmp_path: Path) -> None:
    # the file is 60 wide, 40 high; the annotation says 40 wide, 60 high: a box at x 45-55 fits the file.
    # fit said "bbox [45, 5, 10, 10] lies entirely outside the 40x60 image" and advised dropping boxes;
    # under clip it listed the box as skipped and then kept it
    images = [{"id": 1, "file_name": "a.png", "height": 60, "width": 40}]
    anns = [{"id": 5, "image_id": 1, "bbox": [45, 5, 10, 10], "category_id": 1},
            {"id": 6, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 1}]
    images_root, ann = write_coco(tmp_path, images, anns, create_files=False)
    save_image(images_root / "a.png", 40, 60)
    with pytest.raises(DataError, match=r"a\.png is 60x40 \(w x h\) but the annotation says 40x60") as raised:
        COCODetection(images_root, ann)
    assert "outside" not in str(raised.value)
    clipped = COCODetection(images_root, ann, on_bad_annotation="clip")
    assert [p.kind for p in clipped.problems] == ["size_mismatch"]
    np.testing.assert_array_equal(clipped[0].boxes, [[45, 5, 55, 15], [5, 5, 15, 15]])
    skipped = COCODetection(images_root, ann, on_bad_annotation="skip", verify_images=True)
    assert len(skipped) == 0 and "size_mismatch" in {p.kind for p in skipped.problems}  # skip skips the image
    # boxes outside a file of the annotated size are still reported as such
    images_root, ann = write_coco(tmp_path / "right", [{**images[0], "height": 40, "width": 60}],
                                  [{**anns[0], "bbox": [65, 5, 10, 10]}])
    with pytest.raises(DataError, match="lies entirely outside"):
        COCODetection(images_root, ann)


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd", "C:\\x.png"])
def test_image_paths_escaping_the_root_are_errors_under_every_policy(tmp_path: Path, name: str) -> None:
    images = [{"id": 1, "file_name": name, "height": 20, "width": 20}]
    args = write_coco(tmp_path, images, [], create_files=False)
    for policy in ("raise", "skip", "clip"):
        with pytest.raises(UnsafePathError, match="image 1"):
            COCODetection(*args, on_bad_annotation=policy)


def test_structural_json_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json.*not valid JSON"):
        COCODetection(tmp_path, bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="'annotations'"):
        COCODetection(tmp_path, bad)
    with pytest.raises(DataError, match="does not exist"):
        COCODetection(tmp_path, tmp_path / "missing.json")
    args = one_image(tmp_path / "m", [1, 2, 3])
    with pytest.raises(DataError, match="annotation 70.*not 4 numbers"):
        COCODetection(*args)


def test_size_swapped_by_exif_orientation_is_explained(tmp_path: Path) -> None:
    images_root, ann = write_coco(tmp_path, [{"id": 1, "file_name": "turned.jpg", "height": 64, "width": 48}],
                                  [{"id": 1, "image_id": 1, "bbox": [2, 40, 20, 20], "category_id": 1}],
                                  create_files=False)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide, shown turned by 90 degrees: 48 wide, as annotated
    Image.new("RGB", (64, 48)).save(images_root / "turned.jpg", exif=exif.tobytes())
    with pytest.raises(DataError, match="EXIF orientation turns it by 90 degrees") as info:
        COCODetection(images_root, ann)[0]
    assert "on_bad_annotation='clip'" not in str(info.value)  # clipping would mis-frame every box
