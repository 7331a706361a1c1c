"""Anchor analysis (``lightning-rpn analyze-anchors``): how well an anchor design covers a dataset's boxes, and a better design.

Shapes: ``G`` ground-truth boxes (all images), ``L`` levels, ``A`` anchors per location.

The steps, one module each: the boxes as the training pipeline sees them
(:mod:`~lightning_rpn.tools.anchor_collection`), their exact coverage by the anchors
(:mod:`lightning_rpn.core.coverage`, shared with ``check-data``), a better design with the same
anchor count (:mod:`~lightning_rpn.tools.anchor_optimization`) and the report, plot and config
snippet (:mod:`~lightning_rpn.tools.anchor_report`). This module runs them, and refuses to
replace the files of an earlier run (or a hand-written ``anchors.yaml``) unless told to; its names
are the public ones of all steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from lightning_rpn._files import folder_write_problem
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.cascade import CascadeRPN, check_one_square_anchor
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
    "AnalysisInputError",
    "CASCADE_COVERAGE_NOTE",
    "CASCADE_SEARCH_NOTE",
    "head_coverage_note",
    "model_head",
    "output_paths",
    "run_analyze_anchors",
    "split_role",
]

OUTPUT_FILES = {"plot": "anchor_analysis.png", "report": "anchor_analysis.json", "config_snippet": "anchors.yaml"}
"""The files an analysis writes into its output folder, by their key in :attr:`AnchorAnalysis.files`."""


CASCADE_COVERAGE_NOTE = (
    "model.head is 'cascade': this coverage is the plain RPN's ceiling (its positives are the anchors a gt box "
    "overlaps at IoU >= fg_iou), not the cascade's. The cascade's stage 1 regresses every gt box from the "
    "locations in its central region (model.cascade_centre_ratio) on the level whose anchor size is nearest "
    "its size, whatever their IoU, and its later stages match the refined boxes, so a low figure here "
    "(even 0.000 at IoU 0.7) does not cap its recall; it still shows how the anchor sizes fit the box sizes."
)
"""Printed next to the anchor coverage of a cascade (``analyze-anchors``, ``check-data``)."""

CASCADE_SEARCH_NOTE = "sizes only: a cascade takes one square anchor per location (ratio 1.0)"
"""What ``analyze-anchors --optimize`` keeps fixed for a cascade (report and config snippet)."""


def model_head(model: Any) -> Literal["rpn", "cascade"]:
    """``"cascade"`` for an ``RPNModule`` whose ``rpn`` is a :class:`CascadeRPN` (or for a
    ``CascadeRPN``), else ``"rpn"``."""
    return "cascade" if isinstance(getattr(model, "rpn", model), CascadeRPN) else "rpn"


def head_coverage_note(model: Any) -> str | None:
    """The note to print next to ``model``'s anchor coverage (:data:`CASCADE_COVERAGE_NOTE` for a
    cascade; ``None``: the coverage is the model's recall ceiling, no note)."""
    return CASCADE_COVERAGE_NOTE if model_head(model) == "cascade" else None


class AnalysisInputError(ValueError):
    """What the analysis is asked to read cannot be analysed: a split the config does not set, or
    one without gt boxes. A setting to change (the CLI prints it as one line), not a fault."""


def split_role(datamodule: Any, split: str) -> str:
    """The role (``train``, ``val``, ``test``, ``predict``) of an ``RPNDataModule`` that ``split``
    names: a role, or the split name the config gives one (``val2017``); an
    :class:`AnalysisInputError` naming the configured splits when it names none, or two different ones."""
    splits: dict[str, str | None] = dict(datamodule.splits)
    folder = getattr(datamodule, "predict_images", None)
    if folder is not None:  # predict reads this folder of images, not the split named for the role
        splits["predict"] = None
    roles = {role for role, name in splits.items() if name is not None and split in (role, name)}
    configured = ", ".join(f"{role} ({name})" for role, name in splits.items() if name is not None) or "none"
    if folder is not None:
        configured += f", predict (the folder {str(folder)!r}: images without boxes)"
        if split == "predict":
            raise AnalysisInputError(f"analyze-anchors --split predict: data.predict_images {str(folder)!r} is a "
                                     f"folder of images without boxes; give a split with boxes: {configured}")
    names = sorted({str(splits[role]) for role in roles})
    if len(names) == 1:
        return min(roles, key=list(splits).index)
    if names:
        raise AnalysisInputError(f"analyze-anchors --split {split!r} names two splits ({', '.join(names)}); "
                                 f"give the role or the split name of one: {configured}")
    unset = f"the config sets no data.{split}_split; " if split in splits else ""
    raise AnalysisInputError(f"analyze-anchors --split {split!r}: {unset}the config's splits are {configured}; "
                             "give a role (train, val, test, predict) or its split name")


