"""The non-finite policy (training/nonfinite.py): raise naming the images, or skip the update,
counted, kept in checkpoints, agreed between DDP ranks (the 2-process run: test_ddp.py)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_rpn.core.loss import NonFiniteLossError
from lightning_rpn.training.nonfinite import NonFiniteLossPolicy

from helpers.model import WatchStep, collate_for, quiet_trainer, synthetic_samples, tiny_model, training_batches


def _fit(tmp_path, model, batches, callback) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=len(batches), limit_val_batches=0, callbacks=[callback])
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return trainer


@pytest.mark.parametrize("nan_gradient", [False, True], ids=["nan-loss", "nan-gradient"])
def test_skip_leaves_the_weights_untouched_and_training_goes_on(tmp_path, nan_gradient) -> None:
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0, nonfinite_loss="skip")
    watch = WatchStep(1, nan_gradient=nan_gradient)
    with pytest.warns(UserWarning, match="skipped training batch 1 .*b1-0"):
        trainer = _fit(tmp_path, model, training_batches(model, bad_index=None if nan_gradient else 1), watch)
    for name, value in watch.before.items():
        assert torch.equal(value, watch.after[name]), f"{name} changed in the skipped step"
    assert model.skipped_nonfinite_batches == 1
    assert float(trainer.callback_metrics["train/skipped_nonfinite_batches"]) == 1.0
    assert trainer.global_step == 4  # the remaining batches trained
    final = dict(model.named_parameters())
    assert any(not torch.equal(watch.after[n], final[n].detach()) for n in watch.after)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_raise_names_the_image_ids_of_the_non_finite_batch(tmp_path) -> None:
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0)
    with pytest.raises(ValueError, match=r"images \['b2-0', 'b2-1', 'b2-2', 'b2-3'\].*non-finite.*'skip'"):
        _fit(tmp_path, model, training_batches(model, bad_index=2), WatchStep(0))


def test_raise_on_a_non_finite_gradient_names_the_parameter_and_images(tmp_path) -> None:
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0)
    with pytest.raises(ValueError, match=r"gradient of rpn.head.bbox_deltas.weight .*images \['b1-0'"):
        _fit(tmp_path, model, training_batches(model), WatchStep(1, nan_gradient=True))


def test_skipped_count_survives_a_checkpoint(tmp_path) -> None:
    model = tiny_model(nonfinite_loss="skip")
    model.skipped_nonfinite_batches = 3
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    fresh = tiny_model(nonfinite_loss="skip")
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.skipped_nonfinite_batches == 3


def test_unknown_nonfinite_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="nonfinite_loss must be 'raise' or 'skip', got 'ignore'"):
        tiny_model(nonfinite_loss="ignore")


def test_skip_policy_still_raises_for_malformed_ground_truth() -> None:
    """Only a non-finite loss is skipped; a NaN gt box is a data error and stops training."""
    model = tiny_model(nonfinite_loss="skip")
    batch = collate_for(model)(synthetic_samples(2))
    batch.anchor_labels = batch.positive_deltas = None
    batch.gt_boxes[0] = torch.tensor([[1.0, float("nan"), 8.0, 9.0]])
    with pytest.raises(ValueError, match="non-finite coordinates") as caught:
        model.training_step(batch, 0)
    assert not isinstance(caught.value, NonFiniteLossError)
    assert model.skipped_nonfinite_batches == 0


def test_the_module_installs_its_policy_in_place_of_a_trainers(tmp_path) -> None:
    model = tiny_model(nonfinite_loss="skip")
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[NonFiniteLossPolicy("raise")])
    trainer.fit(model, DataLoader(training_batches(model)[:1], batch_size=None))
    policies = [c for c in trainer.callbacks if isinstance(c, NonFiniteLossPolicy)]
    assert policies == [model.nonfinite_policy] and policies[0].mode == "skip"


class _Strategy:
    """A stand-in for a DDP strategy whose other rank saw a non-finite loss."""

    def __init__(self, any_rank: bool) -> None:
        self.any_rank = any_rank
        self.asked: list[bool] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        assert all is False  # skip when any rank must
        self.asked.append(decision)
        return decision or self.any_rank


@pytest.mark.parametrize("another_rank", [False, True], ids=["all-finite", "another-rank-non-finite"])
def test_every_rank_skips_when_any_rank_saw_a_non_finite_loss(another_rank, monkeypatch) -> None:
    model = tiny_model(nonfinite_loss="skip")
    strategy = _Strategy(another_rank)
    monkeypatch.setattr(model, "_trainer", SimpleNamespace(strategy=strategy, current_epoch=0, global_step=0))
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    batch = collate_for(model)(synthetic_samples(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model.training_step(batch, 0)  # finite on this rank
    assert any("another process had a non-finite loss" in str(w.message) for w in caught) == another_rank
    assert strategy.asked == [False]
    loss.backward()
    assert model.skipped_nonfinite_batches == int(another_rank)
    # a batch skipped for another rank's loss backpropagates the zero loss here too: none of this
    # rank's gradient reaches DDP's all-reduce (or an accumulated step)
    nonzero = [bool(p.grad.abs().sum() > 0) for p in model.parameters() if p.requires_grad]
    assert any(nonzero) != another_rank


@pytest.mark.parametrize("bad", [[1], [0, 1]], ids=["one-of-two", "both"])
def test_with_accumulation_a_skipped_batch_leaves_the_rest_of_its_step(tmp_path, bad) -> None:
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0, nonfinite_loss="skip")
    batches = training_batches(model)
    for index in bad:
        batches[index].positive_deltas.fill_(float("nan"))
    watch = WatchStep(1)  # the second batch of the first step of two: the optimizer steps after it
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[watch])
    with pytest.warns(UserWarning, match="skipped training batch"):
        trainer.fit(model, DataLoader(batches, batch_size=None))
    assert model.skipped_nonfinite_batches == len(bad) and trainer.global_step == 2
    # the first step applied batch 0's gradient when only batch 1 was skipped, and nothing when both were
    changed = any(not torch.equal(watch.before[n], watch.after[n]) for n in watch.before)
    assert changed == (len(bad) == 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _nan_batches(model, bad: list[int]) -> list:
    batches = training_batches(model)
    for index in bad:
        batches[index].positive_deltas.fill_(float("nan"))
    return batches


def test_skip_stops_when_batches_keep_failing_in_a_row(tmp_path) -> None:
    """Weights that make every batch non-finite do not recover by skipping: the run stops, saying so."""
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0, nonfinite_loss="skip")
    model.nonfinite_policy.max_consecutive = 3
    with pytest.warns(UserWarning, match="skipped training batch"), \
            pytest.raises(ValueError, match=r"3 training batches in a row .*b2-0.*weights have most likely diverged"):
        _fit(tmp_path, model, _nan_batches(model, [0, 1, 2, 3]), WatchStep(0))
    assert model.skipped_nonfinite_batches == 3


def test_a_step_between_skips_starts_the_count_in_a_row_again(tmp_path) -> None:
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0, nonfinite_loss="skip")
    model.nonfinite_policy.max_consecutive = 3
    with pytest.warns(UserWarning, match="this fit skipped 3 training batches with a non-finite"):
        trainer = _fit(tmp_path, model, _nan_batches(model, [0, 1, 3]), WatchStep(0))
    assert model.skipped_nonfinite_batches == 3 and trainer.global_step == 4


def test_the_end_of_fit_names_the_skipped_count_only_when_there_were_some(tmp_path) -> None:
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0, nonfinite_loss="skip")
    model.skipped_nonfinite_batches = 5  # a resumed run's count
    with pytest.warns(UserWarning, match=r"this fit skipped 1 training batch \(6 since the run began\)"):
        _fit(tmp_path / "a", model, training_batches(model, bad_index=2), WatchStep(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "b", model, training_batches(model), WatchStep(0))
    assert not any("this fit skipped" in str(w.message) for w in caught)
