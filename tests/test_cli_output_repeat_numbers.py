"""End to end through the real ``lightning-rpn``: a predict without ground truth (a folder of
images) writes its proposal files alone, so the repeat number it takes is the first at which none
of them exists, whatever metrics summary or recall-curve PNG an earlier predict with ground truth
left at that number.

It counted those as its own: after a predict whose proposal files went to another folder, the next
one, of a folder of images, wrote ``proposals_coco-last.2.json`` beside no ``proposals_coco-last.json``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers.cli import TINY_CONFIG, assert_ok, run_cli

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out


def test_a_predict_without_ground_truth_counts_only_its_proposal_files(tmp_path: Path) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"]["logger"] = False
    config["trainer"]["callbacks"].append({"class_path": "lightning_rpn.training.callbacks.RecallCurves"})
    (tmp_path / "here.yaml").write_text(yaml.safe_dump(config))
    (writer,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ProposalWriter")]
    writer["init_args"]["output_dir"] = "run/elsewhere"
    (tmp_path / "elsewhere.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "folder").mkdir()
    for k in range(2):
        Image.new("RGB", (80, 64), (40 * k, 90, 30)).save(tmp_path / "folder" / f"image{k}.png")
    assert_ok(run_cli(["fit", "--config", "here.yaml"], tmp_path))
    run = tmp_path / "run"
    # with ground truth: a summary, a PNG and proposal files (in another folder), all at number 0
    assert_ok(run_cli(["predict", "--config", "elsewhere.yaml", "--ckpt_path", "last"], tmp_path))
    assert sorted(p.name for p in (run / "metrics").glob("predict-last*")) == ["predict-last.json"]
    assert sorted(p.name for p in (run / "recall_curves").glob("predict-last*")) == ["predict-last.png"]
    # without: its proposal files, of which none exists at number 0
    result = run_cli(["predict", "--config", "here.yaml", "--ckpt_path", "last", "--data.predict_images", "folder"],
                     tmp_path)
    assert_ok(result)
    assert sorted(p.name for p in (run / "proposals").glob("proposals_coco-last*")) == ["proposals_coco-last.json"]
    assert "they stay" not in result.stderr  # no earlier file was passed over
    assert sorted(p.name for p in (run / "metrics").glob("predict-last*")) == ["predict-last.json"]
    assert sorted(p.name for p in (run / "recall_curves").glob("predict-last*")) == ["predict-last.png"]
    # with ground truth again: number 0 is taken (the summary, the PNG and the proposal files)
    assert_ok(run_cli(["predict", "--config", "here.yaml", "--ckpt_path", "last"], tmp_path))
    assert sorted(p.name for p in (run / "proposals").glob("proposals_coco-last*")) == [
        "proposals_coco-last.2.json", "proposals_coco-last.json"]
    assert sorted(p.name for p in (run / "metrics").glob("predict-last*")) == ["predict-last.2.json",
                                                                               "predict-last.json"]
