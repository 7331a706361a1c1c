"""``lightning-rpn check-data`` (run in-process): every problem reported, printed as written, listed
in full on request or written to a file, and errors told apart from warnings."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from helpers.builders import save_image, write_coco, write_voc

from lightning_rpn.cli import main
from lightning_rpn.data.validation import validate_dataset
from lightning_rpn.training.datamodule import RPNDataModule

IMAGE = {"height": 40, "width": 60}


def run_check_data(root: Path, capsys: pytest.CaptureFixture, *flags: str, **data: object) -> tuple[int, str, str]:
    """Exit code, stdout with whitespace collapsed (rich wraps lines) and stderr of check-data on ``root``."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False},
        "model": {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32], [64], [128]]},
        "data": {"dataset": "coco", "root": str(root), "train_split": "x", "val_split": None,
                 "coco_images": "images", "coco_annotations": "annotations.json", "num_workers": 0, **data},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    code = main(["check-data", "--config", str(root / "config.yaml"), *flags])
    out = capsys.readouterr()
    return code, " ".join(out.out.split()), out.err


def test_escaping_paths_are_reported_and_the_check_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = [{"id": 1, "file_name": "../outside.png", **IMAGE}, {"id": 2, "file_name": "ok.png", **IMAGE},
              {"id": 3, "file_name": "sub/../../x.png", **IMAGE}]
    anns = [{"id": 10, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 1},
            {"id": 20, "image_id": 2, "bbox": [1, 1, float("nan"), 5], "category_id": 1}]
    images_root, _ = write_coco(tmp_path, images, anns, create_files=False)
    save_image(images_root / "ok.png", 40, 60)
    code, out, err = run_check_data(tmp_path, capsys)
    assert code == 1 and "3 error(s)" in err
    assert "image 1: image path '../outside.png' escapes the images root" in out
    assert "image 3: image path 'sub/../../x.png' escapes the images root" in out
    assert "annotation 20" in out  # checked on after the escaping paths
    assert "annotation 10" not in out  # its image was skipped (and reported), not reported as unknown


def test_voc_escaping_ids_and_file_names_are_reported(tmp_path: Path) -> None:
    write_voc(tmp_path, {"ok": {"size": (20, 20), "objects": [{"box": (2, 2, 9, 9)}]},
                         "bad": {"size": (20, 20), "file_name": "../../x.png", "no_image": True}})
    split_file = tmp_path / "ImageSets/Main/train.txt"
    split_file.write_text(split_file.read_text() + "../../etc/passwd\n")
    dm = RPNDataModule("voc", root=str(tmp_path), train_split="train", val_split=None, num_workers=0)
    (split,) = validate_dataset(dm, splits=("train",)).splits
    assert sorted((p.kind, p.image_id) for p in split.problems) == [
        ("unsafe_path", "../../etc/passwd"), ("unsafe_path", "bad")]
    assert split.images == 1 and split.boxes == 1


def test_a_split_that_cannot_be_read_is_one_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_coco(tmp_path, [{"id": 1, "file_name": "a.png", **IMAGE}], [])
    code, out, err = run_check_data(tmp_path, capsys, val_split="y", coco_annotations="annotations{split}.json")
    assert code == 1 and "2 error(s)" in err  # train's annotationsx.json and val's annotationsy.json
    assert "unreadable_split" in out and "COCO annotation file does not exist; the split was not checked" in out


