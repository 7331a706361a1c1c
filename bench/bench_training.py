"""End-to-end training throughput: lightning_rpn versus torchvision's RegionProposalNetwork.

One training step = wait for the DataLoader's next batch, uint8 -> float + ImageNet
normalisation, backbone, RPN (target assignment wherever it runs), loss, backward, SGD step.
Both sides use the same ResNet-18-FPN architecture with the same initial weights (a deep copy),
the same RPN head weights, the same in-memory images and boxes, the same DataLoader settings
(batch size, workers, persistent) and the same optimiser, all in this one process.

The machine may be shared, so the timed steps are split into rounds (one loader epoch each)
that alternate between the sides, the first side changing every round; a round starts a fresh
epoch, so neither side's workers run during the other's steps. A step is clocked from asking
the loader for its batch to the end of the optimiser step, and split into data wait, backbone
forward, the rest of the forward ("rpn+loss": normalisation, RPN head convolutions, targets,
proposals where made, loss), backward and optimiser.
On a loaded machine two OpenMP threads spin-wait for each other and every figure swings by
2-3x; ``--threads 1`` gives much steadier ratios there.

- ours: ``RPNModule.training_step`` (no proposals in training) on batches from
  ``RPNCollate`` with worker-side anchor-target assignment;
- torchvision: ``torchvision.models.detection.rpn.RegionProposalNetwork`` (anchors 32-512 on
  P2-P6, ratios 0.5/1/2, IoU 0.7/0.3, 256 sampled at 0.5 positives, 2000/2000 pre/post-NMS
  proposals in training) on batches from ``RPNCollate(assign_targets=False)``; it assigns
  targets and generates proposals inside its step.

Datasets (seeded, 512x512 uint8): "coco", about 7 boxes per image of 16-400 px, and "dense",
about 500 boxes per image of 8-40 px; aspect ratios 1:2 to 2:1. Targets (issue 5): ratio
torchvision / ours >= 1.1 on coco and >= 2 on dense.

    python bench/bench_training.py [--steps 8] [--warmup 2] [--rounds 4] [--workers 2]
        [--threads 0] [--datasets coco dense] [--image-size 512] [--batch-size 2] [--seed 0]
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import copy
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.training.module import RPNModule

ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
ASPECT_RATIOS = (0.5, 1.0, 2.0)
DATASETS = {  # name: (boxes per image (low, high), box side in px (low, high))
    "coco": ((4, 10), (16.0, 400.0)),
    "dense": ((450, 550), (8.0, 40.0)),
}
PARTS = ("data", "backbone", "rpn+loss", "backward", "optim")


class InMemoryBoxes(Dataset):
    """Seeded ``size x size`` uint8 images with filled boxes on a smooth noisy background."""

    def __init__(self, count: int, size: int, num_boxes: tuple[int, int], sides: tuple[float, float],
                 seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.images: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []
        ys = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        xs = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
        for _ in range(count):
            a, b, c = rng.uniform(40, 200, size=(3, 3)).astype(np.float32)
            image = a + (b - 120) * ys + (c - 120) * xs + rng.normal(0, 12, (size, size, 3))
            g = int(rng.integers(num_boxes[0], num_boxes[1] + 1))
            side = np.exp(rng.uniform(math.log(sides[0]), math.log(sides[1]), g))
            ratio = np.exp(rng.uniform(math.log(0.5), math.log(2.0), g))
            w = np.minimum(side * np.sqrt(ratio), size - 1)
            h = np.minimum(side / np.sqrt(ratio), size - 1)
            x1 = rng.uniform(0, size - w)
            y1 = rng.uniform(0, size - h)
            boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)
            for (bx1, by1, bx2, by2), colour in zip(boxes.astype(int), rng.uniform(0, 255, (g, 3))):
                image[by1:by2, bx1:bx2] = colour
            self.images.append(np.clip(image, 0, 255).astype(np.uint8))
            self.boxes.append(boxes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> DetectionSample:
        return DetectionSample(image=self.images[index], boxes=self.boxes[index], image_id=index,
                               source="bench")


class NextSlice(Sampler[int]):
    """Each epoch yields the next ``per_epoch`` indices of ``0 .. size - 1`` (cycling)."""

    def __init__(self, size: int, per_epoch: int) -> None:
        self.size, self.per_epoch, self.start = size, per_epoch, 0

    def __iter__(self) -> Iterator[int]:
        indices = [(self.start + i) % self.size for i in range(self.per_epoch)]
        self.start += self.per_epoch
        return iter(indices)

    def __len__(self) -> int:
        return self.per_epoch


@dataclass
class Timings:
    """Per-step wall seconds of each part of the timed steps, and main-process CPU seconds."""

    parts: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PARTS})
    cpu: list[float] = field(default_factory=list)

    def step_times(self) -> list[float]:
        return [sum(values) for values in zip(*self.parts.values())]

    def mean_ms(self, part: str | None = None) -> float:
        values = self.step_times() if part is None else self.parts[part]
        return 1e3 * statistics.fmean(values)

    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.step_times())

    def cpu_ms(self) -> float:
        return 1e3 * statistics.fmean(self.cpu)


class BackboneClock:
    """Forward hooks that time one module's forward pass."""

    def __init__(self, module: nn.Module) -> None:
        self.start = self.seconds = 0.0
        module.register_forward_pre_hook(self._begin)
        module.register_forward_hook(self._end)

    def _begin(self, *_: object) -> None:
        self.start = time.perf_counter()

    def _end(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.start


def build_ours(seed: int) -> RPNModule:
    """ResNet-18-FPN RPNModule with torchvision's loss settings (smooth L1, beta 1/9)."""
    torch.manual_seed(seed)
    return RPNModule(
        backbone="resnet18_fpn",
        weights=None,
        anchor_sizes=ANCHOR_SIZES,
        aspect_ratios=(ASPECT_RATIOS,),
        box_loss="smooth_l1",
        smooth_l1_beta=1.0 / 9.0,
        pre_nms_top_n_train=2000,
        post_nms_top_n_train=2000,
    )


def build_torchvision(ours: RPNModule, memory_format: torch.memory_format) -> tuple[nn.Module, RegionProposalNetwork]:
    """A copy of our backbone and a torchvision RPN with our head's weights and our settings."""
    backbone = copy.deepcopy(ours.backbone).to(memory_format=memory_format)
    head = TVRPNHead(backbone.out_channels, len(ASPECT_RATIOS))
    ours_state = list(ours.rpn.head.state_dict().values())
    tv_state = head.state_dict()
    if [v.shape for v in ours_state] != [v.shape for v in tv_state.values()]:
        raise ValueError(
            f"bench_training: our RPN head's tensors {[tuple(v.shape) for v in ours_state]} do not "
            f"map onto torchvision's RPNHead {[tuple(v.shape) for v in tv_state.values()]}"
        )
    head.load_state_dict(dict(zip(tv_state.keys(), ours_state)))
    head.to(memory_format=memory_format)
    config = ours.target_config
    rpn = RegionProposalNetwork(
        TVAnchorGenerator(ANCHOR_SIZES, (ASPECT_RATIOS,) * len(ANCHOR_SIZES)),
        head,
        fg_iou_thresh=config.fg_iou,
        bg_iou_thresh=config.bg_iou,
        batch_size_per_image=config.batch_size_per_image,
        positive_fraction=config.positive_fraction,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 2000, "testing": 1000},
        nms_thresh=0.7,
    )
    return backbone, rpn


