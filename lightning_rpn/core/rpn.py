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
   the image id) as the pipeline, so both paths give identical targets (without a
   ``sampling_epoch``, from torch's global generator: a fresh sample at every call);
4. proposals (skipped with ``need_proposals=False``, e.g. for a faster training step), with
   the train or test top-k settings chosen by ``self.training``, ranked by ``proposal_score``:
   the objectness, or (with ``quality`` branches, :mod:`~lightning_rpn.core.quality`) the geometric
   mean of the quality probabilities alone or together with the objectness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .config import OBJECTNESS_MODES, AnchorTargetConfig, LossConfig, ProposalConfig, check_choice
from .head import RPNHead, objectness_logits
from .loss import rpn_loss
from .proposer import ProposalInputs, RegionProposer
from .quality import parse_scoring, rank_logits
from .targets import assign_batch_targets

__all__ = ["RPN", "proposal_score_logits"]


def proposal_score_logits(
    pred_objectness: Sequence[Tensor],
    pred_quality: Sequence[Tensor] | None,
    objectness: str,
    proposal_score: str,
) -> list[Tensor]:
    """Per level ``[B, N_l]`` logits of the proposal score, what ranks the proposals.

    ``pred_objectness``: the head's per-level objectness (``[B, N_l]``, or ``[B, N_l, 2]`` pairs
    when ``objectness="softmax"``); ``pred_quality``: its ``[B, N_l, Q]`` quality logits or
    ``None``. ``proposal_score`` as :class:`RPN`'s. The eager RPN and the exported program
    (:mod:`lightning_rpn.tools.export`) both score with this function.
    """
    logits = list(pred_objectness)
    if objectness == "softmax":
        logits = [objectness_logits(o) for o in pred_objectness]
    if pred_quality is None:
        return logits
    return [rank_logits(obj, quality, proposal_score) for obj, quality in zip(logits, pred_quality)]


class RPN(RegionProposer):
    """Region Proposal Network over ``L`` feature levels, called as :meth:`RegionProposer.forward`.

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
        try:
            proposal_config = ProposalConfig(
                pre_nms_top_n_train, post_nms_top_n_train, pre_nms_top_n_test, post_nms_top_n_test,
                nms_thresh, min_size, score_thresh,
            )
            loss_config = LossConfig(loss_normalization, reg_weight, smooth_l1_beta, box_loss)
        except ValueError as error:
            raise ValueError(f"RPN: {error}") from None
        super().__init__(anchor_generator, box_coder, target_config, seed, proposal_config)
        self.loss_config = loss_config
        check_choice(objectness, OBJECTNESS_MODES, "RPN: objectness")
        branches = parse_scoring(quality, proposal_score, "RPN")
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
        self.head = head
        self.loss_normalization = loss_normalization
        self.reg_weight = reg_weight
        self.smooth_l1_beta = smooth_l1_beta
        self.box_loss = box_loss
        self.objectness = objectness
        self.quality = branches
        self.proposal_score = proposal_score

    def _forward(self, inputs: ProposalInputs) -> tuple[list[tuple[Tensor, ...]], dict[str, Tensor]]:
        """:meth:`RegionProposer.forward` of the RPN: ``anchor_targets`` take precedence over ``targets``."""
        feature_list, sizes, shapes, batch, device = (
            inputs.levels, inputs.image_sizes, inputs.shapes, inputs.batch, inputs.device
        )
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
        if inputs.anchor_targets is not None:
            labels_and_deltas = self._check_anchor_targets(inputs.anchor_targets, batch, num_anchors, device)
        elif inputs.targets is not None:
            labels_and_deltas = self._assign_targets(inputs)

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
        if inputs.need_proposals:
            logits = proposal_score_logits(pred_objectness, pred_quality, self.objectness, self.proposal_score)
            proposals = self._proposals(logits, pred_deltas, anchors, sizes, inputs.proposal_logits)
        return proposals, losses

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

    def _assign_targets(self, inputs: ProposalInputs) -> tuple[Tensor, Tensor]:
        """Match and sample anchors of every image, as the data pipeline does (no grad)."""
        gt_boxes, generators = self._gt_boxes(inputs)
        assert inputs.targets is not None
        return assign_batch_targets(
            self.anchor_generator.grid(inputs.shapes, device=inputs.device),
            gt_boxes,
            inputs.image_sizes,
            self.target_config,
            self.box_coder,
            generators,
            [target.get("crowd_boxes") for target in inputs.targets],
            image_ids=inputs.keys("RPN")[0],
        )