def test_boxes_and_names_are_printed_as_written_never_as_markup(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = [{"id": 1, "file_name": "a.png", **IMAGE}, {"id": 2, "file_name": "[bold]b.png", **IMAGE}]
    anns = [{"id": 10, "image_id": 1, "bbox": [float("nan"), 10, 5, 20], "category_id": 1}]
    images_root, _ = write_coco(tmp_path, images, anns, create_files=False)
    save_image(images_root / "a.png", 40, 60)
    code, out, _ = run_check_data(tmp_path, capsys)
    assert code == 1
    assert "annotation 10: bbox [nan, 10, 5, 20] (x, y, w, h) has non-finite coordinates" in out
    assert "images/[bold]b.png: image file does not exist" in out
    # VOC boxes are quoted 1-based, as in the XML
    root = write_voc(tmp_path / "voc", {"v": {"size": (40, 60), "objects": [{"box": (50, 30, 61, 40)}]}})
    report = validate_dataset(RPNDataModule("voc", root=str(root), val_split=None, num_workers=0), splits=("train",))
    console = Console(width=400, record=True, file=open(tmp_path / "voc.txt", "w"))
    console.print(report)
    assert "bndbox [50, 30, 61, 40] (xmin, ymin, xmax, ymax), 1-based extends outside the 60x40 image" in (
        console.export_text())


def many_bad_boxes(root: Path, n: int = 25) -> None:
    anns = [{"id": 100 + i, "image_id": 1, "bbox": [1, 1, 0, 5], "category_id": 1} for i in range(n)]
    write_coco(root, [{"id": 1, "file_name": "a.png", **IMAGE}], anns)


def test_every_problem_can_be_listed_or_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    many_bad_boxes(tmp_path)
    code, out, _ = run_check_data(tmp_path, capsys)
    assert code == 1 and "annotation 119:" in out and "annotation 120:" not in out
    assert "... and 5 more (check-data --list_all prints them all; --report FILE.json or FILE.csv" in out
    _, out, _ = run_check_data(tmp_path, capsys, "--list_all")
    assert all(f"annotation {100 + i}:" in out for i in range(25)) and "more" not in out
    _, _, err = run_check_data(tmp_path, capsys, "--report", str(tmp_path / "out/problems.json"))
    assert f"every problem written to {tmp_path / 'out/problems.json'}" in err
    (split,) = json.loads((tmp_path / "out/problems.json").read_text()).values()
    assert len(split["problems"]) == 25 and split["errors"] == 25
    assert split["problems"][24] == {
        "severity": "error", "kind": "empty_box", "action": "skipped", "file": str(tmp_path / "annotations.json"),
        "image_id": 1, "annotation_id": 124,
        "detail": "bbox [1, 1, 0, 5] (x, y, w, h) is empty; expected w > 0 and h > 0"}
    run_check_data(tmp_path, capsys, "--report", str(tmp_path / "problems.csv"))
    rows = list(csv.DictReader(open(tmp_path / "problems.csv", newline="")))
    assert len(rows) == 25 and rows[0]["split"] == "train (x)" and rows[0]["annotation_id"] == "100"
    code, _, err = run_check_data(tmp_path, capsys, "--report", str(tmp_path / "problems.txt"))
    assert code == 2 and re.search(r"problems\.txt.*\.json or \.csv", err)


def test_boxes_clipped_without_complaint_are_warnings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_coco(tmp_path, [{"id": 1, "file_name": "a.png", **IMAGE}],
               [{"id": 5, "image_id": 1, "bbox": [50, 30, 11, 11], "category_id": 1}])  # x2 = 61 > 60
    code, out, err = run_check_data(tmp_path, capsys)
    assert code == 0 and "0 error(s), 1 warning(s)" in err
    assert "problems found: 1 (0 errors, 1 warnings)" in out and "warning: " in out
    code, _, _ = run_check_data(tmp_path, capsys, "--strict")
    assert code == 1


def test_an_existing_report_file_is_kept_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    many_bad_boxes(tmp_path, n=2)
    annotations = tmp_path / "annotations.json"
    written = annotations.read_text()
    code, _, err = run_check_data(tmp_path, capsys, "--report", str(annotations))
    assert code == 2 and re.search(r"annotations\.json'?: a file of that name exists.*--force", err)
    assert annotations.read_text() == written  # the user's annotations, not a report
    report = tmp_path / "problems.json"
    report.write_text("mine")
    code, _, err = run_check_data(tmp_path, capsys, "--report", str(report))
    assert code == 2 and "a file of that name exists" in err
    assert report.read_text() == "mine"
    run_check_data(tmp_path, capsys, "--report", str(report), "--force")
    assert json.loads(report.read_text())["train (x)"]["errors"] == 2


def test_an_unwritable_report_path_fails_before_the_check(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    many_bad_boxes(tmp_path, n=1)
    (tmp_path / "a_file").write_text("")
    # the name the data module calls (patching it in data.validation would not stop the check)
    monkeypatch.setattr("lightning_rpn.training.datamodule.validate_dataset",
                        lambda *args, **kwargs: pytest.fail("the data was checked before the report path"))
    code, _, err = run_check_data(tmp_path, capsys, "--report", str(tmp_path / "a_file/r.json"))
    assert code == 2 and re.search(r"a_file/r.json'?: its folder '\S+a_file' cannot be created and written to \(\S+a_file is a file\)", err)
    (tmp_path / "folder.json").mkdir()
    code, _, err = run_check_data(tmp_path, capsys, "--report", str(tmp_path / "folder.json"))
    assert code == 2 and "a folder of that name exists" in err


def test_an_empty_split_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_coco(tmp_path, [], [])
    code, out, err = run_check_data(tmp_path, capsys)
    assert code == 1 and "1 error(s)" in err
    assert "empty_split" in out and "the split lists no images" in out


def test_images_without_a_size_have_their_boxes_checked_without_decoding(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    anns = [{"id": 1, "image_id": 1, "bbox": [1, 1, float("nan"), 5], "category_id": 1},
            {"id": 2, "image_id": 1, "bbox": [500, 1, 5, 5], "category_id": 1},
            {"id": 3, "image_id": 1, "bbox": [1, 1, 0, 5], "category_id": 1},
            {"id": 4, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 1}]
    images_root, _ = write_coco(tmp_path, [{"id": 1, "file_name": "a.png"}], anns,  # no width / height
                                create_files=False)
    save_image(images_root / "a.png", 40, 60)
    code, out, err = run_check_data(tmp_path, capsys, "--check_images", "false", "--report",
                                    str(tmp_path / "r.json"))
    assert code == 1 and "3 error(s)" in err
    (split,) = json.loads((tmp_path / "r.json").read_text(), parse_constant=pytest.fail).values()
    assert sorted(p["kind"] for p in split["problems"]) == ["empty_box", "non_finite", "outside_image"]
    assert split["boxes"] == 1


def test_boxes_rechecked_against_the_file_size_are_reported_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    anns = [{"id": 1, "image_id": 1, "bbox": [5, 5, 0, 10], "category_id": 1},
            {"id": 2, "image_id": 1, "bbox": [50, 5, 14.5, 10], "category_id": 1}]  # outside 64 px, inside 65
    images_root, _ = write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}], anns,
                                create_files=False)
    save_image(images_root / "a.png", 48, 65)
    _, _, err = run_check_data(tmp_path, capsys, "--report", str(tmp_path / "r.json"))
    (split,) = json.loads((tmp_path / "r.json").read_text()).values()
    assert sorted(p["kind"] for p in split["problems"]) == ["empty_box", "size_mismatch"], split["problems"]


