"""COCO files merged without renumbering: image ids listed by several image entries, and category
names given to several categories."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.builders import write_coco

from lightning_rpn.cli import main
from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.problems import DataError

SIZE = {"height": 40, "width": 40}


def merged_exports(root: Path) -> tuple[Path, Path]:
    """Two 3-image exports with ids 1-3 each, concatenated: a0 (id 1) has no box, b0 (id 1) two;
    a1 (id 2) has one, b1 (id 2) none; id 3 has none in either; a fourth image (id 4) is clean."""
    images = [{"id": i + 1, "file_name": f"{prefix}{i}.png", **SIZE} for prefix in "ab" for i in range(3)]
    images.append({"id": 4, "file_name": "c.png", **SIZE})
    annotations = [
        {"id": 100, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 1},  # b0's
        {"id": 101, "image_id": 1, "bbox": [20, 20, 10, 10], "category_id": 1},  # b0's
        {"id": 102, "image_id": 2, "bbox": [2, 2, 5, 5], "category_id": 1},  # a1's
        {"id": 103, "image_id": 4, "bbox": [3, 3, 5, 5], "category_id": 1},
    ]
    return write_coco(root, images, annotations)


@pytest.mark.parametrize("policy", ["skip", "clip"])
def test_an_image_id_of_several_entries_skips_every_entry_and_annotation_of_it(tmp_path: Path, policy: str) -> None:
    # the first entry of an id took every annotation of the id (a0 trained with b0's boxes)
    args = merged_exports(tmp_path)
    dataset = COCODetection(*args, on_bad_annotation=policy)
    assert [(r.image_id, r.file.name, r.annotation_ids) for r in dataset.records] == [(4, "c.png", [103])]
    rows = [(p.kind, p.action, p.image_id, p.annotation_id) for p in dataset.problems]
    assert rows == [("bad_image_entry", "skipped", i, None) for i in (1, 2, 3)]
    first, second, third = (str(p) for p in dataset.problems)
    assert first == (f"{args[1]}, image 1: duplicate image id: 'a0.png' and 'b0.png' both have id 1, so its "
                     "annotations could belong to either; both entries are skipped, with the 2 annotations of "
                     "image id 1 (give every image entry its own id, e.g. renumber the ids of merged files) -> skipped")
    assert "'a1.png' and 'b1.png' both have id 2" in second and "with the 1 annotation of image id 2" in second
    assert "'a2.png' and 'b2.png' both have id 3" in third and "with the 0 annotations of image id 3" in third


def test_an_image_id_of_three_entries_names_them_all_and_raise_still_stops(tmp_path: Path) -> None:
    images = [{"id": 5, "file_name": name, **SIZE} for name in ("a.png", "b.png", "c.png")]
    images.append({"id": 6, "file_name": "d.png", **SIZE})
    annotations = [{"id": 50, "image_id": 5, "bbox": [1, 1, 5, 5], "category_id": 1}]
    args = write_coco(tmp_path, images, annotations)
    with pytest.raises(DataError, match=r"image 5: duplicate image id: 'b.png' has the id of 'a.png'"):
        COCODetection(*args)
    dataset = COCODetection(*args, on_bad_annotation="skip")
    assert [r.image_id for r in dataset.records] == [6]
    (problem,) = dataset.problems
    assert "'a.png', 'b.png' and 'c.png' all have id 5" in problem.detail
    assert "all 3 entries are skipped, with the 1 annotation of image id 5" in problem.detail


def test_check_data_reports_an_image_id_of_several_entries(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    merged_exports(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False},
        "model": {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32], [64], [128]]},
        "data": {"dataset": "coco", "root": str(tmp_path), "train_split": "x", "val_split": None,
                 "coco_images": "images", "coco_annotations": "annotations.json", "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code = main(["check-data", "--config", str(tmp_path / "config.yaml")])
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert code == 1 and "3 error(s)" in captured.err
    assert "image 1: duplicate image id: 'a0.png' and 'b0.png' both have id 1" in out
    assert "with the 2 annotations of image id 1" in out


def test_a_category_name_selects_every_category_of_that_name(tmp_path: Path) -> None:
    # merged label sets: two categories named "car"; the name kept only the last id, dropping id 3's boxes
    categories = [{"id": 3, "name": "car"}, {"id": 7, "name": "car"}, {"id": 1, "name": "cat"}]
    images = [{"id": 1, "file_name": "x.png", **SIZE}]
    annotations = [{"id": 10, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 3},
                   {"id": 11, "image_id": 1, "bbox": [10, 10, 5, 5], "category_id": 7},
                   {"id": 12, "image_id": 1, "bbox": [20, 20, 5, 5], "category_id": 1}]
    args = write_coco(tmp_path, images, annotations, categories=categories)
    dataset = COCODetection(*args, category_names=["car"])
    assert dataset.category_ids == {3, 7} and dataset.kept_category_ids == (3, 7)
    assert dataset.records[0].annotation_ids == [10, 11]
    both = COCODetection(*args, category_names=["car", "cat"])
    assert both.category_ids == {1, 3, 7} and both.records[0].annotation_ids == [10, 11, 12]
    with pytest.raises(DataError, match=r"category_names: 'bus' is not a category; known: \['car', 'cat'\]"):
        COCODetection(*args, category_names=["bus"])


def test_an_entry_of_a_shared_id_still_has_its_own_problems_reported(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", **SIZE}, {"id": 1, "file_name": "b.png", "height": 40, "width": 0}]
    args = write_coco(tmp_path, images, [], create_files=False)
    dataset = COCODetection(*args, on_bad_annotation="skip")
    assert len(dataset) == 0
    assert [(p.kind, p.image_id, p.detail.split(":")[0]) for p in dataset.problems] == [
        ("bad_image_entry", 1, "duplicate image id"),
        ("bad_image_entry", 1, "image width/height 0/40 must be positive numbers"),
    ]
