"""A minimal LightningModule exposing what RPNDataModule reads from a model."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.config import AnchorTargetConfig
from lightning_rpn.data.batch import RPNBatch

ANCHORS = AnchorGenerator(((16,), (32,), (64,)), (0.5, 1.0, 2.0), (8, 16, 32))


class TinyModule(pl.LightningModule):
    """Consumes RPNBatch; exposes the attributes the data module reads."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Conv2d(3, 1, 1)
        self.anchor_generator = ANCHORS
        self.target_config = AnchorTargetConfig()
        self.box_coder = BoxCoder()
        self.size_divisibility = 32

    def training_step(self, batch: RPNBatch, batch_idx: int) -> torch.Tensor:
        assert batch.anchor_labels is not None and batch.images.device == self.device
        assert batch.positive_deltas is not None and batch.positive_deltas.device == self.device
        assert batch.target_deltas.shape == (*batch.anchor_labels.shape, 4)
        return self.layer(batch.images.float()).mean()

    def validation_step(self, batch: RPNBatch, batch_idx: int) -> None:
        assert batch.anchor_labels is not None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)
