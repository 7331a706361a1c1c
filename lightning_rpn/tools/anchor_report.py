"""The anchor analysis' outputs: the result object with its rich report, the plot, the config snippet.

Shapes: ``G`` ground-truth boxes, ``Q`` anchor groups (one per level and cell anchor).

:class:`AnchorAnalysis` holds box statistics and coverage before (and after) optimisation and
prints as tables (``rich``) or JSON (:meth:`AnchorAnalysis.to_dict`); :func:`plot_anchor_analysis`
draws box shapes against anchor shapes, size and ratio histograms and coverage bars;
:func:`write_config_snippet` writes the optimised design as the YAML of the model section.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.boxes import COCO_AREA_RANGES
from lightning_rpn.core.coverage import COVERAGE_THRESHOLDS, GTBoxSet, anchor_coverage

__all__ = ["AnchorAnalysis", "box_stats", "plot_anchor_analysis", "write_config_snippet"]


def write_config_snippet(
    anchor_generator: AnchorGenerator, path: str | Path | None = None, comment: str | None = None
) -> str:
    """YAML for the model section (``RPNModule`` ``anchor_sizes`` / ``aspect_ratios``); written to ``path`` if given.

    ``comment``: one more header line (what the search kept fixed)."""
    body = {
        "model": {
            "anchor_sizes": [list(level) for level in anchor_generator.sizes],
            "aspect_ratios": [list(level) for level in anchor_generator.aspect_ratios],
        }
    }
    text = (
        "# from `lightning-rpn analyze-anchors --optimize` (same anchor count)\n"
        + ("" if comment is None else f"# {comment}\n")
        + f"# strides {list(anchor_generator.strides)}\n"
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


def _size_bins(sqrt_area: np.ndarray, count: int = 40) -> np.ndarray:
    """``count + 1`` log-spaced histogram edges spanning ``sqrt_area`` (non-empty); boxes all of one
    size get edges 10% either side (equal edges made ``hist`` raise after the analysis)."""
    low, high = max(float(sqrt_area.min()), 1e-3), max(float(sqrt_area.max()), 1.0)
    if high <= low * 1.01:
        low, high = low / 1.1, high * 1.1
    return np.geomspace(low, high, count + 1)


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
        ax.hist(sqrt_area, bins=_size_bins(sqrt_area), color="tab:blue", alpha=0.7)
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


def _json_coverage(coverage: dict[str, float] | None) -> dict[str, float | None] | None:
    """``coverage`` for strict JSON: the NaN of an area range without boxes becomes ``None`` (``null``)."""
    if coverage is None:
        return None
    return {key: value if math.isfinite(value) else None for key, value in coverage.items()}


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
    notes: list[str] = field(default_factory=list)
    """What the reader of the files should know: earlier files replaced, a snippet not this run's."""
    coverage_note: str | None = None
    """What the coverage means for the model's head where it is not its recall ceiling (a cascade's)."""
    optimize_note: str | None = None
    """What the search kept fixed (a cascade's square anchors), in the report and the config snippet."""

    @property
    def config_snippet(self) -> str | None:
        return None if self.optimized is None else write_config_snippet(self.optimized, comment=self.optimize_note)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain types (``anchor_analysis.json``); a coverage of an area range without
        boxes, NaN in :attr:`coverage`, is ``None`` here (JSON ``null``)."""
        out: dict[str, Any] = {
            "num_images": self.num_images,
            "anchors": _design(self.anchor_generator),
            "coverage": _json_coverage(self.coverage),
            **({} if self.coverage_note is None else {"coverage_note": self.coverage_note}),
            "box_stats": self.box_stats,
            "files": self.files,
        }
        if self.notes:
            out["notes"] = self.notes
        if self.optimized is not None:
            out["optimized_anchors"] = _design(self.optimized)
            if self.optimize_note is not None:
                out["optimize_note"] = self.optimize_note
            out["optimized_coverage"] = _json_coverage(self.optimized_coverage)
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
        if self.coverage_note is not None:
            parts.append(Text(f"note on the coverage: {self.coverage_note}"))
        if self.optimized is not None:
            parts.append(Text("config snippet (paste into the model section):\n" + (self.config_snippet or "")))
        for name, file in self.files.items():
            parts.append(Text(f"{name}: {file}"))
        parts.extend(Text(f"note: {note}") for note in self.notes)
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


def box_stats(boxes: GTBoxSet) -> dict[str, list[float]]:
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
