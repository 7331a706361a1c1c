"""Training's draws under a real Trainer's options: ``overfit_batches`` trains the same images with
each epoch's own augmentations, and the training loader tells Lightning it is resumable without
silencing Lightning's warning about a non-resumable loader of one's own."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers.model import quiet_trainer, tiny_model
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_rpn.training.datamodule import RPNDataModule

FLIPS_AND_COLOURS = [{"HorizontalFlip": {"p": 0.5}}, {"RandomBrightnessContrast": {"p": 0.5}}]
NOT_RESUMABLE = "dataloader is not resumable"


def small_data(batch_size: int = 2) -> RPNDataModule:
    return RPNDataModule(synthetic_train_images=8, synthetic_val_images=2, synthetic_min_size=64,
                         synthetic_max_size=96, batch_size=batch_size, num_workers=0,
                         train_transforms=FLIPS_AND_COLOURS)


class _Batches(pl.Callback):
    """(epoch, image ids, image bytes) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple, bytes]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, tuple(batch.image_ids), batch.images.numpy().tobytes()))


def _batches(tmp_path: Path, **trainer_options: object) -> list[tuple[int, tuple, bytes]]:
    pl.seed_everything(0)
    batches = _Batches()
    trainer = quiet_trainer(tmp_path, limit_val_batches=0, callbacks=[batches], **trainer_options)
    trainer.fit(tiny_model(), datamodule=small_data())
    return batches.seen


def test_overfit_batches_trains_the_same_images_with_each_epochs_own_augmentations(tmp_path: Path) -> None:
    # Lightning replaced the sampler with a SequentialSampler over epoch 0's indices, and the index
    # seeds the augmentation: every epoch was epoch 0's batch, pixel for pixel. A project of one's
    # own (a shuffled DataLoader, a random pipeline) gets its first images again with new augmentations.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        overfit = _batches(tmp_path / "overfit", max_epochs=4, overfit_batches=1)
    assert [epoch for epoch, _, _ in overfit] == [0, 1, 2, 3]
    assert len({ids for _, ids, _ in overfit}) == 1  # the same images every epoch
    assert len({images for _, _, images in overfit}) == 4  # each epoch augmented anew
    # Lightning no longer swaps the sampler, nor warns that it turns off a shuffling there was not
    assert not any("overfit but enabled train dataloader shuffling" in str(w.message) for w in caught)
    # the images of a run's first batch, augmented as that run's first epoch is
    first = _batches(tmp_path / "whole", max_epochs=1, limit_train_batches=1)
    assert first[0][1:] == overfit[0][1:]


def _user_resumes_inside_an_epoch(root: Path) -> bool:
    """Whether resuming a user's own loader (not resumable) inside an epoch warns, under the
    process's warning filters as they are."""
    trainer = quiet_trainer(root, max_steps=3, limit_val_batches=0)
    trainer.fit(BoringModel())  # 64 batches an epoch
    trainer.save_checkpoint(root / "mid.ckpt")
    with warnings.catch_warnings(record=True) as caught:  # records what the filters let through
        quiet_trainer(root, max_steps=5, limit_val_batches=0).fit(BoringModel(), ckpt_path=root / "mid.ckpt")
    return any(NOT_RESUMABLE in str(w.message) for w in caught)


def test_our_loader_resumes_without_lightnings_warning_and_a_users_own_still_warns(tmp_path: Path) -> None:
    # the data module filtered the warning out for the whole process as it made its training loader
    pl.seed_everything(0)
    trainer = quiet_trainer(tmp_path / "ours", max_steps=2, limit_val_batches=0)
    trainer.fit(tiny_model(), datamodule=small_data())  # 4 batches an epoch
    trainer.save_checkpoint(tmp_path / "ours.ckpt")
    resumed = tiny_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path / "ours", max_steps=3, limit_val_batches=0).fit(
            resumed, datamodule=small_data(), ckpt_path=tmp_path / "ours.ckpt")
    assert resumed.global_step == 3
    assert not any(NOT_RESUMABLE in str(w.message) for w in caught)
    assert _user_resumes_inside_an_epoch(tmp_path / "user")  # later in the same process
    # the loader's state is empty (the position is the data module's): left out of the checkpoint, so
    # that a training loader of one's own that is not resumable can resume it, as before
    loops = torch.load(tmp_path / "ours.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert "combined_loader" not in loops
    assert "draws" in torch.load(tmp_path / "ours.ckpt", weights_only=True)["RPNDataModule"]
