"""Region proposals from RPN predictions: top-k, decode, clip, filter, NMS, top-k.

Shapes: ``B`` images, ``L`` levels, ``N_l`` anchors of level ``l`` of an image, ``K`` the
pre-NMS candidates of an image (``sum_l min(pre_nms_top_n, N_l)``), ``P`` proposals.

Per image and level the ``pre_nms_top_n`` highest logits are kept *before* decoding, so only
``B * K`` boxes are decoded instead of ``B * sum_l N_l``. Candidates are clipped to the image,
boxes with a side shorter than ``min_size`` and probabilities below ``score_thresh`` are
dropped, NMS runs within each level, and the best ``post_nms_top_n`` survivors are returned,
best first. These are the steps and the order of torchvision's
``RegionProposalNetwork.filter_proposals``: with the same settings both return the same boxes
with the same scores in the same order, except among proposals whose float32 probabilities are
exactly equal (frequent, as ``sigmoid`` saturates): torchvision orders those by an unstable
sort, here they are ordered by logit, then by candidate position.

Two things make it faster than decoding everything and looping over images:

- top-k, gathering, decoding, clipping and filtering run on the whole batch at once;
- on CPU, NMS stops early. A box's fate in greedy NMS depends only on higher-ranked boxes, so
  NMS first runs on the candidates ranked at least as high as the ``post_nms_top_n``-th best
  and admits more only while fewer than ``post_nms_top_n`` survive (``_nms_per_level_top``).
  On CUDA, where NMS is one parallel kernel per call, all levels go through one
  ``batched_nms`` call per image instead (``_nms_all_levels_top``).

NMS ranks by logit rather than probability: both give the same order wherever the
probabilities differ, and logits separate boxes that ``sigmoid`` rounds to the same value.

The steps are two functions that the eager path and the exported program (``export.py``)
share: :func:`proposal_candidates` (per-level top-k, decode, clip, min size and score filter,
torch ops only, so ``torch.export`` traces it with dynamic sizes) and
:func:`select_image_proposals` (one image's NMS within levels and top-k). The NMS rule is one;
``nms_method`` picks how it is computed: ``"early_stop"`` (CPU, host syncs), ``"batched"``
(one ``batched_nms`` call, CUDA) or ``"per_level"`` (one ``nms`` call per level with no host
sync, the traceable form the exported program uses). All three keep the same boxes in the same
order (``tests/test_proposals.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, overload

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from .box_coder import BoxCoder
from .config import ProposalConfig

__all__ = ["NmsMethod", "generate_proposals", "proposal_candidates", "select_image_proposals"]

NmsMethod = Literal["early_stop", "batched", "per_level"]
NMS_METHODS: tuple[str, ...] = ("early_stop", "batched", "per_level")

_DEFAULT_BOX_CODER = BoxCoder()

_NMS_SENTINELS = torch.tensor([[-4.0, -4.0, -3.0, -3.0], [-2.0, -2.0, -1.0, -1.0]])
"""Two boxes outside every image (``x, y < 0``), disjoint: see :func:`_nms_each_level_top`."""


def _check_inputs(
    objectness: Sequence[Tensor],
    deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
) -> None:
    if not (len(objectness) == len(deltas) == len(anchors)) or len(objectness) == 0:
        raise ValueError(
            "generate_proposals: objectness, deltas and anchors need one entry per level, got "
            f"{len(objectness)}, {len(deltas)} and {len(anchors)} levels"
        )
    batch = len(image_sizes)
    for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
        if obj.dim() != 2:
            raise ValueError(
                f"generate_proposals: objectness[{level}] must be [B, N_l] logits, got {tuple(obj.shape)} "
                "(softmax heads: convert pairs with lightning_rpn.core.head.objectness_logits)"
            )
        n = obj.shape[1]
        if obj.shape[0] != batch:
            raise ValueError(
                f"generate_proposals: objectness[{level}] has {obj.shape[0]} images but image_sizes has {batch}"
            )
        if tuple(dlt.shape) != (batch, n, 4):
            raise ValueError(
                f"generate_proposals: deltas[{level}] has shape {tuple(dlt.shape)}, expected [{batch}, {n}, 4]"
            )
        if tuple(anc.shape) != (n, 4):
            raise ValueError(f"generate_proposals: anchors[{level}] has shape {tuple(anc.shape)}, expected [{n}, 4]")


def _nms_per_level_top(
    boxes: Tensor, logits: Tensor, level_counts: list[int], iou_threshold: float, max_keep: int
) -> Tensor:
    """Indices of the ``max_keep`` best boxes surviving NMS within each level, best first.

    Candidates are grouped by level (``level_counts`` rows each), each group sorted by
    descending logit. NMS first sees only the candidates ranked at least as high as the
    ``max_keep``-th best overall (a prefix of every group). While fewer than ``max_keep``
    survive, the window grows; each round runs NMS on the survivors so far plus the newly
    admitted boxes, which is exact: survivors never suppress each other, suppressed boxes never
    suppress anything, and every new box ranks below every old one.
    """
    num = logits.numel()
    if num == 0 or max_keep <= 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    ranked = logits.sort(descending=True).values
    starts = [0]
    for count in level_counts:
        starts.append(starts[-1] + count)
    survivors = [torch.empty(0, dtype=torch.int64, device=logits.device) for _ in level_counts]
    admitted = [0] * len(level_counts)
    window = min(num, max_keep)
    while True:
        floor = ranked[window - 1]
        # Per-level prefix lengths (candidates with logit >= floor), in one host sync.
        prefix = torch.stack([(logits[s:e] >= floor).sum() for s, e in zip(starts[:-1], starts[1:])]).tolist()
        for level, (start, length) in enumerate(zip(starts[:-1], prefix)):
            if length > admitted[level]:
                new = torch.arange(start + admitted[level], start + length, device=logits.device)
                candidates = torch.cat((survivors[level], new))
                survivors[level] = candidates[nms(boxes[candidates], logits[candidates], iou_threshold)]
                admitted[level] = length
        num_kept = sum(int(kept.numel()) for kept in survivors)
        if window == num or num_kept >= max_keep:
            break
        # Grow by the expected number of candidates still needed at the survival rate so far.
        needed = (max_keep - num_kept) * window // max(num_kept, 1)
        window = min(num, window + max(needed + needed // 4, 64))
    kept_idx = torch.cat(survivors).sort().values
    order = logits[kept_idx].sort(descending=True, stable=True).indices
    return kept_idx[order[:max_keep]]


def _nms_all_levels_top(boxes: Tensor, logits: Tensor, levels: Tensor, iou_threshold: float, max_keep: int) -> Tensor:
    """Same result as :func:`_nms_per_level_top` in one ``batched_nms`` call (for CUDA, where
    NMS is one parallel kernel and every extra call costs a launch and a host sync)."""
    kept = batched_nms(boxes, logits, levels, iou_threshold).sort().values
    return kept[logits[kept].sort(descending=True, stable=True).indices[:max_keep]]


def _nms_each_level_top(
    boxes: Tensor, logits: Tensor, valid: Tensor, level_counts: Sequence[int], iou_threshold: float, max_keep: int
) -> Tensor:
    """Same result as :func:`_nms_per_level_top` on the ``valid`` candidates, as indices into all
    of them: one ``nms`` call per level and no host sync, so it traces with symbolic counts.

    torchvision's fake ``nms`` kernel declares that every call keeps at least 2 boxes (the
    ``min=2`` default of the deprecated ``create_unbacked_symint`` it calls), and an exported
    program asserts that at run time, so a level keeping 0 or 1 box would fail. Each call
    therefore also gets two sentinel boxes (:data:`_NMS_SENTINELS`), left of and above the image
    (candidates are clipped to it), disjoint from each other and ranked last: they suppress
    nothing, always survive, and are dropped from the result.
    """
    kept, start = [], 0
    sentinels = _NMS_SENTINELS.to(boxes.device)
    sentinel_logits = torch.full((2,), -math.inf, dtype=logits.dtype, device=logits.device)
    for count in level_counts:
        level = torch.nonzero(valid[start : start + count]).squeeze(1) + start
        keep = nms(torch.cat((boxes[level], sentinels)), torch.cat((logits[level], sentinel_logits)), iou_threshold)
        kept.append(level[keep[keep < level.shape[0]]])
        start = start + count
    kept_idx = torch.cat(kept).sort().values
    return kept_idx[logits[kept_idx].sort(descending=True, stable=True).indices[:max_keep]]


def proposal_candidates(
    objectness: Sequence[Tensor],
    deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    image_sizes: Tensor,
    pre_nms_top_n: int,
    min_size: float,
    score_thresh: float,
    box_coder: BoxCoder,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[int]]:
    """The pre-NMS candidates of a batch: ``(boxes [B, K, 4], logits [B, K], probabilities [B, K],
    valid [B, K] bool, level_counts)``.

    Per image and level the ``min(pre_nms_top_n, N_l)`` best logits (``level_counts``, level
    after level, descending within a level), their boxes decoded and clipped to
    ``image_sizes`` (``[B, 2]`` ``(h, w)``, any number type); ``valid`` marks boxes with both
    sides ``>= min_size`` and probability ``>= score_thresh``. Torch ops only (no host sync), so
    it traces under ``torch.export`` with symbolic ``N_l``.
    """
    device = objectness[0].device
    batch_idx = torch.arange(objectness[0].shape[0], device=device)[:, None]
    top_logits, top_deltas, top_anchors, level_counts = [], [], [], []
    for obj, dlt, anc in zip(objectness, deltas, anchors):
        k = torch.sym_min(pre_nms_top_n, obj.shape[1])
        logits, idx = obj.float().topk(k, dim=1)
        top_logits.append(logits)
        top_deltas.append(dlt[batch_idx, idx])
        top_anchors.append(anc.to(device)[idx])
        level_counts.append(k)
    logits = torch.cat(top_logits, dim=1)
    boxes = box_coder.decode(torch.cat(top_deltas, dim=1), torch.cat(top_anchors, dim=1))
    limits = image_sizes.to(device=device, dtype=boxes.dtype).flip(-1).repeat(1, 2)  # (w, h, w, h)
    boxes = torch.minimum(boxes.clamp(min=0), limits[:, None, :])
    probs = logits.sigmoid()
    side = boxes[..., 2:] - boxes[..., :2]
    valid = (side[..., 0] >= min_size) & (side[..., 1] >= min_size) & (probs >= score_thresh)
    return boxes, logits, probs, valid, level_counts


def select_image_proposals(
    boxes: Tensor,
    logits: Tensor,
    valid: Tensor,
    level_counts: Sequence[int],
    nms_thresh: float,
    post_nms_top_n: int,
    nms_method: NmsMethod,
) -> Tensor:
    """Indices into one image's ``K`` candidates of its proposals, best logit first.

    ``boxes [K, 4]``, ``logits [K]``, ``valid [K]`` and ``level_counts`` as
    :func:`proposal_candidates` gives them for the image: greedy NMS at ``nms_thresh`` within
    each level over the valid candidates, then the ``post_nms_top_n`` best survivors of all
    levels (ties by level, then by rank within the level). ``nms_method`` only chooses how
    this is computed (see the module docstring).
    """
    if nms_method == "per_level":
        return _nms_each_level_top(boxes, logits, valid, level_counts, nms_thresh, post_nms_top_n)
    keep = torch.nonzero(valid).squeeze(1)
    if nms_method == "early_stop":
        counts = torch.stack([v.sum() for v in valid.split(list(level_counts))]).tolist()
        best = _nms_per_level_top(boxes[keep], logits[keep], counts, nms_thresh, post_nms_top_n)
    elif nms_method == "batched":
        counts = torch.tensor(list(level_counts))
        levels = torch.repeat_interleave(torch.arange(len(level_counts)), counts).to(valid.device)
        best = _nms_all_levels_top(boxes[keep], logits[keep], levels[keep], nms_thresh, post_nms_top_n)
    else:
        raise ValueError(f"select_image_proposals: nms_method must be one of {NMS_METHODS}, got {nms_method!r}")
    return keep[best]


@overload
def generate_proposals(
    objectness: Sequence[Tensor],
    deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    pre_nms_top_n: int = ...,
    post_nms_top_n: int = ...,
    nms_thresh: float = ...,
    min_size: float = ...,
    score_thresh: float = ...,
    *,
    box_coder: BoxCoder | None = ...,
    return_logits: Literal[False] = ...,
    nms_method: NmsMethod | None = ...,
) -> list[tuple[Tensor, Tensor]]: ...


@overload
def generate_proposals(
    objectness: Sequence[Tensor],
    deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    pre_nms_top_n: int = ...,
    post_nms_top_n: int = ...,
    nms_thresh: float = ...,
    min_size: float = ...,
    score_thresh: float = ...,
    *,
    box_coder: BoxCoder | None = ...,
    return_logits: Literal[True],
    nms_method: NmsMethod | None = ...,
) -> list[tuple[Tensor, Tensor, Tensor]]: ...


@torch.no_grad()
def generate_proposals(
    objectness: Sequence[Tensor],
    deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    pre_nms_top_n: int = ProposalConfig.pre_nms_top_n_test,
    post_nms_top_n: int = ProposalConfig.post_nms_top_n_test,
    nms_thresh: float = ProposalConfig.nms_thresh,
    min_size: float = ProposalConfig.min_size,
    score_thresh: float = ProposalConfig.score_thresh,
    *,
    box_coder: BoxCoder | None = None,
    return_logits: bool = False,
    nms_method: NmsMethod | None = None,
) -> list[tuple[Tensor, Tensor]] | list[tuple[Tensor, Tensor, Tensor]]:
    """Proposals per image: ``(boxes [P, 4], objectness probabilities [P])``, best first.

    Args:
        objectness: per level ``[B, N_l]`` logits.
        deltas: per level ``[B, N_l, 4]`` predicted deltas.
        anchors: per level ``[N_l, 4]`` anchors (the same for every image).
        image_sizes: ``(h, w)`` of each image before padding; boxes are clipped to it.
        pre_nms_top_n: candidates kept per image and level before NMS.
        post_nms_top_n: proposals kept per image after NMS.
        nms_thresh: IoU above which a lower-scoring box of the same level is suppressed.
        min_size: boxes with width or height below this (after clipping) are dropped.
        score_thresh: candidates with probability below this are dropped.
        box_coder: delta parametrisation (default ``BoxCoder()``).
        return_logits: also return each proposal's objectness logit, ``(boxes, probabilities,
            logits [P])``: probabilities saturate at 1.0 in float32, logits keep the ranking.
        nms_method: how NMS is computed (same boxes either way, see the module docstring);
            ``None`` chooses by device: ``"early_stop"`` off CUDA, ``"batched"`` on CUDA.

    Runs without gradients; boxes, scores and logits are float32.
    """
    _check_inputs(objectness, deltas, anchors, image_sizes)
    if pre_nms_top_n < 1 or post_nms_top_n < 0:
        raise ValueError(
            "generate_proposals: need pre_nms_top_n >= 1 and post_nms_top_n >= 0, "
            f"got {pre_nms_top_n} and {post_nms_top_n}"
        )
    if not 0.0 <= nms_thresh <= 1.0:  # as ProposalConfig checks it; 1.5 suppressed nothing, silently
        raise ValueError(f"generate_proposals: nms_thresh must be in [0, 1], got {nms_thresh}")
    coder = _DEFAULT_BOX_CODER if box_coder is None else box_coder
    sizes = torch.tensor([(h, w) for h, w in image_sizes], dtype=torch.float32).reshape(-1, 2)
    boxes, logits, probs, valid, level_counts = proposal_candidates(
        objectness, deltas, anchors, sizes, pre_nms_top_n, min_size, score_thresh, coder
    )
    method: NmsMethod = nms_method or ("early_stop" if boxes.device.type != "cuda" else "batched")
    results: list = []
    for image in range(len(image_sizes)):
        chosen = select_image_proposals(
            boxes[image], logits[image], valid[image], level_counts, nms_thresh, post_nms_top_n, method
        )
        if return_logits:
            results.append((boxes[image, chosen], probs[image, chosen], logits[image, chosen]))
        else:
            results.append((boxes[image, chosen], probs[image, chosen]))
    return results