def output_paths(output_dir: str | Path, optimize: bool, overwrite: bool = False) -> dict[str, Path]:
    """The files an analysis writes into ``output_dir`` (the snippet only with ``optimize``), checked
    before the analysis: ``FileExistsError`` naming those already there unless ``overwrite`` (an
    earlier report or a hand-written ``anchors.yaml`` is never replaced unasked), ``ValueError``
    where ``output_dir`` is a file, one of them a folder, or the folder could not be created or
    written."""
    out = Path(output_dir)
    where = f"analyze-anchors --output_dir {str(out)!r}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"{where}: a file of that name exists; choose a folder")
    problem = folder_write_problem(out)
    if problem is not None:
        raise ValueError(f"{where}: cannot be created and written to ({problem}); choose another folder")
    paths = {key: out / name for key, name in OUTPUT_FILES.items() if optimize or key != "config_snippet"}
    folders = [path.name for path in paths.values() if path.is_dir()]
    if folders:
        raise ValueError(f"{where}: {', '.join(folders)} there is a folder; choose another --output_dir")
    existing = [path.name for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{where}: {', '.join(existing)} already there (an earlier run's or written by hand); "
            "choose another --output_dir or pass --force to replace them"
        )
    return paths


def analyze_anchors(
    boxes: GTBoxSet,
    anchor_generator: AnchorGenerator,
    optimize: bool = False,
    output_dir: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    fg_iou: float | None = None,
    head: Literal["rpn", "cascade"] = "rpn",
) -> AnchorAnalysis:
    """Coverage and box statistics (and with ``optimize``, a better design) of ``boxes``.

    With ``output_dir``: writes ``anchor_analysis.png``, ``anchor_analysis.json`` (strict JSON: the
    coverage of an area range without boxes is ``null``) and, when optimising, ``anchors.yaml``
    (the config snippet); their paths are in ``files``. Any of them
    already there is an error before the analysis (:func:`output_paths`) unless ``overwrite``;
    ``notes`` names the files replaced, and an ``anchors.yaml`` this run (without ``optimize``)
    left as it was. ``fg_iou``: the model's positive threshold, whose coverage the optimised
    design keeps (:func:`optimize_anchors`). ``head``: the model's; for ``"cascade"`` (whose one square
    anchor per location is checked) the coverage carries :data:`CASCADE_COVERAGE_NOTE` and the
    search keeps the ratios (:data:`CASCADE_SEARCH_NOTE`).
    """
    if head not in ("rpn", "cascade"):
        raise ValueError(f"analyze_anchors: head must be 'rpn' or 'cascade', got {head!r}")
    if head == "cascade":
        check_one_square_anchor(anchor_generator)
    if len(boxes) == 0:
        raise AnalysisInputError(f"analyze_anchors: no ground-truth boxes in {boxes.num_images} image(s) "
                                 "(empty dataset or split?)")
    paths = None if output_dir is None else output_paths(output_dir, optimize, overwrite)
    analysis = AnchorAnalysis(
        anchor_generator, anchor_coverage(boxes, anchor_generator), box_stats(boxes), boxes.num_images
    )
    if head == "cascade":
        analysis.coverage_note = CASCADE_COVERAGE_NOTE
    if optimize:
        analysis.optimized = optimize_anchors(boxes, anchor_generator, seed=seed, fg_iou=fg_iou,
                                              search_ratios=head != "cascade")
        analysis.optimize_note = CASCADE_SEARCH_NOTE if head == "cascade" else None
        analysis.optimized_coverage = anchor_coverage(boxes, analysis.optimized)
    if paths is not None:
        replaced = [path.name for path in paths.values() if path.exists()]
        if replaced:
            analysis.notes.append(f"replaced the earlier {', '.join(replaced)} in {output_dir}")
        stale = Path(output_dir) / OUTPUT_FILES["config_snippet"]
        if not optimize and stale.exists():
            analysis.notes.append(f"kept {stale}: not this run's snippet (this run did not optimise)")
        analysis.files["plot"] = str(plot_anchor_analysis(boxes, anchor_generator, paths["plot"], analysis.optimized))
        if analysis.optimized is not None:
            write_config_snippet(analysis.optimized, paths["config_snippet"], comment=analysis.optimize_note)
            analysis.files["config_snippet"] = str(paths["config_snippet"])
        analysis.files["report"] = str(paths["report"])
        paths["report"].write_text(json.dumps(analysis.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
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
    overwrite: bool = False,
) -> AnchorAnalysis:
    """``lightning-rpn analyze-anchors``: analyse the model's anchors on a data module's split.

    ``model`` supplies ``anchor_generator``, ``size_divisibility`` and ``target_config.fg_iou``
    (an ``RPNModule``) and its head (:func:`model_head`); ``datamodule`` (an ``RPNDataModule``) the
    dataset and resize policy.
    ``split``: a role of the data module or the split name the config gives one (:func:`split_role`).
    Prints the report and writes the files of :func:`analyze_anchors` to ``output_dir``; one of
    them already there is an error before the boxes are read, unless ``overwrite``. A split the
    config does not set, or one without boxes, is an :class:`AnalysisInputError`.
    """
    generator = getattr(model, "anchor_generator", None)
    if not isinstance(generator, AnchorGenerator):
        raise TypeError(
            f"run_analyze_anchors: model must have an AnchorGenerator `anchor_generator`, "
            f"got {type(generator).__name__} from {type(model).__name__}"
        )
    output_paths(output_dir, optimize, overwrite)
    size_divisibility = getattr(model, "size_divisibility", None) or max(generator.strides)
    fg_iou = getattr(getattr(model, "target_config", None), "fg_iou", None)
    splits = getattr(datamodule, "splits", None)
    role = split_role(datamodule, split) if isinstance(splits, dict) else split
    boxes = collect_gt_boxes(datamodule, split=role, size_divisibility=size_divisibility, max_images=max_images)
    if len(boxes) == 0:
        where = f"the {role} split {splits[role]!r}" if isinstance(splits, dict) else "the dataset"
        found = ("lists no images" if boxes.num_images == 0
                 else f"has no gt boxes in the {boxes.num_images} image(s) read")
        raise AnalysisInputError(f"analyze-anchors --split {split}: {where} {found}; choose a split with boxes")
    analysis = analyze_anchors(boxes, generator, optimize=optimize, output_dir=output_dir, seed=seed,
                               overwrite=overwrite, fg_iou=fg_iou, head=model_head(model))
    (console or Console()).print(analysis)
    return analysis
