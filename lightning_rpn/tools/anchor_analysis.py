"""Anchor analysis (``lightning-rpn analyze-anchors``): how well an anchor design covers a dataset's boxes, and a better design.

Shapes: ``G`` ground-truth boxes (all images), ``L`` levels, ``A`` anchors per location.

The steps, one module each: the boxes as the training pipeline sees them
(:mod:`~lightning_rpn.tools.anchor_collection`), their exact coverage by the anchors
(:mod:`lightning_rpn.core.coverage`, shared with ``check-data``), a better design with the same
anchor count (:mod:`~lightning_rpn.tools.anchor_optimization`) and the report, plot and config
snippet (:mod:`~lightning_rpn.tools.anchor_report`). This module runs them; its names are the
public ones of all steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.coverage import GTBoxSet, anchor_coverage, best_anchor_iou
from lightning_rpn.tools.anchor_collection import collect_gt_boxes
from lightning_rpn.tools.anchor_optimization import optimize_anchors
from lightning_rpn.tools.anchor_report import AnchorAnalysis, box_stats, plot_anchor_analysis, write_config_snippet

__all__ = [
    "GTBoxSet",
    "AnchorAnalysis",
    "collect_gt_boxes",
    "best_anchor_iou",
    "anchor_coverage",
    "optimize_anchors",
    "plot_anchor_analysis",
    "write_config_snippet",
    "analyze_anchors",
    "run_analyze_anchors",
]


def analyze_anchors(
    boxes: GTBoxSet,
    anchor_generator: AnchorGenerator,
    optimize: bool = False,
    output_dir: str | Path | None = None,
    seed: int = 0,
) -> AnchorAnalysis:
    """Coverage and box statistics (and with ``optimize``, a better design) of ``boxes``.

    With ``output_dir``: writes ``anchor_analysis.png``, ``anchor_analysis.json`` and, when
    optimising, ``anchors.yaml`` (the config snippet); their paths are in ``files``.
    """
    if len(boxes) == 0:
        raise ValueError("analyze_anchors: no ground-truth boxes found (empty dataset or split?)")
    analysis = AnchorAnalysis(
        anchor_generator, anchor_coverage(boxes, anchor_generator), box_stats(boxes), boxes.num_images
    )
    if optimize:
        analysis.optimized = optimize_anchors(boxes, anchor_generator, seed=seed)
        analysis.optimized_coverage = anchor_coverage(boxes, analysis.optimized)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        analysis.files["plot"] = str(plot_anchor_analysis(boxes, anchor_generator, out / "anchor_analysis.png",
                                                          analysis.optimized))
        if analysis.optimized is not None:
            snippet = out / "anchors.yaml"
            write_config_snippet(analysis.optimized, snippet)
            analysis.files["config_snippet"] = str(snippet)
        report = out / "anchor_analysis.json"
        analysis.files["report"] = str(report)
        report.write_text(json.dumps(analysis.to_dict(), indent=2), encoding="utf-8")
    return analysis


def run_analyze_anchors(
    model: Any,
    datamodule: Any,
    optimize: bool = False,
    output_dir: str | Path = "anchor_analysis",
    split: str = "train",
    max_images: int | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> AnchorAnalysis:
    """``lightning-rpn analyze-anchors``: analyse the model's anchors on a data module's split.

    ``model`` supplies ``anchor_generator`` and ``size_divisibility`` (an ``RPNModule``);
    ``datamodule`` (an ``RPNDataModule``) the dataset and resize policy. Prints the report
    and writes the files of :func:`analyze_anchors` to ``output_dir``.
    """
    generator = getattr(model, "anchor_generator", None)
    if not isinstance(generator, AnchorGenerator):
        raise TypeError(
            f"run_analyze_anchors: model must have an AnchorGenerator `anchor_generator`, "
            f"got {type(generator).__name__} from {type(model).__name__}"
        )
    size_divisibility = getattr(model, "size_divisibility", None) or max(generator.strides)
    boxes = collect_gt_boxes(datamodule, split=split, size_divisibility=size_divisibility, max_images=max_images)
    analysis = analyze_anchors(boxes, generator, optimize=optimize, output_dir=output_dir, seed=seed)
    (console or Console()).print(analysis)
    return analysis
