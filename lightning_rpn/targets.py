"""Per-image RPN training targets: anchor labels and regression deltas.

Shapes: ``N`` anchors of an image, ``G`` ground-truth boxes, ``C`` crowd boxes.

The one function that both the data pipeline (in DataLoader workers) and the RPN's in-model
path call, so that both give identical targets for the same generator state:
match (``match_anchors``) -> ignore anchors covered by crowd regions -> sample
(``sample_anchors``) -> encode the matched gt box of each sampled positive (``BoxCoder``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .anchors import AnchorGrid
from .box_coder import BoxCoder
from .boxes import box_area
from .matching import match_anchors
from .sampling import sample_anchors

__all__ = ["AnchorTargetConfig", "assign_anchor_targets", "sample_generator"]

_IOA_BUDGET = 1 << 22  # anchor x crowd-box entries evaluated at once


@dataclass(frozen=True)
class AnchorTargetConfig:
    """How anchors are labelled and sampled (defaults: the Faster R-CNN recipe).

    Attributes:
        fg_iou: best IoU at or above which an anchor is positive.
        bg_iou: best IoU below which an anchor is negative (in between: ignored).
        allow_low_quality: also make each gt box's best anchors positive.
        allowed_border: if set, anchors reaching more than this many pixels outside the
            image are ignored and left out of matching; ``None`` keeps all anchors.
        batch_size_per_image: anchors sampled per image for the loss.
        positive_fraction: at most this fraction of the sample is positive.
        crowd_ioa: if set, non-positive anchors whose intersection with a crowd box covers at
            least this fraction of the anchor's area are ignored.
    """

    fg_iou: float = 0.7
    bg_iou: float = 0.3
    allow_low_quality: bool = True
    allowed_border: float | None = None
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    crowd_ioa: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise ValueError(
                f"AnchorTargetConfig: need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou}, fg_iou={self.fg_iou}"
            )
        if self.allowed_border is not None and self.allowed_border < 0:
            raise ValueError(f"AnchorTargetConfig: allowed_border must be >= 0 or None, got {self.allowed_border}")
        batch = self.batch_size_per_image
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise ValueError(
                f"AnchorTargetConfig: batch_size_per_image must be a positive int, got {self.batch_size_per_image!r}"
            )
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"AnchorTargetConfig: positive_fraction must be in [0, 1], got {self.positive_fraction}")
        if self.crowd_ioa is not None and not 0.0 < self.crowd_ioa <= 1.0:
            raise ValueError(f"AnchorTargetConfig: crowd_ioa must be in (0, 1] or None, got {self.crowd_ioa}")


def sample_generator(seed: int, image_id: int | str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, image_id)``, stable across processes and runs.

    The seed is a BLAKE2b digest of ``"{seed}:{image_id}"`` (Python's ``hash`` is salted per
    process), well mixed in the low 32 bits that the CPU generator actually uses.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{image_id}".encode("utf-8"), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return generator


def assign_anchor_targets(
    anchors: Tensor | AnchorGrid,
    gt_boxes: Tensor,
    image_size: tuple[int, int],
    config: AnchorTargetConfig,
    box_coder: BoxCoder,
    generator: torch.Generator | None = None,
    crowd_boxes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Labels int64 ``[N]`` (1 / 0 / -1 after sampling) and float32 ``[N, 4]`` target deltas.

    ``anchors`` may be an ``AnchorGrid`` (``AnchorGenerator.grid``) for the fast matching
    path; the result is the same as with its ``.anchors`` tensor. Deltas are the encoded
    matched gt box for sampled positives and 0 elsewhere. Runs without grad, in float32, on
    the anchors' device; crowd boxes are never matched.
    """
    anchor_boxes = anchors.anchors if isinstance(anchors, AnchorGrid) else anchors
    with torch.no_grad():
        anchor_boxes = anchor_boxes.float()
        device = anchor_boxes.device
        gt = gt_boxes.to(device=device, dtype=torch.float32)
        labels, matched = match_anchors(
            anchors,
            gt,
            config.fg_iou,
            config.bg_iou,
            config.allow_low_quality,
            image_size=image_size,
            allowed_border=config.allowed_border,
        )
        if crowd_boxes is not None and config.crowd_ioa is not None and crowd_boxes.numel():
            crowd = crowd_boxes.to(device=device, dtype=torch.float32).reshape(-1, 4)
            covered = _max_ioa(anchor_boxes, crowd) >= config.crowd_ioa
            labels[covered & (labels != 1)] = -1
        labels = sample_anchors(labels, config.batch_size_per_image, config.positive_fraction, generator)

        target_deltas = torch.zeros(anchor_boxes.shape[0], 4, dtype=torch.float32, device=device)
        positive = torch.nonzero(labels == 1).squeeze(1)
        if positive.numel():
            target_deltas[positive] = box_coder.encode(gt[matched[positive]], anchor_boxes[positive])
    return labels, target_deltas


def _max_ioa(anchors: Tensor, regions: Tensor) -> Tensor:
    """``[N]``: the largest fraction of each anchor's area covered by one of ``regions``."""
    area = box_area(anchors)
    result = torch.empty(anchors.shape[0], device=anchors.device)
    chunk = max(1, _IOA_BUDGET // regions.shape[0])
    for begin in range(0, anchors.shape[0], chunk):
        block = anchors[begin : begin + chunk]
        top_left = torch.maximum(block[:, None, :2], regions[None, :, :2])
        bottom_right = torch.minimum(block[:, None, 2:], regions[None, :, 2:])
        wh = (bottom_right - top_left).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        result[begin : begin + chunk] = (inter / area[begin : begin + chunk, None]).amax(dim=1)
    return result
