"""Per-image RPN training targets: anchor labels and regression deltas.

Shapes: ``B`` images, ``N`` anchors of an image, ``G`` ground-truth boxes, ``C`` crowd boxes.

match (``match_anchors_batched``, crowd regions included) -> sample
(``sample_anchors_with_positives``) -> encode the matched gt box of each sampled positive
(``BoxCoder``). ``assign_batch_targets`` does it for a batch of images sharing their anchors,
dense or, with ``compact=True``, with only the positives' deltas (what DataLoader workers
send); ``assign_anchor_targets`` is a batch of one. The data pipeline (in DataLoader workers)
and the RPN's in-model path both go through ``assign_batch_targets``, so both give identical
targets for the same generator states.

With ``allowed_border`` set (Faster R-CNN's 0), an image whose anchors all reach farther outside
it (a small image, large anchors) keeps no anchor: it adds nothing to the loss, and a data set of
such images trains nothing. The first such image with gt boxes warns, once per process.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .anchors import AnchorGrid
from .box_coder import BoxCoder
from .config import AnchorTargetConfig
from .matching import Backend, match_anchors_batched
from .sampling import sample_anchors_with_positives

__all__ = [
    "AnchorTargetConfig",
    "assign_anchor_targets",
    "assign_batch_targets",
    "dense_target_deltas",
    "sample_generator",
]

_warned_no_anchor_inside = False  # the border warning is given once per process


def sample_generator(seed: int, image_id: int | str, epoch: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, image_id)``, stable across processes and runs.

    The epoch makes every epoch draw a fresh sample of an image's anchors (as Faster R-CNN
    samples afresh every iteration) while a run stays reproducible and resumable. The seed is
    a BLAKE2b digest of ``"{seed}:{epoch}:{image_id}"`` (Python's ``hash`` is salted per
    process), well mixed in the low 32 bits that the CPU generator actually uses.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"sample_generator: epoch must be a non-negative int, got {epoch!r}")
    digest = hashlib.blake2b(f"{int(seed)}:{epoch}:{image_id}".encode("utf-8"), digest_size=8).digest()
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
    *,
    backend: Backend = "auto",
    image_id: int | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Labels int64 ``[N]`` (1 / 0 / -1 after sampling) and float32 ``[N, 4]`` target deltas.

    ``assign_batch_targets`` for one image: deltas are the encoded matched gt box for sampled
    positives and 0 elsewhere; crowd boxes are never matched. ``image_id`` names the image in warnings.
    """
    labels, deltas = assign_batch_targets(
        anchors, [gt_boxes], [image_size], config, box_coder, [generator], [crowd_boxes], backend=backend,
        image_ids=None if image_id is None else [image_id],
    )
    return labels[0], deltas[0]


