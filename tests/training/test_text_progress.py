"""TextProgress: plain progress lines for output that is not a terminal (a job log, CI)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.training.callbacks import TextProgress
from lightning_rpn.training.module import RPNModule
from lightning_rpn.training.text_progress import format_duration


class LoggingModel(BoringModel):
    """BoringModel logging a training loss and a validation value to the progress bar, with a
    ``last_recall`` as ``RPNModule`` sets it."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"], prog_bar=True)
        return out

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val/AR@100", 0.25, prog_bar=True)
        return out

    def on_validation_epoch_end(self) -> None:
        self.last_recall = {"AR@100": 0.5, "AR@1000": 0.75, "AR_small@100": 0.125}


def fit(tmp_path: Path, progress: TextProgress, max_steps: int, ckpt_path: str | None = None, batches: int = 4,
        **trainer) -> Trainer:
    torch.manual_seed(0)
    run = Trainer(max_steps=max_steps, callbacks=[progress], logger=False, default_root_dir=tmp_path,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=batches,
                  limit_val_batches=2, **trainer)
    run.fit(LoggingModel(), ckpt_path=ckpt_path)
    return run


@pytest.mark.parametrize("seconds, text", [(0.04, "0.0s"), (4.25, "4.2s"), (59.9, "59.9s"), (60, "1m 0s"),
                                           (3725.4, "1h 2m 5s"), (float("nan"), "?"), (-1, "?")])
