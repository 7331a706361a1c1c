"""Anchor sampling per epoch through a real fit: fresh samples every epoch, persistent workers, resume."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

import lightning_rpn.core.rpn as rpn_module
from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.module import RPNModule

TINY = dict(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)), warmup_steps=2, lr=1e-3)


class _Record(pl.Callback):
    """The image ids of the batch in flight and the epoch its collate sampled it for."""

    def __init__(self) -> None:
        self.image_ids: list = []
        self.sampling_epochs: list[tuple[int, int | None]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.image_ids = list(batch.image_ids)
        self.sampling_epochs.append((trainer.current_epoch, batch.sampling_epoch))


def _fit(tmp_path, monkeypatch: pytest.MonkeyPatch, max_epochs: int, ckpt_path: str | None = None):
    """``{(epoch, image_id): anchor labels the loss used}`` and the recorder of one ``fit``."""
    record = _Record()
    used: dict[tuple[int, int | str], torch.Tensor] = {}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[record], default_root_dir=tmp_path)
    real_loss = rpn_module.rpn_loss

    def recording_loss(objectness, deltas, labels, *args, **kwargs):
        for image_id, row in zip(record.image_ids, labels):
            used[(trainer.current_epoch, image_id)] = row.clone()
        return real_loss(objectness, deltas, labels, *args, **kwargs)

    monkeypatch.setattr(rpn_module, "rpn_loss", recording_loss)
    pl.seed_everything(0)
    # no augmentation and one fixed size: an image's anchors and matches are the same every epoch
    data = RPNDataModule(synthetic_train_images=8, synthetic_val_images=2, synthetic_min_size=48,
                         synthetic_max_size=64, batch_size=4, num_workers=1, train_transforms=[],
                         resize="fixed", fixed_size=[64, 64])
    trainer.fit(RPNModule(**TINY), datamodule=data, ckpt_path=ckpt_path)
    return used, record, trainer


def test_epochs_sample_afresh_in_persistent_workers_and_resume_reproducibly(tmp_path, monkeypatch) -> None:
    straight, record, _ = _fit(tmp_path / "a", monkeypatch, max_epochs=2)
    assert sorted(set(record.sampling_epochs)) == [(0, 0), (1, 1)]  # the workers followed the epoch
    ids = sorted({image_id for _, image_id in straight}, key=str)
    assert len(ids) == 8
    for image_id in ids:  # the same image, matched alike, sampled afresh
        first, second = straight[(0, image_id)], straight[(1, image_id)]
        assert (first == 1).sum() == (second == 1).sum() and (first != -1).sum() == (second != -1).sum()
        assert not torch.equal(first, second), image_id

    _, _, one_epoch = _fit(tmp_path / "b", monkeypatch, max_epochs=1)
    one_epoch.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, record, _ = _fit(tmp_path / "c", monkeypatch, max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    # batches prefetched before the epoch start may carry epoch 0 targets; the model re-assigns those
    assert {epoch for epoch, _ in record.sampling_epochs} == {1}
    assert set(resumed) == {(1, image_id) for image_id in ids}
    for key, labels in resumed.items():
        assert torch.equal(labels, straight[key]), key


def test_a_batch_sampled_for_another_epoch_is_reassigned_in_the_model() -> None:
    """What a batch prefetched before ``on_train_epoch_start`` (just after a resume) gets."""
    torch.manual_seed(0)
    model = RPNModule(**TINY).train()
    dataset = SyntheticShapes(2, min_size=48, max_size=64, max_shapes=3, split="stale")
    samples = [dataset[i] for i in range(2)]
    collate = RPNCollate(model.anchor_generator, model.target_config, model.box_coder, model.size_divisibility,
                         seed=model.rpn.seed)
    stale = collate(samples)
    collate.set_epoch(1)
    fresh = collate(samples)
    model._trainer = SimpleNamespace(current_epoch=1)  # current_epoch without a whole Trainer
    assert model.current_epoch == 1
    with torch.no_grad():
        _, from_stale = model(stale, need_proposals=False)
        _, from_fresh = model(fresh, need_proposals=False)
        model._trainer = SimpleNamespace(current_epoch=0)
        _, epoch_0 = model(stale, need_proposals=False)
    assert torch.equal(from_stale["loss_rpn_cls"], from_fresh["loss_rpn_cls"])
    assert torch.equal(from_stale["loss_rpn_reg"], from_fresh["loss_rpn_reg"])
    assert not torch.equal(epoch_0["loss_rpn_cls"], from_fresh["loss_rpn_cls"])
