"""The ``check-data`` report: per split, counts, box statistics, anchor coverage and the problems found.

A :class:`SplitReport` is filled by :func:`~lightning_rpn.data.validation.validate_dataset`; the
:class:`DatasetReport` of all splits prints as rich tables (file names and boxes printed as
they are, never read as console markup; the first ``max_listed`` problems of each split, errors
first), converts to a dict, writes every problem to a JSON or CSV file (:meth:`~DatasetReport.write`),
and separates errors from warnings (:data:`~lightning_rpn.data.problems.WARNING_KINDS`: boxes
slightly outside the image that every policy clips, and other data that is used as it is, such
as an evaluation split without a box): it is :attr:`~DatasetReport.ok` when there are no errors.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from lightning_rpn._files import folder_write_problem
from lightning_rpn.core.boxes import COCO_AREA_RANGES
from lightning_rpn.data.problems import Problem, ProblemLog, severity_of

__all__ = [
    "ASPECT_BUCKETS", "AREA_BUCKETS", "DatasetReport", "MAX_LISTED", "PERCENTILES", "REPORT_SUFFIXES", "SplitReport",
    "report_path",
]

PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)
ASPECT_BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, float("inf")))
"""Width / height buckets (lower bound inclusive)."""
AREA_BUCKETS = {name: limits for name, limits in COCO_AREA_RANGES.items() if name != "all"}
"""COCO box-area ranges in pixels squared."""
MAX_LISTED = 20
"""Problems a printed split report lists in full by default (all of them are counted)."""
REPORT_SUFFIXES = (".json", ".csv")
"""File types :meth:`DatasetReport.write` writes."""
_CSV_COLUMNS = ["split", "severity", *(f.name for f in fields(Problem))]


@dataclass
class SplitReport:
    """Statistics and problems of one split."""

    name: str
    images: int = 0
    empty_images: int = 0
    boxes: int = 0
    crowd_boxes: int = 0
    image_heights: list[int] = field(default_factory=list)
    image_widths: list[int] = field(default_factory=list)
    box_widths: list[float] = field(default_factory=list)
    box_heights: list[float] = field(default_factory=list)
    problems: ProblemLog = field(default_factory=ProblemLog)
    best_anchor_iou: list[float] = field(default_factory=list)
    """Per checked gt box, the best IoU any anchor reaches (only with an anchor generator)."""

    def add_image(self, size: tuple[int, int] | None, boxes: np.ndarray, crowd: np.ndarray) -> None:
        """Count one image of ``size`` (``None``: unknown) with its gt ``boxes`` and ``crowd`` boxes."""
        self.images += 1
        self.empty_images += int(len(boxes) == 0)
        self.boxes += len(boxes)
        self.crowd_boxes += len(crowd)
        if size is not None:
            self.image_heights.append(int(size[0]))
            self.image_widths.append(int(size[1]))
        if len(boxes):
            self.box_widths.extend((boxes[:, 2] - boxes[:, 0]).tolist())
            self.box_heights.extend((boxes[:, 3] - boxes[:, 1]).tolist())

    def percentiles(self) -> dict[str, list[float]]:
        """Percentiles (:data:`PERCENTILES`) of box width, height, sqrt(area), aspect ratio (w / h)."""
        if not self.box_widths:
            return {}
        w, h = np.asarray(self.box_widths), np.asarray(self.box_heights)
        values = {"width": w, "height": h, "sqrt_area": np.sqrt(w * h), "aspect_w_over_h": w / h}
        return {k: np.percentile(v, PERCENTILES).round(3).tolist() for k, v in values.items()}

    def aspect_histogram(self) -> dict[str, int]:
        w, h = np.asarray(self.box_widths), np.asarray(self.box_heights)
        ratio = w / h if len(w) else w
        return {f"[{lo:g}, {hi:g})": int(((ratio >= lo) & (ratio < hi)).sum()) for lo, hi in ASPECT_BUCKETS}

    def area_histogram(self) -> dict[str, int]:
        area = np.asarray(self.box_widths) * np.asarray(self.box_heights)
        return {name: int(((area >= lo) & (area < hi)).sum()) for name, (lo, hi) in AREA_BUCKETS.items()}

    def anchor_coverage(self) -> dict[str, float]:
        """Fraction of gt boxes whose best anchor reaches IoU 0.3 / 0.5 / 0.7, and their median IoU."""
        if not self.best_anchor_iou:
            return {}
        # float32, as the IoUs were computed and as analyze-anchors and the matcher compare them: an
        # IoU equal to float32(0.7) is a hit there, and would not be against the float64 0.7
        best = np.asarray(self.best_anchor_iou, dtype=np.float32)
        out = {f"best_iou>={t}": float((best >= np.float32(t)).mean()) for t in (0.3, 0.5, 0.7)}
        out["median_best_iou"] = float(np.median(best))
        out["boxes_checked"] = float(len(best))
        return out

    @property
    def num_errors(self) -> int:
        return self.problems.num_errors()

    @property
    def num_warnings(self) -> int:
        return len(self.problems) - self.problems.num_errors()

    @property
    def ok(self) -> bool:
        """No errors (warnings, such as boxes slightly outside the image that are always clipped, are ok)."""
        return self.num_errors == 0

    def ordered_problems(self) -> list[Problem]:
        """Every problem, errors first, each group in the order found."""
        return sorted(self.problems, key=lambda p: p.severity != "error")

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images, "empty_images": self.empty_images, "boxes": self.boxes,
            "crowd_boxes": self.crowd_boxes,
            "image_height_range": [min(self.image_heights, default=0), max(self.image_heights, default=0)],
            "image_width_range": [min(self.image_widths, default=0), max(self.image_widths, default=0)],
            "box_percentiles": self.percentiles(), "aspect_histogram": self.aspect_histogram(),
            "area_histogram": self.area_histogram(), "anchor_coverage": self.anchor_coverage(),
            "errors": self.num_errors, "warnings": self.num_warnings,
            "problem_counts": {f"{k}/{a}": n for (k, a), n in sorted(self.problems.counts().items())},
            "problems": [p.to_dict() for p in self.ordered_problems()],
        }

    def __rich__(self) -> Group:
        return self.render(MAX_LISTED)

    def render(self, max_listed: int | None = MAX_LISTED, coverage_note: str | None = None) -> Group:
        """The split's tables and its first ``max_listed`` problems (``None``: all), errors first;
        ``coverage_note`` printed under the anchor coverage (:attr:`DatasetReport.coverage_note`)."""
        summary = Table(title=Text(f"split {self.name}"), show_header=False)
        summary.add_row("images", f"{self.images} ({self.empty_images} without boxes)")
        summary.add_row("boxes", f"{self.boxes} (+{self.crowd_boxes} crowd / ignored)")
        if self.image_heights:
            summary.add_row("image h x w", f"{min(self.image_heights)}..{max(self.image_heights)} x "
                                           f"{min(self.image_widths)}..{max(self.image_widths)}")
        parts: list[Any] = [summary]
        pct = self.percentiles()
        if pct:
            table = Table(title="box statistics (percentiles)")
            table.add_column("")
            for p in PERCENTILES:
                table.add_column(f"p{p}", justify="right")
            for key, row in pct.items():
                table.add_row(key, *(f"{v:.3g}" for v in row))
            parts.append(table)
            hist = Table(title="aspect ratio w/h and area (COCO ranges)")
            hist.add_column("bucket")
            hist.add_column("boxes", justify="right")
            for key, n in {**self.aspect_histogram(), **self.area_histogram()}.items():
                hist.add_row(key, str(n))
            parts.append(hist)
        coverage = self.anchor_coverage()
        if coverage:
            table = Table(title=f"anchor coverage ({int(coverage['boxes_checked'])} boxes)", show_header=False)
            for key, value in coverage.items():
                if key != "boxes_checked":
                    table.add_row(key, f"{value:.3f}")
            parts.append(table)
            if coverage_note is not None:
                parts.append(Text(f"note on the coverage: {coverage_note}"))
        problems = Table(title=f"problems found: {len(self.problems)} "
                               f"({self.num_errors} errors, {self.num_warnings} warnings)")
        for column in ("severity", "kind", "action"):
            problems.add_column(column)
        problems.add_column("count", justify="right")
        rows = sorted((severity_of(kind), kind, action, n) for (kind, action), n in self.problems.counts().items())
        for severity, kind, action, n in rows:
            problems.add_row(severity, Text(kind), action, str(n))
        parts.append(problems)
        ordered = self.ordered_problems()
        listed = ordered if max_listed is None else ordered[:max_listed]
        parts += [Text(f"  {problem.severity}: {problem}") for problem in listed]
        if len(ordered) > len(listed):
            parts.append(Text(f"  ... and {len(ordered) - len(listed)} more (check-data --list_all prints "
                              f"them all; --report FILE.json or FILE.csv writes them to a file)"))
        return Group(*parts)


def report_path(path: Path | str, overwrite: bool = True) -> Path:
    """``path`` as a :class:`Path` that :meth:`DatasetReport.write` can write, checked before a long
    check: ``ValueError`` unless it ends in one of :data:`REPORT_SUFFIXES`, its folder can be made
    and written (nothing is created yet), and (unless ``overwrite``) no file is there yet."""
    path = Path(path)
    where = f"check-data --report {str(path)!r}"
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise ValueError(f"{where}: expected a file name ending in {' or '.join(REPORT_SUFFIXES)}, "
                         f"got suffix {path.suffix!r}")
    if path.exists() and (path.is_dir() or not overwrite):
        raise ValueError(f"{where}: {'a folder' if path.is_dir() else 'a file'} of that name exists; "
                         "choose another name" + ("" if path.is_dir() else " or pass --force to replace it"))
    problem = folder_write_problem(path.parent)
    if problem is not None:
        raise ValueError(f"{where}: its folder {str(path.parent)!r} cannot be created and written to ({problem})")
    return path


@dataclass
class DatasetReport:
    """The reports of every checked split; ``print(report)`` or ``rich.print(report)``."""

    splits: list[SplitReport]
    max_listed: int | None = MAX_LISTED
    """Problems listed in full per split when printed (``None``: all)."""
    coverage_note: str | None = None
    """Printed under each split's anchor coverage where it is not the model's recall ceiling (a
    cascade's, set by ``check-data`` from the model's head)."""

    @property
    def num_problems(self) -> int:
        return sum(len(s.problems) for s in self.splits)

    @property
    def num_errors(self) -> int:
        return sum(s.num_errors for s in self.splits)

    @property
    def num_warnings(self) -> int:
        return sum(s.num_warnings for s in self.splits)

    @property
    def ok(self) -> bool:
        """No split has errors (``check-data`` exits 1 otherwise; with ``--strict`` also on warnings)."""
        return all(s.ok for s in self.splits)

    def to_dict(self) -> dict[str, Any]:
        return {s.name: s.to_dict() for s in self.splits}

    def write(self, path: Path | str) -> Path:
        """Write every problem of every split to ``path``: JSON (the whole :meth:`to_dict`) or CSV (one row per problem)."""
        path = report_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
            return path
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=_CSV_COLUMNS)
            writer.writeheader()
            for split in self.splits:
                writer.writerows({"split": split.name, **p.to_dict()} for p in split.ordered_problems())
        return path

    def __rich__(self) -> Group:
        return Group(*(s.render(self.max_listed, self.coverage_note) for s in self.splits))

    def print(self, file: TextIO | None = None) -> None:
        """Print the tables to ``file`` (standard output), in ASCII where its encoding has no box characters."""
        # soft wrap: each problem stays one line (file, image and annotation greppable together)
        Console(width=120, file=file, color_system=None).print(self, soft_wrap=True)

    def __str__(self) -> str:
        buffer = io.StringIO()
        self.print(buffer)
        return buffer.getvalue()
