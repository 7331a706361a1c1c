"""The schedule against the run's length, and a resumed fit against the checkpoint's optimiser.

- A warm-up at least as long as the run (the default 1000 steps, the COCO recipe's, in a short
  run) never reaches ``model.lr``, and a milestone at or past its end never decays it: both warned,
  against the step this run ends at, also when it resumes with a longer budget.
- Resuming with another ``model.optimizer`` stopped at the first step with a bare ``KeyError``
  (``'step'`` / ``'momentum'``): refused before training, naming both values.
- A resumed fit kept the checkpoint's weight decays and momentum (torch restores every group
  setting) while its notice said the run follows its own config.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.model import quiet_trainer, tiny_model, training_batches
from lightning_rpn.training.checkpoint_agreement import check_resume_agrees
from lightning_rpn.training.module import RPNModule
from lightning_rpn.training.optim import LRSchedule, RunLambdaLR, warn_if_schedule_outlasts_run


def _schedule_warnings(model: RPNModule, trainer: pl.Trainer) -> list[str]:
    """The schedule warnings ``model.configure_optimizers()`` gives under ``trainer``."""
    model.trainer = trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.configure_optimizers()
    return [str(w.message) for w in caught if "model.warmup_steps" in str(w.message)
            or "model.milestones" in str(w.message)]


def test_a_warmup_as_long_as_the_run_is_warned_with_the_lr_it_reaches(tmp_path: Path) -> None:
    # a config with lr_schedule cosine and no warmup_steps: 1000 steps of warm-up in a 300-step run
    model = tiny_model(optimizer="adamw", lr=1e-3, lr_schedule="cosine", warmup_steps=1000)
    (message,) = _schedule_warnings(model, quiet_trainer(tmp_path, max_steps=300))
    assert "model.warmup_steps=1000 is not shorter than this run, which ends at optimizer step 300" in message
    assert "the learning rate peaks at 0.079 x model.lr" in message
    assert message.endswith("the default 1000 is the COCO recipe's")
    (own,) = _schedule_warnings(tiny_model(lr_schedule="cosine", warmup_steps=400), quiet_trainer(tmp_path, max_steps=300))
    assert "model.warmup_steps=400" in own and "default" not in own  # a value of the config's own: no word of the default
    assert "below 300 (e.g. 30, a tenth of the run)" in own
    (tiny,) = _schedule_warnings(tiny_model(lr_schedule="cosine", warmup_steps=10), quiet_trainer(tmp_path, max_steps=5))
    assert "below 5 (e.g. 0: no warm-up in so short a run)" in tiny  # was "e.g. 0, a tenth of the run"
    # SGD, multi-step: the warm-up and both default milestones
    messages = _schedule_warnings(tiny_model(warmup_steps=1000), quiet_trainer(tmp_path, max_steps=300))
    assert len(messages) == 2
    assert "peaks at 0.3 x model.lr" in messages[0]
    assert "model.milestones=[60000, 80000]: 60000, 80000 are not before the optimizer step this run ends at (300" \
        in messages[1]


def test_a_schedule_inside_the_run_or_a_run_of_unknown_length_is_not_warned(tmp_path: Path) -> None:
    fits = tiny_model(warmup_steps=10, milestones=(20, 30))
    assert _schedule_warnings(fits, quiet_trainer(tmp_path, max_steps=31)) == []
    one_late = _schedule_warnings(tiny_model(warmup_steps=10, milestones=(20, 31)),
                                  quiet_trainer(tmp_path, max_steps=31))
    assert len(one_late) == 1 and "model.milestones=[20, 31]: 31 is not before" in one_late[0]
    unbounded = quiet_trainer(tmp_path, max_steps=-1, max_epochs=-1)
    assert _schedule_warnings(tiny_model(warmup_steps=1000), unbounded) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model(warmup_steps=1000).configure_optimizers()  # multi-step, built by hand: no run to compare
        warn_if_schedule_outlasts_run(LRSchedule(5, 0.1, "cosine", (1,), 0.1, 10, 0.0), 10)  # cosine: no milestones


def test_a_resume_notice_names_only_the_settings_the_schedule_reads(caplog: pytest.LogCaptureFixture) -> None:
    # a cosine run resumed as multistep: its unused total_steps (0) is no change to name
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cosine = RunLambdaLR(optimizer, LRSchedule(0, 1.0, "cosine", (), 0.1, total_steps=6, min_factor=0.0))
    saved = cosine.state_dict()
    multistep = RunLambdaLR(optimizer, LRSchedule(0, 1.0, "multistep", (8, 10), 0.1, total_steps=0, min_factor=0.0))
    with caplog.at_level(logging.INFO):
        multistep.load_state_dict(saved)
    notice = " ".join(record.getMessage() for record in caplog.records)
    assert "kind 'cosine' -> 'multistep'" in notice and "milestones () -> (8, 10)" in notice
    assert "total_steps" not in notice and "min_factor" not in notice


class _RecordGroups(pl.Callback):
    """The optimiser's state when the (resumed) fit starts training."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict())  # training updates it in place


