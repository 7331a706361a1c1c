"""Cascade refinement of one anchor per location (the Cascade RPN idea, Vu et al., NeurIPS 2019).

Shapes: ``B`` images, ``L`` levels, ``H_l x W_l`` the feature size of level ``l``, ``N`` anchors
of an image (one per location, all levels, in anchor-generator order), ``G`` gt boxes of an
image, ``P`` proposals of an image, ``K = 9`` the points of a 3x3 kernel.

A stack of ``num_stages`` stages, shared by every level, each regressing the boxes of the one
before (stage 1: the anchors):

- stage 1: a dilated 3x3 convolution (``dilation``) + ReLU, then 1x1 box deltas. Targets come
  from the anchor-free centre-region rule (:func:`assign_centre_region`): each gt box belongs to
  the level whose anchor size is nearest to its size (in log scale), and the locations of that
  level whose centres lie in the box's central region (``centre_ratio`` of its width and
  height, and always the location nearest its centre) regress it; no objectness is learnt.
- stage ``s >= 2``: an adaptive 3x3 convolution
  (:func:`~lightning_rpn.core.adaptive_conv.adaptive_conv2d`, ``torchvision.ops.deform_conv2d``'s
  computation, faster on the CPU) whose sampling points are spread over each location's stage
  ``s - 1`` box (:func:`adaptive_offsets`),
  + ReLU, then 1x1 deltas relative to that box; targets by IoU between those boxes and the gt
  boxes with the project's rule (:func:`~lightning_rpn.core.matching.match_anchors_batched`) and
  sampler (``target_config``, seeded like the RPN's); its box loss averages over the sampled
  positives (``box_loss_positives="sampled"``, as the RPN's) or over every IoU positive
  (``"all"``: in dense scenes an image has several hundred, four times the sampler's share). The
  last stage also predicts objectness, trained on the sampled boxes (with ``objectness_level``
  "size" or "best", a gt box's positives on other levels than its own are negatives: see
  :func:`own_level_positives`), and
  optionally localisation quality (``quality``, the branches
  of :mod:`~lightning_rpn.core.quality`: centerness of its input box's centre, IoU of its output
  box, trained on its positives), which ranks the proposals alone or with the objectness
  (``proposal_score``, as the RPN's).

Each stage multiplies its raw deltas by its ``delta_scale`` ``(sx, sy, sw, sh)`` (the "target
standard deviations" of mmdetection's Cascade RPN, e.g. ``(0.1, 0.1, 0.5, 0.5)`` then
``(0.05, 0.05, 0.1, 0.1)``): a later stage's corrections are finer, so a small scale keeps its
raw outputs of order one. Each stage reads the previous stage's hidden features; the boxes passed on are detached. Box
losses are ``1 - IoU`` of the decoded boxes with their gt boxes, averaged over each stage's
positives and summed over stages (times ``reg_weight``) into ``loss_rpn_reg``; ``loss_rpn_cls``
is the last stage's objectness log loss over its sampled boxes (not with ``proposal_score=
"quality"``) plus its quality losses. Proposals are the last stage's boxes ranked by the
proposal score, through :func:`~lightning_rpn.core.proposals.generate_proposals`; in eval mode
the last stage can first refine its own boxes again (``test_iterations``, with its weights and
input features), and in training do the same with a box loss for each pass
(``train_iterations``), so that it learns the boxes it refines at test time.
The stages run in :meth:`CascadeRPN.predict`, which the exported program calls too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adaptive_conv import adaptive_conv2d
from .anchors import AnchorGenerator, AnchorGrid, GridLevel
from .box_coder import BoxCoder
from .config import AnchorTargetConfig, ProposalConfig, SettingError
from .loss import NonFiniteLossError
from .matching import match_anchors_batched
from .proposer import ProposalInputs, RegionProposer
from .quality import aligned_iou, parse_scoring, quality_loss, rank_logits
from .sampling import sample_anchors_with_positives

__all__ = [
    "BoxLossPositives", "CascadePrediction", "CascadeRPN", "CascadeStage", "adaptive_offsets", "assign_centre_region",
    "best_levels", "check_one_square_anchor", "gt_levels", "own_level_positives",
]

ObjectnessLevel = Literal["any", "size", "best"]
"""Which levels' positives of a gt box the cascade's objectness learns (``CascadeRPN(objectness_level=...)``)."""
OBJECTNESS_LEVELS: tuple[str, ...] = ("any", "size", "best")
BoxLossPositives = Literal["sampled", "all"]
"""Which IoU positives of stages >= 2 the box losses average over (``CascadeRPN(box_loss_positives=...)``)."""
BOX_LOSS_POSITIVES: tuple[str, ...] = ("sampled", "all")


def adaptive_offsets(boxes: Tensor, height: int, width: int, stride: float, origin: float) -> Tensor:
    """``deform_conv2d`` offsets ``[B, 2K, H, W]`` placing a 3x3 kernel's points over each location's box.

    ``boxes``: ``[B, H * W, 4]``, one box per location in ``(y, x)`` order, image pixels. Location
    ``(y, x)`` sits at the image point ``(origin + x * stride, origin + y * stride)``, so pixel
    ``X`` is feature coordinate ``(X - origin) / stride``. Kernel point ``(i, j)``
    (``i, j in {-1, 0, 1}``, row and column) moves from its regular position ``(y + i, x + j)``
    to ``(cy + i * h / 2, cx + j * w / 2)`` of the box in feature coordinates: the box's
    corners, edge midpoints and centre. Channels ``2k`` and ``2k + 1`` (``k = 3 (i + 1) + j + 1``)
    hold the y and x displacement, torchvision's layout.
    """
    batch = boxes.shape[0]
    if boxes.dim() != 3 or boxes.shape[1:] != (height * width, 4):
        raise ValueError(f"adaptive_offsets: boxes must be [B, {height * width}, 4], got {tuple(boxes.shape)}")
    feature = (boxes.float() - origin) / stride
    cx, cy = (feature[..., 0] + feature[..., 2]) * 0.5, (feature[..., 1] + feature[..., 3]) * 0.5
    half_w, half_h = (feature[..., 2] - feature[..., 0]) * 0.5, (feature[..., 3] - feature[..., 1]) * 0.5
    ys, xs = torch.meshgrid(
        torch.arange(height, device=boxes.device, dtype=torch.float32),
        torch.arange(width, device=boxes.device, dtype=torch.float32),
        indexing="ij",
    )
    steps = torch.arange(-1.0, 2.0, device=boxes.device, dtype=torch.float32)
    rows, cols = (t.reshape(-1) for t in torch.meshgrid(steps, steps, indexing="ij"))  # [K]
    dy = cy[..., None] + rows * half_h[..., None] - (ys.reshape(-1, 1) + rows)  # [B, H * W, K]
    dx = cx[..., None] + cols * half_w[..., None] - (xs.reshape(-1, 1) + cols)
    offsets = torch.stack((dy, dx), dim=-1).reshape(batch, height * width, 2 * rows.numel())
    return offsets.permute(0, 2, 1).reshape(batch, 2 * rows.numel(), height, width)


def gt_levels(grid: AnchorGrid, gt_boxes: Tensor) -> Tensor:
    """The level ``int64 [G]`` of each gt box: the one whose anchor size is nearest its size ``sqrt(w h)`` in log scale.

    ``grid`` must have one anchor per location.
    """
    sizes = torch.tensor(
        [float((cell[0, 2] - cell[0, 0]) * (cell[0, 3] - cell[0, 1])) ** 0.5 for cell in (lv.cell_anchors for lv in grid.levels)],
        device=gt_boxes.device,
        dtype=torch.float32,
    )
    gt = gt_boxes.float()
    side = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).sqrt()
    return torch.log2(side[:, None] / sizes[None]).abs().argmin(dim=1)


def own_level_positives(positive: Tensor, matched: Tensor, location_levels: Tensor, gt_level: Tensor) -> Tensor:
    """Of one image's IoU positives ``bool [N]``, those on their gt box's own level (``bool [N]``).

    ``matched [N]``: each location's gt index; ``location_levels [N]``: each location's level;
    ``gt_level [G]``: each gt box's (:func:`gt_levels`). A refined box converges on its object
    from every level near the object's size, so without this the objectness learns several
    near-identical proposals per object, which crowd the top of the list in dense scenes.
    A gt box with no positive on its own level keeps its positives on every level.
    """
    if gt_level.numel() == 0:
        return positive
    own = positive & (location_levels == gt_level[matched])
    has_own = torch.zeros(gt_level.numel(), dtype=torch.bool, device=positive.device)
    has_own[matched[own]] = True
    return own | (positive & ~has_own[matched])


def best_levels(positive: Tensor, matched: Tensor, ious: Tensor, location_levels: Tensor, num_gt: int) -> Tensor:
    """The level ``int64 [G]`` of each gt box's best positive (highest ``ious``), -1 for a gt box with none.

    ``positive``, ``matched``, ``ious``, ``location_levels``: ``[N]`` for one image, as in
    :func:`own_level_positives`.
    """
    level = torch.full((num_gt,), -1, dtype=torch.int64, device=ious.device)
    if num_gt == 0:
        return level
    best = torch.full((num_gt,), -1.0, dtype=ious.dtype, device=ious.device).scatter_reduce(
        0, matched[positive], ious[positive], "amax"
    )
    is_best = positive & (ious == best[matched])
    level[matched[is_best]] = location_levels[is_best]
    return level


def assign_centre_region(grid: AnchorGrid, gt_boxes: Tensor, centre_ratio: float) -> tuple[Tensor, Tensor]:
    """Stage-1 targets: ``(positive bool [N], matched int64 [N])`` for one image (see the module docstring).

    ``grid`` must have one anchor per location. A location claimed by several gt boxes
    regresses the smallest (of equal areas, the first); ``matched`` is 0 where ``positive`` is
    False. Each box is tested against the locations of a window around its central region only,
    so memory grows with the boxes' regions, not with boxes times locations (a 3000 x 3000 scene
    with thousands of boxes).
    """
    num = grid.anchors.shape[0]
    device = grid.anchors.device
    positive = torch.zeros(num, dtype=torch.bool, device=device)
    matched = torch.zeros(num, dtype=torch.int64, device=device)
    if gt_boxes.shape[0] == 0:
        return positive, matched
    gt = gt_boxes.to(device=device, dtype=torch.float32)
    width, height = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    centre_x, centre_y = (gt[:, 0] + gt[:, 2]) * 0.5, (gt[:, 1] + gt[:, 3]) * 0.5
    half_width, half_height = centre_ratio * width * 0.5, centre_ratio * height * 0.5
    area = width * height
    level_of = gt_levels(grid, gt)
    for index, level in enumerate(grid.levels):
        chosen = torch.nonzero(level_of == index).squeeze(1)
        if chosen.numel() == 0:
            continue
        boxes, cells = _centre_region_cells(
            level, centre_x[chosen], centre_y[chosen], half_width[chosen], half_height[chosen]
        )
        claim = area[chosen][boxes]
        locations = level.height * level.width
        smallest = torch.full((locations,), math.inf, dtype=claim.dtype, device=device)
        smallest = smallest.scatter_reduce(0, cells, claim, "amin")
        first = torch.where(claim == smallest[cells], boxes, chosen.numel())
        which = torch.full((locations,), chosen.numel(), device=device).scatter_reduce(0, cells, first, "amin")
        hit = torch.nonzero(which < chosen.numel()).squeeze(1)
        positive[level.start + hit] = True
        matched[level.start + hit] = chosen[which[hit]]
    return positive, matched


def _centre_region_cells(
    level: GridLevel, centre_x: Tensor, centre_y: Tensor, half_width: Tensor, half_height: Tensor
) -> tuple[Tensor, Tensor]:
    """``(box int64 [M], cell int64 [M])``: each location of ``level`` (row-major index) whose centre
    lies within ``half_width`` / ``half_height`` of a box's centre, and each box's location nearest
    its centre, for the ``[G_l]`` boxes given. Candidates come from a window one location wider
    than each region, and are tested exactly as location centres ``origin + i * step``."""
    device = centre_x.device
    first_x, count_x = _window(centre_x, half_width, level.origin, level.step, level.width)
    first_y, count_y = _window(centre_y, half_height, level.origin, level.step, level.height)
    counts = count_x * count_y
    boxes = torch.repeat_interleave(torch.arange(centre_x.numel(), device=device), counts)
    within = torch.arange(boxes.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[boxes]
    column = first_x[boxes] + within % count_x[boxes]
    row = first_y[boxes] + torch.div(within, count_x[boxes], rounding_mode="floor")
    xs = level.origin + column.to(torch.float32) * level.step
    ys = level.origin + row.to(torch.float32) * level.step
    inside = ((xs - centre_x[boxes]).abs() <= half_width[boxes]) & ((ys - centre_y[boxes]).abs() <= half_height[boxes])
    near_x = ((centre_x - level.origin) / level.step).round().clamp(0, level.width - 1).long()
    near_y = ((centre_y - level.origin) / level.step).round().clamp(0, level.height - 1).long()
    all_boxes = torch.cat([boxes[inside], torch.arange(centre_x.numel(), device=device)])
    cells = torch.cat([row[inside] * level.width + column[inside], near_y * level.width + near_x])
    return all_boxes, cells


def _window(centre: Tensor, half: Tensor, origin: float, step: float, size: int) -> tuple[Tensor, Tensor]:
    """``(first index, count)`` int64 ``[G_l]`` of the locations along one axis that may lie within
    ``half`` of ``centre``: the region's index range widened by one each side, inside ``[0, size)``
    (at least one location)."""
    low = torch.floor((centre - half - origin) / step).clamp(0, size - 1).long() - 1
    high = torch.ceil((centre + half - origin) / step).clamp(0, size - 1).long() + 1
    low, high = low.clamp(min=0), high.clamp(max=size - 1)
    return low, high - low + 1


class CascadeStage(nn.Module):
    """One stage: 3x3 conv (dilated, or adaptive to given offsets) + ReLU, 1x1 deltas (and objectness, quality).

    ``forward(feature [B, C, H, W], offsets [B, 2K, H, W] | None)`` -> ``(hidden [B, C', H, W],
    deltas [B, H * W, 4], logits [B, H * W] or None, quality [B, H * W, Q] or None)``; ``offsets``
    are required iff ``adaptive``. The deltas are the 1x1 convolution's output times
    ``delta_scale`` (per coordinate); ``Q = num_quality`` quality logits (objectness stages only).
    """

    def __init__(self, in_channels: int, channels: int, adaptive: bool, dilation: int, with_objectness: bool,
                 delta_scale: Sequence[float] = (1.0, 1.0, 1.0, 1.0), num_quality: int = 0) -> None:
        super().__init__()
        scale = tuple(float(v) for v in delta_scale)
        if len(scale) != 4 or not all(math.isfinite(v) and v > 0 for v in scale):
            raise ValueError(f"CascadeStage: delta_scale must be 4 positive numbers (sx, sy, sw, sh), got {delta_scale!r}")
        # not in the state dict: it is a setting (hparams), so checkpoints without it still load
        self.register_buffer("delta_scale", torch.tensor(scale), persistent=False)
        self.adaptive = adaptive
        self.dilation = 1 if adaptive else dilation
        self.weight = nn.Parameter(torch.empty(channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.bbox_deltas = nn.Conv2d(channels, 4, 1)
        self.cls_logits = nn.Conv2d(channels, 1, 1) if with_objectness else None
        self.quality_logits = nn.Conv2d(channels, num_quality, 1) if with_objectness and num_quality else None
        nn.init.normal_(self.weight, std=0.01)
        for conv in filter(None, (self.bbox_deltas, self.cls_logits, self.quality_logits)):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feature: Tensor, offsets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        if self.adaptive != (offsets is not None):
            raise ValueError(f"CascadeStage: offsets are {'required' if self.adaptive else 'not used'} here")
        if offsets is None:
            hidden = F.conv2d(feature, self.weight, self.bias, padding=self.dilation, dilation=self.dilation)
        else:
            hidden = adaptive_conv2d(feature, offsets, self.weight, self.bias)
        hidden = F.relu(hidden)
        b, _, h, w = hidden.shape
        deltas = self.bbox_deltas(hidden).permute(0, 2, 3, 1).reshape(b, h * w, 4) * self.delta_scale.to(hidden.dtype)
        logits = None if self.cls_logits is None else self.cls_logits(hidden).reshape(b, h * w)
        quality = None if self.quality_logits is None else self.quality_logits(hidden).permute(0, 2, 3, 1).reshape(b, h * w, -1)
        return hidden, deltas, logits, quality


class CascadePrediction(NamedTuple):
    """What the stages predict for a batch (see :meth:`CascadeRPN.predict`).

    ``boxes[s]`` / ``deltas[s]``: stage ``s``'s input boxes and its deltas relative to them,
    ``[B, N, 4]`` (stage 0's boxes are the anchors; then one more entry per pass of the last
    stage over its own boxes: ``test_iterations`` in eval mode, ``train_iterations`` in
    training); ``logits``: the last stage's objectness
    ``[B, N]``; ``quality``: its quality logits ``[B, N, Q]`` or ``None``; ``scores``: the logits
    of the proposal score ``[B, N]`` (the objectness unless quality ranks); ``per_level``:
    ``N_l`` of each level.
    """

    boxes: list[Tensor]
    deltas: list[Tensor]
    logits: Tensor
    quality: Tensor | None
    scores: Tensor
    per_level: list[int]

    def image_levels(self, image: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The proposal inputs of image ``image``, per level, detached: the last stage's score
        logits ``[1, N_l]`` and deltas ``[1, N_l, 4]``, and the boxes they refine ``[N_l, 4]`` (in
        the places of :func:`~lightning_rpn.core.proposals.generate_proposals`' anchors)."""
        picked = slice(image, image + 1)
        return (
            list(self.scores[picked].detach().split(self.per_level, dim=1)),
            list(self.deltas[-1][picked].detach().split(self.per_level, dim=1)),
            list(self.boxes[-1][image].detach().split(self.per_level, dim=0)),
        )


def check_one_square_anchor(anchor_generator: AnchorGenerator) -> None:
    """``SettingError`` unless ``anchor_generator`` has the cascade's anchors: one per location,
    square (ratio 1.0: stage 1 regresses a gt box of any shape from its centre region, and a
    stretched anchor only skews where the later stages start), ``anchor_stride`` 1."""
    if anchor_generator.num_anchors_per_location() != 1 or anchor_generator.anchor_stride != 1:
        raise SettingError(
            "CascadeRPN: needs one anchor per location and anchor_stride 1 (model.anchor_sizes one size per "
            f"level, model.aspect_ratios [[1.0]]), got {anchor_generator!r} with "
            f"{anchor_generator.num_anchors_per_location()} anchors per location"
        )
    ratios = [list(level) for level in anchor_generator.aspect_ratios]
    if any(ratio != 1.0 for level in ratios for ratio in level):
        raise SettingError(
            f"CascadeRPN: needs one square anchor per location (model.aspect_ratios [[1.0]]), got "
            f"model.aspect_ratios {ratios}; set model.aspect_ratios: [[1.0]] (`analyze-anchors --optimize` on "
            "a cascade config searches the sizes only)"
        )


class CascadeRPN(RegionProposer):
    """Multi-stage proposal network over ``L`` levels, called as :meth:`RegionProposer.forward` (as the RPN).

    Args:
        anchor_generator: one square anchor per location (one size, aspect ratio 1.0), ``anchor_stride`` 1
            (:func:`check_one_square_anchor`).
        in_channels: feature channels; ``conv_channels`` those of the stages (``None``: the same).
        num_stages: stages (>= 2): one centre-region stage, then adaptive IoU-assigned ones.
        dilation: dilation of stage 1's 3x3 convolution.
        centre_ratio: the central part (fraction of width and height) of a gt box whose locations
            are stage-1 positives.
        box_coder, target_config: delta parametrisation; IoU matching and sampling of stages >= 2.
        pre_nms_top_n_* / post_nms_top_n_* / nms_thresh / min_size / score_thresh: as the RPN's.
        reg_weight: weight of every stage's box loss.
        delta_scales: one ``(sx, sy, sw, sh)`` per stage multiplying its raw deltas (``None``: ones).
        objectness_level: which of a gt box's positives the last stage's objectness learns as
            positives: ``"any"`` (all), ``"size"`` (those on its stage-1 level, :func:`gt_levels`)
            or ``"best"`` (those on the level of its best refined box, :func:`best_levels`); the
            others are its negatives (:func:`own_level_positives`). Box and quality losses keep
            every positive.
        box_loss_positives: which IoU positives the box losses of stages >= 2 (and the quality
            losses) average over: ``"sampled"`` (the sampler's, as the RPN's) or ``"all"``. The
            objectness always learns from the sampled boxes.
        test_iterations: in eval mode, how many more times the last stage refines its own boxes
            (the Iterative RPN idea, at inference).
        train_iterations: in training, how many more times the last stage refines its own boxes
            (detached), each pass adding a box loss like a stage's: it then learns the boxes it
            refines at test time. Objectness and quality still learn from its first pass.
        quality: ``None`` or the last stage's localisation-quality branches (``"iou"``,
            ``"centerness"``, ``"centerness+iou"``), trained on its positives.
        proposal_score: what ranks the proposals, as :class:`~lightning_rpn.core.rpn.RPN`'s:
            ``"objectness"``, ``"quality"`` (its objectness is then not trained) or
            ``"geometric_mean"``.
        seed: mixed with the epoch and each image's sampling key to seed the sampling.

    Its targets always come from ``targets`` (the stages' assignments depend on the predicted
    boxes); precomputed ``anchor_targets`` are not used (``data.assign_targets: false`` skips
    them in the DataLoader workers). Crowd boxes and ``allowed_border`` are not used either.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        in_channels: int = 256,
        num_stages: int = 2,
        conv_channels: int | None = None,
        dilation: int = 3,
        centre_ratio: float = 0.2,
        box_coder: BoxCoder | None = None,
        target_config: AnchorTargetConfig | None = None,
        pre_nms_top_n_train: int = ProposalConfig.pre_nms_top_n_train,
        post_nms_top_n_train: int = ProposalConfig.post_nms_top_n_train,
        pre_nms_top_n_test: int = ProposalConfig.pre_nms_top_n_test,
        post_nms_top_n_test: int = ProposalConfig.post_nms_top_n_test,
        nms_thresh: float = ProposalConfig.nms_thresh,
        min_size: float = ProposalConfig.min_size,
        score_thresh: float = ProposalConfig.score_thresh,
        reg_weight: float = 1.0,
        delta_scales: Sequence[Sequence[float]] | None = None,
        objectness_level: ObjectnessLevel = "any",
        box_loss_positives: BoxLossPositives = "sampled",
        test_iterations: int = 0,
        train_iterations: int = 0,
        quality: str | None = None,
        proposal_score: str = "objectness",
        seed: int = 0,
    ) -> None:
        try:
            proposal_config = ProposalConfig(
                pre_nms_top_n_train, post_nms_top_n_train, pre_nms_top_n_test, post_nms_top_n_test,
                nms_thresh, min_size, score_thresh,
            )
        except ValueError as error:
            raise SettingError(f"CascadeRPN: {error}") from None
        super().__init__(anchor_generator, box_coder, target_config, seed, proposal_config)
        check_one_square_anchor(anchor_generator)
        least = {"num_stages": 2, "dilation": 1, "in_channels": 1, "test_iterations": 0, "train_iterations": 0}
        for name, value in (("num_stages", num_stages), ("dilation", dilation), ("in_channels", in_channels),
                            ("test_iterations", test_iterations), ("train_iterations", train_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least[name]:
                raise SettingError(f"CascadeRPN: {name} must be an int >= {least[name]}, got {value!r}")
        if not 0.0 < centre_ratio <= 1.0:
            raise SettingError(f"CascadeRPN: centre_ratio must be in (0, 1], got {centre_ratio!r}")
        branches = parse_scoring(quality, proposal_score, "CascadeRPN")
        channels = in_channels if conv_channels is None else conv_channels
        scales = [(1.0,) * 4] * num_stages if delta_scales is None else list(delta_scales)
        if len(scales) != num_stages:
            raise SettingError(f"CascadeRPN: delta_scales needs one (sx, sy, sw, sh) per stage ({num_stages}), got {len(scales)}")
        try:
            self.stages = nn.ModuleList(
                CascadeStage(in_channels if s == 0 else channels, channels, adaptive=s > 0, dilation=dilation,
                             with_objectness=s == num_stages - 1, delta_scale=scales[s],
                             num_quality=len(branches))
                for s in range(num_stages)
            )
        except (TypeError, ValueError) as error:
            raise SettingError(f"CascadeRPN: delta_scales: {error}") from None
        for name, value, choices in (("objectness_level", objectness_level, OBJECTNESS_LEVELS),
                                     ("box_loss_positives", box_loss_positives, BOX_LOSS_POSITIVES)):
            if value not in choices:
                raise SettingError(f"CascadeRPN: {name} must be one of {choices}, got {value!r}")
        if not (math.isfinite(reg_weight) and reg_weight >= 0):
            raise SettingError(f"CascadeRPN: reg_weight must be a finite number >= 0, got {reg_weight!r}")
        self.centre_ratio = centre_ratio
        self.objectness_level = objectness_level
        self.box_loss_positives = box_loss_positives
        self.test_iterations = test_iterations
        self.train_iterations = train_iterations
        self.reg_weight = reg_weight
        self.quality = branches
        self.proposal_score = proposal_score

    def predict(self, levels: list[Tensor], anchors: list[Tensor]) -> CascadePrediction:
        """Run the stages on ``levels`` (``[B, C, H_l, W_l]``) from ``anchors`` (per level ``[H_l * W_l, 4]``).

        Torch ops on the feature sizes only, so ``torch.export`` traces it with dynamic sizes:
        the eager forward and the exported program (:mod:`lightning_rpn.tools.export`) both
        call it. The boxes passed from stage to stage are detached. The last stage then refines
        its own boxes ``test_iterations`` (eval mode) or ``train_iterations`` (training) more
        times, with its weights and input features; the scores stay those of its first pass. Each
        pass is appended (``boxes[num_stages + i]``): the proposals refine the last one, and the
        losses (evaluation's too) are those of training: the objectness of the last stage's first
        pass, on the boxes that pass saw, and the box loss of every stage and training iteration
        (evaluation's test iterations refine the proposals only).
        """
        batch = levels[0].shape[0]
        per_level = [a.shape[0] for a in anchors]
        boxes = torch.cat(anchors).unsqueeze(0).expand(batch, -1, -1)  # [B, N, 4], the stage's input boxes
        inputs = levels
        stage_boxes, stage_deltas = [], []
        logits: Tensor | None = None
        quality: Tensor | None = None
        for index, stage in enumerate(self.stages):
            hidden, deltas, logits, quality = self._run_stage(stage, inputs, boxes, per_level)
            stage_boxes.append(boxes)
            stage_deltas.append(deltas)
            if index < len(self.stages) - 1:
                boxes = self.box_coder.decode(deltas.detach(), boxes)
                inputs = hidden
        for _ in range(self.train_iterations if self.training else self.test_iterations):
            boxes = self.box_coder.decode(stage_deltas[-1].detach(), stage_boxes[-1])
            stage_boxes.append(boxes)
            stage_deltas.append(self._run_stage(self.stages[-1], inputs, boxes, per_level)[1])
        assert logits is not None
        scores = rank_logits(logits, quality, self.proposal_score)
        return CascadePrediction(stage_boxes, stage_deltas, logits, quality, scores, per_level)

    def _run_stage(self, stage: CascadeStage, inputs: list[Tensor], boxes: Tensor, per_level: list[int]
                   ) -> tuple[list[Tensor], Tensor, Tensor | None, Tensor | None]:
        """``stage`` on every level's ``inputs`` (an adaptive one placed on ``boxes [B, N, 4]``): its
        hidden features per level, deltas ``[B, N, 4]``, objectness ``[B, N]`` and quality
        ``[B, N, Q]`` (``None`` where it has none)."""
        generator = self.anchor_generator
        level_boxes = boxes.split(per_level, dim=1)
        hidden, deltas, logits, quality = [], [], [], []
        for level, (feature, stride) in enumerate(zip(inputs, generator.strides)):
            offsets = None
            if stage.adaptive:
                height, width = feature.shape[-2:]
                offsets = adaptive_offsets(level_boxes[level], height, width, float(stride), generator.offset * stride)
            h, d, o, q = stage(feature, offsets)
            hidden.append(h)
            deltas.append(d)
            logits.append(o)
            quality.append(q)
        return (hidden, torch.cat(deltas, dim=1), None if logits[0] is None else torch.cat(logits, dim=1),
                None if quality[0] is None else torch.cat(quality, dim=1))

    def _forward(self, inputs: ProposalInputs) -> tuple[list[tuple[Tensor, ...]], dict[str, Tensor]]:
        """:meth:`RegionProposer.forward` of the cascade: the last stage's boxes, ranked by the proposal score."""
        if inputs.anchor_targets is not None and inputs.targets is None:
            raise ValueError(
                "CascadeRPN: assigns its own targets from the gt boxes (they depend on the predicted boxes); "
                "pass targets, not only anchor_targets"
            )
        prediction = self.predict(inputs.levels, self.anchor_generator(inputs.shapes, device=inputs.device))
        losses: dict[str, Tensor] = {}
        if inputs.targets is not None:
            losses = self._losses(prediction, inputs)
        proposals: list[tuple[Tensor, ...]] = []
        if inputs.need_proposals:
            for image, size in enumerate(inputs.image_sizes):
                proposals += self._proposals(*prediction.image_levels(image), [size], inputs.proposal_logits)
        return proposals, losses

    def _losses(self, prediction: CascadePrediction, inputs: ProposalInputs) -> dict[str, Tensor]:
        """Every stage's (and training iteration's) IoU box loss, summed, and the last stage's
        objectness and quality losses (of its first pass)."""
        stage_boxes, stage_deltas, logits, quality = prediction[:4]
        device = inputs.device
        grid = self.anchor_generator.grid(inputs.shapes, device=device)
        gt_boxes, generators = self._gt_boxes(inputs)
        reg = torch.zeros((), dtype=torch.float32, device=device)
        passes = []
        # the passes training counts: evaluation's extra test iterations refine the proposals, and
        # counted here they made val/loss_rpn_reg a sum of more terms than train/loss_rpn_reg
        trained = len(self.stages) + self.train_iterations
        for index, (boxes, deltas) in enumerate(zip(stage_boxes[:trained], stage_deltas[:trained])):
            if not (torch.isfinite(boxes).all() and torch.isfinite(deltas).all()):
                # before matching them, which refuses non-finite boxes as bad input: a diverged
                # network, for the non-finite policy (raise with its hint, or skip the batch)
                raise NonFiniteLossError(
                    f"CascadeRPN: non-finite {'anchors' if index == 0 else 'boxes'} or deltas of pass {index + 1}; "
                    "check the learning rate (or set trainer.gradient_clip_val)"
                )
            with torch.no_grad():
                labels, positive, matched, target_boxes = self._pass_targets(index, boxes, gt_boxes, generators, grid)
            pred = self.box_coder.decode(deltas[positive].float(), boxes[positive].float())
            count = max(int(positive.sum()), 1)
            reg = reg + (1.0 - aligned_iou(pred, target_boxes)).sum() / count
            passes.append((labels, positive, matched, boxes, pred, target_boxes))
        # the last stage's first pass: what its objectness and quality learn from
        labels, positive, matched, boxes, pred, target_boxes = passes[len(self.stages) - 1]
        assert labels is not None
        if self.objectness_level != "any":  # the last stage's positives, as below
            with torch.no_grad():
                labels = self._own_level_labels(labels, positive, matched, grid, gt_boxes,
                                                aligned_iou(pred.detach(), target_boxes))
        sampled = labels >= 0
        cls = F.binary_cross_entropy_with_logits(
            logits[sampled].float(), labels[sampled].float(), reduction="sum"
        ) / sampled.sum().clamp(min=1)
        if quality is not None:
            cls = cls * (0.0 if self.proposal_score == "quality" else 1.0) + quality_loss(
                {name: quality[positive][:, branch] for branch, name in enumerate(self.quality)},
                boxes[positive].float(), pred, target_boxes,
            )
        losses = {"loss_rpn_cls": cls, "loss_rpn_reg": reg * float(self.reg_weight)}
        if not all(bool(torch.isfinite(value)) for value in losses.values()):
            raise NonFiniteLossError(
                f"CascadeRPN: non-finite loss ({ {k: v.item() for k, v in losses.items()} }); check the "
                "predicted deltas and the learning rate"
            )
        return losses

    def _pass_targets(self, index: int, boxes: Tensor, gt_boxes: list[Tensor], generators: list[torch.Generator],
                      grid: AnchorGrid) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        """Targets of pass ``index`` (a stage, or a training iteration after the last) on its input
        ``boxes [B, N, 4]``: sampled labels ``[B, N]`` (``None`` for stage 1, which has no
        objectness), the box loss's positives ``[B, N]``, matched gt indices ``[B, N]`` and the gt
        box of each positive ``[P, 4]`` (row-major)."""
        device = boxes.device
        labels = None
        if index == 0:
            assigned = [assign_centre_region(grid, gt, self.centre_ratio) for gt in gt_boxes]
            positive = torch.stack([p for p, _ in assigned])
            matched = torch.stack([m for _, m in assigned])
        else:
            config = self.target_config
            # each image's boxes are its own, so each is matched alone; the sampling is batched
            matches = [
                match_anchors_batched(box.float(), [gt], config.fg_iou, config.bg_iou, config.allow_low_quality)
                for box, gt in zip(boxes.detach(), gt_boxes)
            ]
            iou_labels = torch.cat([row for row, _ in matches])
            matched = torch.cat([match for _, match in matches])
            labels = sample_anchors_with_positives(
                iou_labels, config.batch_size_per_image, config.positive_fraction, generators
            )[0]
            positive = iou_labels == 1 if self.box_loss_positives == "all" else labels == 1
        first = torch.tensor([0] + [gt.shape[0] for gt in gt_boxes], device=device).cumsum(0)
        image_of = torch.nonzero(positive)[:, 0]
        all_gt = torch.cat([torch.zeros(0, 4, dtype=torch.float32, device=device), *gt_boxes])
        return labels, positive, matched, all_gt[first[image_of] + matched[positive]]

    def _own_level_labels(self, labels: Tensor, positive: Tensor, matched: Tensor, grid: AnchorGrid,
                          gt_boxes: list[Tensor], positive_ious: Tensor) -> Tensor:
        """Sampled labels ``[B, N]`` with the positives off their gt box's own level turned negative.

        ``positive [B, N]``: the box loss's positives (the sampled ones or every IoU positive), which
        pick each gt box's best level; ``positive_ious [P]``: the refined box's IoU with its gt box
        of each of them, in row-major order.
        """
        location_levels = torch.repeat_interleave(
            torch.arange(len(grid.levels), device=labels.device),
            torch.tensor([level.num_anchors for level in grid.levels], device=labels.device),
        )
        ious = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        ious[positive] = positive_ious.float()
        relabelled = labels.clone()
        for image, gt in enumerate(gt_boxes):
            if self.objectness_level == "size":
                gt_level = gt_levels(grid, gt)
            else:
                gt_level = best_levels(positive[image], matched[image], ious[image], location_levels, gt.shape[0])
            own = own_level_positives(positive[image], matched[image], location_levels, gt_level)
            relabelled[image][(labels[image] == 1) & ~own] = 0
        return relabelled
