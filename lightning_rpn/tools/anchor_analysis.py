"""Anchor analysis: how well an anchor design can cover a dataset's boxes, and a better design.

Shapes: ``G`` ground-truth boxes (all images), ``L`` levels, ``A`` anchors per location,
``Q`` anchor groups (one per level and cell anchor, ``Q = sum_l A_l``).

Coverage (the best anchor IoU of each gt box, exact) is computed by
:mod:`lightning_rpn.core.coverage`, shared with ``check-data``; this module collects the
boxes as the training pipeline sees them (after the evaluation resize), optimises the
design, plots and reports.

:func:`optimize_anchors` keeps the number of sizes and aspect ratios of every level (so the
anchor count and the head stay the same), starts from the better of the current design and a
k-means (distance ``1 - IoU`` of centre-aligned shapes) fit and a size/ratio quantile fit, and refines sizes and ratios by
a coordinate-wise local search on the exact coverage of the real boxes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console, Group
from rich.progress import track
from rich.table import Table
from rich.text import Text
from torch import Tensor
from torch.utils.data import Dataset

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.coverage import (
    COVERAGE_THRESHOLDS,
    GTBoxSet,
    anchor_coverage,
    best_anchor_iou,
    level_best_iou,
    per_level_best_iou,
    row_max,
)
from lightning_rpn.data.annotated import AnnotatedDataset
from lightning_rpn.data.image_io import read_image_size
from lightning_rpn.data.transforms import ResizePolicy
from lightning_rpn.core.boxes import COCO_AREA_RANGES

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


# ---------------------------------------------------------------------------------- collection
def _image_boxes(dataset: Dataset, progress: bool, description: str, max_images: int | None):
    """``(original (h, w), boxes [G_i, 4])`` per image: annotations plus headers when possible."""
    inner = getattr(dataset, "dataset", dataset)  # unwrap TransformedDataset: no augmentation
    count = len(inner)  # type: ignore[arg-type]
    if max_images is not None:
        count = min(count, max_images)
    steps = track(range(count), description=description, disable=not progress, transient=True)
    if isinstance(inner, AnnotatedDataset):
        for index in steps:
            record = inner.records[index]
            size = record.size or read_image_size(record.file, image_id=record.image_id)
            yield size, record.boxes
    else:
        for index in steps:
            sample = inner[index]
            yield sample.image_size, sample.boxes


def collect_gt_boxes(
    source: Any,
    split: str = "train",
    resize: ResizePolicy | None = None,
    size_divisibility: int | None = None,
    max_images: int | None = None,
    progress: bool = True,
) -> GTBoxSet:
    """The gt boxes of a dataset (or of an ``RPNDataModule`` split role) after the resize.

    ``source``: an ``RPNDataModule`` (its ``split`` role is built, and its ``resize_policy``
    and ``size_divisibility`` are the defaults) or a dataset of ``DetectionSample`` s.
    File-backed datasets (COCO, VOC) are read from their annotations (image headers only when
    an annotation has no size); other datasets are iterated. Augmentations are not applied;
    the resize is the evaluation one (for multi-scale training, the last ``min_sizes``).
    """
    if isinstance(source, Dataset):
        dataset, where = source, type(source).__name__
    elif callable(getattr(source, "build_dataset", None)) and isinstance(getattr(source, "splits", None), dict):
        if split not in source.splits or source.splits[split] is None:
            raise ValueError(
                f"collect_gt_boxes: the data module has no {split!r} split (splits: {source.splits})"
            )
        dataset, where = source.build_dataset(source.splits[split]), f"{split} ({source.splits[split]})"
        resize = resize or getattr(source, "resize_policy", None)
        size_divisibility = size_divisibility or getattr(source, "size_divisibility", None)
    else:
        raise TypeError(f"collect_gt_boxes: expected a Dataset or RPNDataModule, got {type(source).__name__}")
    resize = resize or ResizePolicy()
    d = int(size_divisibility or 1)
    sizes, new_sizes, boxes, owners = [], [], [], []
    for index, (size, image_boxes) in enumerate(
        _image_boxes(dataset, progress, f"Reading boxes of {where}", max_images)
    ):
        size = (int(size[0]), int(size[1]))
        sizes.append(size)
        new_sizes.append(resize.target_size(size, train=False))
        image_boxes = np.asarray(image_boxes, dtype=np.float32).reshape(-1, 4)
        boxes.append(image_boxes)
        owners.append(np.full(len(image_boxes), index, dtype=np.int64))
    if not boxes:
        return GTBoxSet(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64), 0)
    old = np.asarray(sizes, dtype=np.float32)
    new = np.asarray(new_sizes, dtype=np.int64)
    owner = np.concatenate(owners)
    scale = (new.astype(np.float32) / old)[owner][:, [1, 0, 1, 0]]  # (sx, sy, sx, sy) per box
    scaled = np.concatenate(boxes) * scale
    padded = -(-new[owner] // d) * d
    result = torch.from_numpy(scaled.astype(np.float32))
    valid = (result[:, 2] > result[:, 0]) & (result[:, 3] > result[:, 1])
    return GTBoxSet(result[valid].contiguous(), torch.from_numpy(padded)[valid].contiguous(), len(sizes))


# ---------------------------------------------------------------------------------- optimisation
def _shape_iou(wh: Tensor, centres: Tensor) -> Tensor:
    """``[G, K]`` IoU of centre-aligned shapes ``wh [G, 2]`` and ``centres [K, 2]``."""
    inter = torch.minimum(wh[:, None, 0], centres[None, :, 0]) * torch.minimum(wh[:, None, 1], centres[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (centres[:, 0] * centres[:, 1])[None] - inter
    return inter / union


def _kmeans_shapes(wh: Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> Tensor:
    """k-means of box shapes with distance ``1 - IoU`` (centre-aligned); ``[k, 2]`` centres.

    Seeded k-means++ initialisation; centres are the per-cluster medians (robust to outliers).
    """
    wh = wh.double()
    first = int(torch.randint(wh.shape[0], (1,), generator=generator))
    centres = [wh[first]]
    for _ in range(1, k):
        nearest, _ = row_max(_shape_iou(wh, torch.stack(centres)))
        distance = (1 - nearest).clamp(min=0) ** 2
        if float(distance.sum()) == 0.0:
            centres.append(wh[int(torch.randint(wh.shape[0], (1,), generator=generator))])
        else:
            centres.append(wh[int(torch.multinomial(distance, 1, generator=generator))])
    current = torch.stack(centres)
    for _ in range(iterations):
        _, assign = row_max(_shape_iou(wh, current))
        updated = current.clone()
        for cluster in range(k):
            members = wh[assign == cluster]
            if len(members):
                updated[cluster] = members.median(dim=0).values
        if torch.equal(updated, current):
            break
        current = updated
    return current


def _round_design(sizes: list[list[float]], ratios: list[list[float]]) -> tuple[tuple[tuple[float, ...], ...], ...]:
    return (
        tuple(tuple(round(float(s), 1) for s in level) for level in sizes),
        tuple(tuple(round(float(r), 3) for r in level) for level in ratios),
    )


def _kmeans_design(
    wh: Tensor, reference: AnchorGenerator, generator: torch.Generator
) -> tuple[list[list[float]], list[list[float]]]:
    """Sizes and ratios per level with the reference's counts, fitted by shape k-means.

    ``sum_l S_l * R_l`` clusters are sorted by area and handed out to the levels finest first;
    a level's cluster shapes, sorted by ratio, give its ratios (geometric means of ``S_l``
    consecutive shapes) and, sorted by area, its sizes (geometric means of ``R_l`` shapes).
    """
    counts = [(len(s), len(r)) for s, r in zip(reference.sizes, reference.aspect_ratios)]
    total = sum(s * r for s, r in counts)
    k = min(total, wh.shape[0])
    centres = _kmeans_shapes(wh, k, generator)
    if k < total:  # fewer boxes than anchor shapes: repeat the biggest ones
        centres = torch.cat([centres, centres[-1:].expand(total - k, 2)])
    areas = centres[:, 0] * centres[:, 1]
    centres = centres[areas.argsort()]
    sizes, ratios = [], []
    start = 0
    for num_sizes, num_ratios in counts:
        chunk = centres[start : start + num_sizes * num_ratios]
        start += num_sizes * num_ratios
        log_size = 0.5 * torch.log(chunk[:, 0] * chunk[:, 1])
        log_ratio = torch.log(chunk[:, 1] / chunk[:, 0])
        sizes.append(torch.exp(log_size.sort().values.view(num_sizes, num_ratios).mean(1)).tolist())
        ratios.append(torch.exp(log_ratio.sort().values.view(num_ratios, num_sizes).mean(1)).tolist())
    return sizes, ratios


def _quantile_design(wh: Tensor, reference: AnchorGenerator) -> tuple[list[list[float]], list[list[float]]]:
    """Sizes at evenly spaced quantiles of sqrt(area) (finest level first) and, on every level,
    ratios at evenly spaced quantiles of h / w; the reference's counts."""
    log_size = 0.5 * torch.log(wh[:, 0].double() * wh[:, 1].double())
    log_ratio = torch.log(wh[:, 1].double() / wh[:, 0].double())
    counts = [(len(s), len(r)) for s, r in zip(reference.sizes, reference.aspect_ratios)]
    total = sum(s for s, _ in counts)
    size_q = torch.quantile(log_size, (torch.arange(total, dtype=torch.float64) + 0.5) / total).exp().tolist()
    sizes, ratios, start = [], [], 0
    for num_sizes, num_ratios in counts:
        sizes.append(size_q[start : start + num_sizes])
        start += num_sizes
        q = (torch.arange(num_ratios, dtype=torch.float64) + 0.5) / num_ratios
        ratios.append(torch.quantile(log_ratio, q).exp().tolist())
    return sizes, ratios


