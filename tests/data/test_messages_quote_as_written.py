"""Messages name image and annotation ids, and a COCO ``file_name`` that is no string, as the JSON
file writes them (``null``, ``true``, ``NaN``), as the COCO reader quotes every other value: the
prefix ``file, image ..., annotation ...`` and ``resolve_image_path`` said ``None`` / ``True``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.builders import save_image

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.image_io import resolve_image_path
from lightning_rpn.data.problems import DataError, Problem


@pytest.mark.parametrize("image_id, annotation_id, where", [
    (True, False, "a.json, image true, annotation false"),
    (float("nan"), float("inf"), "a.json, image NaN, annotation Infinity"),
    (7, "object 0 (cat)", "a.json, image 7, annotation 'object 0 (cat)'"),  # VOC names objects so
    (None, None, "a.json"),  # unknown: left out
])
def test_ids_are_quoted_as_written(image_id: Any, annotation_id: Any, where: str) -> None:
    error = DataError("what is wrong", file="a.json", image_id=image_id, annotation_id=annotation_id)
    assert str(error) == f"{where}: what is wrong"
    problem = Problem("empty_box", "skipped", "what is wrong", "a.json", image_id, annotation_id)
    assert str(problem) == f"{where}: what is wrong -> skipped"


@pytest.mark.parametrize("name, quoted", [(None, "null"), (True, "true"), (5, "5"), ("", "''"),
                                          (["a.png"], "['a.png']"), ({"path": None}, "{'path': null}")])
def test_a_file_name_that_is_no_string_is_quoted_as_written(tmp_path: Path, name: Any, quoted: str) -> None:
    with pytest.raises(DataError) as caught:
        resolve_image_path(tmp_path, name, file="a.json", image_id=3)
    assert str(caught.value) == f"a.json, image 3: image file name {quoted} is not a non-empty string"


def test_a_coco_entry_whose_file_name_is_null_or_true_is_named_so(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": None}, {"id": 2, "file_name": True}, {"id": 3, "file_name": "c.png"}]
    annotations = [{"id": 9, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]},
                   {"id": 9, "image_id": 3, "category_id": 1, "bbox": [2, 2, 5, 5]}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(DataError, match=r", image 1: image file name null is not a non-empty string$"):
        COCODetection(tmp_path, path)
    problems = [str(p) for p in COCODetection(tmp_path, path, on_bad_annotation="skip").problems]
    assert problems[:2] == [f"{path}, image 1: image file name null is not a non-empty string -> skipped",
                            f"{path}, image 2: image file name true is not a non-empty string -> skipped"]


def test_a_file_listed_twice_names_its_ids_as_written(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", 40, 60)
    images = [{"id": True, "file_name": "a.png", "width": 60, "height": 40},
              {"id": 2, "file_name": "a.png", "width": 60, "height": 40}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    (problem,) = COCODetection(tmp_path, path).problems
    assert str(problem).startswith(f"{path}, image 2: {tmp_path / 'a.png'} is listed under 2 image ids (true, 2):")
