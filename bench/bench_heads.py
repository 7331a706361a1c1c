"""Plain RPN vs localisation-quality scoring (OLN) vs cascade refinement, side by side (issue 17).

Each variant trains from ``configs/shapes.yaml`` (``make fit``'s job) with its own config's
model and data overrides (``configs/shapes_oln.yaml``, ``configs/shapes_cascade.yaml``), the same
seed, data and number of steps, in a process of its own (so that its peak memory is its own),
then is evaluated on the held-out synthetic ``val`` split:

- AR@100, AR@1000 (IoU 0.50:0.95) and AR at IoU 0.70:0.95 (@100, @1000), the localisation the
  cascade's second stage exists for;
- the cross-category check: a second run of each variant trains with boxes on rectangles and
  ellipses only and is evaluated on images of triangles only (a kind it never learned),
  AR@100 / AR@1000 (``--unseen`` holds out other kinds, the rest are trained with boxes;
  ``--unseen outlined`` holds out a style instead: trained on filled shapes of every kind,
  evaluated on images of outlined shapes only; ``--unseen textured`` a texture: trained on
  one-colour and outlined shapes, evaluated on images of checkerboard-textured filled shapes only).
  ``--cross-protocol unannotated`` (default, OLN's VOC -> non-VOC setting) draws the held-out
  kinds in the training images without boxes, so a classifier learns to call them background;
  ``absent`` leaves them out of the training images;
- the training step's median wall time and the process's peak resident memory;
- with ``--eval-scores``, the same trained model's proposals ranked by each given score (models
  with quality branches), so that scoring is compared on one network;
- with ``--eval-nms``, the same trained model at each NMS threshold (against the plain RPN at
  that threshold).

The kinds are chosen with ``data.synthetic_shape_kinds`` and ``data.synthetic_unannotated_kinds``
(``SyntheticShapes(shape_kinds=..., unannotated_kinds=...)``), the outlined shapes with
``data.synthetic_outlined_fraction`` and ``data.synthetic_unannotated_outlined``, the textured ones
with ``data.synthetic_textured_fraction`` and ``data.synthetic_unannotated_textured``.
Ratios are against the plain RPN. ``--steps`` defaults to ``make fit``'s budget
(8 epochs of 1000 images at batch 8: 1000 steps). ``--seed`` changes the training seed (weight
initialisation, shuffling, augmentation and anchor sampling; the images stay the same).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_heads.py --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_heads.py --threads 1 --steps 300   # reduced budget
    # a variant with changed model settings (YAML values), e.g. the README's ablation rows
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_heads.py --variants oln --set proposal_score=geometric_mean
    # another training seed; ellipses as the unseen kind, only the cross-category runs
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_heads.py --threads 1 --seed 1 --unseen ellipse --cross-only
    # outlined shapes held out (trained on filled ones), only the cross-category runs
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_heads.py --threads 1 --variants plain oln --unseen outlined --cross-only
    # a held-out texture: checkerboard-filled shapes (30% of the filled ones drawn without boxes in training)
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_heads.py --threads 1 --variants plain oln --unseen textured --cross-only
"""

from __future__ import annotations

import _checkout  # noqa: F401  (this checkout's lightning_rpn first on the path)

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"plain": "shapes.yaml", "oln": "shapes_oln.yaml", "cascade": "shapes_cascade.yaml"}
HIGH_IOU = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
UNSEEN = ("triangle",)
OUTLINED = "outlined"  # --unseen value: the outlined style of every kind
TEXTURED = "textured"  # --unseen value: checkerboard-textured filled shapes of every kind
STYLES = (OUTLINED, TEXTURED)


def _sections(config: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    loaded = yaml.safe_load((REPO / "configs" / config).read_text())
    return dict(loaded["model"]), dict(loaded["data"]), int(loaded.get("seed_everything", 0))


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["fg_iou=0.7", "cascade_delta_scales=[[0.1, 0.1, 0.5, 0.5], [1, 1, 1, 1]]"]`` -> model settings (YAML values)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"bench_heads: --set expects KEY=VALUE (a model setting, YAML value), got {pair!r}")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def seen_kinds(unseen: tuple[str, ...]) -> tuple[str, ...]:
    """The kinds trained with boxes in the cross-category runs: every synthetic kind not in ``unseen``."""
    from lightning_rpn.data.synthetic import SHAPE_KINDS

    unknown = sorted(set(unseen) - set(SHAPE_KINDS))
    seen = tuple(kind for kind in SHAPE_KINDS if kind not in unseen)
    if unknown or not seen:
        raise SystemExit(f"bench_heads: --unseen takes some but not all of {SHAPE_KINDS}, got {list(unseen)}")
    return seen


