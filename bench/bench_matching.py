"""Benchmark anchor matching: lightning_rpn.match_anchors vs torchvision box_iou + Matcher.

Setting (issue 14's targets): the plain anchor tensor of torchvision's own ``AnchorGenerator``
for one 800x800 image, FPN P2-P6 (feature maps 200..13, sizes 32..512, ratios 0.5/1/2,
159,882 anchors), random gt boxes (uniform centres, log-uniform sides in [8, 512] px, clipped
to the image, fixed seed). ``match_anchors`` gets that tensor as it is: no grid object.

* 20 and 1000 boxes: both implementations on identical inputs in this process, median of
  repeats, ratio = torchvision / ours, labels and matched indices asserted equal. Ours is timed
  on a tensor matched before (its spatial index cached, as for the generator's cached
  anchors in training); "new tensor" on a fresh copy of it (the index is cached by value, as
  for torchvision's generator, which makes new anchor tensors in every forward); "first call"
  is one call with the index cache emptied (index built).
* 5000 boxes (800x800) and 20,000 boxes (2000x2000, 999,354 anchors): ours only, one call in a
  fresh process after a warm-up call, wall time and extra peak RSS; torchvision is skipped: its
  dense ``G x N`` float32 IoU matrix alone is 3.2 GB / 80 GB and ``box_iou`` holds several.
* Our own ``AnchorGenerator.grid`` output through the same entry point, for comparison.

    python bench/bench_matching.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import math
import os
import statistics
import time

import torch
from _fresh_process import run_in_fresh_process
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from lightning_rpn.core.anchor_index import _INDEXES
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.matching import match_anchors

SEED = 0
SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = (0.5, 1.0, 2.0)


def torchvision_anchors(side: int) -> torch.Tensor:
    """torchvision's ``AnchorGenerator`` output for a ``side x side`` image, FPN P2-P6: ``[N, 4]``."""
    generator = TorchvisionAnchorGenerator(SIZES, (RATIOS,) * len(SIZES))
    images = ImageList(torch.zeros(1, 3, side, side), [(side, side)])
    shapes = [side // 4, side // 8, side // 16, side // 32]
    features = [torch.zeros(1, 1, s, s) for s in shapes + [(shapes[-1] + 1) // 2]]  # P6: stride-2 pool of P5
    return generator(images, features)[0]


def our_grid(side: int):
    generator = AnchorGenerator(SIZES, RATIOS, (4, 8, 16, 32, 64))
    return generator.grid(generator.feature_shapes_for((side, side)))


def random_gt(num_boxes: int, seed: int = SEED, side: int = 800) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + num_boxes)
    centres = torch.rand(num_boxes, 2, generator=g) * side
    sides = torch.exp(torch.empty(num_boxes, 2).uniform_(math.log(8.0), math.log(512.0), generator=g))
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1).clamp(0, side)
    return boxes


def torchvision_match(anchors: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    matcher = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)
    idx = matcher(box_iou(gt, anchors))
    labels = (idx >= 0).long()
    labels[idx == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
    return labels, idx.clamp(min=0)


def median_time(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up, also the result that is compared
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _memory_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure_once(num_boxes: int, side: int) -> dict:
    """One call of ours after a warm-up call; extra peak RSS over the RSS just before the call.

    The peak (VmHWM) is reset first via /proc/self/clear_refs (Linux), so earlier peaks
    (imports, set-up) do not hide the call's own.
    """
    anchors, gt = torchvision_anchors(side), random_gt(num_boxes, side=side)
    match_anchors(anchors, gt[:5])
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _memory_mb("VmRSS")
    start = time.perf_counter()
    labels, _ = match_anchors(anchors, gt)
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds, extra_mb=_memory_mb("VmHWM") - before, anchors=anchors.shape[0],
        positives=int((labels == 1).sum()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    anchors = torchvision_anchors(800)
    grid = our_grid(800)
    print(f"torch {torch.__version__}, {args.threads} thread(s) on {os.cpu_count()} CPUs (load average "
          f"{os.getloadavg()[0]:.1f}), 800x800, {anchors.shape[0]} anchors from torchvision's AnchorGenerator; "
          f"medians of {args.repeats} repeats (3 for torchvision at 1000 boxes)")
    match_anchors(anchors, random_gt(5))  # compile / load the kernels, build the index
    print(f"{'boxes':>6} {'ours ms':>9} {'new tensor':>11} {'first call':>11} {'ours, our grid':>15} "
          f"{'torchvision ms':>15} {'speed-up':>9}  labels, matched")
    for num_boxes, tv_repeats in ((20, args.repeats), (1000, max(1, min(args.repeats, 3)))):
        gt = random_gt(num_boxes)
        ours_s, ours = median_time(lambda: match_anchors(anchors, gt), args.repeats)
        copy_s, _ = median_time(lambda: match_anchors(anchors.clone(), gt), args.repeats)
        _INDEXES.clear()
        start = time.perf_counter()
        match_anchors(anchors, gt)
        first_s = time.perf_counter() - start
        grid_s, _ = median_time(lambda: match_anchors(grid, gt), args.repeats)
        tv_s, theirs = median_time(lambda: torchvision_match(anchors, gt), tv_repeats)
        same = torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        assert same, f"labels or matched indices differ from torchvision's with {num_boxes} boxes"
        print(f"{num_boxes:>6} {ours_s * 1e3:>9.1f} {copy_s * 1e3:>11.1f} {first_s * 1e3:>11.1f} {grid_s * 1e3:>15.1f} "
              f"{tv_s * 1e3:>15.1f} "
              f"{tv_s / ours_s:>8.1f}x  identical ({int((ours[0] == 1).sum())} positives)")
    for num_boxes, side in ((5000, 800), (20000, 2000)):
        child = run_in_fresh_process("bench_matching", f"measure_once({num_boxes}, {side})", args.threads)
        dense_gb = num_boxes * child["anchors"] * 4 / 1e9
        print(f"{num_boxes:>6} boxes, {side}x{side} ({child['anchors']} anchors): ours {child['seconds'] * 1e3:.0f} ms, "
              f"extra peak RSS {child['extra_mb']:.0f} MB ({child['positives']} positives; one call in a fresh "
              f"process); torchvision skipped: its IoU matrix alone is {dense_gb:.1f} GB")


if __name__ == "__main__":
    main()
