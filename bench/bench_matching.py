"""Benchmark anchor matching: lightning_rpn.match_anchors vs torchvision box_iou + Matcher.

Setting (the issue's targets): one 800x800 image, FPN P2-P6 anchors (strides 4..64, sizes
32..512, ratios 0.5/1/2, about 160k anchors), random gt boxes (uniform centres, log-uniform
sides in [8, 512] px, clipped to the image, fixed seed).

* 20 and 1000 boxes: both implementations on identical inputs in this process, median of a
  few repeats, ratio = torchvision / ours, labels and matched indices asserted equal.
* 5000 boxes: ours only (time, and extra peak RSS measured in a fresh subprocess with
  ``resource.getrusage``); torchvision is skipped because its dense G x N float32 IoU matrix
  alone is 5000 x 160k x 4 B = 3.2 GB and ``box_iou`` holds several such temporaries.

Both sides get precomputed anchors: ours an ``AnchorGrid`` (``AnchorGenerator.grid``, cached
per feature shape in real use), torchvision the same anchors as a tensor.

    python bench/bench_matching.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from lightning_rpn.anchors import AnchorGenerator
from lightning_rpn.matching import match_anchors

IMAGE = (800, 800)
SEED = 0


def anchor_grid():
    generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
    return generator.grid(generator.feature_shapes_for(IMAGE))


def random_gt(num_boxes: int, seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + num_boxes)
    h, w = IMAGE
    centres = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w, h])
    sides = torch.exp(torch.empty(num_boxes, 2).uniform_(math.log(8.0), math.log(512.0), generator=g))
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
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


def measure_once(num_boxes: int) -> dict:
    """One call of ours on a warm grid; extra peak RSS over the RSS just before the call.

    On Linux the peak (VmHWM) is reset first via /proc/self/clear_refs, so earlier peaks
    (imports, set-up) do not hide the call's own; elsewhere ``ru_maxrss`` growth is used.
    """
    grid, gt = anchor_grid(), random_gt(num_boxes)
    match_anchors(grid, gt[:5])
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before, peak = _memory_mb("VmRSS"), lambda: _memory_mb("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    start, cpu_start = time.perf_counter(), time.process_time()
    labels, _ = match_anchors(grid, gt)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return dict(
        seconds=seconds, cpu_seconds=cpu_seconds, extra_mb=peak() - before, positives=int((labels == 1).sum())
    )


def peak_child(num_boxes: int, threads: int) -> dict:
    """``measure_once`` in a fresh process, so nothing allocated here skews its memory."""
    code = (
        f"import json, sys, torch; torch.set_num_threads({threads}); "
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
        f"from bench_matching import measure_once; print(json.dumps(measure_once({num_boxes})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    grid = anchor_grid()
    print(f"torch {torch.__version__}, {args.threads} threads on {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f}), image {IMAGE}, {grid.num_anchors} anchors, "
          f"median of {args.repeats} repeats (3 for torchvision at 1000 boxes)")
    rows = []
    for num_boxes, repeats in ((20, args.repeats), (1000, max(1, min(args.repeats, 3)))):
        gt = random_gt(num_boxes)
        ours_s, ours = median_time(lambda: match_anchors(grid, gt), args.repeats)
        tv_s, theirs = median_time(lambda: torchvision_match(grid.anchors, gt), repeats)
        assert torch.equal(ours[0], theirs[0]), f"labels differ with {num_boxes} boxes"
        assert torch.equal(ours[1], theirs[1]), f"matched gt differ with {num_boxes} boxes"
        positives = int((ours[0] == 1).sum())
        speedup = f"{tv_s / ours_s:7.1f}x"
        rows.append((num_boxes, f"{ours_s * 1e3:9.1f}", f"{tv_s * 1e3:9.1f}", speedup, "identical", positives, "-"))

    child = peak_child(5000, args.threads)
    gt = random_gt(5000)
    ours_s, _ = median_time(lambda: match_anchors(grid, gt), max(1, min(args.repeats, 3)))
    memory = f"{child['extra_mb']:.0f} MB"
    rows.append((5000, f"{ours_s * 1e3:9.1f}", "  skipped", "      -", "-", child["positives"], memory))

    header = ("boxes", "ours ms", "tv ms", "speedup", "labels", "positives", "extra peak RSS (ours)")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print(f"5000 boxes: torchvision skipped, its dense IoU matrix alone is 5000 x {grid.num_anchors} x 4 B = "
          f"{5000 * grid.num_anchors * 4 / 1e9:.1f} GB (box_iou keeps several temporaries of that size); "
          f"ours, one call in a fresh process: {child['seconds'] * 1e3:.0f} ms wall, "
          f"{child['cpu_seconds'] * 1e3:.0f} ms CPU, extra peak RSS {child['extra_mb']:.0f} MB")


if __name__ == "__main__":
    main()