def _fit(tmp_path: Path, model: RPNModule, batches: list, steps: int, ckpt_path: Path | None = None,
         callbacks: list | None = None) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=callbacks or [])
    trainer.fit(model, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def _checkpoint(tmp_path: Path, **settings: Any) -> tuple[Path, list]:
    """A checkpoint after 2 steps of the tiny model with ``settings``, and the batches it trains on."""
    torch.manual_seed(0)
    model = tiny_model(**settings)
    batches = training_batches(model)
    trainer = _fit(tmp_path, model, batches, 2)
    path = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(path)
    return path, batches


def test_a_warmup_warned_in_a_short_run_is_not_warned_when_resumed_past_it(tmp_path: Path) -> None:
    short = r"model.warmup_steps=3 is not shorter than this run, which ends at optimizer step 2"
    with pytest.warns(UserWarning, match=short):
        path, batches = _checkpoint(tmp_path, warmup_steps=3, milestones=(3,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, tiny_model(warmup_steps=3, milestones=(3,)), batches, 4, path)
    assert trainer.global_step == 4
    assert not [w for w in caught if "model.warmup_steps" in str(w.message) or "model.milestones" in str(w.message)]


@pytest.mark.parametrize(("trained", "resumed"), [("sgd", "adamw"), ("adamw", "sgd")])  # were KeyError 'step', 'momentum'
def test_resuming_with_another_optimizer_names_both(tmp_path: Path, trained: str, resumed: str) -> None:
    path, batches = _checkpoint(tmp_path, optimizer=trained, lr=1e-3)
    refused = (rf"fit cannot resume the checkpoint {re.escape(str(path))} with another optimizer .*\(model.optimizer: checkpoint "
               rf"'{trained}', this run '{resumed}'.*Resume with --model.optimizer {trained} .*start a new fit")
    with pytest.raises(ValueError, match=refused):
        _fit(tmp_path, tiny_model(optimizer=resumed, lr=1e-3), batches, 3, path)
    # what the message offers instead: a new fit from the checkpoint's weights
    model = RPNModule.load_from_checkpoint(path, optimizer=resumed)
    assert _fit(tmp_path, model, batches, 1).global_step == 1


def test_another_optimizer_is_refused_whatever_the_backbone() -> None:
    custom = {"class_path": "my.Backbone", "init_args": {}}
    with pytest.raises(ValueError, match=r"model.optimizer: checkpoint 'sgd', this run 'adamw'"):
        check_resume_agrees({"backbone": custom, "optimizer": "sgd"}, {"backbone": custom, "optimizer": "adamw"}, 5)
    check_resume_agrees({"backbone": "tiny_fpn"}, {"backbone": "tiny_fpn", "optimizer": "adamw"}, 5)  # not recorded


def test_a_backbone_of_ones_own_resumed_with_another_optimizer_is_refused(tmp_path: Path) -> None:
    from helpers.backbone_probes import ProbeFPN

    def model(optimizer: str) -> RPNModule:
        torch.manual_seed(0)
        backbone = ProbeFPN()
        sizes = ((16,), (32,), (64,), (128,))[:len(backbone.strides)]
        return RPNModule(backbone=backbone, anchor_sizes=sizes, optimizer=optimizer, lr=1e-3, warmup_steps=0)

    trained = model("sgd")
    batches = training_batches(trained)
    path = tmp_path / "custom.ckpt"
    _fit(tmp_path, trained, batches, 1).save_checkpoint(path)
    with pytest.raises(ValueError, match=r"model.optimizer: checkpoint 'sgd', this run 'adamw'"):  # was KeyError 'step'
        _fit(tmp_path, model("adamw"), batches, 3, path)


def test_a_resumed_fit_takes_this_runs_weight_decays_and_momentum(tmp_path: Path, caplog) -> None:
    path, batches = _checkpoint(tmp_path, lr=0.01, weight_decay=1e-4, norm_weight_decay=0.0, momentum=0.9)
    groups = _RecordGroups()
    resumed = tiny_model(lr=0.01, weight_decay=0.05, norm_weight_decay=0.01, momentum=0.5)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, resumed, batches, 3, path, [groups])
    settings = [(group["weight_decay"], group["momentum"]) for group in groups.state["param_groups"]]
    assert settings == [(0.05, 0.5), (0.01, 0.5)]  # the other parameters, the normalisation layers
    notice = " ".join(caplog.text.split())
    assert "weight decays and momentum follow this run's config" in notice
    assert "weight_decay [0.0001, 0.0] -> [0.05, 0.01], momentum [0.9, 0.9] -> [0.5, 0.5]" in notice
    # the momentum buffers are the checkpoint's: only the settings changed
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]["state"]
    assert groups.state["state"].keys() == saved.keys()
    assert all(torch.equal(groups.state["state"][k]["momentum_buffer"], saved[k]["momentum_buffer"]) for k in saved)


def test_an_unchanged_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, caplog) -> None:
    settings = dict(lr=0.01, weight_decay=1e-3, norm_weight_decay=1e-4, momentum=0.9, warmup_steps=1,
                    milestones=(3,))
    path, batches = _checkpoint(tmp_path, **settings)
    groups = _RecordGroups()
    resumed = tiny_model(**settings)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, resumed, batches, 4, path, [groups])
    assert "follow this run's config" not in caplog.text  # nothing differs
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]
    assert groups.state["param_groups"] == saved["param_groups"]
    torch.manual_seed(0)  # the checkpoint's initial weights
    uninterrupted = tiny_model(**settings)
    _fit(tmp_path, uninterrupted, batches, 4)
    for (name, value), other in zip(resumed.state_dict().items(), uninterrupted.state_dict().values(), strict=True):
        assert torch.equal(value, other), name


def test_a_cosine_run_without_an_end_is_a_setting_error_naming_the_way_out() -> None:
    # a traceback before; its "both are unlimited" was wrong for limit_train_batches 0 with max_epochs set
    from lightning_rpn.core.config import OptimConfig, SettingError
    from lightning_rpn.training.optim import configure_optimization

    with pytest.raises(SettingError, match=r"no step count to end at .* use --model.lr_schedule multistep"):
        configure_optimization(OptimConfig(lr_schedule="cosine"), torch.nn.Linear(2, 2), lambda: float("inf"))
