"""``analyze-anchors`` output folders: files of an earlier run, or a hand-written ``anchors.yaml``,
are refused before the analysis unless ``--force`` / ``overwrite``, and a snippet the run did
not write is named as not its own."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from lightning_rpn.cli import main
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.tools import anchor_analysis
from lightning_rpn.tools.anchor_analysis import GTBoxSet, analyze_anchors, run_analyze_anchors

GENERATOR = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),), (4, 8))
HAND_WRITTEN = "# my hand-tuned anchors\nmodel:\n  anchor_sizes: [[20], [40]]\n"


def boxes() -> GTBoxSet:
    return GTBoxSet.from_images([((128, 128), np.array([[10.0, 10.0, 40.0, 30.0], [50.0, 50.0, 90.0, 100.0]]))], 32)


def test_earlier_files_are_kept_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "anchors.yaml").write_text(HAND_WRITTEN)
    (tmp_path / "anchor_analysis.json").write_text('{"my": "earlier report"}')
    with pytest.raises(FileExistsError, match=r"anchor_analysis\.json, anchors\.yaml already there.*--force"):
        analyze_anchors(boxes(), GENERATOR, optimize=True, output_dir=tmp_path)
    assert (tmp_path / "anchors.yaml").read_text() == HAND_WRITTEN
    assert (tmp_path / "anchor_analysis.json").read_text() == '{"my": "earlier report"}'
    assert not (tmp_path / "anchor_analysis.png").exists()
    analysis = analyze_anchors(boxes(), GENERATOR, optimize=True, output_dir=tmp_path, overwrite=True)
    assert yaml.safe_load((tmp_path / "anchors.yaml").read_text())["model"]["anchor_sizes"] != [[20], [40]]
    assert json.loads((tmp_path / "anchor_analysis.json").read_text())["notes"] == analysis.notes
    assert analysis.notes == [f"replaced the earlier anchor_analysis.json, anchors.yaml in {tmp_path}"]


def test_a_snippet_the_run_did_not_write_is_kept_and_named(tmp_path: Path) -> None:
    """Without optimize a hand-written (or earlier) anchors.yaml is not this run's file: no refusal,
    kept, and the report says it is not from this run."""
    (tmp_path / "anchors.yaml").write_text(HAND_WRITTEN)
    analysis = analyze_anchors(boxes(), GENERATOR, output_dir=tmp_path)
    assert (tmp_path / "anchors.yaml").read_text() == HAND_WRITTEN
    assert "config_snippet" not in analysis.files
    note = f"kept {tmp_path / 'anchors.yaml'}: not this run's snippet (this run did not optimise)"
    assert analysis.notes == [note]
    assert json.loads((tmp_path / "anchor_analysis.json").read_text())["notes"] == [note]
    assert f"note: {note}" in " ".join(str(analysis).split())


def test_the_folder_is_checked_before_the_boxes_are_read(tmp_path: Path) -> None:
    (tmp_path / "anchor_analysis.png").write_bytes(b"an earlier plot")
    model = SimpleNamespace(anchor_generator=GENERATOR, size_divisibility=32)
    # a data module that cannot be read: the refusal must come first
    with pytest.raises(FileExistsError, match=r"anchor_analysis\.png already there"):
        run_analyze_anchors(model, object(), output_dir=tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a file of that name exists"):
        run_analyze_anchors(model, object(), output_dir=tmp_path / "a_file")
    (tmp_path / "other" / "anchors.yaml").mkdir(parents=True)
    with pytest.raises(ValueError, match="anchors.yaml there is a folder"):
        run_analyze_anchors(model, object(), optimize=True, output_dir=tmp_path / "other", overwrite=True)
    # a folder that could not be created: refused before, not a traceback after the whole analysis
    with pytest.raises(ValueError, match=r"deeper': cannot be created and written to \(\S+a_file is a file\)"):
        run_analyze_anchors(model, object(), output_dir=tmp_path / "a_file" / "deeper")
    assert anchor_analysis.output_paths(tmp_path / "new" / "out", optimize=False)  # a folder to create: fine
    assert not (tmp_path / "new").exists()  # and not created by the check


def test_run_analyze_anchors_keeps_the_model_s_fg_iou(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return GENERATOR

    monkeypatch.setattr(anchor_analysis, "optimize_anchors", spy)
    monkeypatch.setattr(anchor_analysis, "collect_gt_boxes", lambda *args, **kwargs: boxes())
    model = SimpleNamespace(anchor_generator=GENERATOR, size_divisibility=32,
                            target_config=SimpleNamespace(fg_iou=0.3))
    run_analyze_anchors(model, None, optimize=True, output_dir=tmp_path)
    assert seen["fg_iou"] == 0.3


def test_cli_refuses_an_existing_file_unless_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False},
        "model": {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32], [64], [128]]},
        "data": {"dataset": "synthetic", "synthetic_train_images": 4, "synthetic_val_images": 2,
                 "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    out.mkdir()
    (out / "anchors.yaml").write_text(HAND_WRITTEN)
    args = ["analyze-anchors", "--config", str(tmp_path / "config.yaml"), "--optimize", "--output_dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lightning-rpn analyze-anchors --output_dir" in err and "anchors.yaml already there" in err
    assert (out / "anchors.yaml").read_text() == HAND_WRITTEN and not (out / "anchor_analysis.json").exists()
    assert main([*args, "--force"]) == 0
    assert "replaced the earlier anchors.yaml" in " ".join(capsys.readouterr().out.split())
    assert (out / "anchors.yaml").read_text() != HAND_WRITTEN


def test_the_report_is_strict_json_with_null_for_an_area_range_without_boxes(tmp_path: Path) -> None:
    # a bare NaN (not JSON) was written for the large range, which holds none of these boxes
    analyze_anchors(boxes(), GENERATOR, optimize=True, output_dir=tmp_path)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    report = json.loads((tmp_path / "anchor_analysis.json").read_text(), parse_constant=refuse)
    for key in ("coverage", "optimized_coverage"):
        assert report[key]["boxes_large"] == 0
        assert report[key]["coverage_large@0.50"] is None and report[key]["coverage_large@0.70"] is None
        assert report[key]["coverage@0.50"] is not None


def run_cli_on_coco(tmp_path: Path, capsys: pytest.CaptureFixture, annotations: list, *flags: str) -> tuple[int, str]:
    """Exit code and stderr of ``analyze-anchors`` on a one-image COCO set whose train split is ``x2017``."""
    from helpers.builders import write_coco

    write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}], annotations)
    config = {
        "trainer": {"accelerator": "cpu", "logger": False},
        "model": {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32], [64], [128]]},
        "data": {"dataset": "coco", "root": str(tmp_path), "train_split": "x2017", "val_split": None,
                 "coco_images": "images", "coco_annotations": "annotations.json", "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code = main(["analyze-anchors", "--config", str(tmp_path / "config.yaml"), "--output_dir", str(tmp_path / "out"),
                 *flags])
    return code, capsys.readouterr().err


BOX = [{"id": 1, "image_id": 1, "bbox": [1, 1, 20, 20], "category_id": 1}]


def test_cli_takes_the_split_name_or_names_the_splits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `--split val2017` wanted a role and ended in a ValueError traceback
    assert run_cli_on_coco(tmp_path, capsys, BOX, "--split", "x2017")[0] == 0
    assert json.loads((tmp_path / "out" / "anchor_analysis.json").read_text())["coverage"]["boxes"] == 1
    code, err = run_cli_on_coco(tmp_path, capsys, BOX, "--split", "val2017", "--force")
    assert code == 2 and "Traceback" not in err
    assert ("lightning-rpn analyze-anchors --split 'val2017': the config's splits are train (x2017); give a role "
            "(train, val, test, predict) or its split name") in err
    code, err = run_cli_on_coco(tmp_path, capsys, BOX, "--split", "test", "--force")
    assert code == 2 and "the config sets no data.test_split" in err


def test_the_predict_role_of_a_predict_images_folder_is_refused_not_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # --split predict analysed the val split's boxes in silence when predict reads a folder of images
    folder = tmp_path / "to_predict"
    folder.mkdir()
    code, err = run_cli_on_coco(tmp_path, capsys, BOX, "--split", "predict", "--data.val_split", "x2017",
                                "--data.predict_images", str(folder))
    assert code == 2 and "Traceback" not in err
    assert f"data.predict_images {str(folder)!r} is a folder of images without boxes" in err
    assert "val (x2017)" in err and not (tmp_path / "out").exists()


def test_cli_refuses_a_split_without_boxes_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_cli_on_coco(tmp_path, capsys, [])
    assert code == 2 and "Traceback" not in err
    assert ("lightning-rpn analyze-anchors --split train: the train split 'x2017' has no gt boxes in the 1 image(s) "
            "read; choose a split with boxes") in err


def test_an_unexpected_error_keeps_its_traceback(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(anchor_analysis, "collect_gt_boxes", broken)
    with pytest.raises(ValueError, match="a bug"):
        run_cli_on_coco(tmp_path, capsys, BOX)
