"""check_split_paths: the files and folders a COCO / VOC split reads, checked before a run starts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.trainer.states import TrainerFn

from lightning_rpn.data.problems import DataError
from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.split_datasets import check_split_paths

COCO = {"dataset": "coco", "coco_images": "{split}", "coco_annotations": "annotations/instances_{split}.json"}
VOC = {"dataset": "voc"}


def coco_tree(root: Path, *splits: str) -> Path:
    """Empty stand-ins: the check reads no file, it only looks for them."""
    (root / "annotations").mkdir(parents=True)
    for split in splits:
        (root / "annotations" / f"instances_{split}.json").write_text("{}")
        (root / split).mkdir()
    return root


def voc_tree(root: Path, *splits: str) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for split in splits:
        (root / "ImageSets/Main" / f"{split}.txt").write_text("a\n")
    return root


def refusal(hp: dict, root: Path, split: str) -> DataError:
    with pytest.raises(DataError) as caught:
        check_split_paths(hp, root, split)
    assert "\n" not in str(caught.value)
    return caught.value


def test_a_complete_coco_or_voc_split_passes_and_the_generated_datasets_need_no_files(tmp_path: Path) -> None:
    check_split_paths(COCO, coco_tree(tmp_path / "coco", "val2017"), "val2017")
    check_split_paths(VOC, voc_tree(tmp_path / "voc", "test"), "test")
    check_split_paths({"dataset": "synthetic"}, tmp_path / "nowhere", "train")


def test_coco_names_the_missing_annotation_file_and_its_settings(tmp_path: Path) -> None:
    error = refusal(COCO, tmp_path, "train2017")
    assert error.file == str(tmp_path / "annotations/instances_train2017.json")
    assert f"--data.root {str(tmp_path)!r} and --data.coco_annotations 'annotations/instances_{{split}}.json'" in str(
        error)
    assert str(error).endswith(": COCO annotation file does not exist")  # check-data quotes the reason


def test_coco_names_a_missing_images_folder_once_the_annotation_file_is_there(tmp_path: Path) -> None:
    coco_tree(tmp_path, "val2017")
    error = refusal({**COCO, "coco_images": "images/{split}"}, tmp_path, "val2017")
    assert error.file == str(tmp_path / "images/val2017")
    assert "--data.coco_images 'images/{split}'" in str(error) and "COCO images folder does not exist" in str(error)


@pytest.mark.parametrize("off", ["above", "inside"])
def test_a_root_one_level_off_is_pointed_to_the_right_folder(tmp_path: Path, off: str) -> None:
    coco = coco_tree(tmp_path / "coco", "val2017")
    root = tmp_path if off == "above" else coco / "val2017"
    error = refusal(COCO, root, "val2017")
    assert f"{str(coco)!r} holds it: set --data.root to that folder" in str(error)
    voc = voc_tree(tmp_path / "VOCdevkit" / "VOC2007", "test")
    root = voc.parent if off == "above" else voc / "JPEGImages"
    assert f"{str(voc)!r} holds it" in str(refusal(VOC, root, "test"))


def test_voc_names_the_missing_split_list_and_the_lists_there_are(tmp_path: Path) -> None:
    voc_tree(tmp_path, "train", "val", "trainval", "aeroplane_train", "train_small")
    error = refusal(VOC, tmp_path, "test")
    assert error.file == str(tmp_path / "ImageSets/Main/test.txt")
    assert "--data.*_split to a list in ImageSets/Main: train, train_small, trainval, val" in str(error)
    assert str(error).endswith("VOC split file for split 'test' does not exist")


@pytest.mark.parametrize("folder", ["Annotations", "JPEGImages"])
def test_voc_names_a_missing_annotations_or_images_folder(tmp_path: Path, folder: str) -> None:
    voc_tree(tmp_path, "test")
    (tmp_path / folder).rmdir()
    error = refusal(VOC, tmp_path, "test")
    assert error.file == str(tmp_path / folder) and "set --data.root to the VOC folder" in str(error)


def test_the_dataset_raises_the_same_error_as_the_check(tmp_path: Path) -> None:
    dm = RPNDataModule("coco", root=str(tmp_path), train_split="train2017", val_split=None, num_workers=0)
    with pytest.raises(DataError) as built:
        dm.setup("fit")
    assert str(built.value) == str(refusal(COCO, tmp_path, "train2017"))


def with_stage(dm: RPNDataModule, fn: TrainerFn | None) -> RPNDataModule:
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))  # type: ignore[assignment]
    return dm


@pytest.mark.parametrize("fn, refused", [
    (TrainerFn.FITTING, "train2017"), (TrainerFn.VALIDATING, "val2017"), (TrainerFn.TESTING, "test2017"),
    (TrainerFn.PREDICTING, "val2017"),
])
def test_prepare_data_checks_the_splits_its_stage_reads(tmp_path: Path, fn: TrainerFn | None, refused: str) -> None:
    dm = RPNDataModule("coco", root=str(tmp_path), train_split="train2017", val_split="val2017",
                       test_split="test2017", num_workers=0)
    with pytest.raises(DataError, match=f"instances_{refused}.json: split '{refused}'"):
        with_stage(dm, fn).prepare_data()
    coco_tree(tmp_path, "train2017", "val2017", "test2017")
    with_stage(dm, fn).prepare_data()


def test_prepare_data_leaves_a_split_out_that_the_stage_does_not_read(tmp_path: Path) -> None:
    voc_tree(tmp_path, "trainval")
    dm = RPNDataModule("voc", root=str(tmp_path), train_split="trainval", val_split=None, test_split="test",
                       num_workers=0)
    with_stage(dm, TrainerFn.FITTING).prepare_data()  # no val split, and fit does not read test
    with pytest.raises(DataError, match="VOC split file for split 'test' does not exist"):
        with_stage(dm, TrainerFn.TESTING).prepare_data()


def test_prepare_data_checks_the_predict_folder_instead_of_the_predict_split(tmp_path: Path) -> None:
    dm = RPNDataModule("coco", root=str(tmp_path), predict_images=str(tmp_path / "photos"), num_workers=0)
    with pytest.raises(DataError, match="photos: image folder does not exist; set --data.predict_images"):
        with_stage(dm, TrainerFn.PREDICTING).prepare_data()
    (tmp_path / "photos").mkdir()
    with_stage(dm, TrainerFn.PREDICTING).prepare_data()  # the val split's files are not needed


@pytest.mark.parametrize("fn, missing", [(TrainerFn.VALIDATING, "val"), (TrainerFn.TESTING, "test"),
                                         (TrainerFn.PREDICTING, "predict")])
def test_prepare_data_refuses_a_command_whose_split_is_not_configured(fn: TrainerFn, missing: str) -> None:
    # a Trainer.validate / test / predict of a library user (the CLI refuses earlier): before its loggers start
    dm = RPNDataModule(synthetic_train_images=2, synthetic_val_images=2, val_split=None, test_split=None,
                       num_workers=0)
    with pytest.raises(DataError, match=f"no {missing} split to load: {missing}_split is None"):
        with_stage(dm, fn).prepare_data()
    with_stage(dm, TrainerFn.FITTING).prepare_data()  # fit goes without validation


def test_prepare_data_without_a_trainer_checks_the_root_alone(tmp_path: Path) -> None:
    # Lightning's manual pattern, prepare_data() then setup("fit"), needs no test split on disk
    coco_tree(tmp_path, "train2017", "val2017")
    dm = RPNDataModule("coco", root=str(tmp_path), train_split="train2017", val_split="val2017",
                       test_split="test2017", num_workers=0)
    dm.prepare_data()
    with pytest.raises(DataError, match="is not a folder"):
        RPNDataModule("coco", root=str(tmp_path / "nowhere"), num_workers=0).prepare_data()


def test_coco_annotations_without_images_are_enough_to_read_the_boxes(tmp_path: Path) -> None:
    # analyze-anchors reads boxes and sizes from the annotation file: no image folder needed there
    coco_tree(tmp_path, "val2017")
    (tmp_path / "val2017").rmdir()
    hp = {"dataset": "coco", "coco_annotations": "annotations/instances_{split}.json", "coco_images": "{split}"}
    check_split_paths(hp, tmp_path, "val2017", images=False)
    with pytest.raises(DataError, match="COCO images folder does not exist"):
        check_split_paths(hp, tmp_path, "val2017")


def test_the_folder_one_level_down_that_holds_the_whole_dataset_is_named(tmp_path: Path) -> None:
    voc_tree(tmp_path / "a_partial", "train")
    (tmp_path / "a_partial" / "JPEGImages").rmdir()
    voc_tree(tmp_path / "b_whole", "train")
    hp = {"dataset": "voc"}
    with pytest.raises(DataError, match="b_whole' holds it: set --data.root"):
        check_split_paths(hp, tmp_path, "train")