def test_the_report_prints_on_a_console_without_box_characters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    many_bad_boxes(tmp_path, n=1)
    config = tmp_path / "config.yaml"
    run_check_data(tmp_path, capsys)
    done = subprocess.run([sys.executable, "-m", "lightning_rpn.cli", "check-data", "--config", str(config),
                           "--report", str(tmp_path / "r.json")],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "cp1252"}, cwd=tmp_path)
    assert done.returncode == 1, done.stderr.decode(errors="replace")[-2000:]
    assert b"| images " in done.stdout and (tmp_path / "r.json").is_file()


def test_check_data_needs_no_pretrained_weights(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # the shipped real-data configs name torchvision weights; check-data only needs the anchors
    import torch

    def offline(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    write_coco(tmp_path, [{"id": 1, "file_name": "a.png", **IMAGE}],
               [{"id": 1, "image_id": 1, "bbox": [1, 1, 20, 20], "category_id": 1}])
    config = {"model": {"backbone": "resnet18_fpn", "weights": "ResNet18_Weights.IMAGENET1K_V1"},
              "data": {"dataset": "coco", "root": str(tmp_path), "train_split": "x", "val_split": None,
                       "coco_images": "images", "coco_annotations": "annotations.json", "num_workers": 0},
              "trainer": {"logger": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["check-data", "--config", str(tmp_path / "config.yaml")]) == 0


def test_the_cli_report_has_the_model_s_anchor_coverage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the command never gave the data module the model's anchors: "anchor_coverage": {} on every split
    write_coco(tmp_path, [{"id": 1, "file_name": "a.png", **IMAGE}],
               [{"id": 1, "image_id": 1, "bbox": [1, 1, 16, 16], "category_id": 1},
                {"id": 2, "image_id": 1, "bbox": [30, 5, 24, 12], "category_id": 1}])
    code, out, _ = run_check_data(tmp_path, capsys, "--report", str(tmp_path / "r.json"))
    assert code == 0 and "anchor coverage (2 boxes)" in out
    coverage = json.loads((tmp_path / "r.json").read_text())["train (x)"]["anchor_coverage"]
    assert coverage["boxes_checked"] == 2 and coverage["best_iou>=0.5"] == 1.0  # the 16 px box is an anchor
