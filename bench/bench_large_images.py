"""Whole-scene proposals on one large generated image: peak memory and time, three ways.

- ``windows``: ``RPNModule.predict_images`` with ``sliding_window`` (``--window`` px, ``--overlap``,
  ``--window-batch`` windows per pass);
- ``whole``: the same model on the whole image at once;
- ``torchvision``: torchvision's ``RegionProposalNetwork`` (same anchors, top-k and NMS settings)
  on the same backbone's features of the whole image (torchvision has no sliding windows).

With ``--recall-steps N`` a model is also trained N steps on 256-px windows of generated scenes
(``--recall-size`` px, in a child process), and its whole-scene recall on two held-out scenes is
measured with sliding windows (IoU and IoS merges) and on the whole image at once.

The image is a ``DenseScenes`` scene of ``--size`` px with about ``--objects`` objects; the
network is untrained (time and memory do not depend on the weights). Each run is its own
process: the peak resident memory it reports is above its baseline (model built, image
generated, a small warm-up run done), i.e. above the image itself. Whole-image runs are skipped
above ``--whole-max-side`` px (they grow with the image and may not fit next to other jobs);
a skipped or failed run is reported as such.

    .venv/bin/python bench/bench_large_images.py [--size 6000] [--objects 10000] [--threads 1]
        [--backbone tiny_fpn] [--window 512] [--overlap 96] [--window-batch 4] [--whole-max-side 3000]
        [--recall-steps 0] [--recall-size 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import OrderedDict

import torch

ANCHORS = ((16,), (32,), (64,), (128,), (256,))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    from lightning_rpn.data.scenes import DenseScenes
    from lightning_rpn.data.transforms import ResizePolicy
    from lightning_rpn.module import RPNModule

    density = args.objects / (args.size * args.size / 1e6)
    scene = DenseScenes(1, size=args.size, density=density, objects="crowns", split="bench")[0]
    torch.manual_seed(0)
    window = None if args.mode != "windows" else {
        "size": args.window, "overlap": args.overlap, "window_batch": args.window_batch, "merge_metric": "ios",
        "top_k": args.top_k}
    strides = 4 if args.backbone == "tiny_fpn" else 5
    # whole image: the scene's top-k from one pass; windows: 1000 per window, top-k after the merge
    model = RPNModule(backbone=args.backbone, anchor_sizes=ANCHORS[:strides],
                      post_nms_top_n_test=1000 if window else args.top_k, sliding_window=window).eval()
    image = torch.from_numpy(scene.image).permute(2, 0, 1).contiguous()
    keep = ResizePolicy()
    if args.mode == "torchvision":
        from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchors
        from torchvision.models.detection.image_list import ImageList
        from torchvision.models.detection.rpn import RegionProposalNetwork
        from torchvision.models.detection.rpn import RPNHead as TVHead

        rpn = RegionProposalNetwork(
            TVAnchors(ANCHORS[:strides], ((0.5, 1.0, 2.0),) * strides),
            TVHead(model.backbone.out_channels, 3), 0.7, 0.3, 256, 0.5,
            pre_nms_top_n={"training": 2000, "testing": 1000}, post_nms_top_n={"training": 1000, "testing": args.top_k},
            nms_thresh=0.7,
        ).eval()

        @torch.no_grad()
        def run(pixels: torch.Tensor) -> int:
            divisor = model.size_divisibility
            h, w = pixels.shape[-2:]
            padded = torch.nn.functional.pad(pixels, (0, -w % divisor, 0, -h % divisor))[None]
            features = model.backbone(model.normalize(padded))
            boxes, _ = rpn(ImageList(padded.float(), [(h, w)]), OrderedDict(enumerate(features)))
            return len(boxes[0])
    else:
        def run(pixels: torch.Tensor) -> int:
            return len(model.predict_images(pixels, resize=keep)["boxes"])

    run(image[:, :256, :256])  # warm-up: kernels, allocator pools
    baseline = _peak_mb()
    start = time.perf_counter()
    count = run(image)
    seconds = time.perf_counter() - start
    return {"mode": args.mode, "seconds": round(seconds, 2), "peak_above_image_mb": round(_peak_mb() - baseline, 1),
            "image_mb": round(image.numel() / 2**20, 1), "objects": len(scene.boxes), "proposals": count}


def _recall_child(args: argparse.Namespace) -> dict:
    """Train on windows of generated scenes, then whole-scene recall: sliding windows vs the whole image."""
    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from lightning_rpn.data.datamodule import RPNDataModule
    from lightning_rpn.data.scenes import DenseScenes
    from lightning_rpn.data.transforms import ResizePolicy
    from lightning_rpn.metrics import ProposalRecall
    from lightning_rpn.module import RPNModule
    from lightning_rpn.windows import SlidingWindowConfig

    pl.seed_everything(0, verbose=False)
    scenes = {"size": args.recall_size}
    data = RPNDataModule(dataset="scenes", scene_options=scenes, synthetic_train_images=4, synthetic_val_images=2,
                         batch_size=4, num_workers=1,
                         tiles={"size": 256, "per_epoch": 4 * args.recall_steps, "box_probability": 0.5},
                         train_transforms=[{"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}}])
    levels = 4 if args.backbone == "tiny_fpn" else 5
    model = RPNModule(backbone=args.backbone, anchor_sizes=ANCHORS[:levels], optimizer="adamw", lr=0.002,
                      lr_schedule="cosine", warmup_steps=max(1, args.recall_steps // 10), fg_iou=0.5,
                      post_nms_top_n_test=3000, recall_max_proposals=(1000, 3000))
    # the whole image keeps 3000 from one pass; windows keep 1000 each, 3000 after the merge
    trainer = pl.Trainer(max_steps=args.recall_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - start
    model.eval()
    held_out = DenseScenes(2, **scenes, split="val")
    results: dict = {"mode": "recall", "train_seconds": round(train_seconds, 1), "steps": args.recall_steps,
                     "scene_px": args.recall_size, "objects": sum(len(s.boxes) for s in held_out)}
    ways = {"whole": None, **{f"windows {m}": SlidingWindowConfig(args.window, args.overlap, args.window_batch, m,
                                                                  top_k=3000) for m in ("iou", "ios")}}
    for name, config in ways.items():
        model.sliding_window = config
        model.rpn.post_nms_top_n["test"] = 3000 if config is None else 1000
        recall = ProposalRecall(max_proposals=(1000, 3000))
        start = time.perf_counter()
        for scene in held_out:
            out = model.predict_images(scene.image, resize=ResizePolicy())
            recall.update([out["boxes"]], [torch.from_numpy(scene.boxes)])
        values = recall.compute()
        results[name] = {key: round(float(values[key]), 3) for key in ("AR@1000", "AR@3000", "recall@0.50@3000")}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--objects", type=int, default=10000)
    parser.add_argument("--backbone", default="tiny_fpn")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=96)
    parser.add_argument("--window-batch", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=10000, help="proposals kept per scene")
    parser.add_argument("--whole-max-side", type=int, default=3000)
    parser.add_argument("--modes", nargs="+", default=["windows", "whole", "torchvision"],
                        choices=["windows", "whole", "torchvision"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recall-steps", type=int, default=0,
                        help="also train this many steps on windows of generated scenes and compare whole-scene recall")
    parser.add_argument("--recall-size", type=int, default=1024, help="side of the scenes of the recall comparison")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="windows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_recall_child(args) if args.mode == "recall" else _child(args)))
        return
    print(f"{args.size} x {args.size} px, ~{args.objects} objects, {args.backbone}, {args.threads} thread(s); "
          f"windows {args.window} px, overlap {args.overlap}, batch {args.window_batch}")
    for mode in args.modes + (["recall"] if args.recall_steps else []):
        if mode in ("whole", "torchvision") and args.size > args.whole_max_side:
            print(f"{mode:12s} not run: {args.size} px > --whole-max-side {args.whole_max_side}")
            continue
        settings = {"size": args.size, "objects": args.objects, "backbone": args.backbone, "window": args.window,
                    "overlap": args.overlap, "window-batch": args.window_batch, "top-k": args.top_k,
                    "threads": args.threads, "mode": mode, "recall-steps": args.recall_steps,
                    "recall-size": args.recall_size}
        child = [sys.executable, __file__, "--child"] + [f"--{k}={v}" for k, v in settings.items()]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{mode:12s} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if mode == "recall":
            print(f"recall: {result.pop('steps')} training steps on 256-px windows ({result.pop('train_seconds')} s), "
                  f"2 held-out {result.pop('scene_px')}-px scenes, {result.pop('objects')} objects:")
            for name, values in result.items():
                if name != "mode":
                    print(f"  {name:12s} {values}")
            continue
        print(f"{mode:12s} {result['seconds']:8.2f} s  peak {result['peak_above_image_mb']:8.1f} MB above the "
              f"image ({result['image_mb']} MB); {result['objects']} objects, {result['proposals']} proposals")


if __name__ == "__main__":
    main()
