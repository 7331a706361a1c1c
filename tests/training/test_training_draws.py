"""Training's random draws depend on the seed only: not on the sanity check, on how often fit
validates, on whether the compiled kernels were loaded before, on the number of workers or
processes, or on an interruption (a resumed epoch trains the items it had left, as drawn)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers.model import quiet_trainer, tiny_model
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_rpn.core.cpu_kernels import load_kernels
from lightning_rpn.training.callbacks import LastCheckpoint
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


FLIPS_AND_COLOURS = [{"HorizontalFlip": {"p": 0.5}}, {"RandomBrightnessContrast": {"p": 0.5}}]


def _draws(monkeypatch: pytest.MonkeyPatch, seed: int = 7, **options: object) -> RPNDataModule:
    monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))  # what seed_everything sets
    data = RPNDataModule(**{**dict(synthetic_train_images=12, synthetic_val_images=2, synthetic_min_size=64,
                                   synthetic_max_size=96, batch_size=2, num_workers=0,
                                   train_transforms=FLIPS_AND_COLOURS), **options})  # type: ignore[arg-type]
    data.setup("fit")
    return data


def _items(data: RPNDataModule) -> list[tuple[object, bytes]]:
    """(image id, padded image bytes) of every image of an epoch of the training loader, in order."""
    out = []
    for batch in data.train_dataloader():
        for i, image_id in enumerate(batch.image_ids):
            height, width = batch.image_sizes[i]
            out.append((image_id, batch.images[i, :, :height, :width].numpy().tobytes()))
    return out


def test_workers_draw_the_items_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    single = _items(_draws(monkeypatch))
    assert sorted(image_id for image_id, _ in single) == list(range(12))
    assert [image_id for image_id, _ in single] != list(range(12))
    assert _items(_draws(monkeypatch, num_workers=2)) == single  # before: each worker its own augmentations
    assert _items(_draws(monkeypatch, seed=8)) != single


def _rank(data: RPNDataModule, rank: int, world_size: int) -> RPNDataModule:
    data.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, lightning_module=None,  # type: ignore
                                   fit_loop=SimpleNamespace(restarting=False), current_epoch=0,
                                   strategy=SimpleNamespace(broadcast=lambda value: value))
    return data


def test_processes_share_one_epoch_each_item_drawn_as_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    single = dict(_items(_draws(monkeypatch)))
    shares = [_items(_rank(_draws(monkeypatch), rank, 2)) for rank in (0, 1)]
    assert sorted(image_id for share in shares for image_id, _ in share) == list(range(12))
    assert all(single[image_id] == image for share in shares for image_id, image in share)


def test_a_restored_position_trains_the_rest_of_the_epoch_as_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _items(_draws(monkeypatch))
    resumed = _draws(monkeypatch, seed=99)  # another seed_everything: the checkpoint's seed wins
    resumed.load_state_dict({"draws": {"epoch": 0, "done": 4, "finished": False, "seed": 7}})
    assert _items(resumed) == whole[4:]
    older = _draws(monkeypatch)  # a tiled checkpoint of before 2026-12-07: its position, today's seed
    older.load_state_dict({"tiles": {"epoch": 0, "done": 6, "finished": False}})
    assert _items(older) == whole[6:]


def test_passes_of_ones_own_loop_draw_new_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    # a loop of one's own (no set_epoch between passes) gets a new order and new augmentations each pass
    loader = _draws(monkeypatch).train_dataloader()
    passes = [[(tuple(batch.image_ids), batch.images.sum().item()) for batch in loader] for _ in range(2)]
    assert passes[0] != passes[1]
    assert sorted(i for ids, _ in passes[1] for i in ids) == list(range(12))


def _fitting(data: RPNDataModule, fn: TrainerFn = TrainerFn.FITTING) -> RPNDataModule:
    data.trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), world_size=1, global_rank=0,  # type: ignore
                                   lightning_module=None, fit_loop=SimpleNamespace(restarting=False), current_epoch=0)
    return data


def test_a_resumed_fit_keeps_its_checkpoints_seed_and_an_evaluation_takes_none(monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"draws": {"epoch": 0, "done": 4, "finished": False, "seed": 7}}
    evaluated = _fitting(_draws(monkeypatch, seed=99), TrainerFn.VALIDATING)
    evaluated.load_state_dict(state)  # validate(ckpt_path=...) restores the data module too
    evaluated.setup("fit")
    evaluated.trainer = None  # type: ignore[assignment]
    assert _items(evaluated) == _items(_draws(monkeypatch, seed=99))  # a later fit of its own, from its start
    resumed = _fitting(_draws(monkeypatch, seed=99))
    resumed.setup("fit")
    resumed.load_state_dict(state)
    first = _items(resumed)
    again = _items(resumed)  # reload_dataloaders_every_n_epochs: the checkpoint's seed, from the epoch's start
    assert resumed._draw_seed == 7 and again[4:] == first
    resumed.setup("fit")  # the next fit of this data module draws from its own seed again
    assert resumed._draw_seed is None


class _StopBefore(Callback):
    """Ctrl-C as the batch of global step ``step`` starts (fetched, not trained)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def _fit_to_six(tmp_path: Path, callbacks: list, ckpt_path: str | None = None) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    model = tiny_model()
    data = RPNDataModule(synthetic_train_images=8, synthetic_val_images=2, synthetic_min_size=64,
                         synthetic_max_size=96, batch_size=2, num_workers=0)
    trainer = quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_a_ctrl_c_in_an_epochs_last_batch_resumes_with_that_batch(tmp_path: Path) -> None:
    # Lightning marks the last batch as it fetches it; the checkpoint took the epoch for over, and the
    # resume trained epoch 0's first batch again in place of its last (72 tensors differed)
    whole = _fit_to_six(tmp_path / "whole", [])
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C
        _fit_to_six(tmp_path / "cut", [LastCheckpoint(dirpath=tmp_path / "ck"), _StopBefore(3)])
    assert torch.load(tmp_path / "ck/last.ckpt", weights_only=True)["global_step"] == 3
    resumed = _fit_to_six(tmp_path / "cut", [LastCheckpoint(dirpath=tmp_path / "ck")], str(tmp_path / "ck/last.ckpt"))
    assert all(torch.equal(resumed[key], whole[key]) for key in whole)
