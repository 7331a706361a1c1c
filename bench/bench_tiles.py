"""Tiled training throughput: random windows of large images (``data.tiles``) vs pre-cut tiles on disk.

``--scenes`` generated dense scenes of ``--size`` px are written as JPEG files with COCO
annotations; the same scenes are also cut on the ``--tile``-px grid into JPEG tiles with their
own COCO annotations (boxes clipped, ``min_visibility`` applied), the hand work the tiles option
replaces. Both go through ``RPNDataModule(dataset="coco")``: two workers, batch 8, flips,
worker-side anchor targets (four levels, strides 4-32, three ratios); an epoch is as many
windows as there are pre-cut tiles. Each loader is timed over its second epoch (workers up,
the tiled loader's scene cache filled; its first epoch is printed too), in ``--rounds`` paired
rounds; the figure is the median of the per-round ratios. Target: tiled >= 0.9 x pre-cut.

    .venv/bin/python bench/bench_tiles.py [--scenes 4] [--size 2000] [--tile 256] [--rounds 3]
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.windows import window_grid
from lightning_rpn.data.scenes import DenseScenes
from lightning_rpn.data.tiles import cut_window
from lightning_rpn.training.datamodule import RPNDataModule

ANCHORS = AnchorGenerator(((16,), (32,), (64,), (128,)), (0.5, 1.0, 2.0), (4, 8, 16, 32))
MIN_VISIBILITY = 0.3


def _write_coco(root: Path, split: str, images: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """``root/split/<name>`` JPEG files and ``root/annotations/instances_<split>.json`` (xywh boxes)."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries, annotations = [], []
    for image_id, (name, pixels, boxes) in enumerate(images, start=1):
        Image.fromarray(pixels).save(root / split / name, quality=95)
        entries.append({"id": image_id, "file_name": name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for x1, y1, x2, y2 in boxes.tolist():
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}))


def _loader(root: Path, split: str, tiles: dict | None) -> torch.utils.data.DataLoader:
    data = RPNDataModule(dataset="coco", root=str(root), train_split=split, val_split=None, batch_size=8,
                         num_workers=2, min_visibility=MIN_VISIBILITY, tiles=tiles, anchor_generator=ANCHORS,
                         train_transforms=[{"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}}])
    data.setup("fit")
    return data.train_dataloader()


def _epoch(loader: torch.utils.data.DataLoader, epoch: int) -> tuple[float, int]:
    """Seconds and windows of one epoch of ``loader``."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch)
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generated = DenseScenes(args.scenes, size=args.size, split="bench-tiles")
    scenes = [generated[i] for i in range(args.scenes)]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _write_coco(root, "scenes", [(f"scene{i}.jpg", s.image, s.boxes) for i, s in enumerate(scenes)])
        cut = []
        for i, scene in enumerate(scenes):
            for window in window_grid(scene.image_size, args.tile, 0):
                piece = cut_window(scene, window, MIN_VISIBILITY)
                cut.append((f"scene{i}_{window[0]}_{window[1]}.jpg", piece.image, piece.boxes))
        _write_coco(root, "tiles", cut)
        print(f"{args.scenes} scenes of {args.size} px ({sum(len(s.boxes) for s in scenes)} boxes), "
              f"{len(cut)} pre-cut {args.tile}-px tiles; 2 workers, batch 8")
        tiled = _loader(root, "scenes", {"size": args.tile, "per_epoch": len(cut)})
        precut = _loader(root, "tiles", None)
        first, _ = _epoch(tiled, 0)
        _epoch(precut, 0)
        ratios = []
        for round_ in range(args.rounds):
            order = [(tiled, "tiled"), (precut, "pre-cut")][:: 1 if round_ % 2 == 0 else -1]
            rates = {}
            for loader, name in order:
                seconds, count = _epoch(loader, round_ + 1)
                rates[name] = count / seconds
            ratios.append(rates["tiled"] / rates["pre-cut"])
            print(f"round {round_}: tiled {rates['tiled']:.0f} windows/s, pre-cut {rates['pre-cut']:.0f} tiles/s, "
                  f"ratio {ratios[-1]:.2f}")
        print(f"tiled first epoch (each worker decodes the scenes): {len(cut) / first:.0f} windows/s")
        print(f"median ratio tiled / pre-cut: {statistics.median(ratios):.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
