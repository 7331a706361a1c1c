"""Pascal VOC loading, difficult handling, xywh-looking boxes, image mode conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers.builders import save_image, voc_xml, write_voc

from lightning_rpn.data.image_io import load_rgb_image, resolve_image_path
from lightning_rpn.data.problems import DataError, UnsafePathError
from lightning_rpn.data.voc import VOCDetection, read_split_ids


def test_loads_split_with_one_based_boxes_and_difficult_as_crowd(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {
        "000001": {"size": (40, 50), "objects": [
            {"name": "cat", "box": (1, 1, 10, 20)},
            {"name": "dog", "box": (20, 5, 50, 40), "difficult": 1},
        ]},
        "000002": {"size": (30, 30), "objects": []},
    }, split="trainval")
    ds = VOCDetection(root, "trainval")
    assert len(ds) == 2
    item = ds[0]
    assert item.image.shape == (40, 50, 3) and item.image_id == "000001"
    np.testing.assert_array_equal(item.boxes, [[0, 0, 10, 20]])
    np.testing.assert_array_equal(item.crowd_boxes, [[19, 4, 50, 40]])
    assert ds[1].boxes.shape == (0, 4)
    kept = VOCDetection(root, "trainval", keep_difficult=True)[0]
    assert len(kept.boxes) == 2 and len(kept.crowd_boxes) == 0
    cats = VOCDetection(root, "trainval", class_names=["dog"], keep_difficult=True)[0]
    np.testing.assert_array_equal(cats.boxes, [[19, 4, 50, 40]])


def test_box_that_looks_like_xywh_is_named_as_such(tmp_path: Path) -> None:
    # xmin=21, xmax=11 (a width) -> x2 < x1 but x1 + x2 fits in the 60 px image
    root = write_voc(tmp_path, {"a": {"size": (40, 60), "objects": [{"box": (21, 6, 11, 11)}]}})
    with pytest.raises(DataError, match="looks like \\(x, y, w, h\\)") as info:
        VOCDetection(root, "train")
    assert "a.xml" in str(info.value) and "image 'a'" in str(info.value) and "object 0" in str(info.value)
    ds = VOCDetection(root, "train", on_bad_annotation="skip")
    assert len(ds[0].boxes) == 0 and ds.problems.problems[0].kind == "looks_like_xywh"


def test_missing_or_malformed_annotation_raises_or_skips_the_image(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {
        "ok": {"size": (20, 20), "objects": [{"box": (2, 2, 9, 9)}]},
        "nofile": {"size": (20, 20), "xml": None},
        "broken": {"size": (20, 20), "xml": "<annotation><object>"},
        "badnum": {"size": (20, 20), "xml": "<annotation><filename>badnum.png</filename>"  # the image is a PNG
                                            "<object><bndbox><xmin>a</xmin></bndbox></object></annotation>"},
    })
    with pytest.raises(DataError, match="nofile.xml.*does not exist"):
        VOCDetection(root, "train")
    ds = VOCDetection(root, "train", on_bad_annotation="skip")
    assert [r.image_id for r in ds.records] == ["ok", "badnum"]
    assert {p.kind for p in ds.problems} == {"bad_annotation_file", "malformed_bbox"}
    with pytest.raises(DataError, match="split 'val'"):
        VOCDetection(root, "val")


def test_missing_size_is_checked_against_the_decoded_image(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"a": {"size": None, "file_size": (30, 40), "objects": [{"box": (1, 1, 41, 10)}]}})
    item = VOCDetection(root, "train")[0]  # x2 = 41 overshoots 40 by 1 px: clipped
    np.testing.assert_array_equal(item.boxes, [[0, 0, 40, 10]])
    assert item.problems[0].kind == "slightly_outside"


def test_escaping_file_name_in_xml_is_an_error(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"a": {"size": (20, 20), "file_name": "../../x.png", "no_image": True}})
    with pytest.raises(UnsafePathError, match="escapes"):
        VOCDetection(root, "train", on_bad_annotation="skip")


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_rgba_and_16_bit_become_8_bit_rgb(tmp_path: Path, mode: str) -> None:
    path = save_image(tmp_path / "x.png", 9, 7, mode=mode)
    image = load_rgb_image(path)
    assert image.shape == (9, 7, 3) and image.dtype == np.uint8
    raw = np.asarray(Image.open(path))
    if mode == "L":
        np.testing.assert_array_equal(image[:, :, 1], raw)
    elif mode == "RGBA":
        np.testing.assert_array_equal(image, raw[:, :, :3])
    else:
        np.testing.assert_array_equal(image[:, :, 0], np.round(raw.astype(np.float64) / 257).astype(np.uint8))
        assert image.max() > 200  # the full 16-bit range maps to the full 8-bit range


def test_16_bit_voc_image_loads(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"a": {"size": (12, 16), "mode": "I;16", "objects": [{"box": (2, 2, 8, 8)}]}})
    item = VOCDetection(root, "train")[0]
    assert item.image.shape == (12, 16, 3) and item.image.dtype == np.uint8


def test_resolve_image_path_accepts_nested_and_rejects_escapes(tmp_path: Path) -> None:
    assert resolve_image_path(tmp_path, "a/./b.png") == tmp_path / "a" / "b.png"
    assert resolve_image_path(tmp_path, "a/../b.png") == tmp_path / "b.png"
    for bad in ("../b.png", "/abs.png", "a/../../b.png", "..\\b.png", "D:/x.png"):
        with pytest.raises(UnsafePathError):
            resolve_image_path(tmp_path, bad, file="ann.json", image_id=3)


def test_a_split_file_with_a_byte_order_mark_lists_its_first_id(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"first": {"size": (20, 20), "objects": [{"box": (2, 2, 9, 9)}]}})
    split_file = root / "ImageSets/Main/train.txt"
    split_file.write_text("\ufefffirst\n", encoding="utf-8")  # as Windows Notepad saves it
    assert read_split_ids(root, "train") == ["first"]


def test_a_class_name_no_object_has_is_an_error_and_voc_takes_no_category_ids(tmp_path: Path) -> None:
    from lightning_rpn.training.datamodule import RPNDataModule

    root = write_voc(tmp_path, {"a": {"size": (20, 20), "objects": [{"box": (2, 2, 9, 9), "name": "car"}]}})
    assert len(VOCDetection(root, "train", class_names=["car"])[0].boxes) == 1
    with pytest.raises(DataError, match=r"class_names \(data.category_names\) \['Car', 'horse'\] name no object of the split "
                                        r"\(names found: \['car'\]"):
        VOCDetection(root, "train", class_names=["car", "Car", "horse"])
    with pytest.raises(ValueError, match="VOC classes are chosen by name"):
        RPNDataModule("voc", root=str(root), category_ids=[1])


@pytest.mark.parametrize("written, crowd", [("True", True), ("true", True), ("false", False), (" 1 ", True), ("", False)])
def test_difficult_written_true_or_false_is_read(tmp_path: Path, written: str, crowd: bool) -> None:
    # "True" (some export tools) was read as not difficult, silently
    xml = voc_xml("a.png", (40, 60), [{"box": (5, 5, 30, 30)}]).replace("<difficult>0</difficult>",
                                                                        f"<difficult>{written}</difficult>")
    root = write_voc(tmp_path, {"a": {"size": (40, 60), "xml": xml}})
    record = VOCDetection(root, "train").records[0]
    assert (len(record.crowd_boxes), len(record.boxes)) == (int(crowd), int(not crowd))


def test_another_difficult_value_is_an_error_naming_the_object(tmp_path: Path) -> None:
    xml = voc_xml("a.png", (40, 60), [{"box": (5, 5, 30, 30)}]).replace("<difficult>0</difficult>",
                                                                        "<difficult>yes</difficult>")
    root = write_voc(tmp_path, {"a": {"size": (40, 60), "xml": xml}})
    with pytest.raises(DataError, match=r"a.xml, image 'a', annotation 'object 0 \(cat\)': <difficult> is 'yes'; expected 0"):
        VOCDetection(root, "train")
    skipped = VOCDetection(root, "train", on_bad_annotation="skip")
    assert len(skipped.records[0].boxes) == 0 and [p.kind for p in skipped.problems] == ["bad_difficult"]
