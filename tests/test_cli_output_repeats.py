"""End to end through the real ``lightning-rpn``: the outputs one command names after its checkpoint
(proposal files, metrics summary, recall-curve PNG, proposal images) carry one repeat number, the
first free for all of them, after an earlier command wrote only some of them.

Each output's own first free number had put a predict's PNG at ``predict-last.png`` beside its
``proposals_coco-last.2.json`` and ``predict-last.2.json`` (the earlier predict had no
``RecallCurves``), and a validate's ``val-last.png`` beside its ``validate-last.2.json``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from helpers.cli import TINY_CONFIG, assert_ok, run_cli

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

REPORTING = [{"class_path": "lightning_rpn.training.callbacks.RecallCurves"},
             {"class_path": "lightning_rpn.training.callbacks.ProposalImages", "init_args": {"num_images": 2}}]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step fit without a logger (files under ``run/``), and two configs for the evaluations:
    ``all.yaml`` with ``RecallCurves`` and ``ProposalImages``, ``some.yaml`` without them."""
    workdir = tmp_path_factory.mktemp("repeats")
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"]["logger"] = False
    (workdir / "some.yaml").write_text(yaml.safe_dump(config))
    config["trainer"]["callbacks"] += REPORTING
    (workdir / "all.yaml").write_text(yaml.safe_dump(config))
    assert_ok(run_cli(["fit", "--config", "all.yaml"], workdir))
    return workdir


def _names(folder: Path, pattern: str) -> list[str]:
    return sorted(path.name for path in folder.glob(pattern))


def test_a_predict_after_one_that_wrote_some_outputs_numbers_them_all_alike(fitted: Path) -> None:
    run = fitted / "run"
    for config in ("some.yaml", "all.yaml"):  # proposal files and a summary, then every output
        assert_ok(run_cli(["predict", "--config", config, "--ckpt_path", "last"], fitted))
    assert _names(run / "proposals", "proposals_coco-last*") == ["proposals_coco-last.2.json", "proposals_coco-last.json"]
    assert _names(run / "metrics", "predict-last*") == ["predict-last.2.json", "predict-last.json"]
    assert _names(run / "recall_curves", "predict-last*") == ["predict-last.2.png"]  # was predict-last.png
    summary = json.loads((run / "metrics/predict-last.2.json").read_text())
    assert Path(summary["proposals"]["files"][0]["paths"]["coco_json"]).name == "proposals_coco-last.2.json"
    # a third: the proposal files and the summary hold .3 alone; .2 and .3 are taken for some output
    assert_ok(run_cli(["predict", "--config", "some.yaml", "--ckpt_path", "last"], fitted))
    result = run_cli(["predict", "--config", "all.yaml", "--ckpt_path", "last"], fitted)
    assert_ok(result)
    assert "proposals_coco-last.4.json" in result.stderr and "predict-last.4.json" in result.stderr
    assert _names(run / "recall_curves", "predict-last*") == ["predict-last.2.png", "predict-last.4.png"]


def test_a_validate_after_one_that_wrote_its_summary_alone_numbers_all_its_outputs_alike(fitted: Path) -> None:
    run = fitted / "run"
    for config in ("some.yaml", "all.yaml"):  # a summary, then a summary, the PNG and the images
        assert_ok(run_cli(["validate", "--config", config, "--ckpt_path", "last"], fitted))
    assert _names(run / "metrics", "validate-last*") == ["validate-last.2.json", "validate-last.json"]
    assert _names(run / "recall_curves", "val-last*") == ["val-last.2.png"]  # was val-last.png
    images = _names(run / "proposal_images", "val-last*")
    assert len(images) == 2 and all(name.startswith("val-last.2_") for name in images)
