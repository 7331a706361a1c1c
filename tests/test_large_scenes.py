"""configs/large_scenes.yaml end to end through the ``lightning-rpn`` command, with tiny settings:
training on windows of generated scenes, validating and predicting whole scenes through sliding windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers.cli import assert_ok, run_cli, start_cli

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "large_scenes.yaml"


def test_large_scenes_config_trains_on_windows_and_validates_whole_scenes(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["data"]["tiles"]["size"] < config["data"]["scene_options"]["size"]
    assert config["model"]["sliding_window"]["overlap"] >= 70, "every object (<= 70 px) whole in some window"
    config["trainer"].update(accelerator="cpu", max_steps=4, check_val_every_n_epoch=1, logger=False,
                             enable_progress_bar=False, default_root_dir="run")
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                      if not c["class_path"].endswith(("LearningRateMonitor", "RichProgress"))]
    for checkpoint in config["trainer"]["callbacks"][:2]:  # best and last
        checkpoint["init_args"]["dirpath"] = "run/checkpoints"
    config["model"].update(backbone="tiny_fpn", anchor_sizes=[[16], [32], [64], [128]], warmup_steps=1,
                           pre_nms_top_n_test=200, post_nms_top_n_test=300, recall_max_proposals=[100, 1000],
                           sliding_window={"size": 128, "overlap": 48, "window_batch": 3, "merge_metric": "ios"})
    config["data"].update(scene_options={"size": 320, "density": 250.0}, synthetic_train_images=2,
                          synthetic_val_images=1, batch_size=2, num_workers=1,
                          tiles={"size": 96, "per_epoch": 4, "box_probability": 0.5})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    fit = run_cli(["fit", "--config", "config.yaml"], tmp_path, timeout=300)
    assert_ok(fit)
    output = fit.stdout + fit.stderr
    assert "train: 8 images" in output, "4 steps of 2 windows in the data report"
    assert "Proposal recall (end of fit" in output and "validate: 2 images" in output, "whole scenes validated"
    checkpoint = tmp_path / "run/checkpoints/last.ckpt"
    assert checkpoint.is_file()

    # both only read the checkpoint and write their own summaries: side by side
    validate, predict = [start_cli([command, "--config", "config.yaml", "--ckpt_path", str(checkpoint)], tmp_path,
                                   timeout=300) for command in ("validate", "predict")]
    validate = validate.result()
    assert_ok(validate)
    (summary,) = (tmp_path / "run/metrics").glob("validate-*.json")
    summary = json.loads(summary.read_text())
    assert 0.0 <= summary["metrics"]["AR@1000"] <= 1.0
    losses = summary["losses"]  # per window, from the gt boxes each window cuts
    assert set(losses) == {"loss", "loss_rpn_cls", "loss_rpn_reg"} and all(v > 0 for v in losses.values()), losses
    assert losses["loss"] == pytest.approx(losses["loss_rpn_cls"] + losses["loss_rpn_reg"], rel=1e-5)

    predict = predict.result()
    assert_ok(predict)
    predicted = json.loads((tmp_path / "run/metrics/predict-last.json").read_text())
    assert predicted["coordinates"] != "resized images" and 0.0 <= predicted["metrics"]["AR@1000"] <= 1.0
