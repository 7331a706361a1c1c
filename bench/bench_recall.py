"""Time ProposalRecall against pycocotools' COCOeval on the same proposals.

300 synthetic images (seeded), ~7 gt boxes each (small/medium/large mix, 30% overlapping
another box) and up to 1000 scored proposals each (jittered copies of gt boxes plus clutter).
Ours: ``update`` in batches of 8 (as in a validation loop) + ``compute``, and one ``update`` with
all images; COCOeval: ``loadRes + evaluate + accumulate + summarize`` with ``useCats=0`` and
``maxDets=[100, 300, 1000]``. The two AR definitions differ (COCO matches per threshold in score
order, ours is the one-to-one IoU-greedy coverage of DESIGN.md); they agree exactly when no
proposal reaches IoU 0.5 with two gt boxes, and only roughly otherwise.

Run: ``python bench/bench_recall.py [--images 300] [--seed 0]``
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import contextlib
import io
import time

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lightning_rpn.evaluation.metrics import ProposalRecall

IMAGE_H, IMAGE_W = 480, 640


def make_image(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gt boxes [G, 4], proposals [P, 4] sorted by score, scores [P] for one image."""
    num_gt = int(torch.randint(1, 14, (1,), generator=gen))  # mean 7
    side = torch.exp(torch.empty(num_gt, 2).uniform_(np.log(8.0), np.log(300.0), generator=gen))
    xy = torch.rand(num_gt, 2, generator=gen) * (torch.tensor([IMAGE_W, IMAGE_H]) - side).clamp(
        min=1
    )
    gt = torch.cat([xy, xy + side], dim=1)
    crowd = torch.rand(num_gt, generator=gen) < 0.3  # overlapping objects: proposals are contested
    crowd[0] = False
    shift = (torch.rand(num_gt, 2, generator=gen) - 0.5) * 0.6 * side
    gt[crowd] = gt[:-1][crowd[1:]] + shift[crowd].repeat(1, 2)

    num_props = (
        1000
        if torch.rand(1, generator=gen) < 0.8
        else int(torch.randint(50, 1000, (1,), generator=gen))
    )
    num_near = num_props // 10
    src = gt[torch.randint(0, num_gt, (num_near,), generator=gen)]
    wh = (src[:, 2:] - src[:, :2]).repeat(1, 2)
    spread = torch.empty(num_near, 1).uniform_(0.05, 1.2, generator=gen)
    near = src + (torch.rand(num_near, 4, generator=gen) - 0.5) * spread * wh
    near = torch.cat([near[:, :2].minimum(near[:, 2:] - 1), near[:, 2:]], dim=1)
    far_side = torch.exp(
        torch.empty(num_props - num_near, 2).uniform_(np.log(8.0), np.log(400.0), generator=gen)
    )
    far_xy = torch.rand(num_props - num_near, 2, generator=gen) * torch.tensor([IMAGE_W, IMAGE_H])
    far = torch.cat([far_xy, far_xy + far_side], dim=1)
    props = torch.cat([near, far])
    scores = torch.rand(num_props, generator=gen) + torch.cat(
        [1.0 - spread[:, 0], torch.zeros(num_props - num_near)]
    )
    order = scores.argsort(descending=True)
    return gt, props[order], scores[order]


def coco_inputs(gts, proposals, scores) -> tuple[COCO, np.ndarray]:
    images, annotations, detections = [], [], []
    for image_id, (gt, props, score) in enumerate(zip(gts, proposals, scores, strict=True)):
        images.append({"id": image_id, "height": IMAGE_H, "width": IMAGE_W})
        for x1, y1, x2, y2 in gt.tolist():
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        xywh = torch.cat([props[:, :2], props[:, 2:] - props[:, :2]], dim=1)
        rows = torch.cat(
            [
                torch.full((len(props), 1), float(image_id)),
                xywh,
                score[:, None],
                torch.ones(len(props), 1),
            ],
            1,
        )
        detections.append(rows.double().numpy())
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, np.concatenate(detections)


def run_ours(proposals, gts, batch_size: int) -> tuple[float, dict[str, float]]:
    metric = ProposalRecall()
    start = time.perf_counter()
    for i in range(0, len(gts), batch_size):
        metric.update(proposals[i : i + batch_size], gts[i : i + batch_size])
    values = metric.compute()
    elapsed = time.perf_counter() - start
    return elapsed, {key: float(v) for key, v in values.items()}


def run_coco(coco: COCO, detections: np.ndarray) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = coco.loadRes(detections)
        evaluator = COCOeval(coco, results, iouType="bbox")
        evaluator.params.useCats = 0
        evaluator.params.maxDets = [100, 300, 1000]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return time.perf_counter() - start, evaluator.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(args.seed)
    data = [make_image(gen) for _ in range(args.images)]
    gts, proposals, scores = ([d[i] for d in data] for i in range(3))
    coco, detections = coco_inputs(gts, proposals, scores)
    print(
        f"{args.images} images, {sum(len(g) for g in gts)} gt boxes, "
        f"{sum(len(p) for p in proposals)} proposals; "
        f"torch threads: {torch.get_num_threads()}"
    )

    run_ours(proposals[:16], gts[:16], args.batch_size)  # warm-up
    ours_batched, values = run_ours(proposals, gts, args.batch_size)
    ours_single, _ = run_ours(proposals, gts, len(gts))
    coco_time, stats = run_coco(coco, detections)

    print(
        f"ProposalRecall update(batches of {args.batch_size}) + compute: "
        f"{ours_batched * 1000:8.1f} ms"
    )
    print(
        f"ProposalRecall update(all {args.images} at once) + compute: {ours_single * 1000:8.1f} ms"
    )
    print(f"COCOeval loadRes + evaluate + accumulate + summarize:  {coco_time * 1000:8.1f} ms")
    print(
        f"speed-up: {coco_time / ours_batched:.1f}x (batched), "
        f"{coco_time / ours_single:.1f}x (single call)"
    )
    print(
        "AR comparison (ours: one-to-one IoU greedy; COCO: score-ordered matching per threshold):"
    )
    pairs = [
        ("AR@100", stats[6]),
        ("AR@300", stats[7]),
        ("AR@1000", stats[8]),
        ("AR_small@1000", stats[9]),
        ("AR_medium@1000", stats[10]),
        ("AR_large@1000", stats[11]),
    ]
    for key, coco_value in pairs:
        print(
            f"  {key:15s} ours {values[key]:.4f}   COCOeval {coco_value:.4f}   "
            f"diff {values[key] - coco_value:+.4f}"
        )


if __name__ == "__main__":
    main()
