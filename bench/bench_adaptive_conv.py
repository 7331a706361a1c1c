"""Benchmark the cascade's adaptive 3x3 convolution: ``adaptive_conv2d`` vs ``torchvision.ops.deform_conv2d``.

Both compute the same thing (asserted here on every setting, forward and gradients, float32
tolerance); the inputs are the cascade's: offsets from :func:`~lightning_rpn.core.cascade.adaptive_offsets`
over random boxes of 4-32 px (1-8 strides) per side, one per location. Settings:

- ``shapes``: ``make fit``'s cascade (``configs/shapes_cascade.yaml``): a batch of 8 images of
  192 px, ``tiny_fpn`` (32 channels), the stride-4 level (48 x 48);
- ``scenes``: ``configs/scenes.yaml`` with the cascade head: a batch of 4 random 256-px crops,
  ResNet-18 FPN (256 channels), the stride-4 level (64 x 64).

Prints the median over repeats of the forward pass and of forward + backward (the training
step's cost: input, weight and bias gradients; the offsets come from detached boxes) per side,
and the ratio torchvision / ours.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_adaptive_conv.py --threads 1
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torchvision.ops import deform_conv2d

from lightning_rpn.core.adaptive_conv import adaptive_conv2d
from lightning_rpn.core.cascade import adaptive_offsets

SETTINGS = {"shapes": (8, 32, 48), "scenes": (4, 256, 64)}  # batch, channels, side of the stride-4 map
STRIDE = 4.0


def inputs(batch: int, channels: int, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, box-derived offsets, weight and bias of one setting (seeded)."""
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(batch, channels, side, side, generator=generator)
    centres = (torch.arange(side * side).reshape(1, -1, 1).expand(batch, -1, 1) + 0.5)
    cx, cy = (centres % side) * STRIDE, (centres // side) * STRIDE
    sizes = 2 * STRIDE * 2 ** (torch.rand(batch, side * side, 2, generator=generator) * 3 - 1)
    boxes = torch.cat((cx - sizes[..., :1] / 2, cy - sizes[..., 1:] / 2, cx + sizes[..., :1] / 2,
                       cy + sizes[..., 1:] / 2), dim=-1)
    offsets = adaptive_offsets(boxes, side, side, STRIDE, STRIDE / 2)
    weight = torch.randn(channels, channels, 3, 3, generator=generator) * 0.01
    return feature, offsets, weight, torch.zeros(channels)


def torchvision_conv(feature: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return deform_conv2d(feature, offsets, weight, bias, padding=(1, 1))


def timed(conv: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], repeats: int) -> tuple[float, float, list]:
    """Median forward and forward + backward ms, and the output and gradients of the last call."""
    forward, both = [], []
    for _ in range(repeats + 1):  # the first call warms up
        feature, offsets, weight, bias = (t.detach().requires_grad_(i != 1) for i, t in enumerate(args))
        start = time.perf_counter()
        out = conv(feature, offsets, weight, bias)
        middle = time.perf_counter()
        out.square().sum().backward()
        end = time.perf_counter()
        forward.append(1000 * (middle - start))
        both.append(1000 * (end - start))
    return (statistics.median(forward[1:]), statistics.median(both[1:]),
            [out.detach(), feature.grad, weight.grad, bias.grad])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print(f"{options.threads} thread(s), median of {options.repeats}; ms")
    print(f"{'setting':<8}{'B x C x H x W':>18}{'pass':>18}{'torchvision':>14}{'ours':>10}{'ratio':>9}")
    for name in options.settings:
        batch, channels, side = SETTINGS[name]
        args = inputs(batch, channels, side)
        reference = timed(torchvision_conv, args, options.repeats)
        ours = timed(adaptive_conv2d, args, options.repeats)
        for expected, got in zip(reference[2], ours[2]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        shape = f"{batch} x {channels} x {side} x {side}"
        for label, index in (("forward", 0), ("forward+backward", 1)):
            print(f"{name if index == 0 else '':<8}{shape if index == 0 else '':>18}{label:>18}"
                  f"{reference[index]:>14.1f}{ours[index]:>10.1f}{reference[index] / ours[index]:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
