"""ProposalRecall against a plain-loop reference of DESIGN.md's recall definition."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from lightning_rpn.evaluation.metrics import COCO_AREA_RANGES, ProposalRecall, greedy_coverage

from helpers.metrics import random_image

THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]


def float32(value: float) -> float:
    """``value`` rounded to float32: IoUs are float32, and thresholds are compared in float32."""
    return torch.tensor(value, dtype=torch.float32).item()


# ---------------------------------------------------------------- plain reference


def reference_coverage(proposals: torch.Tensor, gt: torch.Tensor, k: int) -> list[float]:
    """DESIGN.md's loop, written out: min(P, G) times take the best remaining (gt, proposal)."""
    props = proposals[:k]
    if len(gt) == 0:
        return []
    if len(props) == 0:
        return [0.0] * len(gt)
    iou = tv_box_iou(gt.float(), props.float()).tolist()  # [G][P]
    coverage = [0.0] * len(gt)
    free_gt = list(range(len(gt)))
    free_props = list(range(len(props)))
    for _ in range(min(len(gt), len(props))):
        best = None  # (iou, g, p); strictly greater wins -> lowest g, then lowest p on ties
        for g in free_gt:
            for p in free_props:
                if best is None or iou[g][p] > best[0]:
                    best = (iou[g][p], g, p)
        value, g, p = best
        coverage[g] = value
        free_gt.remove(g)
        free_props.remove(p)
    return coverage


def reference_metric(proposals, gts, ks, thresholds=THRESHOLDS, area_ranges=COCO_AREA_RANGES):
    """Expected compute() dict (python floats) with per-range matching as in detectron2."""
    out = {}
    recall = {}  # (k, t, area) -> value
    for name, (lo, hi) in area_ranges.items():
        for k in ks:
            covered = []
            for props, gt in zip(proposals, gts, strict=True):
                area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).tolist()
                keep = [i for i, a in enumerate(area) if lo <= a <= hi]
                covered += reference_coverage(props, gt[keep], k)
            for t in thresholds:
                recall[k, t, name] = (
                    sum(c >= float32(t) for c in covered) / len(covered) if covered else -1.0
                )
    for k in ks:
        for name in area_ranges:
            values = [recall[k, t, name] for t in thresholds]
            key = f"AR@{k}" if name == "all" else f"AR_{name}@{k}"
            out[key] = -1.0 if values[0] == -1.0 else sum(values) / len(values)
        for t in thresholds:
            out[f"recall@{t:.2f}@{k}"] = recall[k, t, "all"]
    return out


# ---------------------------------------------------------------- data



def assert_matches_reference(metric: ProposalRecall, proposals, gts, ks) -> None:
    got = {key: float(v) for key, v in metric.compute().items()}
    want = reference_metric(proposals, gts, ks, list(metric.iou_thresholds), metric.area_ranges)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


# ---------------------------------------------------------------- equality with the reference


@pytest.mark.parametrize(
    ("seed", "num_images", "max_gt", "max_props", "ks"),
    [
        (0, 12, 8, 40, (5, 10, 40)),
        (1, 10, 15, 25, (3, 10, 100)),
        (2, 20, 4, 60, (1, 20, 60)),
        (3, 6, 25, 12, (2, 7, 12)),
    ],
)
def test_matches_plain_reference(seed, num_images, max_gt, max_props, ks):
    gen = torch.Generator().manual_seed(seed)
    images = [random_image(gen, max_gt, max_props) for _ in range(num_images)]
    proposals = [p for p, _ in images]
    gts = [g for _, g in images]
    metric = ProposalRecall(max_proposals=ks, curve_proposals=())
    half = num_images // 2  # two update calls: accumulation across batches
    metric.update(proposals[:half], gts[:half])
    metric.update(proposals[half:], gts[half:])
    assert_matches_reference(metric, proposals, gts, ks)


def test_matches_reference_custom_thresholds_and_ranges():
    gen = torch.Generator().manual_seed(7)
    images = [random_image(gen, 10, 30) for _ in range(10)]
    proposals, gts = [p for p, _ in images], [g for _, g in images]
    ranges = {
        "all": (0.0, math.inf),
        "tiny": (0.0, 40.0**2),
        "mid": (30.0**2, 150.0**2),
    }  # overlapping
    metric = ProposalRecall(
        iou_thresholds=(0.3, 0.6, 0.9), max_proposals=(4, 30), area_ranges=ranges
    )
    metric.update(proposals, gts)
    assert_matches_reference(metric, proposals, gts, (4, 30))
    assert {"AR_tiny@4", "AR_mid@30", "recall@0.30@4", "recall@0.90@30"} <= set(metric.compute())