def _objective(per_level: Tensor) -> float:
    """Coverage at IoU 0.7 plus coverage at 0.5 (neither is traded away for the other), plus a
    tenth of the mean best IoU, which makes the search surface smoother."""
    best, _ = row_max(per_level)
    return float((best >= 0.7).float().mean() + (best >= 0.5).float().mean() + 0.1 * best.mean())


def optimize_anchors(
    boxes: GTBoxSet,
    anchor_generator: AnchorGenerator,
    max_boxes: int = 20000,
    seed: int = 0,
    max_passes: int = 4,
) -> AnchorGenerator:
    """Sizes and ratios per level that maximise the anchors' coverage of ``boxes``.

    Keeps the strides, offset, anchor stride and the number of sizes and ratios of each level
    (same anchor count, same head). Starts from the better of the current design and a shape
    k-means fit (``1 - IoU`` distance) and a quantile fit, then a coordinate-wise local search multiplies one size
    or ratio at a time by ``2^(+-step)`` (steps 1/2 down to 1/16 octave) and keeps any change
    that raises the objective: coverage at IoU 0.7 + coverage at 0.5 + 0.1 x mean best IoU,
    evaluated exactly on (at most ``max_boxes``, a seeded sample of) the real boxes. The result
    never scores below the current design on the boxes searched. Deterministic for a seed.
    """
    if len(boxes) == 0:
        raise ValueError("optimize_anchors: no ground-truth boxes to fit the anchors to")
    generator = torch.Generator().manual_seed(seed)
    if len(boxes) > max_boxes:
        boxes = boxes.subset(torch.randperm(len(boxes), generator=generator)[:max_boxes])

    def build(sizes: Sequence, ratios: Sequence) -> AnchorGenerator:
        rounded_sizes, rounded_ratios = _round_design(list(sizes), list(ratios))
        return AnchorGenerator(
            rounded_sizes,
            rounded_ratios,
            anchor_generator.strides,
            offset=anchor_generator.offset,
            anchor_stride=anchor_generator.anchor_stride,
        )

    start_sizes = [list(s) for s in anchor_generator.sizes]
    start_ratios = [list(r) for r in anchor_generator.aspect_ratios]
    candidates = [
        (start_sizes, start_ratios),
        _kmeans_design(boxes.wh, anchor_generator, generator),
        _quantile_design(boxes.wh, anchor_generator),
    ]
    scored = []
    for sizes, ratios in candidates:
        per_level, _ = per_level_best_iou(boxes, build(sizes, ratios))
        scored.append((_objective(per_level), sizes, ratios, per_level))
    best_score, sizes, ratios, per_level = max(scored, key=lambda item: item[0])
    sizes = [list(s) for s in sizes]
    ratios = [list(r) for r in ratios]

    for step in (0.5, 0.25, 0.125, 0.0625):
        factor = 2.0**step
        for _ in range(max_passes):
            improved = False
            for level in range(anchor_generator.num_levels):
                for values in (sizes[level], ratios[level]):
                    for index in range(len(values)):
                        for scale in (factor, 1.0 / factor):
                            old = values[index]
                            values[index] = old * scale
                            candidate = build(sizes, ratios)
                            level_iou, _ = level_best_iou(boxes, candidate, level)
                            trial = per_level.clone()
                            trial[:, level] = level_iou
                            score = _objective(trial)
                            if score > best_score + 1e-12:
                                best_score, per_level, improved = score, trial, True
                                break
                            values[index] = old
            if not improved:
                break
    return build(sizes, ratios)


