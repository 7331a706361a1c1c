"""Benchmark the cascade's stage-1 targets (centre regions) against plain-RPN anchor matching.

Setting: the dense scenes' levels (strides 4-64, one square anchor of 16-256 px a location for the
cascade; three ratios a location for the plain RPN), boxes of 15-70 px at uniform positions
(fixed seed), on a training crop (256 x 256, 50 boxes), a held-out dense scene (1000 x 1000,
100 boxes) and a large scene evaluated whole (3000 x 3000, 2500 boxes). Each row runs in a fresh
process: the median time of repeated calls, and the extra peak RSS of one call over the RSS
just before it. Compared on the same boxes: ``lightning_rpn.core.cascade.assign_centre_region``
(the cascade's stage 1), ``lightning_rpn.core.matching.match_anchors`` on the plain RPN's anchors,
and torchvision's ``box_iou`` + ``Matcher`` on those anchors (skipped where its dense IoU matrix
passes 1 GB). Until 2026-12-07 the centre regions were tested over every box x location of a
level (``G x H x W``); run this on an older checkout to see that.

    python bench/bench_cascade_targets.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import time

import torch
from _fresh_process import run_in_fresh_process
from bench_matching import _memory_mb, median_time, torchvision_match

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.cascade import assign_centre_region
from lightning_rpn.core.matching import match_anchors

SIZES = ((16,), (32,), (64,), (128,), (256,))
STRIDES = (4, 8, 16, 32, 64)
SETTINGS = ((256, 50), (1000, 100), (3000, 2500))
CENTRE_RATIO = 0.2  # scenes_cascade.yaml's


def boxes(side: int, count: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(side + count)
    corner = torch.rand(count, 2, generator=g) * (side - 72)
    return torch.cat([corner, corner + 15 + torch.rand(count, 2, generator=g) * 55], 1)


def measure(side: int, count: int, repeats: int) -> dict:
    """The three assignments on one image: ``{name: (median seconds, extra peak MB)}``."""
    gt = boxes(side, count)
    cascade = AnchorGenerator(SIZES, (1.0,), STRIDES)
    plain = AnchorGenerator(SIZES, (0.5, 1.0, 2.0), STRIDES)
    cascade_grid = cascade.grid(cascade.feature_shapes_for((side, side)))
    plain_anchors = plain.grid(plain.feature_shapes_for((side, side))).anchors.clone()  # a plain [N, 4] tensor
    runs = {
        "cascade stage 1": lambda: assign_centre_region(cascade_grid, gt, CENTRE_RATIO),
        "plain RPN, match_anchors": lambda: match_anchors(plain_anchors, gt),
    }
    if count * plain_anchors.shape[0] * 4 <= 1e9:
        runs["plain RPN, torchvision"] = lambda: torchvision_match(plain_anchors, gt)
    result = {}
    for name, run in runs.items():
        seconds, _ = median_time(run, repeats)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak (VmHWM)
        before = _memory_mb("VmRSS")
        run()
        result[name] = (seconds, _memory_mb("VmHWM") - before)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats} calls, each row in a "
          f"fresh process; extra peak RSS of one call")
    print(f"{'image':>11} {'boxes':>6}  {'cascade stage 1':>22}  {'plain, match_anchors':>22}  "
          f"{'plain, torchvision':>22}  torchvision / cascade (time)")
    start = time.perf_counter()
    for side, count in SETTINGS:
        row = run_in_fresh_process("bench_cascade_targets", f"measure({side}, {count}, {args.repeats})", args.threads)
        cells = [f"{row[name][0] * 1e3:>9.1f} ms {row[name][1]:>6.0f} MB" if name in row else f"{'not run':>22}"
                 for name in ("cascade stage 1", "plain RPN, match_anchors", "plain RPN, torchvision")]
        ratio = (f"{row['plain RPN, torchvision'][0] / row['cascade stage 1'][0]:.0f}x"
                 if "plain RPN, torchvision" in row else "-")
        print(f"{side:>5}x{side:<5} {count:>6}  {'  '.join(cells)}  {ratio}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
