"""DataLoader throughput with worker-side anchor-target assignment versus without.

Two workers, batch 8, the default synthetic training pipeline (SyntheticShapes 128-192 px,
HorizontalFlip) and, second, COCO-like JPEG files read from disk and resized (shortest edge
512, max 853), both served as ``RPNDataModule`` serves training (:func:`training_items`: the
epoch's order, each item's augmentation seeded from the run's seed and its index; a line gives
the item cost without that seeding too). Anchors: four levels, strides 8-64, three aspect
ratios. The two loaders are measured in rounds, back to back, the first one changing every
round. The machine may be shared and one round swings by 10-30%, so the figure is the median
over rounds of each round's ratio (paired measurements cancel the drift); the ratio of the best
rounds is printed too. Target: throughput with assignment >= 90% of throughput without.

``--against REV`` also compares the in-process assignment cost per image (collate with minus
without assignment, one thread, median of 15 paired rounds on the same items) with the
``RPNCollate`` of git revision ``REV`` (its package extracted with ``git archive`` into a
temporary directory and imported under another name).

    python bench/bench_dataloader.py [--rounds 9] [--images 480] [--against c32c382]
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.draws import ShuffledEpochs
from lightning_rpn.data.folder import ImageFolder
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.transforms import DetectionTransform, ResizePolicy, TransformedDataset
from lightning_rpn.data.window_sampler import WindowSampler

ANCHORS = AnchorGenerator(((16,), (32,), (64,), (128,)), (0.5, 1.0, 2.0), (8, 16, 32, 64))
SEED = 0  # the run's seed (seed_everything's) that the training draws come from


def training_items(dataset: Dataset, transform: DetectionTransform) -> TransformedDataset:
    """``dataset`` as the data module's training loader serves it (``_training_draws``): item
    ``epoch * n + j`` the ``j``-th of the epoch's order, its augmentation seeded from the run's
    seed and the index (a :class:`WindowSampler` hands out the epoch's indices)."""
    return TransformedDataset(ShuffledEpochs(dataset, SEED), transform, SEED)


class BoxedFolder(Dataset):
    """Images of a folder with a few fixed random boxes each (a stand-in for COCO files)."""

    def __init__(self, root: Path, seed: int = 0) -> None:
        self.folder = ImageFolder(root)
        rng = np.random.default_rng(seed)
        self.boxes = []
        for _ in range(len(self.folder)):
            xy = rng.uniform(0, 400, size=(7, 2))
            wh = rng.uniform(16, 200, size=(7, 2))
            self.boxes.append(np.concatenate([xy, np.minimum(xy + wh, [640, 480])], axis=1).astype(np.float32))

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> DetectionSample:
        sample = self.folder[index]
        sample.boxes = self.boxes[index]
        return sample


def write_jpegs(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    source = SyntheticShapes(count, min_size=480, max_size=480, seed=1)
    for i in range(count):
        image = np.ascontiguousarray(np.broadcast_to(source[i % 8].image[:, :, :], (480, 480, 3)))
        canvas = np.concatenate([image, image[:, :160]], axis=1)  # 480 x 640
        canvas = np.clip(canvas.astype(np.int16) + rng.integers(-3, 4, canvas.shape), 0, 255).astype(np.uint8)
        Image.fromarray(canvas).save(root / f"{i:05d}.jpg", quality=90)


def throughput(dataset: Dataset, assign: bool, batch_size: int = 8, workers: int = 2) -> float:
    """Images per second over the whole dataset after a warm-up of two batches."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, sampler=WindowSampler(len(dataset)),
                        collate_fn=RPNCollate(ANCHORS, assign_targets=assign))
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch)
        assert (batch.anchor_labels is not None) == assign
    return count / (time.perf_counter() - start)


def cpu_costs(dataset: Dataset, count: int = 96, batch_size: int = 8, repeats: int = 7) -> tuple[float, float, float]:
    """In-process, one-thread milliseconds per image: item (load + transform), collate, assignment.

    Each collate figure is the fastest of ``repeats`` passes over the same items (the noise of
    a shared machine only ever adds time).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    count = min(count, len(dataset))
    start = time.perf_counter()
    items = [dataset[i] for i in range(count)]
    item_ms = (time.perf_counter() - start) / count * 1e3
    costs = []
    for assign in (False, True):
        collate = RPNCollate(ANCHORS, assign_targets=assign)
        collate(items[:batch_size])  # warm the anchor cache
        passes = []
        for _ in range(repeats):
            start = time.perf_counter()
            for begin in range(0, count, batch_size):
                collate(items[begin:begin + batch_size])
            passes.append((time.perf_counter() - start) / count * 1e3)
        costs.append(min(passes))
    torch.set_num_threads(threads)
    return item_ms, costs[0], costs[1] - costs[0]


def revision_collate(revision: str) -> Callable[[bool], object]:
    """``assign -> RPNCollate(ANCHORS' settings, assign_targets=assign)`` of git ``revision``."""
    name = "lightning_rpn_" + re.sub(r"\W", "_", revision)
    root = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", revision, "lightning_rpn"], cwd=Path(__file__).parents[1],
                             capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(root, filter="data")
    package = (root / "lightning_rpn").rename(root / name)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\blightning_rpn\b", name, path.read_text()))
    (package / "__init__.py").write_text("")  # the modules only, not the public API's imports
    sys.path.insert(0, str(root))
    collate = importlib.import_module(f"{name}.data.collate").RPNCollate
    anchors = f"{name}.core.anchors" if (package / "core").is_dir() else f"{name}.anchors"  # before issue 15's move
    generator = importlib.import_module(anchors).AnchorGenerator(
        ANCHORS.sizes, ANCHORS.aspect_ratios, ANCHORS.strides)
    return lambda assign: collate(generator, assign_targets=assign)


def assignment_versus(
    items: list, other: Callable[[bool], object], rounds: int = 15, batch_size: int = 8
) -> tuple[float, float]:
    """Median one-thread assignment ms per image (collate with - without), ``other``'s and ours,
    over paired rounds on ``items`` (the first side alternating)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ours = (RPNCollate(ANCHORS, assign_targets=False), RPNCollate(ANCHORS, assign_targets=True))
    sides = [(other(False), other(True)), ours]
    for pair in sides:
        for collate in pair:
            collate(items[:batch_size])

    def per_image(collate) -> float:
        start = time.perf_counter()
        for begin in range(0, len(items), batch_size):
            collate(items[begin:begin + batch_size])
        return (time.perf_counter() - start) / len(items) * 1e3

    costs: list[list[float]] = [[], []]
    for round_index in range(rounds):
        for side in (0, 1) if round_index % 2 == 0 else (1, 0):
            without, with_assign = sides[side]
            costs[side].append(per_image(with_assign) - per_image(without))
    torch.set_num_threads(threads)
    return statistics.median(costs[0]), statistics.median(costs[1])


def seeding_cost(
    seeded: TransformedDataset, unseeded: Dataset, count: int = 96, repeats: int = 9
) -> tuple[float, float]:
    """In-process, one-thread milliseconds per item (load + transform) of ``seeded`` (from
    :func:`training_items`) and of ``unseeded`` (the pipeline drawing from the process's stream, as
    before 2026-12-07) on the same images, the fastest of ``repeats`` passes each, the first side
    alternating."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    count = min(count, len(seeded))
    sides = [(seeded, range(count)), (unseeded, [int(i) for i in seeded.dataset.order(0)[:count]])]
    passes: list[list[float]] = [[], []]
    for round_index in range(repeats):
        for side in (0, 1) if round_index % 2 == 0 else (1, 0):
            dataset, indices = sides[side]
            start = time.perf_counter()
            for i in indices:
                dataset[i]
            passes[side].append((time.perf_counter() - start) / count * 1e3)
    torch.set_num_threads(threads)
    return min(passes[0]), min(passes[1])


def compare(name: str, dataset: TransformedDataset, unseeded: Dataset, rounds: int, against: str | None = None) -> None:
    measured: dict[bool, list[float]] = {True: [], False: []}
    for round_index in range(rounds):
        for assign in (True, False) if round_index % 2 == 0 else (False, True):
            measured[assign].append(throughput(dataset, assign))
    with_assign, without = measured[True], measured[False]
    best_with, best_without = max(with_assign), max(without)
    paired = statistics.median(a / b for a, b in zip(with_assign, without))
    print(f"{name}:")
    print(f"  with worker-side assignment : {best_with:7.1f} images/s   (rounds: {', '.join(f'{v:.0f}' for v in with_assign)})")
    print(f"  without assignment          : {best_without:7.1f} images/s   (rounds: {', '.join(f'{v:.0f}' for v in without)})")
    print(f"  ratio (median of rounds)    : {paired:7.3f}   (target >= 0.90; of the best rounds: "
          f"{best_with / best_without:.3f})")
    item_ms, collate_ms, assign_ms = cpu_costs(dataset)
    expected = (item_ms + collate_ms) / (item_ms + collate_ms + assign_ms)
    print(f"  CPU ms/image (1 thread)     : item {item_ms:.2f}, collate {collate_ms:.2f}, assignment {assign_ms:.2f}"
          f"  -> CPU-bound ratio {expected:.3f}")
    seeded_ms, plain_ms = seeding_cost(dataset, unseeded)
    print(f"  item ms/image (1 thread)    : {seeded_ms:.3f} seeded, {plain_ms:.3f} unseeded "
          f"({seeded_ms - plain_ms:+.3f} ms for the training draws: {plain_ms / seeded_ms:.3f}x the items a second)")
    if against is not None:
        theirs, ours = assignment_versus([dataset[i] for i in range(min(96, len(dataset)))], revision_collate(against))
        print(f"  assignment ms/image vs {against}: {theirs:.3f} there, {ours:.3f} here (ratio {ours / theirs:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--against", help="also compare the assignment cost with this git revision's collate")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 2 workers, batch 8, "
          f"anchors: strides {ANCHORS.strides}, {ANCHORS.num_anchors_per_location()} per location")
    flip = [{"HorizontalFlip": {"p": 0.5}}]
    shapes = SyntheticShapes(args.images, seed=0)
    compare(f"synthetic shapes 128-192 px ({args.images} images)",
            training_items(shapes, DetectionTransform(flip, 0.3, train=True)),
            TransformedDataset(shapes, DetectionTransform(flip, 0.3, train=True)), args.rounds, args.against)
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images // 2)
        resize = ResizePolicy("shortest_edge", (512,), 853)
        folder = BoxedFolder(Path(tmp))
        compare(f"JPEG 640x480 files, resized to 512x683 ({args.images // 2} images)",
                training_items(folder, DetectionTransform(flip, 0.3, resize, train=True)),
                TransformedDataset(folder, DetectionTransform(flip, 0.3, resize, train=True)),
                args.rounds, args.against)


if __name__ == "__main__":
    main()