def sgd(parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.005, momentum=0.9, weight_decay=1e-4)


@dataclass
class Side:
    """One contender: its DataLoader (persistent workers), step forward, clock and optimiser."""

    name: str
    loader: DataLoader
    forward: Callable[[RPNBatch], Tensor]
    clock: BackboneClock
    optimizer: torch.optim.Optimizer
    collate: Callable[[list[DetectionSample]], RPNBatch]
    timings: Timings = field(default_factory=Timings)

    def train_epoch(self, timed: bool) -> None:
        """One epoch of the loader (one round): a training step per batch."""
        iterator = iter(self.loader)
        while True:
            c0, t0 = time.process_time(), time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            loss = self.forward(batch)
            t2 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            self.optimizer.step()
            t4, c4 = time.perf_counter(), time.process_time()
            if not torch.isfinite(loss):
                raise ValueError(f"bench_training: {self.name} got a non-finite loss {float(loss)}")
            if timed:
                backbone = self.clock.seconds
                parts = (t1 - t0, backbone, t2 - t1 - backbone, t3 - t2, t4 - t3)
                for part, value in zip(PARTS, parts):
                    self.timings.parts[part].append(value)
                self.timings.cpu.append(c4 - c0)

    def collate_ms(self, dataset: Dataset, batch_size: int, repeats: int = 3) -> float:
        """One-thread CPU milliseconds of this side's collate per batch, in this process."""
        samples = [dataset[i] for i in range(batch_size)]
        self.collate(samples)  # anchor cache
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        start = time.process_time()
        for _ in range(repeats):
            self.collate(samples)
        torch.set_num_threads(threads)
        return 1e3 * (time.process_time() - start) / repeats


def make_loader(dataset: Dataset, collate: RPNCollate, args: argparse.Namespace) -> DataLoader:
    """Persistent workers; each epoch (round) takes the next ``per_round`` batches of images."""
    sampler = NextSlice(len(dataset), args.per_round * args.batch_size)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                      collate_fn=collate, persistent_workers=args.workers > 0)


def ours_side(dataset: Dataset, args: argparse.Namespace) -> Side:
    """``RPNModule.training_step`` on batches with worker-side anchor targets."""
    module = build_ours(args.seed)
    module.train()
    collate = RPNCollate(module.anchor_generator, module.target_config, module.box_coder,
                         module.size_divisibility, seed=module.rpn.seed, assign_targets=True)

    def forward(batch: RPNBatch) -> Tensor:
        if batch.anchor_labels is None:
            raise RuntimeError("bench_training: ours must get worker-side anchor targets")
        return module.training_step(batch, 0)

    return Side("ours", make_loader(dataset, collate, args), forward, BackboneClock(module.backbone),
                sgd(list(module.parameters())), collate)