# ---------------------------------------------------------------------------------- output
def write_config_snippet(anchor_generator: AnchorGenerator, path: str | Path | None = None) -> str:
    """YAML for the model section (``RPNModule`` ``anchor_sizes`` / ``aspect_ratios``); written to ``path`` if given."""
    body = {
        "model": {
            "anchor_sizes": [list(level) for level in anchor_generator.sizes],
            "aspect_ratios": [list(level) for level in anchor_generator.aspect_ratios],
        }
    }
    text = (
        "# from `lightning-rpn analyze-anchors --optimize` (same anchor count)\n"
        f"# strides {list(anchor_generator.strides)}\n"
        + yaml.safe_dump(body, default_flow_style=None, sort_keys=False)
    )
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


def _anchor_shapes(anchor_generator: AnchorGenerator) -> np.ndarray:
    """``[Q, 2]`` (w, h) of every cell anchor of every level."""
    cells = torch.cat([c.float() for c in anchor_generator.cell_anchors])
    return (cells[:, 2:] - cells[:, :2]).numpy()


def plot_anchor_analysis(
    boxes: GTBoxSet,
    anchor_generator: AnchorGenerator,
    path: str | Path,
    optimized: AnchorGenerator | None = None,
    max_points: int = 20000,
) -> Path:
    """A PNG: box shapes vs anchor shapes, size and aspect-ratio histograms, coverage bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wh = boxes.wh.numpy()
    if len(wh) > max_points:
        wh = wh[np.random.default_rng(0).choice(len(wh), max_points, replace=False)]
    designs = [("current", anchor_generator, "tab:red", "x")]
    if optimized is not None:
        designs.append(("optimized", optimized, "tab:green", "+"))
    figure, axes = plt.subplots(2, 2, figsize=(11, 9))
    ax = axes[0, 0]
    ax.scatter(wh[:, 0], wh[:, 1], s=2, alpha=0.25, color="tab:blue", label="gt boxes")
    for name, design, color, marker in designs:
        shapes = _anchor_shapes(design)
        ax.scatter(shapes[:, 0], shapes[:, 1], s=80, color=color, marker=marker, label=f"{name} anchors")
    ax.set(xscale="log", yscale="log", xlabel="width (px)", ylabel="height (px)", title="box shapes vs anchor shapes")
    ax.legend(loc="upper left", fontsize=8)

    sqrt_area = np.sqrt(wh[:, 0] * wh[:, 1])
    ax = axes[0, 1]
    if len(sqrt_area):
        bins = np.geomspace(max(sqrt_area.min(), 1e-3), max(sqrt_area.max(), 1.0), 40)
        ax.hist(sqrt_area, bins=bins, color="tab:blue", alpha=0.7)
    for name, design, color, _ in designs:
        for i, size in enumerate(sorted({s for level in design.sizes for s in level})):
            ax.axvline(size, color=color, linestyle="--", label=f"{name} sizes" if i == 0 else None)
    ax.set(xscale="log", xlabel="sqrt(area) (px)", ylabel="boxes", title="box size")
    ax.legend(fontsize=8)

    ratio = np.log2(wh[:, 1] / wh[:, 0])
    ax = axes[1, 0]
    if len(ratio):
        ax.hist(ratio, bins=40, color="tab:blue", alpha=0.7)
    for name, design, color, _ in designs:
        for i, r in enumerate(sorted({r for level in design.aspect_ratios for r in level})):
            ax.axvline(math.log2(r), color=color, linestyle="--", label=f"{name} ratios" if i == 0 else None)
    ax.set(xlabel="log2(h / w)", ylabel="boxes", title="aspect ratio")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    names = list(COCO_AREA_RANGES)
    bar_width = 0.8 / (2 * len(designs))
    for d, (name, design, color, _) in enumerate(designs):
        coverage = anchor_coverage(boxes, design)
        for t_index, t in enumerate(COVERAGE_THRESHOLDS):
            values = [coverage[f"coverage{'' if n == 'all' else '_' + n}@{t:.2f}"] for n in names]
            offset = (d * len(COVERAGE_THRESHOLDS) + t_index) * bar_width - 0.4 + bar_width / 2
            ax.bar(np.arange(len(names)) + offset, np.nan_to_num(values), bar_width, color=color,
                   alpha=1.0 if t == 0.5 else 0.55, label=f"{name} IoU>={t}")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylim=(0, 1.05), ylabel="fraction of gt boxes", title="anchor coverage (best anchor IoU)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _design(g: AnchorGenerator) -> dict[str, Any]:
    return {"anchor_sizes": [list(s) for s in g.sizes], "aspect_ratios": [list(r) for r in g.aspect_ratios],
            "strides": list(g.strides)}


@dataclass
class AnchorAnalysis:
    """Result of :func:`analyze_anchors`: box statistics, coverage before (and after) optimisation."""

    anchor_generator: AnchorGenerator
    coverage: dict[str, float]
    box_stats: dict[str, list[float]]
    num_images: int
    optimized: AnchorGenerator | None = None
    optimized_coverage: dict[str, float] | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def config_snippet(self) -> str | None:
        return None if self.optimized is None else write_config_snippet(self.optimized)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_images": self.num_images,
            "anchors": _design(self.anchor_generator),
            "coverage": self.coverage,
            "box_stats": self.box_stats,
            "files": self.files,
        }
        if self.optimized is not None:
            out["optimized_anchors"] = _design(self.optimized)
            out["optimized_coverage"] = self.optimized_coverage
        return out

    def __rich__(self) -> Group:
        parts: list[Any] = []
        stats = Table(title=f"gt boxes after resize ({int(self.coverage['boxes'])} boxes, {self.num_images} images)")
        stats.add_column("")
        for p in _PERCENTILES:
            stats.add_column(f"p{p}", justify="right")
        for key, row in self.box_stats.items():
            stats.add_row(key, *(f"{v:.3g}" for v in row))
        parts.append(stats)
        designs = Table(title="anchor designs (per level: sizes x h/w ratios)")
        designs.add_column("level")
        designs.add_column("stride", justify="right")
        designs.add_column("current")
        if self.optimized is not None:
            designs.add_column("optimized")
        for level, stride in enumerate(self.anchor_generator.strides):
            row = [str(level), str(stride), _describe_level(self.anchor_generator, level)]
            if self.optimized is not None:
                row.append(_describe_level(self.optimized, level))
            designs.add_row(*row)
        parts.append(designs)
        table = Table(title="anchor coverage: fraction of gt boxes whose best anchor reaches IoU t")
        table.add_column("area range")
        table.add_column("boxes", justify="right")
        for t in COVERAGE_THRESHOLDS:
            table.add_column(f"IoU>={t}", justify="right")
            if self.optimized_coverage is not None:
                table.add_column(f"optimized >={t}", justify="right")
        for name in COCO_AREA_RANGES:
            suffix = "" if name == "all" else f"_{name}"
            row = [name, str(int(self.coverage[f"boxes{suffix}"]))]
            for t in COVERAGE_THRESHOLDS:
                row.append(f"{self.coverage[f'coverage{suffix}@{t:.2f}']:.3f}")
                if self.optimized_coverage is not None:
                    row.append(f"{self.optimized_coverage[f'coverage{suffix}@{t:.2f}']:.3f}")
            table.add_row(*row)
        row = ["mean best IoU", "", f"{self.coverage['mean_best_iou']:.3f}"]
        if self.optimized_coverage is not None:
            row.append(f"{self.optimized_coverage['mean_best_iou']:.3f}")
        table.add_row(*row)
        parts.append(table)
        if self.optimized is not None:
            parts.append(Text("config snippet (paste into the model section):\n" + (self.config_snippet or "")))
        for name, file in self.files.items():
            parts.append(Text(f"{name}: {file}"))
        return Group(*parts)

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(width=120, file=buffer, color_system=None).print(self)
        return buffer.getvalue()


_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def _describe_level(g: AnchorGenerator, level: int) -> str:
    sizes = ", ".join(f"{s:g}" for s in g.sizes[level])
    ratios = ", ".join(f"{r:g}" for r in g.aspect_ratios[level])
    return f"({sizes}) x ({ratios})"


def _box_stats(boxes: GTBoxSet) -> dict[str, list[float]]:
    if len(boxes) == 0:
        return {}
    wh = boxes.wh.double().numpy()
    values = {
        "width": wh[:, 0],
        "height": wh[:, 1],
        "sqrt_area": np.sqrt(wh[:, 0] * wh[:, 1]),
        "ratio_h_over_w": wh[:, 1] / wh[:, 0],
    }
    return {k: np.percentile(v, _PERCENTILES).round(3).tolist() for k, v in values.items()}


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
        anchor_generator, anchor_coverage(boxes, anchor_generator), _box_stats(boxes), boxes.num_images
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
