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
  smooth L1 beta 1/9, the reported protocol's SGD lr 0.02 momentum 0.9 with weight decay on every
  parameter, the same warm-up + cosine schedule and gradient clipping) on batches of the same
  data module. Our config trains with AdamW lr 0.002 (its chosen default); ``--ablations sgd``
  is our side with the protocol's SGD (the same settings), ``--optimizer`` sets both sides.

Two protocols (``--protocol``):

- ``scenes`` (default): ``dataset: scenes`` as in the config, and the torchvision loop trains on
  batches of our data module (the same crops: only the training recipe differs);
- ``voc``: the reported real-data case. The scenes are written as JPEG files in a Pascal VOC
  folder with fewer training images (``--train-images``, large: ``--train-size``) than the batch
  size, our side trains on it through ``dataset: voc`` (the config's crops and flips, defaults
  otherwise), and the torchvision loop reads the same files with its own 40-line pipeline
  (:class:`PlainCrops`: ``batch_size`` random crops per step, images drawn with replacement,
  boxes clipped to the crop), as a user's plain loop does. Any difference in our data path shows.

Prints AR@100, AR@300, AR@1000, recall@0.5@100 and recall@0.7@1000 per side and seed, the
means over seeds and the ratios ours / torchvision (``--eval-nms 0.7 0.5``: every trained model is
also evaluated at each NMS threshold, against torchvision at the same threshold; ``--eval-pre-nms
1000 4000`` likewise with that many candidates per level before NMS). ``--keep DIR`` saves our
side's trained models as checkpoints (it refuses to overwrite one). Heavy: ~10 min per seed on 2
CPU cores at the default 300 steps; run it alone.

    .venv/bin/python bench/bench_quality.py --seeds 0 1
    .venv/bin/python bench/bench_quality.py --seeds 0 --ours-args --model.box_loss smooth_l1
    .venv/bin/python bench/bench_quality.py --protocol voc --seeds 0 1
    .venv/bin/python bench/bench_quality.py --ablations all      # the README's ablation table
    .venv/bin/python bench/bench_quality.py --seeds 0 --eval-nms 0.7 0.6 0.5 0.4   # its NMS row
    .venv/bin/python bench/bench_quality.py --sides torchvision --optimizer adamw  # torchvision with our optimiser
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import json
import os
import random
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from lightning.pytorch import seed_everything

from lightning_rpn.cli import RPNLightningCLI
from lightning_rpn.data import DenseScenes, RPNCollate
from lightning_rpn.metrics import ProposalRecall
from lightning_rpn.module import LRSchedule
from lightning_rpn.torchvision_reference import TorchvisionLoop

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "scenes.yaml"
KEYS = ("AR@100", "AR@300", "AR@1000", "recall@0.50@100", "recall@0.70@1000", "AR0.7+@100", "AR0.7+@1000")
HIGH_IOU = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
"""``AR0.7+@k``: AR over these IoU thresholds, the localisation a refining head exists for."""
UNSEEN = {"objects": "roofs", "background": "urban"}
# each optimiser at its peak learning rate: SGD is the reported protocol (torchvision's side),
# AdamW the config's (our chosen default for this from-scratch network)
OPTIMISERS = {"sgd": ["--model.optimizer", "sgd", "--model.lr", "0.02"],
              "adamw": ["--model.optimizer", "adamw", "--model.lr", "0.002"]}