def test_durations_read_as_hours_minutes_seconds(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_every_step_with_no_interval_its_share_and_eta_and_the_logged_metrics(tmp_path: Path) -> None:
    out = io.StringIO()
    fit(tmp_path, TextProgress(interval_s=0, stream=out), max_steps=6, enable_checkpointing=False)
    lines = out.getvalue().splitlines()
    assert lines[0] == "train: from step 0 of 6, a line every 0.0s"
    steps = [line for line in lines if line.startswith("train step")]
    assert [int(re.match(r"train step (\d+)/6", line).group(1)) for line in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[2].startswith("train step 3/6 (50%) | epoch 0 | ")
    # no ETA from the first step (it holds the start-up) nor at the last
    assert [" eta " in line for line in steps] == [False, True, True, True, True, False]
    assert all(re.search(r"\| train/loss [-\d.e]+$", line) for line in steps)
    # 4 batches an epoch: a validation after steps 4 (end of epoch 0), and none at 6 (mid-epoch)
    (done,) = [line for line in lines if line.startswith("validation at step 4: done in")]
    assert done.endswith("| AR@100 0.500 | AR@1000 0.750 | val/AR@100 0.25")
    assert lines[-1].startswith("train: ended at step 6 after ")


def test_a_long_interval_prints_the_first_and_the_last_step_only(tmp_path: Path) -> None:
    out = io.StringIO()
    fit(tmp_path, TextProgress(interval_s=3600, stream=out), max_steps=6, enable_checkpointing=False)
    steps = [line for line in out.getvalue().splitlines() if line.startswith("train step")]
    assert [line.split(" |")[0] for line in steps] == ["train step 1/6 (17%)", "train step 6/6 (100%)"]


def test_a_resumed_run_counts_from_its_checkpoint_to_its_new_budget(tmp_path: Path) -> None:
    first = fit(tmp_path, TextProgress(interval_s=3600, stream=io.StringIO()), max_steps=4)
    checkpoint = first.checkpoint_callback.best_model_path or first.checkpoint_callback.last_model_path
    out = io.StringIO()
    fit(tmp_path, TextProgress(interval_s=3600, stream=out), max_steps=7, ckpt_path=checkpoint)
    lines = out.getvalue().splitlines()
    assert lines[0] == "train: from step 4 of 7, a line every 1h 0m 0s"
    steps = [line.split(" |")[0] for line in lines if line.startswith("train step")]
    assert steps == ["train step 5/7 (71%)", "train step 7/7 (100%)"]


def test_a_resumed_epoch_budget_counts_the_new_steps_per_epoch_from_its_checkpoint(tmp_path: Path) -> None:
    """2 epochs of 2 steps, then 2 more of 4 (a smaller batch size): the fit ends at step 12,
    where max_epochs x today's steps per epoch would say 16."""
    first = fit(tmp_path, TextProgress(interval_s=3600, stream=io.StringIO()), max_steps=-1, max_epochs=2, batches=2)
    assert first.global_step == 4
    out = io.StringIO()
    fit(tmp_path, TextProgress(interval_s=3600, stream=out), max_steps=-1, max_epochs=4, batches=4,
        ckpt_path=first.checkpoint_callback.last_model_path or first.checkpoint_callback.best_model_path)
    lines = out.getvalue().splitlines()
    assert lines[0] == "train: from step 4 of 12, a line every 1h 0m 0s"
    steps = [line.split(" |")[0] for line in lines if line.startswith("train step")]
    assert steps == ["train step 5/12 (42%)", "train step 12/12 (100%)"]


def test_max_steps_beyond_the_epochs_is_not_the_total(tmp_path: Path) -> None:
    out = io.StringIO()
    fit(tmp_path, TextProgress(interval_s=3600, stream=out), max_steps=100, max_epochs=1, enable_checkpointing=False)
    assert out.getvalue().splitlines()[0] == "train: from step 0 of 4, a line every 1h 0m 0s"


class TwoOptimizerModel(BoringModel):
    """Manual optimisation with two optimisers: two global steps a batch (a two-stage detector's loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.second = torch.nn.Linear(32, 2)

    def training_step(self, batch, batch_idx):
        for optimizer, layer in zip(self.optimizers(), (self.layer, self.second)):
            optimizer.zero_grad()
            self.manual_backward(layer(batch).sum())
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.layer.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.1)]


def test_manual_optimisation_counts_no_epoch_total_it_cannot_know(tmp_path: Path) -> None:
    # "train step 8/4 (200%)": the epoch total counted a step a batch, the module made two
    out = io.StringIO()
    run = Trainer(max_epochs=1, callbacks=[TextProgress(interval_s=0, stream=out)], logger=False, default_root_dir=tmp_path,
                  enable_model_summary=False, enable_checkpointing=False, limit_train_batches=4, limit_val_batches=0)
    run.fit(TwoOptimizerModel())
    lines = out.getvalue().splitlines()
    assert run.global_step == 8 and lines[0] == "train: from step 0, a line every 0.0s"
    assert [line.split(" |")[0] for line in lines if line.startswith("train step")][-1] == "train step 8"


def test_validate_alone_prints_its_batches_and_its_metrics(tmp_path: Path) -> None:
    out = io.StringIO()
    trainer = Trainer(callbacks=[TextProgress(interval_s=0, stream=out)], logger=False, default_root_dir=tmp_path,
                      enable_model_summary=False, limit_val_batches=3)
    trainer.validate(LoggingModel(), verbose=False)
    lines = out.getvalue().splitlines()
    assert [line.split(" | elapsed")[0] for line in lines[:3]] == [
        "validation: batch 1/3", "validation: batch 2/3", "validation: batch 3/3"]
    assert lines[-1].startswith("validation: done in") and lines[-1].endswith("| AR@100 0.500 | AR@1000 0.750 | val/AR@100 0.25")


def test_disabled_it_prints_nothing(tmp_path: Path) -> None:
    out = io.StringIO()
    progress = TextProgress(interval_s=0, stream=out)
    progress.disable()
    fit(tmp_path, progress, max_steps=2, enable_checkpointing=False)
    assert out.getvalue() == ""


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_s must be >= 0"):
        TextProgress(interval_s=-1)


def test_with_gradient_accumulation_a_line_is_an_optimiser_step(tmp_path: Path) -> None:
    out = io.StringIO()
    fit(tmp_path, TextProgress(interval_s=0, stream=out), max_steps=2, enable_checkpointing=False,
        accumulate_grad_batches=2)
    steps = [line.split(" |")[0] for line in out.getvalue().splitlines() if line.startswith("train step")]
    assert steps == ["train step 1/2 (50%)", "train step 2/2 (100%)"]


def windowed_loader(sizes: list[tuple[int, int]]) -> DataLoader:
    """One batch of blank images of ``sizes`` (``H, W``), each with a box, as ``RPNCollate`` pads them."""
    samples = [DetectionSample(image=np.zeros((h, w, 3), np.uint8), boxes=np.array([[10, 10, 50, 50]], np.float32),
                               image_id=index, source=f"blank {index}") for index, (h, w) in enumerate(sizes)]
    return DataLoader(samples, batch_size=len(samples), collate_fn=RPNCollate(assign_targets=False))


@pytest.mark.parametrize("loop", ["predict", "validate"])
def test_sliding_windows_print_inside_a_batch(tmp_path: Path, loop: str) -> None:
    """One large image is one batch of minutes (3 min 39 s for a 6000 x 4000 image on a CPU); its
    windows were silent until the batch ended."""
    torch.manual_seed(0)
    model = RPNModule(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)), pre_nms_top_n_test=100,
                      post_nms_top_n_test=50, sliding_window={"size": 128, "overlap": 32, "window_batch": 4})
    out = io.StringIO()
    trainer = Trainer(callbacks=[TextProgress(interval_s=0, stream=out)], logger=False, default_root_dir=tmp_path,
                      enable_model_summary=False)
    loader = windowed_loader([(300, 300), (128, 300)])  # 9 windows (3 x 3), then 3 (1 x 3)
    getattr(trainer, loop)(model, loader, **({"verbose": False} if loop == "validate" else {}))
    name = "validation" if loop == "validate" else "predict"
    lines = [line.split(" | elapsed")[0] for line in out.getvalue().splitlines()]
    assert lines[:5] == [f"{name}: batch 1/1, windows {done}/12" for done in (4, 8, 9, 12)] + [f"{name}: batch 1/1"]
    assert lines[5].startswith(f"{name}: done in")
    model.predict_images(np.zeros((300, 300, 3), np.uint8))  # outside the trainer's loops: silent
    assert len(out.getvalue().splitlines()) == 6
