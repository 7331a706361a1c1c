"""One RPNDataModule reused for several models (a sweep in a notebook): each fit, validate and predict
uses its model's anchor setup, exactly as a fresh data module would; what the user gave is still checked.

The data module used to write the first model's values into its own settings, then refused the next
model ("data.anchor_generator ... disagrees with the model's") or kept sampling with the old seed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers.model import quiet_trainer, tiny_model

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.targets import AnchorTargetConfig
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.module import RPNModule

OTHER_ANCHORS = ((24,), (48,), (96,), (192,))


def data(**kwargs: object) -> RPNDataModule:
    args = dict(synthetic_train_images=4, synthetic_val_images=2, batch_size=2, num_workers=0,
                synthetic_min_size=64, synthetic_max_size=96, train_transforms=[])
    return RPNDataModule(**{**args, **kwargs})  # type: ignore[arg-type]


class FirstValBatch(pl.Callback):
    """Keeps the first validation batch: its anchor targets show the setup the loader's collate used."""

    def __init__(self) -> None:
        self.batch: RPNBatch | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.batch is None:
            self.batch = batch


def fit(model: RPNModule, dm: RPNDataModule, tmp_path: Path) -> RPNBatch:
    """Fit one step, validate one batch; the validation batch."""
    seen = FirstValBatch()
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[seen]).fit(model, datamodule=dm)
    assert seen.batch is not None
    return seen.batch


def validate(model: RPNModule, dm: RPNDataModule, tmp_path: Path) -> RPNBatch:
    seen = FirstValBatch()
    quiet_trainer(tmp_path, limit_val_batches=1, callbacks=[seen]).validate(model, datamodule=dm, verbose=False)
    assert seen.batch is not None
    return seen.batch


def assert_same_targets(a: RPNBatch, b: RPNBatch) -> None:
    assert torch.equal(a.anchor_labels, b.anchor_labels)
    assert torch.equal(a.target_deltas, b.target_deltas)


@pytest.mark.parametrize("change", [
    {"anchor_sizes": OTHER_ANCHORS},
    {"fg_iou": 0.6},
    {"anchor_sampling_seed": 7},
], ids=["anchors", "target_config", "seed"])
def test_a_second_fit_with_the_same_data_module_uses_the_second_models_setup(
    tmp_path: Path, change: dict[str, object]
) -> None:
    dm = data()
    fit(tiny_model(), dm, tmp_path)
    second = tiny_model(**change)
    reused, collate = fit(second, dm, tmp_path), dm.collate
    assert collate.seed == second.rpn.seed
    assert_same_targets(reused, fit(second, data(), tmp_path))  # what a fresh data module gives
    assert collate.anchor_generator is second.anchor_generator and collate.target_config is second.target_config


def test_validate_and_predict_after_fit_use_the_other_models_setup(tmp_path: Path) -> None:
    dm = data()
    fit(tiny_model(), dm, tmp_path)
    other = tiny_model(fg_iou=0.6, anchor_sampling_seed=7, anchor_sizes=OTHER_ANCHORS)
    assert_same_targets(validate(other, dm, tmp_path), validate(other, data(), tmp_path))
    predictions = quiet_trainer(tmp_path, limit_predict_batches=1).predict(other, datamodule=dm)
    assert predictions and dm.anchor_generator is other.anchor_generator


def test_workers_get_the_reused_data_modules_setup(tmp_path: Path) -> None:
    # the workers unpickle the loader's collate: it must carry the second model's setup
    dm = data(num_workers=1)
    fit(tiny_model(), dm, tmp_path)
    second = tiny_model(anchor_sizes=OTHER_ANCHORS, anchor_sampling_seed=7)
    assert_same_targets(fit(second, dm, tmp_path), fit(second, data(), tmp_path))


def test_a_users_own_value_is_still_checked_against_each_model(tmp_path: Path) -> None:
    dm = data(target_config=AnchorTargetConfig())  # the models' default rule, given explicitly
    fit(tiny_model(), dm, tmp_path)
    fit(tiny_model(anchor_sizes=OTHER_ANCHORS), dm, tmp_path)  # the anchors are still the model's to set
    assert dm.given_anchor_setup.anchor_generator is None
    with pytest.raises(ValueError, match=r"data\.target_config=.*'fg_iou': 0\.7.*disagrees.*'fg_iou': 0\.6"):
        fit(tiny_model(fg_iou=0.6), dm, tmp_path)


def test_a_disagreeing_anchor_generator_is_refused_after_reuse(tmp_path: Path) -> None:
    first = tiny_model()
    dm = data()
    fit(first, dm, tmp_path)
    dm.anchor_generator = AnchorGenerator(OTHER_ANCHORS, (0.5, 1.0, 2.0), (4, 8, 16, 32))  # the user's own
    with pytest.raises(ValueError, match=r"data\.anchor_generator .*24\.0.*disagrees.*16\.0"):
        fit(first, dm, tmp_path)
    fit(tiny_model(anchor_sizes=OTHER_ANCHORS), dm, tmp_path)  # agrees with it


def test_each_model_pads_to_its_own_size_divisibility() -> None:
    # the first model's 32 used to become the data module's own, then "not a multiple of" the next 64
    dm = data()
    for divisor in (32, 64, 32):
        dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(size_divisibility=divisor))  # type: ignore[assignment]
        dm.setup("validate")
        assert dm.collate.size_divisibility == divisor
