"""Proposal recall and average recall (AR) as a torchmetrics ``Metric``.

Shapes: ``B`` images, ``G`` gt boxes of an image, ``P`` proposals of an image, ``K`` proposal
budgets (top-k values), ``T`` IoU thresholds, ``R`` area ranges.

Recall definition (DESIGN.md; one-to-one, as detectron2's box-proposal evaluation and
mmdetection's ``eval_recalls``): per image, take the top-k proposals, compute the IoU matrix and
repeat ``min(P, G)`` times: pick the gt box whose best remaining proposal has the highest IoU,
record that IoU as the box's coverage, remove both. Unmatched boxes, and every box of an image
without proposals, have coverage 0. ``recall@t = #(coverage >= t) / #boxes`` and
``AR@k = mean_t recall@t``. Ties are broken like that loop run with ``torch.max``: lowest gt
index, then lowest proposal index (the better-scored one). IoUs are float32 and every comparison
(thresholds, area bounds) is made in float32, as in detectron2: a box covered at IoU exactly
``t`` counts at ``t``.

Area ranges: a gt box belongs to a range when ``lo <= area <= hi``, both ends closed, as in
COCOeval's ``evaluateImg`` and detectron2's ``_evaluate_box_proposals``: a box of area exactly
32² is both small and medium, one of exactly 96² both medium and large. Its area is the one given
to ``update(areas=...)``, else that of the box, ``(x2 - x1) * (y2 - y1)``. ``RPNModule`` gives
the annotation's ``area`` where the data has one (COCO files: the segmentation's area, what
COCOeval and detectron2 sort by), else the box area in original-image pixels (COCO's scale, when
it evaluates resized images); one rule for every source. Each range keeps only its own gt boxes
and is matched on its own: a box outside the range never takes a proposal away from one inside.
So on a COCO file ``AR_small/medium/large`` are detectron2's, but for two corners: the open
ranges end at infinity (theirs at 1e5², a box of over 10^10 px²), and the boxes of an image
without any proposal count as uncovered (detectron2 leaves them out). ``AR@k`` and
``recall@t@k`` count the ``"all"`` range, ``[0, inf]`` by default: every box.

How it stays fast. The loop above is the greedy matching that accepts (gt, proposal) pairs in
decreasing IoU order. Two facts make it cheap to batch:

* Pairs below the smallest threshold are decided after every pair above it, so dropping them
  leaves every coverage that can reach a threshold unchanged: only the pairs with
  ``IoU >= min(iou_thresholds)`` are kept (a sparse list, about one per useful proposal).
* A pair that is the best of its gt row and of its proposal column is accepted by the loop,
  whatever happens elsewhere. Accepting all such pairs at once, removing their rows and
  columns, and repeating, gives exactly the loop's matching in a few rounds.

So one padded IoU computation per batch (at the largest k), then one round-based matching on
the pair list copied for every (k, area range, image) problem at once (a pair belongs to the
top-k problems with k > its proposal index): no Python loop over images, budgets or ranges.
States are fixed-size hit counts per (k, threshold, area range) plus box counts per range, summed
across processes, so memory does not grow with the dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import Metric

from lightning_rpn.core.boxes import COCO_AREA_RANGES, check_gt_boxes

__all__ = [
    "COCO_AREA_RANGES",
    "DEFAULT_CURVE_PROPOSALS",
    "DEFAULT_IOU_THRESHOLDS",
    "RecallResults",
    "ProposalRecall",
    "greedy_coverage",
]

DEFAULT_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
DEFAULT_CURVE_PROPOSALS: tuple[int, ...] = (1, 10, 20, 50, 100, 200, 300, 500, 1000)


def greedy_coverage(rows: Tensor, cols: Tensor, ious: Tensor, num_rows: int) -> Tensor:
    """One-to-one greedy coverage of gt rows from a list of (row, column, IoU) edges.

    ``rows`` / ``cols`` (int64 ``[E]``) number gt boxes and proposals globally (several images,
    ranges and budgets are separate problems when their ids differ); ``ious`` (float32 ``[E]``,
    all > 0) are the IoUs of the kept pairs. Returns float32 ``[num_rows]``: the IoU each row
    is matched at, 0 for unmatched rows. Same matching as taking the highest remaining pair
    (ties: lowest row, then lowest column) and removing its row and column, repeatedly.
    """
    if not bool((ious > 0).all()):
        raise ValueError("greedy_coverage: ious must all be > 0 (drop the pairs that cannot count)")
    coverage = ious.new_zeros(num_rows)
    if rows.numel() == 0:
        return coverage
    # dense slots (sorted, so order within a row / column is kept) for the scatter reductions
    row_ids, row_slot = torch.unique(rows, return_inverse=True)
    col_ids, col_slot = torch.unique(cols, return_inverse=True)
    # int64 keys ordering a row's pairs by (IoU desc, column asc) and a column's pairs by
    # (IoU desc, row asc): the bits of a positive float32 sort like the float
    bits = ious.float().contiguous().view(torch.int32).long() << 32
    row_keys = bits | (len(col_ids) - 1 - col_slot)
    col_keys = bits | (len(row_ids) - 1 - row_slot)
    while row_slot.numel():
        row_best = torch.full((len(row_ids),), -1, dtype=torch.long, device=rows.device)
        col_best = torch.full((len(col_ids),), -1, dtype=torch.long, device=rows.device)
        row_best.scatter_reduce_(0, row_slot, row_keys, "amax")
        col_best.scatter_reduce_(0, col_slot, col_keys, "amax")
        # a pair that is the best of its row and of its column is taken by the loop
        accept = (row_keys == row_best[row_slot]) & (col_keys == col_best[col_slot])
        coverage[row_ids[row_slot[accept]]] = ious[accept]
        row_done = torch.zeros(len(row_ids), dtype=torch.bool, device=rows.device)
        col_done = torch.zeros(len(col_ids), dtype=torch.bool, device=rows.device)
        row_done[row_slot[accept]] = True
        col_done[col_slot[accept]] = True
        keep = ~(row_done[row_slot] | col_done[col_slot])
        row_slot, col_slot, ious = row_slot[keep], col_slot[keep], ious[keep]
        row_keys, col_keys = row_keys[keep], col_keys[keep]
    return coverage


def _padded_iou(gt: Tensor, proposals: Tensor) -> Tensor:
    """IoU of padded batches ``[B, G, 4] x [B, P, 4] -> [B, G, P]`` in float32.

    Same arithmetic as ``lightning_rpn.core.boxes.box_iou`` (so the same bits); zero-area padding
    rows give NaN, which the caller masks.
    """
    gx1, gy1, gx2, gy2 = (c[:, :, None] for c in gt.unbind(-1))
    px1, py1, px2, py2 = (c[:, None, :] for c in proposals.unbind(-1))
    area_gt = (gx2 - gx1) * (gy2 - gy1)
    area_prop = (px2 - px1) * (py2 - py1)
    inter_w = (torch.minimum(gx2, px2) - torch.maximum(gx1, px1)).clamp_(min=0)
    inter_h = (torch.minimum(gy2, py2) - torch.maximum(gy1, py1)).clamp_(min=0)
    inter = inter_w.mul_(inter_h)
    return inter / (area_gt + area_prop - inter)


class RecallResults(dict):
    """``ProposalRecall.compute()``'s keys and values; a recall key whose threshold has other
    decimals (``recall@0.7@1000``, as the design's API example writes it) finds its key
    (``recall@0.70@1000``); the keys themselves keep two decimals."""

    @staticmethod
    def _canonical(key: object) -> object:
        parts = key.split("@") if isinstance(key, str) else []
        if len(parts) != 3 or parts[0] != "recall":
            return key
        try:
            return f"recall@{float(parts[1]):.2f}@{parts[2]}"
        except ValueError:
            return key

    def __missing__(self, key: object) -> Tensor:
        canonical = self._canonical(key)
        if canonical != key and dict.__contains__(self, canonical):
            return dict.__getitem__(self, canonical)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or dict.__contains__(self, self._canonical(key))

    def get(self, key: object, default: Any = None) -> Any:
        return self[key] if key in self else default


class ProposalRecall(Metric):
    """Recall and average recall of class-agnostic proposals (see the module docstring).

    Args:
        iou_thresholds: IoU thresholds in (0, 1] (compared in float32); AR averages recall over
            them.
        max_proposals: proposal budgets k reported by ``compute()`` (``AR@k`` ...).
        area_ranges: name -> ``(lo, hi)`` gt-box area range ``lo <= area <= hi``; must contain
            ``"all"``. Defaults to the COCO limits (small [0, 32²], medium [32², 96²], large
            [96², inf]).
        curve_proposals: extra budgets for the recall-vs-proposals curve of ``curves()``
            (merged with ``max_proposals``).
        kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    ``update(proposals, targets, areas=None)``: ``proposals[i]`` are image i's boxes ``[P, 4]``
    sorted by score, best first; ``targets[i]`` its gt boxes ``[G, 4]``; both xyxy pixels.
    ``areas[i]`` (``[G]``, optional) are the areas that place image i's gt boxes in the area
    ranges instead of the boxes' own: the annotated areas (COCO's ``area``), or the areas in
    original-image pixels when the boxes are in resized ones (matching and IoUs use the boxes
    either way).

    ``compute()`` returns float tensors keyed ``"AR@{k}"``, ``"AR_{area}@{k}"`` (every range but
    ``"all"``) and ``"recall@{t:.2f}@{k}"`` for each k in ``max_proposals`` and each threshold t.
    A range without any gt box reports -1 (the COCO convention).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: Tensor
    num_boxes: Tensor

    def __init__(
        self,
        iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
        max_proposals: Sequence[int] = (100, 300, 1000),
        area_ranges: Mapping[str, tuple[float, float]] = COCO_AREA_RANGES,
        curve_proposals: Sequence[int] = DEFAULT_CURVE_PROPOSALS,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        thresholds = [float(t) for t in iou_thresholds]
        as_float32 = torch.tensor(thresholds, dtype=torch.float32)  # as update() compares them
        if not thresholds or not bool(((as_float32 > 0) & (as_float32 <= 1)).all()):
            raise ValueError(
                "ProposalRecall: iou_thresholds must be non-empty and in (0, 1], "
                f"got {list(iou_thresholds)}"
            )
        names = [f"{t:.2f}" for t in thresholds]
        if len(set(names)) != len(names):
            raise ValueError(
                f"ProposalRecall: iou_thresholds must be distinct at 2 decimals, got {names}"
            )
        budgets = [self._check_budget(k, "max_proposals") for k in max_proposals]
        if not budgets or len(set(budgets)) != len(budgets):
            raise ValueError(
                f"ProposalRecall: max_proposals must be non-empty and distinct, "
                f"got {list(max_proposals)}"
            )
        curve = [self._check_budget(k, "curve_proposals") for k in curve_proposals]
        if "all" not in area_ranges:
            raise ValueError(
                f"ProposalRecall: area_ranges must contain 'all', got {list(area_ranges)}"
            )
        for name, bounds in area_ranges.items():
            if len(bounds) != 2 or not float(bounds[0]) < float(bounds[1]):
                raise ValueError(
                    f"ProposalRecall: area_ranges[{name!r}] must be (lo, hi) with lo < hi, "
                    f"got {bounds}"
                )

        self.iou_thresholds: tuple[float, ...] = tuple(thresholds)
        self.max_proposals: tuple[int, ...] = tuple(budgets)
        self.area_names: tuple[str, ...] = ("all", *(n for n in area_ranges if n != "all"))
        self.area_ranges: dict[str, tuple[float, float]] = {
            n: (float(area_ranges[n][0]), float(area_ranges[n][1])) for n in self.area_names
        }
        self.curve_proposals: tuple[int, ...] = tuple(sorted(set(curve) | set(budgets)))
        self._k_index = {k: i for i, k in enumerate(self.curve_proposals)}

        num_k, num_t, num_r = len(self.curve_proposals), len(thresholds), len(self.area_names)
        self.add_state(
            "hits", torch.zeros(num_k, num_t, num_r, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("num_boxes", torch.zeros(num_r, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _check_budget(k: int, name: str) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ProposalRecall: {name} must hold positive ints, got {k!r}")
        return k

    def update(
        self,
        proposals: Sequence[Tensor],
        targets: Sequence[Tensor],
        areas: Sequence[Tensor] | None = None,
    ) -> None:
        """Accumulate hit counts for a batch of images (see the class docstring)."""
        boxes, gts = self._check_inputs(proposals, targets)
        gt_areas = None if areas is None else self._check_areas(areas, gts)
        if not gts:
            return
        device = gts[0].device
        num_images = len(gts)
        k_max = self.curve_proposals[-1]

        gt = pad_sequence(gts, batch_first=True)  # [B, G, 4]
        gt_valid = (
            torch.arange(gt.shape[1], device=device)
            < torch.tensor([len(g) for g in gts], device=device)[:, None]
        )
        if gt_areas is None:
            gt_area = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
        else:
            gt_area = pad_sequence(gt_areas, batch_first=True)  # [B, G]
        # float32 bounds (not the default dtype): compared in the areas' precision
        lows, highs = torch.tensor(
            list(self.area_ranges.values()), dtype=torch.float32, device=device
        ).unbind(1)
        in_range = (
            gt_valid & (gt_area >= lows[:, None, None]) & (gt_area <= highs[:, None, None])
        )  # [R, B, G]
        # out of place: states reset inside an inference-mode validate are inference tensors, which a
        # later fit's validation (no_grad, not inference mode) may not update in place
        self.num_boxes = self.num_boxes + in_range.sum(dim=(1, 2)).to(self.num_boxes.device)
        if gt.shape[1] == 0:
            return

        kept = [b[:k_max] for b in boxes]
        num_props = torch.tensor([len(b) for b in kept], device=device)
        if int(num_props.max()) == 0:
            return
        props = pad_sequence(kept, batch_first=True)  # [B, P, 4]
        prop_valid = torch.arange(props.shape[1], device=device) < num_props[:, None]
        iou = _padded_iou(gt, props)
        # float32 thresholds, as the IoUs: the filter and the hit counts compare the same values
        thresholds = torch.tensor(self.iou_thresholds, dtype=torch.float32, device=device)
        useful = gt_valid[:, :, None] & prop_valid[:, None, :] & (iou >= thresholds.min())

        # pairs that can reach a threshold, copied once per (budget k, area range) holding them;
        # each copy is its own matching problem: problem = (k, range, image)
        image, gt_i, prop_i = useful.nonzero(as_tuple=True)
        range_i, pair = in_range[:, image, gt_i].nonzero(as_tuple=True)
        budgets = torch.tensor(self.curve_proposals, device=device)
        k_i, copy = (prop_i[pair][None, :] < budgets[:, None]).nonzero(as_tuple=True)
        pair = pair[copy]
        num_r, num_gt, num_p = len(self.area_names), gt.shape[1], props.shape[1]
        problem = (k_i * num_r + range_i[copy]) * num_images + image[pair]
        coverage = greedy_coverage(
            rows=problem * num_gt + gt_i[pair],
            cols=problem * num_p + prop_i[pair],
            ious=iou[image[pair], gt_i[pair], prop_i[pair]],
            num_rows=len(budgets) * num_r * num_images * num_gt,
        )
        coverage = coverage.view(len(budgets), num_r, 1, num_images * num_gt)
        hits = (coverage >= thresholds[:, None]).sum(dim=3)  # [K, R, T]
        self.hits = self.hits + hits.transpose(1, 2).to(self.hits.device)

    def _check_inputs(
        self, proposals: Sequence[Tensor], targets: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        if isinstance(proposals, Tensor) or isinstance(targets, Tensor):
            raise TypeError(
                "ProposalRecall.update: proposals and targets must be lists with one [N, 4] "
                "tensor per image"
            )
        if len(proposals) != len(targets):
            raise ValueError(
                f"ProposalRecall.update: got {len(proposals)} proposal tensors but "
                f"{len(targets)} target tensors; expected one of each per image"
            )
        boxes: list[Tensor] = []
        for i, b in enumerate(proposals):
            if isinstance(b, (tuple, list)):
                raise TypeError(
                    f"ProposalRecall.update: proposals[{i}] is a {type(b).__name__}; "
                    "pass the boxes only "
                    "(for generate_proposals output use [boxes for boxes, _ in proposals])"
                )
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(
                    f"ProposalRecall.update: proposals[{i}] must be a [P, 4] tensor, got {shape}"
                )
            boxes.append(b.float())
        gts: list[Tensor] = []
        for i, g in enumerate(targets):
            if isinstance(g, Mapping):
                raise TypeError(
                    f"ProposalRecall.update: targets[{i}] is a dict; pass the gt boxes tensor "
                    "[G, 4] (e.g. target['boxes'])"
                )
            if not isinstance(g, Tensor) or g.dim() != 2 or g.shape[1] != 4:
                shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(
                    f"ProposalRecall.update: targets[{i}] must be a [G, 4] tensor, got {shape}"
                )
            gts.append(g.float())
        if gts:
            all_gt = torch.cat(gts)
            bad = (
                ~torch.isfinite(all_gt).all(dim=1)
                | (all_gt[:, 2] <= all_gt[:, 0])
                | (all_gt[:, 3] <= all_gt[:, 1])
            )
            if bool(bad.any()):
                for i, g in enumerate(gts):
                    check_gt_boxes(g, where=f"ProposalRecall.update: targets[{i}]")
            if not bool(torch.isfinite(torch.cat(boxes)).all()):
                image = next(i for i, b in enumerate(boxes) if not bool(torch.isfinite(b).all()))
                raise ValueError(
                    f"ProposalRecall.update: proposals[{image}] has non-finite coordinates"
                )
        return boxes, gts

    @staticmethod
    def _check_areas(areas: Sequence[Tensor], gts: list[Tensor]) -> list[Tensor]:
        """``areas`` as float32 ``[G]`` tensors on the gt boxes' devices, one per image."""
        if isinstance(areas, Tensor) or len(areas) != len(gts):
            count = "a tensor" if isinstance(areas, Tensor) else f"{len(areas)} area tensors"
            raise ValueError(
                f"ProposalRecall.update: got {count} for {len(gts)} images; pass areas as a "
                "list with one [G] tensor per image, like targets"
            )
        out: list[Tensor] = []
        for i, (a, g) in enumerate(zip(areas, gts)):
            if not isinstance(a, Tensor) or a.shape != (len(g),) or not bool(torch.isfinite(a).all()):
                shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
                raise ValueError(
                    f"ProposalRecall.update: areas[{i}] must be {len(g)} finite areas (one per "
                    f"gt box of targets[{i}]), got {shape}"
                )
            out.append(a.to(device=g.device, dtype=torch.float32))
        return out

    def _recall(self) -> Tensor:
        """Recall per (k, threshold, area range) ``[K, T, R]`` in float64, -1 where no gt box."""
        boxes = self.num_boxes.double()
        recall = self.hits.double() / boxes.clamp(min=1)
        return torch.where(boxes > 0, recall, torch.full_like(recall, -1.0))

    def compute(self) -> dict[str, Tensor]:
        """AR and recall keys for every budget in ``max_proposals`` (see the class docstring)."""
        recall = self._recall()
        average = recall.mean(dim=1)  # [K, R]; -1 stays -1 for empty ranges
        out: dict[str, Tensor] = RecallResults()
        for k in self.max_proposals:
            k_i = self._k_index[k]
            for r_i, name in enumerate(self.area_names):
                key = f"AR@{k}" if name == "all" else f"AR_{name}@{k}"
                out[key] = average[k_i, r_i].float()
        for k in self.max_proposals:
            for t_i, t in enumerate(self.iou_thresholds):
                out[f"recall@{t:.2f}@{k}"] = recall[self._k_index[k], t_i, 0].float()
        return out

    def curves(self) -> dict[str, tuple[list, list[float]]]:
        """Recall curves on all gt boxes, synced across processes like ``compute()``.

        ``"recall_vs_iou"``: (thresholds, recall at each) for the largest ``max_proposals``;
        ``"recall_vs_proposals"``: (budgets of ``curve_proposals``, AR at each).
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync and not self._is_synced,
            should_unsync=self._should_unsync,
        ):
            recall = self._recall()[:, :, 0]
        head = self._k_index[max(self.max_proposals)]
        return {
            "recall_vs_iou": (list(self.iou_thresholds), recall[head].tolist()),
            "recall_vs_proposals": (list(self.curve_proposals), recall.mean(dim=1).tolist()),
        }