def torchvision_side(dataset: Dataset, args: argparse.Namespace) -> Side:
    """torchvision's RegionProposalNetwork (in-step assignment and proposals) on plain batches."""
    ours = build_ours(args.seed)  # same seed: the same initial weights as ours
    memory_format = torch.channels_last if args.torchvision_channels_last else torch.contiguous_format
    backbone, rpn = build_torchvision(ours, memory_format)
    backbone.train()
    rpn.train()
    collate = RPNCollate(size_divisibility=ours.size_divisibility, assign_targets=False)

    def forward(batch: RPNBatch) -> Tensor:
        images = ((batch.images.float() - ours.pixel_mean) / ours.pixel_std).contiguous(memory_format=memory_format)
        features = {str(i): f for i, f in enumerate(backbone(images))}
        targets = [{"boxes": boxes} for boxes in batch.gt_boxes]
        _, losses = rpn(ImageList(images, list(batch.image_sizes)), features, targets)
        return losses["loss_objectness"] + losses["loss_rpn_box_reg"]

    params = list(backbone.parameters()) + list(rpn.parameters())
    return Side("torchvision", make_loader(dataset, collate, args), forward, BackboneClock(backbone),
                sgd(params), collate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side and dataset")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per side first (rounded up to whole rounds)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="the timed steps are split into this many alternating rounds")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["coco", "dense"])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torchvision-channels-last", action="store_true",
                        help="run torchvision's side in channels-last too (ours always uses its default)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or not 1 <= args.rounds <= args.steps:
        parser.error("need --steps >= 1, --warmup >= 0 and 1 <= --rounds <= --steps")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step without a Trainer
    per_round = args.per_round = math.ceil(args.steps / args.rounds)
    warmup_rounds = math.ceil(args.warmup / per_round)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.workers} workers, "
          f"batch {args.batch_size}, {args.image_size}x{args.image_size}, ResNet-18-FPN (random init); "
          f"per side and dataset {warmup_rounds * per_round} warm-up + {per_round * args.rounds} "
          f"timed steps in {args.rounds} alternating rounds; load average at start {load_average()}")
    rows = []
    for name in args.datasets:
        num_boxes, sides = DATASETS[name]
        images = (warmup_rounds + args.rounds) * per_round * args.batch_size
        dataset = InMemoryBoxes(images, args.image_size, num_boxes, sides, seed=args.seed + 1)
        mean_boxes = statistics.fmean(len(b) for b in dataset.boxes)
        contenders = [ours_side(dataset, args), torchvision_side(dataset, args)]
        for side in contenders:
            # Fork every side's persistent workers before any step: a fork shares all pages
            # copy-on-write, so the first optimiser step after another side's fork would copy
            # this side's weights and momenta (a one-off 0.3-0.6 s inside a timed step).
            iter(side.loader)
        for side in contenders:
            for _ in range(warmup_rounds):
                side.train_epoch(timed=False)
        for round_index in range(args.rounds):  # alternate who goes first: load drifts
            for side in contenders[:: 1 if round_index % 2 == 0 else -1]:
                side.train_epoch(timed=True)
        print(f"\n{name} ({mean_boxes:.1f} boxes/image), mean wall ms per timed step "
              f"(load average now {load_average()}):")
        cpu = {}
        for side in contenders:
            collate_ms = side.collate_ms(dataset, args.batch_size)
            cpu[side.name] = side.timings.cpu_ms() + collate_ms
            parts = "  ".join(f"{p} {side.timings.mean_ms(p):5.0f}" for p in PARTS)
            print(f"  {side.name:<11} {parts}  | CPU ms/step: main process "
                  f"{side.timings.cpu_ms():5.0f} + collate {collate_ms:3.0f}")
        ours, tv = (side.timings for side in contenders)
        rows.append((name, mean_boxes, ours.mean_ms(), tv.mean_ms(), tv.mean_ms() / ours.mean_ms(),
                     tv.median_ms() / ours.median_ms(), cpu["torchvision"] / cpu["ours"]))
        del contenders, side, ours, tv  # the loaders go, and their persistent workers with them

    targets = {"coco": 1.1, "dense": 2.0}
    print("\nratio = torchvision / ours: of the mean wall time per step (the figure of merit), of the "
          "median step, and of CPU time per step (main process incl. OpenMP spin-waits + collate)")
    print(f"{'dataset':<8} {'boxes/img':>9} {'ours ms/step':>13} {'torchvision ms/step':>20} "
          f"{'ratio':>6} {'median':>7} {'CPU':>5} {'target':>7}")
    for name, mean_boxes, ours_ms, tv_ms, ratio, median_ratio, cpu_ratio in rows:
        print(f"{name:<8} {mean_boxes:>9.1f} {ours_ms:>13.0f} {tv_ms:>20.0f} {ratio:>6.2f} "
              f"{median_ratio:>7.2f} {cpu_ratio:>5.2f} {'>= ' + str(targets[name]):>7}")


def load_average() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    main()
