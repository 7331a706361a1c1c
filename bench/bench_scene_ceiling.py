"""How much of the dense scenes' average recall any proposal network can reach, and what the
targets of issue 17 ask of it.

The held-out scenes of ``configs/scenes.yaml`` (the ones ``bench_quality.py`` evaluates on,
built through the real CLI) hold about a hundred 15-70 px objects each, blurred, noisy, low in
contrast and drawn over one another; their boxes are each object's full extent, hidden parts
included. The script measures, with the project's recall metric:

- how many objects 100 proposals a scene can reach at all (a scene may hold more than 100);
- the *visible-extent oracle*: one proposal per object, the box of what stays visible of it
  (``DenseScenes.owners``), perfectly ranked, no duplicate: the ceiling of a network that
  localises what it sees exactly;
- the same oracle with Gaussian noise of ``sigma`` px added to every coordinate: the recall of a
  network that finds every object once and places each edge with that error;
- against ``--plain`` and ``--cascade`` (AR@100, AR@1000, and the two at IoU 0.7-0.95; defaults:
  the README's three-seed means of the plain RPN with 16-256 px anchors and of
  ``scenes_cascade.yaml``, "Cascade refinement on dense scenes"), each target's required value
  (1.15x or 1.3x the plain RPN), its share of the ceiling, and the share of the plain RPN's gap
  to the ceiling that the cascade closes and that the target asks to close.

Seconds on the CPU, no training:

    .venv/bin/python bench/bench_scene_ceiling.py
    .venv/bin/python bench/bench_scene_ceiling.py --data-seeds 0 1 2
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torchvision.ops import box_iou

from lightning_rpn.cli import RPNLightningCLI
from lightning_rpn.data import DenseScenes
from lightning_rpn.evaluation.metrics import ProposalRecall

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "scenes.yaml"
ALL_IOU = tuple(0.5 + 0.05 * step for step in range(10))
HIGH_IOU = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
FIGURES = ("AR@100", "AR@1000", "AR0.7+@100", "AR0.7+@1000")
TARGETS = {"AR@100": 1.15, "AR@1000": 1.15, "AR0.7+@100": 1.3, "AR0.7+@1000": 1.3}
PLAIN = (0.689, 0.795, 0.585, 0.667)  # plain RPN, anchors 16-256 px, seeds 0-2
CASCADE = (0.796, 0.859, 0.716, 0.777)  # scenes_cascade.yaml, seeds 0-2
SIGMAS = (0.25, 0.5, 0.75, 1.0)


def held_out_scenes(data_seed: int) -> DenseScenes:
    """The validation scenes of ``configs/scenes.yaml`` with ``--data.seed data_seed``."""
    with tempfile.TemporaryDirectory() as workdir, mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = RPNLightningCLI(args=["--config", str(CONFIG), "--data.seed", str(data_seed),
                                    "--trainer.logger", "false", "--trainer.callbacks", "[]",
                                    "--trainer.enable_checkpointing", "false",
                                    "--trainer.default_root_dir", workdir], run=False)
        return cli.datamodule.build_dataset(cli.datamodule.splits["val"])


def visible_boxes(scenes: DenseScenes) -> list[torch.Tensor]:
    """Per scene, the ``[G', 4]`` boxes of what stays visible of each object (wholly hidden ones left out)."""
    extents = []
    for index in range(len(scenes)):
        owners = scenes.owners(index)
        boxes = []
        for owner in range(len(scenes[index].boxes)):
            ys, xs = np.nonzero(owners == owner)
            if len(xs):
                boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        extents.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    return extents


def recall(proposals: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, float]:
    """AR@100 / AR@1000 over IoU 0.5-0.95 and 0.7-0.95 (keys ``AR@k`` / ``AR0.7+@k``)."""
    figures = {}
    for prefix, thresholds in (("AR", ALL_IOU), ("AR0.7+", HIGH_IOU)):
        metric = ProposalRecall(iou_thresholds=thresholds, max_proposals=(100, 1000))
        metric.update(proposals, targets)
        computed = metric.compute()
        figures.update({f"{prefix}@{k}": float(computed[f"AR@{k}"]) for k in (100, 1000)})
    return figures


def _row(name: str, figures: dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{figures[key]:.3f}" for key in FIGURES) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0],
                        help="--data.seed of the held-out scenes (bench_quality.py evaluates on 0)")
    parser.add_argument("--plain", type=float, nargs=4, default=PLAIN, metavar=("AR100", "AR1000", "HIGH100", "HIGH1000"),
                        help="the plain RPN's AR@100, AR@1000 and both at IoU 0.7-0.95")
    parser.add_argument("--cascade", type=float, nargs=4, default=CASCADE, metavar=("AR100", "AR1000", "HIGH100", "HIGH1000"),
                        help="the cascade's, the same four")
    parser.add_argument("--noise-seed", type=int, default=0)
    options = parser.parse_args()
    plain, cascade = dict(zip(FIGURES, options.plain)), dict(zip(FIGURES, options.cascade))
    noise = torch.Generator().manual_seed(options.noise_seed)
    for data_seed in options.data_seeds:
        scenes = held_out_scenes(data_seed)
        targets = [torch.from_numpy(scenes[index].boxes) for index in range(len(scenes))]
        visible = visible_boxes(scenes)
        counts = [len(boxes) for boxes in targets]
        reachable = sum(min(100, count) for count in counts) / sum(counts)
        overlap = torch.cat([_matched_iou(v, t) for v, t in zip(visible, targets)])
        print(f"\ndata seed {data_seed}: {len(scenes)} scenes of {scenes.size} px, objects per scene {counts}; "
              f"{sum(counts) - sum(len(v) for v in visible)} wholly hidden; reachable with 100 proposals a scene: "
              f"{reachable:.3f}; visible extent against the box: IoU < 0.9 for {float((overlap < 0.9).float().mean()):.3f}, "
              f"< 0.7 for {float((overlap < 0.7).float().mean()):.3f} of the visible objects\n")
        print("| one proposal per object | " + " | ".join(FIGURES) + " |")
        print("|---" * (len(FIGURES) + 1) + "|")
        ceiling = recall(visible, targets)
        print(_row("visible extent, exact (the ceiling)", ceiling))
        for sigma in SIGMAS:
            noisy = [boxes + sigma * torch.randn(boxes.shape, generator=noise) for boxes in visible]
            print(_row(f"visible extent + N(0, {sigma:g} px) per coordinate", recall(noisy, targets)))
        print("\n| figure | plain | cascade (ratio) | target | target / ceiling | gap to the ceiling closed: cascade / target |")
        print("|---|---|---|---|---|---|")
        for key in FIGURES:
            target = TARGETS[key] * plain[key]
            gap = ceiling[key] - plain[key]
            print(f"| {key} | {plain[key]:.3f} | {cascade[key]:.3f} ({cascade[key] / plain[key]:.2f}x) | {target:.3f} "
                  f"({TARGETS[key]:g}x) | {target / ceiling[key]:.3f} | {(cascade[key] - plain[key]) / gap:.2f} / "
                  f"{(target - plain[key]) / gap:.2f} |")


def _matched_iou(visible: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each visible extent's IoU with the annotated box it lies in (its best match)."""
    return box_iou(visible, boxes).max(dim=1).values if len(visible) else visible.new_zeros(0)


if __name__ == "__main__":
    main()
