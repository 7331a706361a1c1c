"""A split whose images hold no ground-truth box: fit refuses it for training, warns for
validation; check-data reports an error (train) or a warning (val / test)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from helpers.builders import basic_coco, write_coco, write_voc

from lightning_rpn.data.problems import DataError
from lightning_rpn.data.validation import validate_dataset
from lightning_rpn.training.datamodule import RPNDataModule

IMAGES = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
          {"id": 2, "file_name": "b.png", "height": 40, "width": 60}]
CROWD_ONLY = [{"id": 10, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 1, "iscrowd": 1}]


def coco_module(root: Path, train: str = "boxless", val: str = "boxless", **kwargs: object) -> RPNDataModule:
    """Splits ``boxless`` (two images, one crowd box) and ``boxes`` (the basic dataset)."""
    write_coco(root / "boxless", IMAGES, CROWD_ONLY)
    basic_coco(root / "boxes")
    return RPNDataModule("coco", root=str(root), train_split=train, val_split=val, coco_images="{split}/images",
                         coco_annotations="{split}/annotations.json", batch_size=2, num_workers=0,
                         **kwargs)  # type: ignore[arg-type]


def test_fit_refuses_a_train_split_without_boxes_naming_it_and_the_causes(tmp_path: Path) -> None:
    dm = coco_module(tmp_path, val="boxes")
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "boxless/annotations.json"))
    assert "the train split 'boxless'" in message and "its 2 image(s) hold no ground-truth box" in message
    assert "only 1 crowd / difficult boxes" in message and "category_ids" in message and "iscrowd" in message


def test_fit_warns_once_of_a_val_split_without_boxes(tmp_path: Path) -> None:
    dm = coco_module(tmp_path, train="boxes")
    with pytest.warns(UserWarning, match="recall is undefined") as caught:
        dm.setup("fit")
        dm.setup("fit")
    (warning,) = [w for w in caught if "recall is undefined" in str(w.message)]
    assert "the val split 'boxless'" in str(warning.message) and "best.ckpt" in str(warning.message)


def test_splits_with_boxes_neither_raise_nor_warn(tmp_path: Path) -> None:
    dm = coco_module(tmp_path, train="boxes", val="boxes")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ground-truth box")
        dm.setup("fit")


def test_check_data_errs_on_a_boxless_train_split_and_warns_on_val_and_test(tmp_path: Path) -> None:
    dm = coco_module(tmp_path, test_split="boxless")
    report = validate_dataset(dm, check_images=False, splits=("train", "val", "test"))
    assert not report.ok
    kinds = {split.name: [(p.kind, p.severity) for p in split.problems] for split in report.splits}
    assert kinds == {"train (boxless)": [("no_boxes", "error")], "val (boxless)": [("no_eval_boxes", "warning")],
                     "test (boxless)": [("no_eval_boxes", "warning")]}
    (val_problem,) = report.splits[1].problems
    assert val_problem.file == str(tmp_path / "boxless/annotations.json")
    assert "recall is undefined (-1); best.ckpt chosen on it is meaningless" in val_problem.detail
    assert "best.ckpt" not in next(iter(report.splits[2].problems)).detail
    only_val = validate_dataset(coco_module(tmp_path, train="boxes"), check_images=False)
    assert only_val.ok and only_val.num_warnings == 1


def test_a_voc_train_split_of_difficult_objects_only_is_refused_naming_the_split_file(tmp_path: Path) -> None:
    write_voc(tmp_path, {"a": {"size": (40, 60), "objects": [{"box": (2, 2, 20, 20), "difficult": 1}]}})
    dm = RPNDataModule("voc", root=str(tmp_path), train_split="train", val_split=None, num_workers=0)
    with pytest.raises(DataError, match="hold no ground-truth box") as info:
        dm.setup("fit")
    assert str(info.value).startswith(str(tmp_path / "ImageSets/Main/train.txt"))
    (problem,) = validate_dataset(dm, check_images=False, splits=("train",)).splits[0].problems
    assert (problem.kind, problem.file) == ("no_boxes", str(tmp_path / "ImageSets/Main/train.txt"))
    dm_kept = RPNDataModule("voc", root=str(tmp_path), train_split="train", val_split=None, num_workers=0,
                            keep_difficult=True)
    dm_kept.setup("fit")


def test_check_data_adds_no_no_boxes_error_where_errors_of_the_split_explain_it(tmp_path: Path) -> None:
    write_coco(tmp_path / "bad", IMAGES[:1], [{"id": 10, "image_id": 1, "bbox": [5, 5, 0, 10], "category_id": 1}])
    dm = RPNDataModule("coco", root=str(tmp_path), train_split="bad", val_split=None, coco_images="{split}/images",
                       coco_annotations="{split}/annotations.json", num_workers=0)
    (split,) = validate_dataset(dm, check_images=False, splits=("train",)).splits
    assert [p.kind for p in split.problems] == ["empty_box"]
