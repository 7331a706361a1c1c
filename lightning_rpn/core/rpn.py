"""The Region Proposal Network: head + anchors + targets + loss + proposals in one module.

Shapes: ``B`` images, ``L`` levels, ``A`` anchors per location, ``H_l x W_l`` the feature size
of level ``l``, ``N`` anchors of an image (all levels), ``G`` gt boxes of an image, ``P``
proposals of an image.

One forward pass:

1. anchors for the feature shapes (cached by the generator);
2. the head's objectness and deltas per level;
3. losses, if training targets are available: either ``anchor_targets`` precomputed by the
   data pipeline (used as given), or assigned here from ``targets`` under ``no_grad`` with the
   same function and the same per-image generator (seeded by ``seed``, ``sampling_epoch`` and
   the image id) as the pipeline, so both paths give identical targets;
4. proposals (skipped with ``need_proposals=False``, e.g. for a faster training step), with
   the train or test top-k settings chosen by ``self.training``, ranked by ``proposal_score``:
   the objectness, or (with ``quality`` branches, :mod:`~lightning_rpn.core.quality`) the geometric
   mean of the quality probabilities alone or together with the objectness.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .config import OBJECTNESS_MODES, PROPOSAL_SCORES, AnchorTargetConfig, LossConfig, ProposalConfig, check_choice
from .head import RPNHead, objectness_logits
from .loss import rpn_loss
from .matching import check_gt_box_batch
from .proposals import generate_proposals
from .quality import parse_quality, score_logits
from .targets import assign_batch_targets, sample_generator

__all__ = ["RPN"]


class RPN(nn.Module):
    """Region Proposal Network over ``L`` feature levels.

    Args:
        anchor_generator: anchors per level (its ``anchor_stride`` must match the head's).
        head: the prediction head; ``None`` builds ``RPNHead(in_channels, A, objectness=...,
            anchor_stride=anchor_generator.anchor_stride)``.
        in_channels: feature channels, used only to build the default head.
        box_coder: delta parametrisation (default ``BoxCoder()``).
        target_config: anchor labelling and sampling for in-model targets.
        pre_nms_top_n_train / post_nms_top_n_train: proposal top-k per level / per image while
            ``self.training``; ``*_test`` otherwise.
        nms_thresh, min_size, score_thresh: see :func:`~lightning_rpn.core.proposals.generate_proposals`.
        loss_normalization, reg_weight, smooth_l1_beta, box_loss: see
            :func:`~lightning_rpn.core.loss.rpn_loss`.
            With ``"paper"``, ``N_reg`` = anchor locations (``sum_l`` of the anchor-grid
            ``H_l x W_l``, i.e. ``N / A``) per image times ``B``.
        objectness: ``"sigmoid"`` or ``"softmax"``; must equal the head's mode.
        seed: mixed with the epoch and each image id to seed anchor sampling (``sample_generator``).
        quality: ``None`` or the head's localisation-quality branches (``"centerness"``,
            ``"iou"``, ``"centerness+iou"``), trained on the positive anchors.
        proposal_score: what ranks the proposals (and is returned as their probability):
            ``"objectness"``; ``"quality"``, the geometric mean of the quality branches, with
            the objectness branch left untrained (OLN); ``"geometric_mean"`` of the objectness
            and the quality branches.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead | None = None,
        in_channels: int = 256,
        box_coder: BoxCoder | None = None,
        target_config: AnchorTargetConfig | None = None,
        pre_nms_top_n_train: int = ProposalConfig.pre_nms_top_n_train,
        post_nms_top_n_train: int = ProposalConfig.post_nms_top_n_train,
        pre_nms_top_n_test: int = ProposalConfig.pre_nms_top_n_test,
        post_nms_top_n_test: int = ProposalConfig.post_nms_top_n_test,
        nms_thresh: float = ProposalConfig.nms_thresh,
        min_size: float = ProposalConfig.min_size,
        score_thresh: float = ProposalConfig.score_thresh,
        loss_normalization: Literal["sampled", "paper"] = LossConfig.normalization,  # type: ignore[assignment]
        reg_weight: float | None = LossConfig.reg_weight,
        smooth_l1_beta: float = LossConfig.smooth_l1_beta,
        box_loss: Literal["smooth_l1", "l1", "giou", "iou"] = LossConfig.box_loss,  # type: ignore[assignment]
        objectness: Literal["sigmoid", "softmax"] = "sigmoid",
        seed: int = 0,
        quality: str | None = None,
        proposal_score: Literal["objectness", "quality", "geometric_mean"] = "objectness",
    ) -> None:
        super().__init__()
        try:
            self.loss_config = LossConfig(loss_normalization, reg_weight, smooth_l1_beta, box_loss)
            self.proposal_config = ProposalConfig(
                pre_nms_top_n_train, post_nms_top_n_train, pre_nms_top_n_test, post_nms_top_n_test,
                nms_thresh, min_size, score_thresh,
            )
        except ValueError as error:
            raise ValueError(f"RPN: {error}") from None
        check_choice(objectness, OBJECTNESS_MODES, "RPN: objectness")
        branches = parse_quality(quality, "RPN: quality")
        check_choice(proposal_score, PROPOSAL_SCORES, "RPN: proposal_score")
        if proposal_score != "objectness" and not branches:
            raise ValueError(f"RPN: proposal_score={proposal_score!r} needs quality branches, got quality=None")
        num_anchors = anchor_generator.num_anchors_per_location()
        if head is None:
            head = RPNHead(
                in_channels, num_anchors, objectness=objectness, anchor_stride=anchor_generator.anchor_stride,
                quality=quality,
            )
        for name, head_value, expected in (
            ("num_anchors", head.num_anchors, num_anchors),
            ("anchor_stride", head.anchor_stride, anchor_generator.anchor_stride),
            ("objectness", head.objectness, objectness),
            ("quality", getattr(head, "quality", ()), branches),
        ):
            if head_value != expected:
                raise ValueError(
                    f"RPN: head.{name}={head_value!r} but the RPN expects {expected!r} "
                    f"(from {name if name in ('objectness', 'quality') else 'the anchor generator'})"
                )
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder() if box_coder is None else box_coder
        self.target_config = AnchorTargetConfig() if target_config is None else target_config
        self.pre_nms_top_n = {"train": pre_nms_top_n_train, "test": pre_nms_top_n_test}
        self.post_nms_top_n = {"train": post_nms_top_n_train, "test": post_nms_top_n_test}
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        self.score_thresh = score_thresh
        self.loss_normalization = loss_normalization
        self.reg_weight = reg_weight
        self.smooth_l1_beta = smooth_l1_beta
        self.box_loss = box_loss
        self.objectness = objectness
        self.seed = seed
        self.quality = branches
        self.proposal_score = proposal_score

    def forward(
        self,
        features: Sequence[Tensor] | Mapping[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        *,
        anchor_targets: tuple[Tensor, Tensor] | None = None,
        image_ids: Sequence[int | str] | None = None,
        sampling_keys: Sequence[int | str] | None = None,
        sampling_epoch: int = 0,
        need_proposals: bool = True,
        proposal_logits: bool = False,
    ) -> tuple[list[tuple[Tensor, ...]], dict[str, Tensor]]:
        """Proposals per image ``(boxes [P, 4], probabilities [P])`` and the loss dict.

        Args:
            features: per-level ``[B, C, H_l, W_l]`` maps (a dict is taken in its order).
            image_sizes: ``(h, w)`` of each image before padding.
            targets: per image ``{"boxes": [G, 4], "crowd_boxes": [C, 4] (optional)}``.
            anchor_targets: precomputed ``(labels [B, N] integer, deltas float32 [B, N, 4])``;
                takes precedence over ``targets``.
            image_ids: ids naming each image in errors, and seeding its sampling unless
                ``sampling_keys`` are given (default: index in the batch).
            sampling_keys: what seeds each image's sampling (``RPNBatch.sampling_keys``: the
                items' dataset positions, so that an image listed twice draws two samples).
            sampling_epoch: the training epoch, mixed into the sampling seeds so that every
                epoch samples afresh (pass the one the data pipeline used: ``RPNCollate.set_epoch``).
            need_proposals: ``False`` skips proposal generation and returns ``[]``.
            proposal_logits: proposals as ``(boxes, probabilities, logits [P])``: the logits
                keep the ranking that float32 probabilities lose once they round to 1.0.

        Losses ``{"loss_rpn_cls", "loss_rpn_reg"}`` are computed whenever ``targets`` or
        ``anchor_targets`` are given, in train and eval mode alike; ``{}`` otherwise.
        """
        feature_list = list(features.values()) if isinstance(features, Mapping) else list(features)
        if len(feature_list) != self.anchor_generator.num_levels:
            raise ValueError(
                f"RPN: got {len(feature_list)} feature levels but the anchor generator has "
                f"{self.anchor_generator.num_levels} (strides {self.anchor_generator.strides})"
            )
        batch = feature_list[0].shape[0]
        if len(image_sizes) != batch:
            raise ValueError(f"RPN: {len(image_sizes)} image_sizes for a batch of {batch} feature maps")
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        device = feature_list[0].device
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_list]
        anchors = self.anchor_generator(shapes, device=device)
        pred_objectness, pred_deltas, *rest = self.head(feature_list)
        pred_quality: list[Tensor] | None = rest[0] if self.quality else None
        for level, (obj, anc) in enumerate(zip(pred_objectness, anchors)):
            if obj.shape[1] != anc.shape[0]:
                raise ValueError(
                    f"RPN: level {level} has {obj.shape[1]} predictions but {anc.shape[0]} anchors "
                    f"(feature shape {shapes[level]}); head and anchor generator disagree"
                )
        num_anchors = sum(a.shape[0] for a in anchors)

        labels_and_deltas = None
        if anchor_targets is not None:
            labels_and_deltas = self._check_anchor_targets(anchor_targets, batch, num_anchors, device)
        elif targets is not None:
            labels_and_deltas = self._assign_targets(
                targets, sizes, shapes, image_ids, sampling_keys, sampling_epoch, batch, device
            )

        losses: dict[str, Tensor] = {}
        if labels_and_deltas is not None:
            losses = rpn_loss(
                pred_objectness,
                pred_deltas,
                *labels_and_deltas,
                normalization=self.loss_normalization,
                reg_weight=self.reg_weight,
                smooth_l1_beta=self.smooth_l1_beta,
                box_loss=self.box_loss,
                anchors=anchors,
                box_coder=self.box_coder,
                num_anchor_locations=num_anchors // self.head.num_anchors,
                pred_quality=pred_quality,
                quality="+".join(self.quality) or None,
                objectness_weight=0.0 if self.proposal_score == "quality" else 1.0,
            )

        proposals: list[tuple[Tensor, ...]] = []
        if need_proposals:
            logits = self._score_logits(pred_objectness, pred_quality)
            mode = "train" if self.training else "test"
            proposals = generate_proposals(
                logits,
                pred_deltas,
                anchors,
                sizes,
                self.pre_nms_top_n[mode],
                self.post_nms_top_n[mode],
                self.nms_thresh,
                self.min_size,
                self.score_thresh,
                box_coder=self.box_coder,
                return_logits=proposal_logits,
            )
        return proposals, losses

    def _score_logits(self, pred_objectness: list[Tensor], pred_quality: list[Tensor] | None) -> list[Tensor]:
        """Per level ``[B, N_l]`` logits of the proposal score (``proposal_score``)."""
        logits = pred_objectness
        if self.objectness == "softmax":
            logits = [objectness_logits(o) for o in pred_objectness]
        if pred_quality is None or self.proposal_score == "objectness":
            return logits
        return [
            score_logits(([obj] if self.proposal_score == "geometric_mean" else []) + list(quality.unbind(-1)))
            for obj, quality in zip(logits, pred_quality)
        ]

    @staticmethod
    def _check_anchor_targets(
        anchor_targets: tuple[Tensor, Tensor], batch: int, num_anchors: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        labels, deltas = anchor_targets
        if labels.dim() != 2 or labels.shape[0] != batch or deltas.shape != (*labels.shape, 4):
            raise ValueError(
                f"RPN: anchor_targets must be (labels [B, N], deltas [B, N, 4]) with B={batch}, got "
                f"{tuple(labels.shape)} and {tuple(deltas.shape)}"
            )
        if labels.shape[1] != num_anchors:
            raise ValueError(
                f"RPN: anchor_targets have N={labels.shape[1]} anchors per image but the model's anchors "
                f"have N={num_anchors}; the data pipeline and the model use different anchor settings"
            )
        return labels.to(device), deltas.to(device)

    def _assign_targets(
        self,
        targets: Sequence[Mapping[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        shapes: list[tuple[int, int]],
        image_ids: Sequence[int | str] | None,
        sampling_keys: Sequence[int | str] | None,
        sampling_epoch: int,
        batch: int,
        device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """Match and sample anchors of every image, as the data pipeline does (no grad).

        Every gt box must be finite, non-empty and at least partly inside its image.
        """
        if len(targets) != batch:
            raise ValueError(f"RPN: {len(targets)} targets for a batch of {batch} images")
        ids = list(range(batch)) if image_ids is None else list(image_ids)
        keys = ids if sampling_keys is None else list(sampling_keys)
        if len(ids) != batch or len(keys) != batch:
            raise ValueError(
                f"RPN: {len(ids)} image_ids and {len(keys)} sampling_keys for a batch of {batch} images"
            )
        gt_boxes = []
        for index, (target, image_id) in enumerate(zip(targets, ids)):
            boxes = target.get("boxes")
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(
                    f"RPN targets[{index}] (image_id={image_id!r}): the 'boxes' entry must be gt boxes "
                    f"[G, 4], got {'nothing' if boxes is None else _describe(boxes)}"
                )
            gt_boxes.append(boxes.to(device=device, dtype=torch.float32))
        check_gt_box_batch(gt_boxes, lambda i: f"RPN targets[{i}] (image_id={ids[i]!r})", image_sizes)
        return assign_batch_targets(
            self.anchor_generator.grid(shapes, device=device),
            gt_boxes,
            image_sizes,
            self.target_config,
            self.box_coder,
            [sample_generator(self.seed, key, sampling_epoch) for key in keys],
            [target.get("crowd_boxes") for target in targets],
        )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