def cross_data(unseen: tuple[str, ...], unannotated: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cross-category runs' training data (``RPNDataModule`` overrides) and held-out images
    (``SyntheticShapes`` options): ``unseen`` kinds, or ``("outlined",)``, the outlined shapes of
    every kind; ``unannotated``: drawn without boxes in training (else left out of it)."""
    from lightning_rpn.data.synthetic import SHAPE_KINDS

    styles = [value for value in unseen if value in STYLES]
    if styles:
        if len(unseen) > 1:
            raise SystemExit(f"bench_heads: --unseen {styles[0]} holds out a style of every kind, give it alone "
                             f"(got {list(unseen)})")
        if styles[0] == OUTLINED:
            train = {"synthetic_unannotated_outlined": True} if unannotated else {"synthetic_outlined_fraction": 0.0}
            return train, {"shape_kinds": SHAPE_KINDS, "outlined_fraction": 1.0}
        train = {"synthetic_textured_fraction": 0.3, "synthetic_unannotated_textured": True} if unannotated else {}
        return train, {"shape_kinds": SHAPE_KINDS, "outlined_fraction": 0.0, "textured_fraction": 1.0}
    train = {"synthetic_shape_kinds": list(seen_kinds(unseen))}
    if unannotated:
        train["synthetic_unannotated_kinds"] = list(unseen)
    return train, {"shape_kinds": unseen}


def cross_label(unseen: tuple[str, ...]) -> str:
    """What the cross-category runs train on with boxes and are evaluated on, in words."""
    if unseen == (OUTLINED,):
        return "trained with boxes on filled shapes of every kind, evaluated on outlined shapes"
    if unseen == (TEXTURED,):
        return ("trained with boxes on one-colour and outlined shapes of every kind, evaluated on "
                "checkerboard-textured filled shapes")
    return f"trained with boxes on {'+'.join(seen_kinds(unseen))}, evaluated on {'+'.join(unseen)}"


def build_module(variant: str, settings: dict[str, Any], seed: int | None) -> Any:
    """The variant's ``RPNModule`` from its config's model section, ``settings`` and the training ``seed``."""
    from lightning_rpn import RPNModule

    model_args = _sections(VARIANTS[variant])[0]
    if seed is not None:
        model_args["anchor_sampling_seed"] = seed
    model_args.update(settings)
    return RPNModule(**{key: tuple(map(tuple, v)) if key in ("anchor_sizes", "aspect_ratios") else v
                        for key, v in model_args.items()})


def check_settings(variants: list[str], settings: dict[str, Any]) -> None:
    """Build every variant's model once here, so that a mistyped ``--set`` fails before any run starts."""
    for variant in variants:
        try:
            build_module(variant, settings, None)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"bench_heads: {variant} ({VARIANTS[variant]}) with --set {settings}: {error}") from None


