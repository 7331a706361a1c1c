"""Generalisation check: one trained checkpoint, recall on every built-in generator.

A proposal model that only fits its own generator must be visible. This evaluates a checkpoint
(e.g. ``make fit``'s ``runs/shapes/.../last.ckpt`` or a ``configs/scenes.yaml`` run) on held-out
images of every generator: the synthetic shapes and the dense scenes in both object families
(crowns on fields, roofs on urban ground), and prints the recall of each next to the others.
torchvision's RPN, trained by ``bench/bench_quality.py`` on the same data, gets the same check
there (its "unseen family" rows).

    .venv/bin/python bench/generalisation.py runs/shapes/checkpoints/last.ckpt
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import sys

import torch
from torch.utils.data import Dataset

from lightning_rpn import RPNModule
from lightning_rpn.data import DenseScenes, RPNCollate, SyntheticShapes
from lightning_rpn.evaluation.metrics import ProposalRecall

KEYS = ("AR@100", "AR@1000", "recall@0.50@100", "recall@0.70@1000")


def generators(count: int, scene_size: int) -> dict[str, Dataset]:
    """Held-out images of every built-in generator (splits no config trains on)."""
    return {
        "shapes": SyntheticShapes(count * 10, split="generalisation"),
        "scenes crowns/field": DenseScenes(count, scene_size, "crowns", "field", split="generalisation"),
        "scenes roofs/urban": DenseScenes(count, scene_size, "roofs", "urban", split="generalisation"),
    }


@torch.no_grad()
def recall(module: RPNModule, dataset: Dataset) -> dict[str, float]:
    metric = ProposalRecall()
    collate = RPNCollate(size_divisibility=module.size_divisibility, assign_targets=False)
    for index in range(len(dataset)):  # type: ignore[arg-type]
        batch = collate([dataset[index]])
        proposals, _ = module(batch, with_targets=False)
        metric.update([boxes for boxes, _ in proposals], batch.gt_boxes)
    results = metric.compute()
    return {key: float(results[key]) for key in KEYS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--scenes", type=int, default=4, help="dense scenes per family (shapes: 10x as many)")
    parser.add_argument("--scene-size", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    module = RPNModule.load_from_checkpoint(options.checkpoint, map_location="cpu").eval()
    print(f"{options.checkpoint} ({module.hparams.backbone})")
    print(f"{'generator':<24}" + "".join(f"{key:>18}" for key in KEYS))
    for name, dataset in generators(options.scenes, options.scene_size).items():
        row = recall(module, dataset)
        print(f"{name:<24}" + "".join(f"{row[key]:>18.3f}" for key in KEYS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
