"""``fit --ckpt_path`` with other trainable backbone parameters: the setting named, not torch's
"parameter group that doesn't match"; evaluating the checkpoint with them still works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_rpn.core.backbones import build_backbone
from helpers.model import quiet_trainer, tiny_model, training_batches

RESNET_ANCHORS = ((16,), (32,), (64,), (128,), (256,))


def _checkpoint(tmp_path: Path, settings: dict[str, Any]) -> tuple[Path, list]:
    """A checkpoint of one training step with ``settings``, and the batches it trained on."""
    model = tiny_model(**settings)
    batches = training_batches(model)[:1]
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, DataLoader(batches, batch_size=None))
    path = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(path)
    return path, batches


def _tiny_weights(tmp_path: Path) -> str:
    path = tmp_path / "tiny.pth"
    torch.save(build_backbone("tiny_fpn").state_dict(), path)
    return str(path)


@pytest.mark.parametrize("case", ["trainable_layers", "frozen_bn"])
def test_a_resume_that_trains_other_backbone_parameters_names_the_setting(tmp_path: Path, case: str) -> None:
    if case == "trainable_layers":  # pretrained tiny_fpn: 3 of 5 stages train, then all 5
        trained = {"weights": _tiny_weights(tmp_path)}
        resumed = {**trained, "trainable_layers": 5}
        expected = r"trainable_layers: checkpoint None, this run 5; so trainable backbone stages of 5: checkpoint 3"
    else:  # resnet18_fpn from scratch: trainable BatchNorm, then FrozenBatchNorm2d
        trained = {"backbone": "resnet18_fpn", "anchor_sizes": RESNET_ANCHORS}
        resumed = {**trained, "frozen_bn": True}
        expected = (r"frozen_bn: checkpoint None, this run True; so the backbone's batch norm: checkpoint "
                    r"BatchNorm2d, this run FrozenBatchNorm2d")
    path, batches = _checkpoint(tmp_path, trained)
    with pytest.raises(ValueError, match=rf"fit cannot resume the checkpoint {path} with other trainable parameters "
                                         rf".*\({expected}.*Resume with the checkpoint's model.weights"):
        quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(
            tiny_model(**resumed), DataLoader(batches, batch_size=None), ckpt_path=str(path))
    # evaluation loads the weights either way (FrozenBatchNorm2d and BatchNorm2d read each other's)
    quiet_trainer(tmp_path).validate(tiny_model(**resumed), DataLoader(batches, batch_size=None), ckpt_path=str(path))
    # the same settings resume
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(tiny_model(**trained), DataLoader(batches, batch_size=None), ckpt_path=str(path))
    assert trainer.global_step == 2