def test_curves_match_reference():
    gen = torch.Generator().manual_seed(11)
    images = [random_image(gen, 8, 50) for _ in range(8)]
    proposals, gts = [p for p, _ in images], [g for _, g in images]
    metric = ProposalRecall(max_proposals=(10, 50), curve_proposals=(1, 5, 20))
    metric.update(proposals, gts)
    curves = metric.curves()
    ks, ars = curves["recall_vs_proposals"]
    assert ks == [1, 5, 10, 20, 50]
    want = reference_metric(proposals, gts, ks, area_ranges={"all": (0.0, math.inf)})
    assert ars == pytest.approx([want[f"AR@{k}"] for k in ks], abs=1e-6)
    ious, recalls = curves["recall_vs_iou"]
    assert ious == pytest.approx(THRESHOLDS)
    assert recalls == pytest.approx([want[f"recall@{t:.2f}@50"] for t in THRESHOLDS], abs=1e-6)


@pytest.mark.parametrize("quantize", [False, True])
def test_greedy_coverage_matches_loop_on_random_matrices(quantize):
    gen = torch.Generator().manual_seed(5)
    num, num_gt, num_props = 30, 9, 14
    iou = torch.rand(num, num_gt, num_props, generator=gen)
    if quantize:  # many exact ties: the loop's order (lowest gt, then lowest proposal) decides
        iou = (iou * 8).ceil() / 8
    n, g, p = (iou >= 0.3).nonzero(as_tuple=True)
    got = greedy_coverage(n * num_gt + g, n * num_props + p, iou[n, g, p], num * num_gt).view(
        num, num_gt
    )
    for i in range(num):
        m = iou[i].tolist()
        want = [0.0] * num_gt
        free_g, free_p = set(range(num_gt)), set(range(num_props))
        for _ in range(num_gt):
            v, neg_g, neg_p = max((m[g][p], -g, -p) for g in free_g for p in free_p)
            want[-neg_g] = v if v >= 0.3 else 0.0
            free_g.discard(-neg_g)
            free_p.discard(-neg_p)
        assert got[i].tolist() == want


def test_greedy_coverage_rejects_non_positive_ious():
    with pytest.raises(ValueError, match="> 0"):
        greedy_coverage(torch.tensor([0]), torch.tensor([0]), torch.tensor([0.0]), 1)


# ---------------------------------------------------------------- edge cases


def box(x1, y1, x2, y2):
    return [float(x1), float(y1), float(x2), float(y2)]


def single(metric: ProposalRecall, props: list, gt: list) -> dict[str, float]:
    metric.update([torch.tensor(props).reshape(-1, 4)], [torch.tensor(gt).reshape(-1, 4)])
    return {key: float(v) for key, v in metric.compute().items()}


def test_no_gt_reports_minus_one_and_counts_nothing():
    metric = ProposalRecall(max_proposals=(10,))
    out = single(metric, [box(0, 0, 10, 10)], [])
    assert out["AR@10"] == -1.0 and out["recall@0.50@10"] == -1.0
    assert int(metric.num_boxes.sum()) == 0


def test_no_proposals_are_misses():
    metric = ProposalRecall(max_proposals=(10,))
    out = single(metric, [], [box(0, 0, 10, 10), box(20, 20, 200, 200)])
    assert out["AR@10"] == 0.0 and out["AR_small@10"] == 0.0 and out["AR_large@10"] == 0.0
    assert metric.num_boxes.tolist() == [2, 1, 0, 1]
    assert out["AR_medium@10"] == -1.0


def test_proposal_equal_to_box_gives_full_recall():
    metric = ProposalRecall(max_proposals=(1, 5))
    out = single(metric, [box(10, 10, 60, 70), box(0, 0, 5, 5)], [box(10, 10, 60, 70)])
    assert out["AR@1"] == 1.0 and out["recall@0.95@1"] == 1.0 and out["AR_medium@5"] == 1.0


def test_fewer_proposals_than_boxes_one_to_one():
    # one proposal equal to both (identical) gt boxes: only one box may be covered
    metric = ProposalRecall(max_proposals=(10,))
    out = single(
        metric, [box(0, 0, 50, 50)], [box(0, 0, 50, 50), box(0, 0, 50, 50), box(100, 100, 140, 140)]
    )
    assert out["AR@10"] == pytest.approx(1 / 3)


def test_duplicate_proposals_cover_two_boxes_and_respect_top_k():
    gt = [box(0, 0, 40, 40), box(0, 0, 40, 44)]  # IoU(gt0, gt1) = 40/44
    props = [box(0, 0, 40, 40), box(0, 0, 40, 40)]
    out = single(ProposalRecall(max_proposals=(1, 2)), props, gt)
    assert out["recall@0.50@1"] == 0.5  # top-1: a single proposal covers a single box
    assert out["recall@0.50@2"] == 1.0 and out["recall@0.95@2"] == 0.5
    # the greedy gives the exact copy to gt0 (IoU 1), the duplicate covers gt1 at 40/44
    assert out["recall@0.90@2"] == 1.0