def write_voc_scenes(root: Path, seed: int, train_images: int, train_size: int, val_images: int,
                     val_size: int) -> Path:
    """Dense scenes as a Pascal VOC folder (JPEG, 1-based inclusive boxes), ``train``/``val`` splits."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, count, size in (("train", train_images, train_size), ("val", val_images, val_size)):
        names = []
        for index, sample in enumerate(DenseScenes(count, size, seed=seed, split=split)):
            name = f"{split}_{index:03d}"
            Image.fromarray(sample.image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            objects = "".join(
                f"<object><name>crown</name><difficult>0</difficult><bndbox><xmin>{int(x1) + 1}</xmin>"
                f"<ymin>{int(y1) + 1}</ymin><xmax>{int(x2)}</xmax><ymax>{int(y2)}</ymax></bndbox></object>"
                for x1, y1, x2, y2 in sample.boxes)
            (root / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><filename>{name}.jpg</filename><size><width>{size}</width><height>{size}</height>"
                f"<depth>3</depth></size>{objects}</annotation>")
            names.append(name)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


class PlainCrops:
    """A plain loop's data: ``batch_size`` random crops per step from a VOC folder, with flips.

    Written without the package's data code (PIL + ElementTree): images are drawn uniformly
    with replacement, the crop position uniformly, boxes are clipped to the crop and kept when
    at least 1 px wide and high.
    """

    def __init__(self, root: Path, split: str, crop: int, batch_size: int, seed: int) -> None:
        names = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        self.images = [np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB")) for name in names]
        self.boxes = []
        for name in names:
            objects = ET.parse(root / "Annotations" / f"{name}.xml").findall("object/bndbox")
            self.boxes.append(np.array([[float(o.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                                        for o in objects], np.float32).reshape(-1, 4) - [1, 1, 0, 0])
        self.crop, self.batch_size, self.random = crop, batch_size, random.Random(seed)

    def batch(self) -> tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor]]:
        images, boxes = [], []
        for _ in range(self.batch_size):
            index = self.random.randrange(len(self.images))
            image, gt = self.images[index], self.boxes[index]
            top = self.random.randint(0, image.shape[0] - self.crop)
            left = self.random.randint(0, image.shape[1] - self.crop)
            window = image[top:top + self.crop, left:left + self.crop]
            gt = np.clip(gt - [left, top, left, top], 0, self.crop)
            gt = gt[(gt[:, 2] - gt[:, 0] >= 1) & (gt[:, 3] - gt[:, 1] >= 1)]
            if self.random.random() < 0.5:
                window, gt = window[:, ::-1], np.stack([self.crop - gt[:, 2], gt[:, 1], self.crop - gt[:, 0], gt[:, 3]], 1)
            if self.random.random() < 0.5:
                window, gt = window[::-1], np.stack([gt[:, 0], self.crop - gt[:, 3], gt[:, 2], self.crop - gt[:, 1]], 1)
            images.append(torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1))
            boxes.append(torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32)).reshape(-1, 4))
        return torch.stack(images), [(self.crop, self.crop)] * self.batch_size, boxes


def _cli(args: list[str]) -> RPNLightningCLI:
    return RPNLightningCLI(args=args, run=False)


def evaluate(propose, scenes: DenseScenes, size_divisibility: int) -> dict[str, float]:
    """Recall of ``propose(batch) -> list[boxes]`` over whole scenes, one scene per batch."""
    metric, high_iou = ProposalRecall(), ProposalRecall(iou_thresholds=HIGH_IOU)
    collate = RPNCollate(size_divisibility=size_divisibility, assign_targets=False)
    for index in range(len(scenes)):
        batch = collate([scenes[index]])
        boxes = propose(batch)
        metric.update(boxes, batch.gt_boxes)
        high_iou.update(boxes, batch.gt_boxes)
    high = {f"AR0.7+@{key.removeprefix('AR@')}": value for key, value in high_iou.compute().items() if key.startswith("AR@")}
    results = {**metric.compute(), **high}
    return {key: float(results[key]) for key in KEYS}


def evaluate_at_nms(propose, data, size_divisibility: int, rpn, nms_values: list[float | None],
                    pre_nms_values: list[int | None]) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """:func:`evaluate_held_out` once per (NMS threshold, pre-NMS candidates per level) set on ``rpn``.

    ``None`` keeps the model's own value; the rows are keyed by suffix (" @nms T", " @pre K").
    ``rpn`` is ours (``pre_nms_top_n["test"]``) or torchvision's (``_pre_nms_top_n["testing"]``).
    """
    rows = {}
    for nms in nms_values:
        if nms is not None:
            rpn.nms_thresh = nms
        for pre in pre_nms_values:
            if pre is not None:
                if hasattr(rpn, "_pre_nms_top_n"):
                    rpn._pre_nms_top_n["testing"] = pre
                else:
                    rpn.pre_nms_top_n["test"] = pre
            suffix = ("" if nms is None else f" @nms {nms:g}") + ("" if pre is None else f" @pre {pre}")
            rows[suffix] = evaluate_held_out(propose, data, size_divisibility)
    return rows


def evaluate_held_out(propose, data, size_divisibility: int) -> tuple[dict[str, float], dict[str, float]]:
    """Recall on the config's validation scenes and on as many scenes of the unseen family."""
    scenes = data.build_dataset(data.splits["val"])
    size = int(scenes[0].image.shape[0])
    unseen = DenseScenes(len(scenes), size, **UNSEEN, seed=data.hparams.seed, split="unseen")
    return evaluate(propose, scenes, size_divisibility), evaluate(propose, unseen, size_divisibility)


