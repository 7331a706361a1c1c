"""Proposal quality against torchvision's RPN on generated dense scenes, side by side.

Both sides train from the same initial weights on the same data (``configs/scenes.yaml``: 8
dense aerial-like scenes, random 256-px crops with flips, ResNet-18 FPN from scratch) for the
same number of steps, then both are evaluated on whole held-out scenes with the same recall
metric, and on scenes of another family they never saw (roofs on an urban background: the
generalisation check):

- ``ours``: the real CLI, ``lightning-rpn fit --config configs/scenes.yaml`` (in process),
  plus any ``--ours-args`` (an ablation: ``--ours-args --model.box_loss smooth_l1``);
- ``torchvision``: torchvision's ``RegionProposalNetwork`` in a plain loop
  (:class:`~lightning_rpn.torchvision_reference.TorchvisionLoop`: its own matcher and sampler,
  smooth L1 beta 1/9, SGD with weight decay on every parameter, the same warm-up + cosine
  schedule and gradient clipping) on batches of the same data module.

Prints AR@100, AR@300, AR@1000, recall@0.5@100 and recall@0.7@1000 per side and seed, the
means over seeds and the ratios ours / torchvision. Heavy: ~10 min per seed on 2 CPU cores at
the default 300 steps; run it alone.

    .venv/bin/python bench/bench_quality.py --seeds 0 1
    .venv/bin/python bench/bench_quality.py --seeds 0 --ours-args --model.box_loss smooth_l1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from lightning_rpn.cli import RPNLightningCLI
from lightning_rpn.data import DenseScenes, RPNCollate
from lightning_rpn.metrics import ProposalRecall
from lightning_rpn.module import LRSchedule
from lightning_rpn.torchvision_reference import TorchvisionLoop

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "scenes.yaml"
KEYS = ("AR@100", "AR@300", "AR@1000", "recall@0.50@100", "recall@0.70@1000")
UNSEEN = {"objects": "roofs", "background": "urban"}


def _cli(args: list[str]) -> RPNLightningCLI:
    return RPNLightningCLI(args=args, run=False)


def evaluate(propose, scenes: DenseScenes, size_divisibility: int) -> dict[str, float]:
    """Recall of ``propose(batch) -> list[boxes]`` over whole scenes, one scene per batch."""
    metric = ProposalRecall()
    collate = RPNCollate(size_divisibility=size_divisibility, assign_targets=False)
    for index in range(len(scenes)):
        batch = collate([scenes[index]])
        metric.update(propose(batch), batch.gt_boxes)
    results = metric.compute()
    return {key: float(results[key]) for key in KEYS}


def evaluate_held_out(propose, data, size_divisibility: int) -> tuple[dict[str, float], dict[str, float]]:
    """Recall on the config's validation scenes and on as many scenes of the unseen family."""
    scenes = data.build_dataset(data.splits["val"])
    unseen = DenseScenes(len(scenes), scenes.size, **UNSEEN, seed=scenes.seed, split="unseen")
    return evaluate(propose, scenes, size_divisibility), evaluate(propose, unseen, size_divisibility)


def _config_args(seed: int, steps: int, workdir: Path) -> list[str]:
    """``configs/scenes.yaml`` for ``steps`` steps (10% warm-up), no checkpoints, no callbacks."""
    return ["--config", str(CONFIG), "--seed_everything", str(seed), "--trainer.max_steps", str(steps),
            "--model.warmup_steps", str(max(1, steps // 10)), "--trainer.default_root_dir", str(workdir),
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"]


def run_ours(seed: int, steps: int, extra: list[str], workdir: Path) -> tuple[dict, dict, float]:
    cli = _cli([*_config_args(seed, steps, workdir), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir", str(workdir), "--trainer.limit_val_batches", "0", *extra])
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    module = cli.model.eval()

    @torch.no_grad()
    def propose(batch):
        proposals, _ = module(batch, with_targets=False)
        return [boxes for boxes, _ in proposals]

    return (*evaluate_held_out(propose, cli.datamodule, module.size_divisibility), seconds)


def run_torchvision(seed: int, steps: int, workdir: Path) -> tuple[dict, dict, float]:
    # the same config and seed build the same initial weights and the same data module
    cli = _cli([*_config_args(seed, steps, workdir), "--trainer.logger", "false"])
    module, data = cli.model, cli.datamodule
    hp = module.hparams
    # the same warm-up + cosine factor as our side
    schedule = LRSchedule(hp.warmup_steps, hp.warmup_factor, "cosine", (), 0.1, steps, hp.min_lr_factor)
    loop = TorchvisionLoop.from_module(module, gradient_clip_norm=cli.trainer.gradient_clip_val, schedule=schedule)
    data.setup("fit")
    data.assign_targets = False
    seed_everything(seed, workers=True)
    start = time.perf_counter()
    loader = data.train_dataloader()  # persistent workers: new crops every pass
    done = 0
    while done < steps:
        for batch in loader:
            loop.step(batch.images, batch.image_sizes, batch.gt_boxes)
            done += 1
            if done == steps:
                break
    seconds = time.perf_counter() - start

    def propose(batch):
        return loop.proposals(batch.images, batch.image_sizes)

    return (*evaluate_held_out(propose, data, module.size_divisibility), seconds)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(row[key] for row in rows) / len(rows) for key in KEYS}


def _line(name: str, row: dict[str, float]) -> str:
    return f"{name:<42}" + "".join(f"{row[key]:>18.3f}" for key in KEYS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sides", nargs="+", default=["ours", "torchvision"], choices=["ours", "torchvision"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--ours-args", nargs=argparse.REMAINDER, default=[],
                        help="extra CLI arguments for our side (everything after this flag)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        for seed in options.seeds:
            for side in options.sides:
                workdir = Path(tmp) / f"{side}_{seed}"
                if side == "ours":
                    seen, unseen, seconds = run_ours(seed, options.steps, options.ours_args, workdir)
                else:
                    seen, unseen, seconds = run_torchvision(seed, options.steps, workdir)
                results.setdefault(side, {"seen": [], "unseen": []})
                results[side]["seen"].append(seen)
                results[side]["unseen"].append(unseen)
                print(f"[{side} seed {seed}: {options.steps} steps in {seconds:.0f} s] "
                      + ", ".join(f"{k} {v:.3f}" for k, v in seen.items()), flush=True)
    print(f"\nheld-out scenes ({options.steps} steps, seeds {options.seeds}; ours: "
          f"{' '.join(options.ours_args) or 'configs/scenes.yaml as is'})")
    print(f"{'':<42}" + "".join(f"{key:>18}" for key in KEYS))
    for split in ("seen", "unseen"):
        label = "same family" if split == "seen" else "unseen family (roofs/urban)"
        means = {side: _mean(rows[split]) for side, rows in results.items()}
        for side, row in means.items():
            print(_line(f"{side}, {label}", row))
        if len(means) == 2:
            ratio = {key: means["ours"][key] / max(means["torchvision"][key], 1e-9) for key in KEYS}
            print(_line(f"ratio ours / torchvision, {split}", ratio))
    if options.out is not None:
        options.out.write_text(json.dumps({"steps": options.steps, "seeds": options.seeds,
                                           "ours_args": options.ours_args, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