def run_variant(variant: str, steps: int, threads: int, cross: tuple[dict[str, Any], dict[str, Any]] | None,
                val_images: int, settings: dict[str, Any] | None = None,
                seed: int | None = None, eval_scores: tuple[str, ...] = (), eval_nms: tuple[float, ...] = (),
                eval_iterations: tuple[int, ...] = ()) -> dict[str, Any]:
    """Train one variant for ``steps`` and evaluate it (runs in its own process); ``cross``: the
    cross-category run's data (:func:`cross_data`), else the config's and its ``val`` split.

    The same trained model is also evaluated ranked by each of ``eval_scores`` (quality branches
    only), at each NMS threshold of ``eval_nms`` and, a cascade, with each number of test
    iterations of ``eval_iterations``.
    """
    import lightning.pytorch as pl
    import torch

    from lightning_rpn import RPNDataModule
    from lightning_rpn.data import SyntheticShapes

    torch.set_num_threads(threads)
    _, data_args, config_seed = _sections(VARIANTS[variant])
    pl.seed_everything(config_seed if seed is None else seed, workers=True)
    data_args.update(synthetic_val_images=val_images)
    if cross is not None:
        data_args.update(cross[0])
    module = build_module(variant, settings or {}, seed)
    datamodule = RPNDataModule(**data_args)

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer],
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_s = time.perf_counter() - started
    module.eval()
    dataset = (SyntheticShapes(val_images, split="val") if cross is None
               else SyntheticShapes(val_images, split="unseen-kinds", **cross[1]))
    results = evaluate(module, dataset)
    by_score = {}
    if getattr(module.rpn, "quality", ()):  # an RPN with quality branches: rank its proposals each way
        by_score = {score: results if score == module.rpn.proposal_score
                    else evaluate_with(module, dataset, "proposal_score", score) for score in eval_scores}
    by_nms = {nms: results if nms == module.rpn.nms_thresh else evaluate_with(module, dataset, "nms_thresh", nms)
              for nms in eval_nms}
    by_iterations = {}
    if hasattr(module.rpn, "test_iterations"):
        by_iterations = {k: results if k == module.rpn.test_iterations
                         else evaluate_with(module, dataset, "test_iterations", k) for k in eval_iterations}
    return {
        "variant": variant,
        **results,
        "by_score": by_score,
        "by_nms": by_nms,
        "by_iterations": by_iterations,
        "step_ms": 1000 * statistics.median(timer.times[len(timer.times) // 10:]),
        "train_s": train_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def evaluate_with(module: Any, dataset: Any, setting: str, value: Any) -> dict[str, float]:
    """:func:`evaluate` with the proposal network's ``setting`` (e.g. ``nms_thresh``) changed to ``value``, then restored."""
    trained = getattr(module.rpn, setting)
    setattr(module.rpn, setting, value)
    try:
        return evaluate(module, dataset)
    finally:
        setattr(module.rpn, setting, trained)


def evaluate(module: Any, dataset: Any) -> dict[str, float]:
    """AR@100 / AR@1000 over IoU 0.5:0.95 and over 0.7:0.95 of ``module``'s proposals on ``dataset``."""
    import torch

    from lightning_rpn.data import RPNCollate
    from lightning_rpn.evaluation.metrics import ProposalRecall

    metrics = {"": ProposalRecall(), "0.7+": ProposalRecall(iou_thresholds=HIGH_IOU)}
    collate = RPNCollate(size_divisibility=module.size_divisibility, assign_targets=False)
    with torch.no_grad():
        for start in range(0, len(dataset), 8):
            batch = collate([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
            proposals, _ = module(batch, with_targets=False)
            for metric in metrics.values():
                metric.update([boxes for boxes, _ in proposals], batch.gt_boxes)
    results = {name: metric.compute() for name, metric in metrics.items()}
    return {f"AR{name}@{top}": float(results[name][f"AR@{top}"]) for name in metrics for top in (100, 1000)}


def _child(options: argparse.Namespace, variant: str, cross: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--steps", str(options.steps), "--threads",
               str(options.threads), "--val-images", str(options.val_images),
               "--cross-protocol", options.cross_protocol, "--unseen", *options.unseen] + (["--cross"] if cross else [])
    command += [] if options.seed is None else ["--seed", str(options.seed)]
    command += ["--eval-scores", *options.eval_scores] if options.eval_scores else []
    command += ["--eval-nms", *map(str, options.eval_nms)] if options.eval_nms else []
    command += ["--eval-test-iterations", *map(str, options.eval_test_iterations)] if options.eval_test_iterations else []
    command += [item for pair in options.set for item in ("--set", pair)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"{variant} (cross={cross}) failed:\n{done.stderr[-4000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"done: {variant}{' (cross)' if cross else ''} {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def _reevaluations(row: dict[str, Any], plain: dict[str, Any] | None) -> list[tuple[str, dict, dict | None]]:
    """``(label, result, reference)`` of ``row``'s re-evaluations: each score and number of test
    iterations against the plain RPN's own result, each NMS threshold against the plain RPN at
    that threshold (if it has it)."""
    scores = [(f"ranked by {score}", result, plain) for score, result in row["by_score"].items()]
    scores += [(f"with {k} test iteration(s)", result, plain) for k, result in row.get("by_iterations", {}).items()]
    thresholds = [(f"at NMS {nms}", result, None if plain is None else plain["by_nms"].get(nms))
                  for nms, result in row["by_nms"].items()]
    return scores + thresholds


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every run (make fit: 1000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-cross", action="store_true", help="skip the cross-category runs")
    parser.add_argument("--cross-only", action="store_true", help="only the cross-category runs")
    parser.add_argument("--cross-protocol", choices=["unannotated", "absent"], default="unannotated",
                        help="unseen kinds in the training images without boxes (default), or left out")
    parser.add_argument("--unseen", nargs="+", default=list(UNSEEN), metavar="KIND",
                        help="the kinds held out of the cross-category runs' boxes (default: triangle), or "
                             "'outlined': the outlined shapes of every kind, or 'textured': checkerboard-textured "
                             "filled shapes of every kind"),
    parser.add_argument("--eval-scores", nargs="+", default=[], choices=["objectness", "quality", "geometric_mean"],
                        help="also evaluate each trained model ranked by these proposal scores (models with quality "
                             "branches whose objectness is trained, e.g. --set proposal_score=geometric_mean)")
    parser.add_argument("--eval-nms", nargs="+", type=float, default=[], metavar="T",
                        help="also evaluate each trained model at these NMS IoU thresholds (ratios against the "
                             "plain RPN at the same threshold)")
    parser.add_argument("--eval-test-iterations", nargs="+", type=int, default=[], metavar="K",
                        help="also evaluate each trained cascade with its last stage refining its boxes K more "
                             "times (cascade_test_iterations)")
    parser.add_argument("--seed", type=int, help="training seed (default: the config's seed_everything)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a model setting of every variant run (YAML value; repeatable)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--cross", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    settings = parse_settings(options.set)
    unseen = tuple(options.unseen)
    cross_runs = cross_data(unseen, options.cross_protocol == "unannotated")
    if options.child:
        row = run_variant(options.child, options.steps, options.threads, cross_runs if options.cross else None,
                          options.val_images, settings=settings, seed=options.seed,
                          eval_scores=tuple(options.eval_scores), eval_nms=tuple(options.eval_nms),
                          eval_iterations=tuple(options.eval_test_iterations))
        print(json.dumps(row))
        return 0

    if any(not 0.0 < nms <= 1.0 for nms in options.eval_nms):
        raise SystemExit(f"bench_heads: --eval-nms takes IoU thresholds in (0, 1], got {options.eval_nms}")
    if any(k < 0 for k in options.eval_test_iterations):
        raise SystemExit(f"bench_heads: --eval-test-iterations must be >= 0, got {options.eval_test_iterations}")
    if options.no_cross and options.cross_only:
        raise SystemExit("bench_heads: --no-cross and --cross-only leave nothing to run")
    check_settings(options.variants, settings)

    rows = {} if options.cross_only else {variant: _child(options, variant, cross=False) for variant in options.variants}
    cross = {} if options.no_cross else {variant: _child(options, variant, cross=True) for variant in options.variants}
    base = rows.get("plain")
    print(f"{options.steps} steps per run, {options.threads} thread(s), {options.val_images} held-out images"
          + ("" if options.seed is None else f", seed {options.seed}") + (f", settings {settings}" if settings else ""))
    keys = ("AR@100", "AR@1000", "AR0.7+@100", "AR0.7+@1000", "step_ms", "peak_rss_mb")
    if rows:
        print(f"{'variant':<10}" + "".join(f"{key:>14}" for key in keys))
    for variant, row in rows.items():
        print(f"{variant:<10}" + "".join(f"{row[key]:>14.3f}" for key in keys))
        if base is not None and variant != "plain":
            print(f"{'  / plain':<10}" + "".join(f"{_ratio(row[key], base[key]):>14}" for key in keys))
        for label, result, reference in _reevaluations(row, base):
            print(f"  {label}: " + "  ".join(
                f"{key} {result[key]:.3f}" + ("" if reference is None else f" ({_ratio(result[key], reference[key])})")
                for key in keys[:4]))
    if cross:
        print(f"cross-category ({options.cross_protocol}): {cross_label(unseen)}")
        plain = cross.get("plain")
        for variant, row in cross.items():
            evaluations = [(f"{variant:<10}", row, None if variant == "plain" else plain),
                           *((f"  {label}:", result, reference) for label, result, reference in _reevaluations(row, plain))]
            for label, result, reference in evaluations:
                ratio = "" if reference is None else (f"   ({_ratio(result['AR@100'], reference['AR@100'])} / "
                                                      f"{_ratio(result['AR@1000'], reference['AR@1000'])} plain)")
                print(f"{label} AR@100 {result['AR@100']:.3f}  AR@1000 {result['AR@1000']:.3f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