def _config_args(seed: int, steps: int, workdir: Path, voc_root: Path | None,
                 optimiser: Sequence[str] = ()) -> list[str]:
    """``configs/scenes.yaml`` for ``steps`` steps (10% warm-up), no checkpoints, no callbacks,
    with ``optimiser`` (CLI arguments for both sides, e.g. ``--model.optimizer adamw``).

    With ``voc_root``, the data is that VOC folder (the config's crops and flips, data defaults
    otherwise).
    """
    data = [] if voc_root is None else ["--data.dataset", "voc", "--data.root", str(voc_root),
                                        "--data.scene_options", "null"]
    return ["--config", str(CONFIG), "--seed_everything", str(seed), "--trainer.max_steps", str(steps), *optimiser,
            "--model.warmup_steps", str(max(1, steps // 10)), "--trainer.default_root_dir", str(workdir),
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", *data]


def run_ours(seed: int, steps: int, extra: list[str], workdir: Path, voc_root: Path | None,
             nms_values: list[float | None], pre_nms_values: list[int | None], keep: Path | None,
             optimiser: Sequence[str] = (), test_iterations: Sequence[int] = ()) -> tuple[dict, float]:
    """Our CLI trained on the scenes, evaluated at each NMS / pre-NMS setting and, a cascade, with
    each number of ``test_iterations`` of its last stage (rows " @iter K")."""
    cli = _cli([*_config_args(seed, steps, workdir, voc_root, optimiser), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                "--trainer.logger.save_dir", str(workdir), "--trainer.limit_val_batches", "0", *extra])
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        cli.trainer.save_checkpoint(keep)
    module = cli.model.eval()

    @torch.no_grad()
    def propose(batch):
        proposals, _ = module(batch, with_targets=False)
        return [boxes for boxes, _ in proposals]

    rows = evaluate_at_nms(propose, cli.datamodule, module.size_divisibility, module.rpn, nms_values, pre_nms_values)
    if hasattr(module.rpn, "test_iterations"):
        trained = module.rpn.test_iterations
        for iterations in test_iterations:
            module.rpn.test_iterations = iterations
            rows[f" @iter {iterations}"] = evaluate_held_out(propose, cli.datamodule, module.size_divisibility)
        module.rpn.test_iterations = trained
    return rows, seconds


def torchvision_optimiser(optimiser: Sequence[str]) -> list[str]:
    """The torchvision side's optimiser arguments: the reported protocol's SGD lr 0.02, unless
    ``optimiser`` (``--optimizer`` / ``--lr``, both sides) says otherwise."""
    return [*OPTIMISERS["sgd"], *optimiser]


def run_torchvision(seed: int, steps: int, workdir: Path, voc_root: Path | None,
                    nms_values: list[float | None], pre_nms_values: list[int | None],
                    optimiser: Sequence[str] = ()) -> tuple[dict, float]:
    # the same config and seed build the same initial weights and the same data module; the
    # loop uses the module's optimiser
    cli = _cli([*_config_args(seed, steps, workdir, voc_root, torchvision_optimiser(optimiser)),
                "--trainer.logger", "false"])
    module, data = cli.model, cli.datamodule
    hp = module.hparams
    # the same warm-up + cosine factor as our side
    schedule = LRSchedule(hp.warmup_steps, hp.warmup_factor, "cosine", (), 0.1, steps, hp.min_lr_factor)
    loop = TorchvisionLoop.from_module(module, gradient_clip_norm=cli.trainer.gradient_clip_val, schedule=schedule)
    data.setup("fit")
    data.assign_targets = False
    seed_everything(seed, workers=True)
    start = time.perf_counter()
    if voc_root is not None:  # its own pipeline on the same files
        crop = data.train_transform.spec[0]["RandomCrop"]["height"]
        crops = PlainCrops(voc_root, "train", crop, data.batch_size, seed)
        for _ in range(steps):
            loop.step(*crops.batch())
    else:
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

    return evaluate_at_nms(propose, data, module.size_divisibility, loop.rpn, nms_values, pre_nms_values), seconds


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(row[key] for row in rows) / len(rows) for key in KEYS}


def _line(name: str, row: dict[str, float]) -> str:
    return f"{name:<42}" + "".join(f"{row[key]:>18.3f}" if row[key] == row[key] else f"{'-':>18}" for key in KEYS)


# The ablation table (``--ablations``): each row is our CLI with these arguments, one choice
# that differs from torchvision's recipe switched at a time, or a candidate default (the last rows).
CASCADE = ["--model.head", "cascade", "--model.anchor_sizes", "[[16], [32], [64], [128], [256]]",
           "--model.aspect_ratios", "[[1.0]]", "--model.cascade_stages", "3", "--model.reg_weight", "2.0",
           "--model.cascade_centre_ratio", "0.5", "--model.cascade_objectness_level", "best", "--model.fg_iou", "0.5",
           "--model.cascade_box_loss_positives", "all", "--model.cascade_test_iterations", "1",
           "--data.assign_targets", "false"]
# CASCADE with the paper's stage-1 centre ratio: the base of the dense-scene cascade rows
CASCADE_CENTRE_02 = [*CASCADE, "--model.cascade_centre_ratio", "0.2"]
# CASCADE_CENTRE_02 with its last stage trained on its own boxes once more and box-loss weight 3:
# configs/scenes_cascade.yaml's training
CASCADE_DENSE = [*CASCADE_CENTRE_02, "--model.cascade_train_iterations", "1", "--model.reg_weight", "3"]
# the cascade rows measured before the config had these two (the README's figures for them)
SAMPLED_ONE_PASS = ["--model.cascade_box_loss_positives", "sampled", "--model.cascade_test_iterations", "0"]
# torchvision's RPN-level recipe: smooth L1 beta 1/9 (our smooth_l1_beta default), contiguous
# memory, weight decay on normalisation layers
TORCHVISION_RPN = ["--model.box_loss", "smooth_l1", "--model.channels_last", "false",
                   "--model.norm_weight_decay", "0.0001"]
ABLATIONS: dict[str, list[str]] = {
    "defaults": [],
    # the plain RPN with the cascade rows' anchor sizes (16-256 px, still 3 ratios a location)
    "defaults_anchors_16": ["--model.anchor_sizes", "[[16], [32], [64], [128], [256]]"],
    # the reported protocol's optimiser: our side at torchvision's settings but for the recipe rows below
    "sgd": OPTIMISERS["sgd"],
    "torchvision_recipe": [*OPTIMISERS["sgd"], *TORCHVISION_RPN],
    # the config's AdamW with torchvision's RPN-level recipe (against --sides torchvision --optimizer adamw)
    "torchvision_rpn_recipe": TORCHVISION_RPN,
    "smooth_l1": ["--model.box_loss", "smooth_l1"],
    "norm_weight_decay": ["--model.norm_weight_decay", "0.0001"],
    "no_channels_last": ["--model.channels_last", "false"],
    "giou": ["--model.box_loss", "giou"],
    "targets_in_model": ["--data.assign_targets", "false"],
    "min_visibility_0": ["--data.min_visibility", "0"],
    "each_image_once": ["--data.repeats", "1"],
    "quality_scoring": ["--model.quality", "centerness+iou", "--model.proposal_score", "geometric_mean"],
    "sampled_512": ["--model.batch_size_per_image", "512"],
    "head_depth_2": ["--model.head_conv_depth", "2"],
    # the cascade head of configs/shapes_cascade.yaml (3 stages, box-loss weight 2, centre ratio
    # 0.5, objectness on each object's best level, IoU 0.5 positives, box losses over every
    # positive, one test iteration) on one square anchor per location, 16..256 px for the 15-70 px
    # objects; it assigns its own targets (#17)
    "cascade": CASCADE,
    # the same with the paper's stage-1 centre region (the central fifth of each box), better on
    # these touching objects (README)
    "cascade_centre_0.2": CASCADE_CENTRE_02,
    # and with the box losses over the sampler's positives and no test iteration (the row before)
    "cascade_centre_0.2_sampled": [*CASCADE_CENTRE_02, *SAMPLED_ONE_PASS],
    # and with the objectness learnt on every level (the paper's), or on each object's stage-1
    # level: the first lets near-identical boxes of one object from several levels crowd the top 100
    "cascade_centre_0.2_any_level": [*CASCADE_CENTRE_02, *SAMPLED_ONE_PASS,
                                     "--model.cascade_objectness_level", "any"],
    "cascade_centre_0.2_size_level": [*CASCADE_CENTRE_02, *SAMPLED_ONE_PASS,
                                      "--model.cascade_objectness_level", "size"],
    # the centre-0.2 head with one more: its last stage trained on its own boxes once more
    # (model.cascade_train_iterations), stages 2-3 positives from IoU 0.6, or an IoU branch
    # ranking with the objectness
    "cascade_centre_0.2_train_iteration": [*CASCADE_CENTRE_02, "--model.cascade_train_iterations", "1"],
    "cascade_centre_0.2_fg_0.6": [*CASCADE_CENTRE_02, "--model.fg_iou", "0.6"],
    "cascade_centre_0.2_iou_quality": [*CASCADE_CENTRE_02, "--model.quality", "iou",
                                       "--model.proposal_score", "geometric_mean"],
    "cascade_centre_0.2_fg_0.6_iou_quality": [*CASCADE_CENTRE_02, "--model.fg_iou", "0.6",
                                              "--model.quality", "iou", "--model.proposal_score", "geometric_mean"],
    "cascade_centre_0.2_train_iteration_fg_0.6": [*CASCADE_CENTRE_02, "--model.cascade_train_iterations", "1",
                                                  "--model.fg_iou", "0.6"],
    "cascade_centre_0.2_train_iteration_reg_3": CASCADE_DENSE,
    # configs/scenes_cascade.yaml (the dense scenes' cascade config) as a row: the same, 2000
    # candidates a level before NMS
    "scenes_cascade": [*CASCADE_DENSE, "--model.pre_nms_top_n_test", "2000"],
    "cascade_sgd": [*CASCADE, *OPTIMISERS["sgd"]],
    "sampled_512_quality": ["--model.batch_size_per_image", "512", "--model.quality", "centerness+iou",
                            "--model.proposal_score", "geometric_mean"],
}


def _print_table(results: dict[str, dict[str, list[dict[str, float]]]], title: str) -> None:
    print(f"\n{title}")
    print(f"{'':<42}" + "".join(f"{key:>18}" for key in KEYS))
    for split in ("seen", "unseen"):
        label = "same family" if split == "seen" else "unseen family (roofs/urban)"
        print(label)
        means = {row: _mean(runs[split]) for row, runs in results.items()}
        for row, values in means.items():
            print(_line(f"  {row}", values))
            # against torchvision at the same NMS threshold (the row's " @nms T" suffix)
            reference = means.get("torchvision" + row[row.index(" @"):] if " @" in row else "torchvision")
            if reference is not None and not row.startswith("torchvision"):
                print(_line("    ratio to torchvision", {k: values[k] / reference[k] if reference[k] >= 1e-3 else float("nan") for k in KEYS}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sides", nargs="+", default=["ours", "torchvision"], choices=["ours", "torchvision"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--protocol", choices=["scenes", "voc"], default="scenes",
                        help="scenes: the config's generated scenes, shared batches; voc: a VOC folder, "
                             "each side its own data path (module docstring)")
    parser.add_argument("--train-images", type=int, default=2, help="voc: training scenes (fewer than the batch)")
    parser.add_argument("--train-size", type=int, default=1024, help="voc: side of a training scene (px)")
    parser.add_argument("--val-images", type=int, default=4, help="voc: held-out scenes")
    parser.add_argument("--val-size", type=int, default=640, help="voc: side of a held-out scene (px)")
    parser.add_argument("--ablations", nargs="+", default=None, choices=[*ABLATIONS, "all"],
                        help="our side once per named row of the ablation table (all: every row)")
    parser.add_argument("--eval-nms", type=float, nargs="+", default=None, metavar="T",
                        help="evaluate every trained model at each of these NMS thresholds (the README's NMS row)")
    parser.add_argument("--eval-pre-nms", type=int, nargs="+", default=None, metavar="K",
                        help="also evaluate with K candidates per level before NMS (default: the model's 1000)")
    parser.add_argument("--eval-test-iterations", type=int, nargs="+", default=[], metavar="K",
                        help="also evaluate our cascade rows with their last stage refining its boxes K more "
                             "times (model.cascade_test_iterations)")
    parser.add_argument("--optimizer", choices=list(OPTIMISERS), default=None,
                        help="both sides' optimiser at its peak lr (sgd 0.02, adamw 0.002; default: ours "
                             "the config's AdamW, torchvision the protocol's SGD); an --ablations row that sets "
                             "the optimiser itself (sgd, torchvision_recipe, cascade_sgd) keeps its own on our side")
    parser.add_argument("--lr", type=float, default=None,
                        help="both sides' peak learning rate (default: the optimiser's above)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="save our side's trained models here (DIR/<row>_<seed>.ckpt) for later evaluation")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--ours-args", nargs=argparse.REMAINDER, default=[],
                        help="extra CLI arguments for our side (everything after this flag)")
    options = parser.parse_args()
    if options.ablations and options.ours_args:
        parser.error("--ablations and --ours-args exclude each other")
    torch.set_num_threads(options.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    if options.ablations:
        names = list(ABLATIONS) if "all" in options.ablations else options.ablations
        rows = {f"ours {name}": ABLATIONS[name] for name in names} if "ours" in options.sides else {}
    else:
        rows = {"ours": options.ours_args} if "ours" in options.sides else {}
    if "torchvision" in options.sides:
        rows = {"torchvision": [], **rows}
    nms_values: list[float | None] = options.eval_nms or [None]
    pre_nms_values: list[int | None] = options.eval_pre_nms or [None]
    optimiser = [*(OPTIMISERS[options.optimizer] if options.optimizer else []),
                 *(["--model.lr", str(options.lr)] if options.lr is not None else [])]
    if any(k < 1 for k in options.eval_pre_nms or []):
        parser.error("--eval-pre-nms: candidates per level must be >= 1")
    if any(k < 0 for k in options.eval_test_iterations):
        parser.error("--eval-test-iterations: iterations must be >= 0")

    def kept(row: str, seed: int) -> Path | None:
        return None if options.keep is None else options.keep / f"{row.replace(' ', '_')}_{seed}.ckpt"

    existing = [str(path) for seed in options.seeds for row in rows
                if row != "torchvision" and (path := kept(row, seed)) is not None and path.exists()]
    if existing:
        parser.error(f"--keep: would overwrite {', '.join(existing)}; choose another directory")
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        for seed in options.seeds:
            voc_root = None
            if options.protocol == "voc":
                voc_root = write_voc_scenes(Path(tmp) / f"voc_{seed}", seed, options.train_images,
                                            options.train_size, options.val_images, options.val_size)
            for index, (row, extra) in enumerate(rows.items()):
                workdir = Path(tmp) / f"run{index}_{seed}"
                if row == "torchvision":
                    evaluated, seconds = run_torchvision(seed, options.steps, workdir, voc_root, nms_values,
                                                         pre_nms_values, optimiser)
                else:
                    evaluated, seconds = run_ours(seed, options.steps, extra, workdir, voc_root, nms_values,
                                                  pre_nms_values, kept(row, seed), optimiser,
                                                  options.eval_test_iterations)
                for suffix, (seen, unseen) in evaluated.items():
                    runs = results.setdefault(row + suffix, {"seen": [], "unseen": []})
                    runs["seen"].append(seen)
                    runs["unseen"].append(unseen)
                    print(f"[{row}{suffix} seed {seed}: {options.steps} steps in {seconds:.0f} s] "
                          + ", ".join(f"{k} {v:.3f}" for k, v in seen.items()), flush=True)
    described = "" if options.ablations else f"; ours: {' '.join(options.ours_args) or 'configs/scenes.yaml as is'}"
    if optimiser:
        described += f"; both: {' '.join(optimiser)}"
    elif "torchvision" in rows:
        described += f"; torchvision: {' '.join(OPTIMISERS['sgd'])} (the protocol)"
    _print_table(results, f"held-out scenes ({options.protocol} protocol, {options.steps} steps, "
                          f"seeds {options.seeds}{described})")
    if options.out is not None:
        options.out.write_text(json.dumps({"protocol": options.protocol, "steps": options.steps, "seeds": options.seeds,
                                           "rows": rows, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