def test_greedy_is_not_per_box_best():
    # both gts' best proposal is p0; the greedy gives p0 to gt0 (IoU 1) and p1 to gt1 (7/11)
    gt = [box(0, 0, 100, 100), box(0, 0, 100, 110)]
    props = [box(0, 0, 100, 100), box(0, 0, 100, 70)]
    out = single(ProposalRecall(max_proposals=(2,)), props, gt)
    assert out["recall@0.90@2"] == 0.5  # per-box best would cover gt1 at 10/11 too
    assert out["recall@0.60@2"] == 1.0 and out["recall@0.65@2"] == 0.5


@pytest.mark.parametrize("t", THRESHOLDS)
def test_coverage_equal_to_a_threshold_counts_at_it(t):
    # IoU 100 * 100t / 100^2 is t in float32, and detectron2 compares in float32: a hit at t
    props, gt = [box(0, 0, 100, round(100 * t))], [box(0, 0, 100, 100)]
    assert tv_box_iou(torch.tensor(gt), torch.tensor(props)).item() == float32(t)
    out = single(ProposalRecall(max_proposals=(1,)), props, gt)
    assert [out[f"recall@{u:.2f}@1"] for u in THRESHOLDS] == [float(u <= t) for u in THRESHOLDS]
    assert out["AR@1"] == pytest.approx(sum(u <= t for u in THRESHOLDS) / len(THRESHOLDS))


def test_area_bounds_compare_in_float32_whatever_the_default_dtype():
    # area float32(0.7) reaches the bound 0.7 in float32 (as detectron2), not in float64
    ranges = {"all": (0.0, math.inf), "from_0.7": (0.7, math.inf)}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        metric = ProposalRecall(max_proposals=(1,), area_ranges=ranges)
        out = single(metric, [box(0, 0, 1, 0.7)], [box(0, 0, 1, 0.7)])
    finally:
        torch.set_default_dtype(previous)
    assert metric.num_boxes.tolist() == [1, 1] and out["AR_from_0.7@1"] == 1.0


def test_area_ranges_split_boxes_and_match_separately():
    small, medium, large = box(0, 0, 20, 20), box(100, 100, 150, 150), box(200, 200, 400, 400)
    props = [large, box(0, 0, 20, 22)]
    metric = ProposalRecall(max_proposals=(10,))
    out = single(metric, props, [small, medium, large])
    assert metric.num_boxes.tolist() == [3, 1, 1, 1]
    assert out["AR_large@10"] == 1.0 and out["AR_medium@10"] == 0.0
    assert out["recall@0.90@10"] == pytest.approx(2 / 3) and out["AR_small@10"] == pytest.approx(
        0.9
    )
    # boundaries are closed, as in COCOeval and detectron2: area exactly 32^2 is small and medium,
    # exactly 96^2 medium and large
    metric = ProposalRecall(max_proposals=(10,))
    single(metric, [], [box(0, 0, 32, 32), box(0, 0, 96, 96), box(0, 0, 31, 32)])
    assert metric.num_boxes.tolist() == [3, 2, 2, 1]


def test_range_matching_is_independent_of_other_ranges():
    # one proposal, IoU 0.875 with the medium box and 0.857 with the small one: in "all" the
    # medium box takes it; in "small" the small box is matched on its own and gets it
    medium, small = box(0, 0, 30, 40), box(0, 0, 30, 30)
    out = single(ProposalRecall(max_proposals=(1,)), [box(0, 0, 30, 35)], [medium, small])
    assert out["recall@0.50@1"] == 0.5 and out["recall@0.85@1"] == 0.5
    assert out["AR_medium@1"] == pytest.approx(0.8) and out["AR_small@1"] == pytest.approx(0.8)


def test_states_are_fixed_size_and_reset():
    metric = ProposalRecall()
    gen = torch.Generator().manual_seed(0)
    shapes = {name: tuple(getattr(metric, name).shape) for name in ("hits", "num_boxes")}
    for _ in range(3):
        images = [random_image(gen, 6, 30) for _ in range(4)]
        metric.update([p for p, _ in images], [g for _, g in images])
    assert {name: tuple(getattr(metric, name).shape) for name in shapes} == shapes
    assert shapes["hits"] == (len(metric.curve_proposals), 10, 4)
    metric.reset()
    assert int(metric.hits.sum()) == 0 and int(metric.num_boxes.sum()) == 0


