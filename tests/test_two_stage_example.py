"""examples/two_stage: lightning-rpn's RPN as the first stage of a Faster R-CNN trains and predicts."""

from __future__ import annotations

import pytest

import math

import lightning.pytorch as pl
import torch
from helpers.scripts import REPO, load_script

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

EXAMPLE = REPO / "examples" / "two_stage" / "faster_rcnn.py"


def load_example():
    return load_script(str(EXAMPLE.relative_to(REPO)), "two_stage_faster_rcnn")


def test_two_stage_detector_trains_both_stages_and_predicts(tmp_path) -> None:
    example = load_example()
    pl.seed_everything(0)
    model = example.TwoStageDetector(rpn_post_nms_train=64, rpn_post_nms_test=32, roi_batch_size=32, lr=1e-3)
    data = example.synthetic_data(train_images=6, val_images=2, batch_size=2, num_workers=0, min_size=64, max_size=96)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("train/loss_rpn_cls", "train/loss_rpn_reg", "train/loss_classifier", "train/loss_box_reg"):
        assert math.isfinite(float(metrics[key])), key
    assert 0.0 <= float(metrics["val/proposal_AR@32"]) <= 1.0
    changed = {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert {"backbone", "rpn", "roi_heads"} <= changed
    # the data module took the anchors from the model, so the batches carried RPN anchor targets
    assert data.anchor_generator is model.anchor_generator

    predictions = trainer.predict(model, datamodule=data)
    images = [item for batch in predictions for item in batch]
    assert len(images) == 2
    for item in images:
        assert set(item) == {"image_id", "boxes", "labels", "scores"}
        assert item["boxes"].shape[1] == 4 and len(item["boxes"]) <= 100
        assert torch.all(item["labels"] == 1)


def test_the_documented_command_runs_across_epochs_and_validates() -> None:
    """README: ``--max_steps 300`` over 400 images (50 batches of 8) stopped at once with
    ``val_check_interval (100) must be <= the number of training batches (50)``. Here the same
    command line with a smaller epoch: 3 steps over 2 batches of 8, validation at step 3."""
    readme = (EXAMPLE.parent / "README.md").read_text()
    assert "python examples/two_stage/faster_rcnn.py --max_steps 300" in readme
    trainer = load_example().main(["--max_steps", "3", "--train_images", "16"])
    assert trainer.global_step == 3  # into the second epoch
    assert trainer.num_training_batches == 2 and trainer.val_check_batch == 3
    assert 0.0 <= float(trainer.callback_metrics["val/proposal_AR@100"]) <= 1.0
