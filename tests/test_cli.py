"""End to end: the real ``lightning-rpn`` console script on tiny synthetic data.

One module-scoped ``fit`` run (W&B offline, as the configs' default logger) feeds the other
tests: resume with ``--ckpt_path last``, ``validate``, ``predict`` and ``load_from_checkpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import torch
import yaml

from lightning_rpn.cli import CONFIG_KEY
from lightning_rpn.core.boxes import clip_boxes_to_image
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.transforms import ResizePolicy
from lightning_rpn.evaluation.proposal_files import FORMATS, read_detectron2_proposals
from lightning_rpn.training.module import RPNModule

from helpers.cli import TINY_CONFIG, assert_ok, run_cli

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A working directory with config.yaml and a 2-step fit (W&B offline)."""
    workdir = tmp_path_factory.mktemp("cli")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    result = run_cli(["fit", "--config", "config.yaml"], workdir)
    assert_ok(result)
    return workdir


def test_fit_leaves_checkpoint_config_and_recall_table(trained: Path) -> None:
    last = trained / "run/checkpoints/last.ckpt"
    assert last.is_file()
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    resolved = yaml.safe_load(checkpoint[CONFIG_KEY])
    assert resolved["model"]["backbone"] == "tiny_fpn"
    assert resolved["data"]["synthetic_train_images"] == 8
    assert checkpoint["hyper_parameters"]["anchor_sizes"] == [[16.0], [32.0], [64.0], [128.0]]
    assert (trained / "run/config.yaml").is_file()
    assert list((trained / "run/wandb").glob("offline-run-*")), "W&B offline run directory missing"


def test_load_from_checkpoint_needs_no_config(trained: Path) -> None:
    model = RPNModule.load_from_checkpoint(trained / "run/checkpoints/last.ckpt", map_location="cpu")
    assert model.hparams.backbone == "tiny_fpn"
    assert model.anchor_generator.strides == (4, 8, 16, 32)
    assert tuple(model.hparams.recall_max_proposals) == (10, 100)
    assert model.val_recall.max_proposals == (10, 100)


def test_validate_prints_the_recall_table(trained: Path) -> None:
    result = run_cli(
        ["validate", "--config", "config.yaml", "--ckpt_path", "run/checkpoints/last.ckpt",
         "--trainer.logger", "false"],
        trained,
    )
    assert_ok(result)
    assert "Proposal recall (validate" in result.stdout
    assert "val/AR@100" in result.stdout


def test_predict_writes_proposals_in_original_coordinates(trained: Path) -> None:
    result = run_cli(
        ["predict", "--config", "config.yaml", "--ckpt_path", "run/checkpoints/last.ckpt",
         "--trainer.logger", "false"],
        trained,
    )
    assert_ok(result)
    records = read_detectron2_proposals(trained / "run/proposals" / FORMATS["detectron2_pkl"])
    dataset = SyntheticShapes(4, min_size=64, max_size=96, max_shapes=3, seed=0, split="val")
    assert [r["image_id"] for r in records] == [0, 1, 2, 3]
    model = RPNModule.load_from_checkpoint(trained / "run/checkpoints/last.ckpt", map_location="cpu")
    expected = model.predict_images(
        [dataset[i].image for i in range(4)], resize=ResizePolicy("fixed", fixed_size=(64, 64))
    )
    for record, item, sample in zip(records, expected, (dataset[i] for i in range(4))):
        height, width = sample.image_size
        boxes = torch.as_tensor(record["boxes"])
        assert 0 < len(boxes) <= 50 and len(record["scores"]) == len(boxes)
        assert boxes[:, [0, 2]].max() <= width and boxes[:, [1, 3]].max() <= height
        # the same proposals as the in-process evaluation pipeline, mapped back by the same scale
        torch.testing.assert_close(boxes, item["boxes"][:50], atol=1e-3, rtol=0)
    # by hand: run the 64x64 image as it is, then scale x by w / 64 and y by h / 64 and clip
    sample = dataset[1]
    height, width = sample.image_size
    small = cv2.resize(sample.image, (64, 64), interpolation=cv2.INTER_LINEAR)
    (at_64,) = model.predict_images([small])
    scale = torch.tensor([width / 64, height / 64, width / 64, height / 64])
    by_hand = clip_boxes_to_image(at_64["boxes"][:50] * scale, (height, width))
    torch.testing.assert_close(torch.as_tensor(records[1]["boxes"]), by_hand, atol=1e-3, rtol=0)


def test_fit_resumes_from_last_checkpoint(trained: Path) -> None:
    result = run_cli(
        ["fit", "--config", "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "3",
         "--trainer.logger", "false"],
        trained,
    )
    assert_ok(result)
    checkpoint = torch.load(trained / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3  # continued from step 2, not restarted


def test_check_data_reports_the_splits(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    result = run_cli(["check-data", "--config", "config.yaml"], tmp_path)
    assert_ok(result)
    assert "split train (train)" in result.stdout and "split val (val)" in result.stdout
    assert "problems found: 0" in result.stdout


def test_check_data_exits_1_on_bad_annotations(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images/a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 7, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 1, "iscrowd": 0, "area": 100},
            {"id": 8, "image_id": 1, "bbox": [5, 5, float("nan"), 10], "category_id": 1, "iscrowd": 0,
             "area": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "annotations/instances_images.json").write_text(json.dumps(coco))
    config = {**TINY_CONFIG, "data": {"dataset": "coco", "root": str(tmp_path), "train_split": "images",
                                      "val_split": None, "coco_images": "{split}", "num_workers": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(["check-data", "--config", "config.yaml"], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error(s), 0 warning(s)" in result.stderr
    report = " ".join(result.stdout.split())  # rich wraps long lines
    assert "annotation 8: bbox [5, 5, nan, 10] (x, y, w, h) has non-finite coordinates" in report


def test_analyze_anchors_optimize_writes_plot_and_snippet(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    result = run_cli(
        ["analyze-anchors", "--config", "config.yaml", "--optimize", "--output_dir", "anchors",
         "--max_images", "8"],
        tmp_path,
    )
    assert_ok(result)
    assert (tmp_path / "anchors/anchor_analysis.png").stat().st_size > 0
    snippet = yaml.safe_load((tmp_path / "anchors/anchors.yaml").read_text())["model"]
    assert len(snippet["anchor_sizes"]) == len(snippet["aspect_ratios"]) == 4  # one per level
    assert "config snippet" in result.stdout