def test_more_proposals_than_largest_k_are_ignored():
    gt = [box(0, 0, 50, 50)]
    props = [box(200, 200, 210, 210)] * 3 + [box(0, 0, 50, 50)]
    out = single(ProposalRecall(max_proposals=(3,), curve_proposals=()), props, gt)
    assert out["AR@3"] == 0.0


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_keys():
    keys = set(ProposalRecall().compute())
    assert {"AR@100", "AR@300", "AR@1000", "AR_small@100", "AR_medium@300", "AR_large@1000"} <= keys
    assert {"recall@0.50@1000", "recall@0.70@100", "recall@0.95@300"} <= keys
    assert len(keys) == 3 * 4 + 3 * 10


def test_half_precision_inputs():
    gt = torch.tensor([box(0, 0, 50, 50)])
    metric = ProposalRecall(max_proposals=(5,))
    metric.update([gt.half()], [gt.half()])
    assert float(metric.compute()["AR@5"]) == 1.0


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("proposals", "targets", "error", "match"),
    [
        ([torch.zeros(0, 4)], [], ValueError, "1 proposal tensors but 0 target"),
        (
            [torch.zeros(3, 5)],
            [torch.zeros(0, 4)],
            ValueError,
            r"proposals\[0\] must be a \[P, 4\]",
        ),
        ([torch.zeros(0, 4)], [torch.zeros(4)], ValueError, r"targets\[0\] must be a \[G, 4\]"),
        (
            [(torch.zeros(1, 4), torch.zeros(1))],
            [torch.zeros(0, 4)],
            TypeError,
            "pass the boxes only",
        ),
        ([torch.zeros(0, 4)], [{"boxes": torch.zeros(0, 4)}], TypeError, "dict"),
        (torch.zeros(1, 0, 4), [torch.zeros(0, 4)], TypeError, "lists"),
        (
            [torch.zeros(0, 4), torch.zeros(0, 4)],
            [torch.zeros(0, 4), torch.tensor([box(5, 5, 5, 9)])],
            ValueError,
            r"targets\[1\]: gt box 0",
        ),
        (
            [torch.tensor([[0.0, 0.0, math.nan, 1.0]])],
            [torch.tensor([box(0, 0, 5, 5)])],
            ValueError,
            r"proposals\[0\] has non-finite",
        ),
    ],
)
def test_update_rejects_bad_inputs(proposals, targets, error, match):
    with pytest.raises(error, match=match):
        ProposalRecall().update(proposals, targets)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iou_thresholds": (0.0, 0.5)}, "iou_thresholds"),
        ({"iou_thresholds": (1e-46,)}, "iou_thresholds"),  # 0 in float32
        ({"iou_thresholds": (0.5, 0.501)}, "distinct"),
        ({"max_proposals": (100, 0)}, "max_proposals"),
        ({"max_proposals": ()}, "max_proposals"),
        ({"curve_proposals": (1.5,)}, "curve_proposals"),
        ({"area_ranges": {"small": (0, 10)}}, "'all'"),
        ({"area_ranges": {"all": (10, 0)}}, "lo < hi"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProposalRecall(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(9)
    images = [random_image(gen, 12, 80) for _ in range(16)]
    proposals, gts = [p for p, _ in images], [g for _, g in images]
    cpu, gpu = ProposalRecall(max_proposals=(10, 80)), ProposalRecall(max_proposals=(10, 80)).cuda()
    cpu.update(proposals, gts)
    gpu.update([p.cuda() for p in proposals], [g.cuda() for g in gts])
    got, want = gpu.compute(), cpu.compute()
    assert all(float(got[k]) == pytest.approx(float(want[k]), abs=1e-6) for k in want)


def test_a_recall_key_is_found_with_the_threshold_written_as_the_design_writes_it():
    # DESIGN's API example writes "recall@0.7@1000"; the keys have two decimals
    metric = ProposalRecall(max_proposals=(1,))
    metric.update([torch.tensor([box(0, 0, 100, 70)])], [torch.tensor([box(0, 0, 100, 100)])])
    out = metric.compute()
    assert "recall@0.70@1" in out and "recall@0.7@1" in out and out["recall@0.7@1"] == out["recall@0.70@1"] == 1.0
    assert out.get("recall@0.9@1") == out["recall@0.90@1"] == 0.0 and out.get("recall@0.33@1") is None
    assert not any(key.startswith("recall@0.7@") for key in out)  # logged keys keep two decimals
    with pytest.raises(KeyError):
        out["recall@0.7@2"]


def test_states_reset_in_inference_mode_take_updates_outside_it():
    """A ``trainer.validate`` (inference mode) before a ``fit``, whose validation runs under
    ``no_grad``: the states reset in inference mode are inference tensors, which the fit's
    updates must not modify in place."""
    metric = ProposalRecall(max_proposals=(10,))
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    with torch.inference_mode():
        metric.update([gt[0].clone()], gt)
        metric.compute()
        metric.reset()
    with torch.no_grad():
        metric.update([gt[0].clone()], gt)
    assert metric.compute()["AR@10"] == pytest.approx(1.0)
