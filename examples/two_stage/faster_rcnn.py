"""A two-stage detector in a user's own LightningModule: lightning-rpn's RPN + torchvision's RoIHeads.

The first stage is :class:`lightning_rpn.RPN` (anchors, targets, loss and proposals), the
second torchvision's ``RoIHeads`` (RoIAlign over the FPN levels, a two-layer MLP, class scores
and box refinement): a small Faster R-CNN. It trains on the built-in synthetic shapes with
:class:`lightning_rpn.RPNDataModule`, which reads ``anchor_generator``, ``target_config``,
``box_coder`` and ``size_divisibility`` from this module and assigns the RPN's anchor targets in
its DataLoader workers. The synthetic shapes have no classes, so the detector has one object
class ("shape") besides the background.

Run (a GPU is used when present; on a 2-core CPU a step of 8 images took about 0.5 s, measured
over 5 steps)::

    python examples/two_stage/faster_rcnn.py --max_steps 300

The 300 steps run over 6 epochs of 400 images (50 batches of 8); validation counts steps across
epochs and runs every 100 (``--train_images`` sets the epoch's size).
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from lightning_rpn import RPN, AnchorGenerator, AnchorTargetConfig, BoxCoder, ProposalRecall, RPNDataModule
from lightning_rpn.core.backbones import build_backbone
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.collate import set_sampling_epoch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TwoStageDetector(pl.LightningModule):
    """Backbone + lightning-rpn RPN (stage 1) + torchvision RoIHeads (stage 2).

    Args:
        backbone: a lightning-rpn backbone name (``tiny_fpn`` trains on a CPU).
        anchor_sizes / aspect_ratios: RPN anchors per level (``h / w`` ratios).
        num_classes: object classes plus the background.
        rpn_post_nms_train / rpn_post_nms_test: proposals per image handed to the second stage.
        roi_batch_size: RoIs sampled per image for the second-stage loss.
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        backbone: str = "tiny_fpn",
        anchor_sizes: tuple[tuple[float, ...], ...] = ((16,), (32,), (64,), (128,)),
        aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),),
        num_classes: int = 2,
        rpn_post_nms_train: int = 300,
        rpn_post_nms_test: int = 100,
        roi_batch_size: int = 128,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone)
        # What RPNDataModule reads from the model, so that data and model share one anchor setup.
        self.anchor_generator = AnchorGenerator(anchor_sizes, aspect_ratios, self.backbone.strides)
        self.target_config = AnchorTargetConfig()
        self.box_coder = BoxCoder()
        self.size_divisibility = self.backbone.size_divisibility
        self.rpn = RPN(
            self.anchor_generator,
            in_channels=self.backbone.out_channels,
            box_coder=self.box_coder,
            target_config=self.target_config,
            pre_nms_top_n_train=1000,
            post_nms_top_n_train=rpn_post_nms_train,
            pre_nms_top_n_test=500,
            post_nms_top_n_test=rpn_post_nms_test,
        )
        self.level_names = [str(level) for level in range(len(self.backbone.strides))]
        channels = self.backbone.out_channels
        self.roi_heads = RoIHeads(
            box_roi_pool=MultiScaleRoIAlign(self.level_names, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(channels * 7 * 7, 256),
            box_predictor=FastRCNNPredictor(256, num_classes),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=roi_batch_size,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=100,
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.proposal_recall = ProposalRecall(max_proposals=(rpn_post_nms_test,))
        self.detection_recall = ProposalRecall(iou_thresholds=(0.5, 0.75), max_proposals=(100,))

    def forward(self, batch: RPNBatch) -> tuple[list[Tensor], list[dict[str, Tensor]], dict[str, Tensor]]:
        """Proposals, detections (eval) and the losses of both stages (train)."""
        features = self.backbone((batch.images.float() - self.pixel_mean) / self.pixel_std)
        training = self.training
        epoch = self.current_epoch  # anchor sampling is seeded per image and epoch
        proposals, rpn_losses = self.rpn(
            features,
            batch.image_sizes,
            targets=batch.targets if training else None,
            anchor_targets=batch.anchor_targets_for(epoch) if training else None,
            image_ids=batch.image_ids,
            sampling_epoch=epoch,
        )
        proposal_boxes = [boxes.detach() for boxes, _ in proposals]
        targets = None
        if training:
            targets = [
                {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64, device=boxes.device)}
                for boxes in batch.gt_boxes
            ]
        level_features = OrderedDict(zip(self.level_names, features))
        detections, roi_losses = self.roi_heads(level_features, proposal_boxes, batch.image_sizes, targets)
        return proposal_boxes, detections, {**rpn_losses, **roi_losses}

    def on_train_epoch_start(self) -> None:
        # the data module's workers sample this epoch's anchors (as RPNModule does)
        set_sampling_epoch([self.trainer.train_dataloader, self.trainer.val_dataloaders], self.current_epoch)

    def training_step(self, batch: RPNBatch, batch_idx: int) -> Tensor:
        _, _, losses = self(batch)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: RPNBatch, batch_idx: int) -> None:
        proposals, detections, _ = self(batch)
        self.proposal_recall.update(proposals, batch.gt_boxes)
        self.detection_recall.update([d["boxes"] for d in detections], batch.gt_boxes)

    def on_validation_epoch_end(self) -> None:
        k = self.hparams.rpn_post_nms_test
        self.log(f"val/proposal_AR@{k}", self.proposal_recall.compute()[f"AR@{k}"], prog_bar=True)
        detection = self.detection_recall.compute()
        self.log("val/detection_recall@0.5", detection["recall@0.50@100"], prog_bar=True)
        self.proposal_recall.reset()
        self.detection_recall.reset()

    def predict_step(self, batch: RPNBatch, batch_idx: int) -> list[dict[str, Any]]:
        _, detections, _ = self(batch)
        return [{"image_id": i, **d} for i, d in zip(batch.image_ids, detections)]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


def synthetic_data(train_images: int = 400, val_images: int = 50, batch_size: int = 8, num_workers: int = 2,
                   min_size: int = 128, max_size: int = 192) -> RPNDataModule:
    """The built-in synthetic shapes; anchors and targets come from the model in ``setup``."""
    return RPNDataModule(
        synthetic_train_images=train_images,
        synthetic_val_images=val_images,
        synthetic_min_size=min_size,
        synthetic_max_size=max_size,
        batch_size=batch_size,
        num_workers=num_workers,
    )


def main(argv: list[str] | None = None) -> pl.Trainer:
    """Train for ``--max_steps`` optimizer steps, validating every 100 (fewer: at the end); the trainer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train_images", type=int, default=400, help="synthetic training images (an epoch)")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    model = TwoStageDetector(lr=args.lr)
    data = synthetic_data(train_images=args.train_images, batch_size=args.batch_size, num_workers=args.num_workers)
    # the steps run across epochs (400 images are 50 batches of 8): validation counts steps, not
    # the batches of one epoch (``check_val_every_n_epoch=None``)
    trainer = pl.Trainer(max_steps=args.max_steps, val_check_interval=min(100, args.max_steps),
                         check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                         accelerator="auto", devices=1)
    trainer.fit(model, datamodule=data)
    return trainer


if __name__ == "__main__":
    main()
