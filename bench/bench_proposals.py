"""Benchmark generate_proposals against torchvision's decode-all + filter_proposals.

Both sides run in one process on identical inputs: 2 images padded to 800 x 800, FPN levels
P2-P6 (strides 4..64, sizes 32..512, ratios 0.5 / 1 / 2: ~160k anchors per image), random
logits and deltas. torchvision decodes every anchor and then filters
(``RegionProposalNetwork.forward``'s proposal path); lightning-rpn selects the per-level top-k
first and decodes only those. Timings are medians over interleaved repeats; the boxes are
asserted equal (scores in order, boxes up to the order of exactly-equal scores).

    .venv/bin/python bench/bench_proposals.py [--repeats 20] [--device cpu] [--threads N]
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import statistics
import time

import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.proposals import generate_proposals

IMAGE_SIZES = [(800, 800), (781, 800)]
SETTINGS = {"test (1000/1000)": (1000, 1000), "train (2000/2000)": (2000, 2000)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _canonical(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    order = torch.arange(boxes.shape[0], device=boxes.device)
    for column in (3, 2, 1, 0):
        order = order[boxes[order, column].sort(stable=True).indices]
    return boxes[order[scores[order].sort(descending=True, stable=True).indices]]


def _same(ours, theirs) -> bool:
    return all(
        torch.equal(s, ts) and torch.equal(_canonical(b, s), _canonical(tb, ts))
        for (b, s), tb, ts in zip(ours, *theirs)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
    anchors = generator(generator.feature_shapes_for((800, 800)), device=device)
    counts = [a.shape[0] for a in anchors]
    batch = len(IMAGE_SIZES)
    rng = torch.Generator().manual_seed(args.seed)
    objectness = [(torch.randn(batch, n, generator=rng) * 2).to(device) for n in counts]
    deltas = [(torch.randn(batch, n, 4, generator=rng) * 0.5).to(device) for n in counts]
    # torchvision's head output after concat_box_prediction_layers: [B * N, 1] and [B * N, 4].
    tv_objectness = torch.cat(objectness, dim=1).reshape(-1, 1)
    tv_deltas = torch.cat(deltas, dim=1).reshape(-1, 4)
    tv_anchors = [torch.cat(anchors)] * batch

    print(f"device {device}, threads {torch.get_num_threads()}, {batch} images, {sum(counts)} anchors/image, "
          f"levels {counts}, median of {args.repeats}")
    print(f"{'setting':<20} {'torchvision ms':>15} {'ours ms':>10} {'speed-up':>9} {'boxes equal':>12}")
    for name, (pre, post) in SETTINGS.items():
        rpn = RegionProposalNetwork(
            None, TVRPNHead(1, 1), 0.7, 0.3, 256, 0.5,
            {"training": pre, "testing": pre}, {"training": post, "testing": post}, 0.7,
        ).eval()

        def torchvision_side():
            proposals = rpn.box_coder.decode(tv_deltas, tv_anchors).view(batch, -1, 4)
            return rpn.filter_proposals(proposals, tv_objectness, IMAGE_SIZES, counts)

        def our_side():
            return generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, pre, post)

        times: dict[str, list[float]] = {"tv": [], "ours": []}
        for repeat in range(args.repeats + 3):
            for key, fn in (("tv", torchvision_side), ("ours", our_side)):
                _sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    fn()
                _sync(device)
                if repeat >= 3:  # warm-up
                    times[key].append(time.perf_counter() - start)
        with torch.no_grad():
            equal = _same(our_side(), torchvision_side())
        tv_ms = statistics.median(times["tv"]) * 1e3
        our_ms = statistics.median(times["ours"]) * 1e3
        print(f"{name:<20} {tv_ms:>15.2f} {our_ms:>10.2f} {tv_ms / our_ms:>8.2f}x {str(equal):>12}")
        assert equal, f"{name}: proposals differ from torchvision's"


if __name__ == "__main__":
    main()