def assign_batch_targets(
    anchors: Tensor | AnchorGrid,
    gt_boxes: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    config: AnchorTargetConfig,
    box_coder: BoxCoder,
    generators: Sequence[torch.Generator | None],
    crowd_boxes: Sequence[Tensor | None] | None = None,
    *,
    compact: bool = False,
    backend: Backend = "auto",
    image_ids: Sequence[int | str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampled anchor labels and regression targets of a batch of images sharing ``anchors [N, 4]``.

    Returns labels int64 ``[B, N]`` and target deltas float32 ``[B, N, 4]`` (0 except at
    sampled positives); with ``compact``, labels int8 ``[B, N]`` and the positives' deltas
    only, float32 ``[P, 4]`` in the row-major order of ``labels == 1`` (``dense_target_deltas``
    restores ``[B, N, 4]``). Row ``i`` uses ``generators[i]`` and ``crowd_boxes[i]``; runs
    without grad, in float32, on the anchors' device, with ``backend`` for matching and
    sampling (see :mod:`~lightning_rpn.core.matching`). ``image_ids`` name the images in the
    warning given when ``config.allowed_border`` leaves an image with gt boxes no anchor.
    """
    count = len(gt_boxes)
    if len(image_sizes) != count or len(generators) != count or (crowd_boxes is not None and len(crowd_boxes) != count):
        raise ValueError(
            f"assign_batch_targets: {count} gt_boxes, {len(image_sizes)} image_sizes, {len(generators)} generators"
            + ("" if crowd_boxes is None else f" and {len(crowd_boxes)} crowd_boxes")
            + "; expected one of each per image"
        )
    anchor_boxes = (anchors.anchors if isinstance(anchors, AnchorGrid) else anchors).float()
    device = anchor_boxes.device
    with torch.no_grad():
        gt = [boxes.to(device=device, dtype=torch.float32) for boxes in gt_boxes]
        labels, matched = match_anchors_batched(
            anchor_boxes,
            gt,
            config.fg_iou,
            config.bg_iou,
            config.allow_low_quality,
            image_sizes=image_sizes,
            allowed_border=config.allowed_border,
            crowd_boxes=crowd_boxes,
            crowd_ioa=config.crowd_ioa,
            compact=True,
            backend=backend,
        )
        if config.allowed_border is not None and not _warned_no_anchor_inside:
            _warn_if_no_anchor_left(labels, anchor_boxes, gt, image_sizes, config.allowed_border, image_ids)
        sampled, image, anchor = sample_anchors_with_positives(
            labels, config.batch_size_per_image, config.positive_fraction, generators, inplace=True, backend=backend
        )
        order = torch.argsort(image * anchor_boxes.shape[0] + anchor)  # row-major, as labels == 1
        image, anchor = image[order].to(device), anchor[order].to(device)
        positive_deltas = torch.zeros(0, 4, dtype=torch.float32, device=device)
        if image.numel():
            first_gt = torch.tensor([0] + [boxes.shape[0] for boxes in gt], device=device).cumsum(0)
            matched_boxes = torch.cat(gt)[first_gt[image] + matched[image, anchor]]
            positive_deltas = box_coder.encode(matched_boxes, anchor_boxes[anchor])
    if compact:
        return sampled, positive_deltas
    return sampled.long(), dense_target_deltas(sampled, positive_deltas)


def _warn_if_no_anchor_left(
    labels: Tensor,
    anchor_boxes: Tensor,
    gt: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    allowed_border: float,
    image_ids: Sequence[int | str] | None,
) -> None:
    """Warn (once per process) when matching under the border filter left an image with gt boxes no
    labelled anchor (``labels [B, N]`` all -1): its loss is then exactly 0, and nothing trains on it.
    Read from the labels, so the border test is not computed a second time."""
    global _warned_no_anchor_inside
    rows = [i for i, boxes in enumerate(gt) if boxes.shape[0]]
    if not rows:
        return
    kept = (labels[rows] != -1).any(1)
    empty = [i for i, any_kept in zip(rows, kept.tolist()) if not any_kept]
    if not empty:
        return
    row = empty[0]
    height, width = image_sizes[row]
    sides = anchor_boxes[:, 2:] - anchor_boxes[:, :2]
    anchor_w, anchor_h = sides[int(torch.argmin(sides.prod(1)))].tolist()
    image = f"image {image_ids[row]!r}" if image_ids is not None else f"image {row} of the batch"
    warnings.warn(
        f"{image} ({width}x{height} px, w x h, as trained) has {gt[row].shape[0]} gt box(es) but no anchor "
        f"within model.allowed_border={allowed_border:g} px of its border (the smallest anchor is "
        f"{anchor_w:.0f}x{anchor_h:.0f} px): every anchor is ignored, so the image adds nothing to the loss "
        "(0 when all images are like it) and trains nothing. Set model.allowed_border: null to keep border "
        "anchors (or a larger value), or train on larger images (data.min_sizes) or with smaller anchors. "
        "Warned once.",
        UserWarning,
        stacklevel=3,
    )
    _warned_no_anchor_inside = True


def dense_target_deltas(anchor_labels: Tensor, positive_deltas: Tensor) -> Tensor:
    """Float32 ``[B, N, 4]``: ``positive_deltas [P, 4]`` at ``anchor_labels == 1`` (row-major), 0 elsewhere."""
    positive = anchor_labels == 1
    count = int(positive.sum())
    if positive_deltas.dim() != 2 or positive_deltas.shape != (count, 4):
        raise ValueError(
            f"dense_target_deltas: {count} positive anchors in anchor_labels {tuple(anchor_labels.shape)} "
            f"but positive_deltas has shape {tuple(positive_deltas.shape)}; expected [{count}, 4]"
        )
    deltas = torch.zeros(*anchor_labels.shape, 4, dtype=torch.float32, device=anchor_labels.device)
    deltas[positive] = positive_deltas.to(device=deltas.device, dtype=torch.float32)
    return deltas
