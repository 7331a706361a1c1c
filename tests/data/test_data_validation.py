"""validate_dataset: counts, box statistics, problems with file / image / annotation ids."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console
from helpers.builders import basic_coco, save_image, write_coco

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.coverage import GTBoxSet, anchor_coverage, best_anchor_iou
from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.dataset_report import SplitReport
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.validation import validate_dataset
from lightning_rpn.training.datamodule import RPNDataModule


def test_report_of_a_clean_coco_dataset(tmp_path: Path) -> None:
    report = validate_dataset(COCODetection(*basic_coco(tmp_path)))
    (split,) = report.splits
    assert (split.images, split.empty_images, split.boxes, split.crowd_boxes) == (3, 1, 3, 1)
    assert report.num_problems == 0
    stats = report.to_dict()["dataset"]
    assert stats["box_percentiles"]["width"][0] == 8.0 and stats["box_percentiles"]["width"][-1] == 25.0
    assert stats["area_histogram"] == {"small": 3, "medium": 0, "large": 0}  # 200, 750, 64 px²
    assert sum(stats["aspect_histogram"].values()) == 3
    text = str(report)
    assert "box statistics" in text and "sqrt_area" in text and "problems found: 0" in text


def test_problems_are_listed_with_file_image_and_annotation(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
              {"id": 2, "file_name": "missing.png", "height": 40, "width": 60},
              {"id": 3, "file_name": "small.png", "height": 40, "width": 60}]
    anns = [{"id": 10, "image_id": 1, "bbox": [1, 1, float("nan"), 3], "category_id": 1},
            {"id": 11, "image_id": 1, "bbox": [55, 1, 6, 6], "category_id": 1},
            {"id": 12, "image_id": 3, "bbox": [1, 1, 50, 30], "category_id": 1}]
    images_root, ann = write_coco(tmp_path, images, anns, create_files=False)
    save_image(images_root / "a.png", 40, 60)
    save_image(images_root / "small.png", 20, 30)
    report = validate_dataset(COCODetection(images_root, ann, on_bad_annotation="clip"))
    kinds = {(p.kind, p.image_id, p.annotation_id) for p in report.splits[0].problems}
    assert ("non_finite", 1, 10) in kinds and ("slightly_outside", 1, 11) in kinds
    assert ("unreadable_image", 2, None) in kinds and ("size_mismatch", 3, None) in kinds
    assert ("outside_image", 3, 12) in kinds  # re-checked against the real 30x20 file (clip keeps the image)
    text = str(report)
    assert "missing.png" in text
    # one line per problem, however long its path: file, image and annotation grep together
    lines = text.splitlines()
    for problem in report.splits[0].problems:
        assert any(str(problem) in line for line in lines), (str(problem), text)
    Console(file=open(tmp_path / "out.txt", "w")).print(report)  # renders with rich


def test_report_of_a_plain_dataset_iterates_items() -> None:
    report = validate_dataset(SyntheticShapes(30, seed=0), name="shapes")
    split = report.splits[0]
    assert split.name == "shapes" and split.images == 30
    assert split.boxes == sum(len(SyntheticShapes(30, seed=0)[i].boxes) for i in range(30))
    pct = split.percentiles()
    assert np.all(np.diff(pct["sqrt_area"]) >= 0)


def test_check_data_counts_anchor_coverage_as_analyze_anchors_does() -> None:
    # a gt box [0, 0, 10, 7] inside the 10 x 10 anchor: IoU 70 / 100, float32(0.7), a hit at 0.7 for
    # analyze-anchors and the matcher; check-data compared it with the float64 0.7 and missed it
    gt = GTBoxSet(torch.tensor([[0.0, 0.0, 10.0, 7.0], [0.0, 0.0, 10.0, 4.0]]), torch.tensor([[20, 20], [20, 20]]), 1)
    generator = AnchorGenerator(((10,),), (1.0,), (10,), offset=0.5)  # an anchor [0, 0, 10, 10]
    best, _ = best_anchor_iou(gt, generator)
    assert best[0] == torch.tensor(0.7)
    split = SplitReport("val")
    split.best_anchor_iou.extend(best.tolist())
    assert split.anchor_coverage()["best_iou>=0.7"] == anchor_coverage(gt, generator)["coverage@0.70"] == 0.5


def test_check_data_of_a_datamodule_adds_anchor_coverage_and_ok(tmp_path: Path) -> None:
    model = SimpleNamespace(anchor_generator=AnchorGenerator(((16,), (32,), (64,)), (0.5, 1.0, 2.0), (8, 16, 32)),
                            size_divisibility=32)
    dm = RPNDataModule(synthetic_train_images=20, synthetic_val_images=10, num_workers=0)
    report = dm.check_data(model=model, splits=("val",))
    (split,) = report.splits
    assert split.name == "val (val)" and split.images == 10 and report.ok
    coverage = split.anchor_coverage()
    assert coverage["boxes_checked"] == split.boxes and 0.3 < coverage["median_best_iou"] <= 1.0
    assert coverage["best_iou>=0.3"] >= coverage["best_iou>=0.5"] >= coverage["best_iou>=0.7"]
    assert "anchor coverage" in str(report)
    # a dataset with a structural problem is not ok
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}]
    anns = [{"id": 10, "image_id": 1, "bbox": [1, 1, float("nan"), 3], "category_id": 1}]
    write_coco(tmp_path, images, anns)
    bad = RPNDataModule("coco", root=str(tmp_path), train_split="x", val_split=None, coco_images="images",
                        coco_annotations="annotations.json")
    assert not bad.check_data().ok


def test_check_data_warns_of_train_boxes_no_window_keeps() -> None:
    # tiled training drops a box larger than its windows everywhere: check-data said nothing
    options = {"size": 128, "density": 300.0, "min_object_size": 60, "max_object_size": 64}
    dm = RPNDataModule(dataset="scenes", scene_options=options, synthetic_train_images=1, synthetic_val_images=1,
                       num_workers=0, tiles={"size": 32, "per_epoch": 8}, min_visibility=0.5)
    report = dm.check_data()
    train, val = report.splits
    (problem,) = train.problems
    assert (problem.kind, problem.severity, problem.image_id) == ("box_larger_than_window", "warning", 0)
    assert "larger than a window (data.tiles.size=32)" in problem.detail
    assert not val.problems and report.ok  # a warning (validation is on whole images): check-data exits 0
    untiled = RPNDataModule(dataset="scenes", scene_options=options, synthetic_train_images=1,
                            synthetic_val_images=1, num_workers=0, min_visibility=0.5)
    assert not untiled.check_data().splits[0].problems


def test_a_subset_is_checked_alone(tmp_path: Path) -> None:
    from torch.utils.data import Subset

    dataset = COCODetection(*basic_coco(tmp_path))
    (split,) = validate_dataset(Subset(dataset, [0])).splits
    assert split.images == 1 and split.boxes == len(dataset[0].boxes)


@pytest.mark.parametrize("policy", ["skip", "clip"])
def test_a_size_mismatch_is_listed_with_the_action_fit_takes(tmp_path: Path, policy: str) -> None:
    """fit under skip skips an image whose file has another size than annotated (with or without
    verify_images); check-data said "clipped" and checked its boxes against the file."""
    images = [{"id": 3, "file_name": "small.png", "height": 40, "width": 60}]
    anns = [{"id": 12, "image_id": 3, "bbox": [1, 1, 50, 30], "category_id": 1}]
    images_root, ann = write_coco(tmp_path, images, anns, create_files=False)
    save_image(images_root / "small.png", 20, 30)
    report = validate_dataset(COCODetection(images_root, ann, on_bad_annotation=policy))
    actions = {(p.kind, p.action) for p in report.splits[0].problems}
    if policy == "skip":
        assert actions == {("size_mismatch", "skipped")} and report.splits[0].images == 0
    else:  # kept, its box checked against the 30 x 20 file
        assert ("size_mismatch", "clipped") in actions and len(actions) > 1
