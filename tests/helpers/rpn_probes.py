"""What the RPN's in-model path assigns for a batch, for tests comparing it with the workers'."""

from __future__ import annotations

import torch

from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.training.module import RPNModule


def in_model_anchor_labels(model: RPNModule, batch: RPNBatch, sampling_epoch: int = 0) -> torch.Tensor:
    """The sampled anchor labels ``[B, N]`` (int64) the RPN assigns itself from the batch's boxes
    and sampling keys, through ``RPN.forward`` (the labels are read where the loss receives them)."""
    captured = {}
    assign = model.rpn._assign_targets

    def capture(*args, **kwargs):
        captured["labels"], deltas = assign(*args, **kwargs)
        return captured["labels"], deltas

    model.rpn._assign_targets = capture
    try:
        features = model.backbone(model.normalize(batch.images))
        model.rpn(features, batch.image_sizes, batch.targets, image_ids=batch.image_ids,
                  sampling_keys=batch.sampling_keys, sampling_epoch=sampling_epoch, need_proposals=False)
    finally:
        del model.rpn._assign_targets  # back to the class's method
    return captured["labels"].to(torch.int64)
