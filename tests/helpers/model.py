"""A tiny RPNModule, synthetic samples and batches, a quiet Trainer, a parameter-watching callback."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch

from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.training.module import RPNModule


TINY = dict(
    backbone="tiny_fpn",
    anchor_sizes=((16,), (32,), (64,), (128,)),
    warmup_steps=2,
    post_nms_top_n_train=300,
    pre_nms_top_n_test=300,
    post_nms_top_n_test=100,
    recall_max_proposals=(10, 100),
)


def tiny_model(**overrides) -> RPNModule:
    return RPNModule(**{**TINY, **overrides})


def synthetic_samples(count: int = 4) -> list[DetectionSample]:
    dataset = SyntheticShapes(count, min_size=48, max_size=80, max_shapes=3, split="test-module")
    return [dataset[i] for i in range(count)]


def collate_for(model: RPNModule, assign_targets: bool = True) -> RPNCollate:
    return RPNCollate(
        model.anchor_generator,
        model.target_config,
        model.box_coder,
        model.size_divisibility,
        seed=model.hparams.anchor_sampling_seed,
        assign_targets=assign_targets,
    )


def quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def training_batches(model, bad_index: int | None = None) -> list:
    """Four training batches; batch ``bad_index`` has NaN box targets (a non-finite loss)."""
    batch = collate_for(model)(synthetic_samples())
    batches = [copy.deepcopy(batch) for _ in range(4)]
    for index, item in enumerate(batches):
        item.image_ids = [f"b{index}-{i}" for i in range(len(item))]
    if bad_index is not None:
        batches[bad_index].positive_deltas.fill_(float("nan"))
    return batches


class WatchStep(pl.Callback):
    """Parameters before / after training batch ``index``; optionally NaN one gradient there."""

    def __init__(self, index: int, nan_gradient: bool = False) -> None:
        self.index = index
        self.nan_gradient = nan_gradient
        self.current = -1
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def _params(self, module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current = batch_idx
        if batch_idx == self.index:
            self.before = self._params(pl_module)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.nan_gradient and self.current == self.index:
            pl_module.rpn.head.bbox_deltas.weight.grad[0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.after = self._params(pl_module)
