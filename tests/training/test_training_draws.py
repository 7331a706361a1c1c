"""Training's random draws depend on the seed only: not on the sanity check, on how often fit
validates, or on whether the compiled kernels were loaded before."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.model import quiet_trainer, tiny_model

from lightning_rpn.core.cpu_kernels import load_kernels
from lightning_rpn.training.datamodule import RPNDataModule


def small_data() -> RPNDataModule:
    return RPNDataModule(synthetic_train_images=8, synthetic_val_images=4, synthetic_min_size=64,
                         synthetic_max_size=96, batch_size=4, num_workers=0)


def test_loading_the_kernels_leaves_torchs_random_state_alone() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    load_kernels()
    assert torch.equal(torch.get_rng_state(), before)


def test_evaluation_loaders_leave_torchs_random_state_alone() -> None:
    data = small_data()
    data.setup("fit")
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert sum(len(batch) for batch in data.val_dataloader()) == 4
    assert torch.equal(torch.get_rng_state(), before)
    next(iter(data.train_dataloader()))  # training's loader does draw (its shuffle and worker seeds)
    assert not torch.equal(torch.get_rng_state(), before)


def _fit(tmp_path: Path, **trainer_options: object) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    model = tiny_model()
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1, **trainer_options)
    trainer.fit(model, datamodule=small_data())
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_the_sanity_check_and_the_validation_cadence_leave_training_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a validation's loader took a draw from torch's RNG as it started, so a sanity check (whose
    # collate also loaded the kernels inside Lightning's isolated RNG) or another validation interval
    # trained other weights from the same seed
    reference = _fit(tmp_path / "a")
    with caplog.at_level(logging.INFO):
        with_sanity_check = _fit(tmp_path / "b", num_sanity_val_steps=1)
    every_other_epoch = _fit(tmp_path / "c", check_val_every_n_epoch=2)
    for weights in (with_sanity_check, every_other_epoch):
        assert all(torch.equal(weights[key], reference[key]) for key in reference)
    # the sanity check's batch is validation's: it is not counted as one more validation image
    report = next(r.getMessage() for r in caplog.records if "data report" in r.getMessage())
    assert "validate: 12 images" in report and "sanity" not in report
