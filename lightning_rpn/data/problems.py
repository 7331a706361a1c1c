"""Bad annotations: the policy that handles them, the record of what was done, the box checks.

Every box that a dataset clips or skips is recorded as a :class:`Problem` naming the file, the
image id and the annotation id, so nothing is ever dropped silently. Structural errors (NaN or
infinite coordinates, empty boxes, boxes that look like ``(x, y, w, h)``, boxes far outside the
image, image sizes that disagree with the annotation, unknown image ids) raise by default;
``on_bad_annotation="skip"`` drops the offending box or image instead, and ``"clip"`` clips
what clipping can repair and skips the rest. Boxes only slightly outside the image (by at most
:data:`OUTSIDE_TOLERANCE_PX` or :data:`OUTSIDE_TOLERANCE_FRACTION` of the image side) are
clipped under every policy: they are *warnings* (:data:`WARNING_KINDS`), as are boxes that no
training window keeps (``box_larger_than_window``: the data is sound, the window too small),
COCO annotations of a category not in ``categories`` and reused annotation ids (the box is kept),
and evaluation splits without a ground-truth box (recall is undefined there); every other
problem is an *error*, one that the default policy refuses.

Boxes are checked as written in their file (:data:`BoxFormat`: xyxy, COCO ``xywh`` or VOC's
1-based ``xmin, ymin, xmax, ymax``) and problem messages quote them that way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np

__all__ = [
    "as_written",
    "quoted",
    "BadAnnotationPolicy",
    "BAD_ANNOTATION_POLICIES",
    "BoxFormat",
    "WARNING_KINDS",
    "BOX_PROBLEM_KINDS",
    "OUTSIDE_TOLERANCE_PX",
    "OUTSIDE_TOLERANCE_FRACTION",
    "DataError",
    "UnsafePathError",
    "Problem",
    "ProblemLog",
    "AnnotationRef",
    "Severity",
    "check_policy",
    "describe_box",
    "sanitize_boxes",
    "severity_of",
    "to_xyxy",
]

BadAnnotationPolicy = Literal["raise", "skip", "clip"]
BAD_ANNOTATION_POLICIES: tuple[str, ...] = ("raise", "skip", "clip")

BoxFormat = Literal["xyxy", "xywh", "voc"]
"""How a source writes boxes: 0-based ``(x1, y1, x2, y2)``, COCO ``(x, y, w, h)``, or Pascal
VOC's 1-based inclusive ``(xmin, ymin, xmax, ymax)``."""

Severity = Literal["error", "warning"]
WARNING_KINDS = frozenset({
    "slightly_outside", "box_larger_than_window", "unknown_category", "duplicate_annotation_id",
    "no_eval_boxes", "file_listed_twice", "missing_area", "bad_area",
})
"""Problem kinds that every policy repairs, or uses as they are, without complaint (``check-data``
exits 0 on these unless ``--strict``); every other kind is an error."""
BOX_PROBLEM_KINDS = frozenset({"non_finite", "looks_like_xywh", "empty_box", "outside_image", "slightly_outside"})
"""The kinds :func:`sanitize_boxes` records: a box checked against another image size is judged again."""

OUTSIDE_TOLERANCE_PX = 2.0
"""A box may overshoot the image by this many pixels and still count as 'slightly outside'."""
OUTSIDE_TOLERANCE_FRACTION = 0.02
"""... or by this fraction of the image side, whichever is larger."""


def severity_of(kind: str) -> Severity:
    """``"warning"`` for the problem kinds in :data:`WARNING_KINDS` (always repaired), else ``"error"``."""
    return "warning" if kind in WARNING_KINDS else "error"


class DataError(ValueError):
    """A dataset problem, with the file, image id and annotation id it concerns."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        image_id: int | str | None = None,
        annotation_id: int | str | None = None,
    ) -> None:
        where = _describe(file, image_id, annotation_id)
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
        """The message without the file / image / annotation prefix."""
        self.file = file
        self.image_id = image_id
        self.annotation_id = annotation_id


class UnsafePathError(DataError):
    """An image path that is absolute or climbs out of its root: always an error, whatever the policy."""


def as_written(value: Any) -> str:
    """``value`` quoted for a message, JSON's ``null``, ``true`` and ``false`` as the file writes them
    (``repr`` says ``None``, ``True``, ``False``), also inside lists and objects."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return f"[{', '.join(as_written(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k!r}: {as_written(v)}' for k, v in value.items())}}}"
    if isinstance(value, float) and not math.isfinite(value):  # Python's json reads and writes these
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return repr(value)


def quoted(value: Any, limit: int = 60) -> str:
    """:func:`as_written` cut to ``limit`` characters: a whole entry quoted may be long."""
    text = as_written(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(file: str | None, image_id: int | str | None, annotation_id: int | str | None) -> str:
    """``file, image <id>, annotation <id>`` (the known parts), ids quoted as a COCO file writes
    them (``true``, ``NaN``: ``repr`` would say ``True``, ``nan``)."""
    parts = []
    if file is not None:
        parts.append(str(file))
    if image_id is not None:
        parts.append(f"image {as_written(image_id)}")
    if annotation_id is not None:
        parts.append(f"annotation {as_written(annotation_id)}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Problem:
    """One handled problem: what was wrong (``kind``), what was done (``action``: ``"kept"`` where the
    data is used as it is), and where."""

    kind: str
    action: Literal["clipped", "skipped", "converted", "kept"]
    detail: str
    file: str | None = None
    image_id: int | str | None = None
    annotation_id: int | str | None = None

    @property
    def severity(self) -> Severity:
        """See :func:`severity_of`."""
        return severity_of(self.kind)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus ``severity``, JSON-ready."""
        return {"severity": self.severity, **asdict(self)}

    def __str__(self) -> str:
        return f"{_describe(self.file, self.image_id, self.annotation_id)}: {self.detail} -> {self.action}"


class ProblemLog:
    """An ordered record of handled problems with per-(kind, action) counts."""

    def __init__(self, problems: Iterable[Problem] = ()) -> None:
        self.problems: list[Problem] = list(problems)

    def add(self, problem: Problem) -> None:
        self.problems.append(problem)

    def extend(self, problems: Iterable[Problem]) -> None:
        self.problems.extend(problems)

    def counts(self) -> Counter[tuple[str, str]]:
        """How many problems of each ``(kind, action)``."""
        return Counter((p.kind, p.action) for p in self.problems)

    def num_errors(self) -> int:
        """How many problems are errors (not in :data:`WARNING_KINDS`)."""
        return sum(p.severity == "error" for p in self.problems)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def summary(self, max_listed: int = 10) -> str:
        """Counts per kind and action, then the first ``max_listed`` distinct problems in full (repeats counted)."""
        if not self.problems:
            return "no problems"
        lines = [f"{n} x {kind} ({action})" for (kind, action), n in sorted(self.counts().items())]
        distinct = list(Counter(self.problems).items())
        lines += [f"  {p}" + (f" (x{n})" if n > 1 else "") for p, n in distinct[:max_listed]]
        if len(distinct) > max_listed:
            lines.append(f"  ... and {len(distinct) - max_listed} more")
        return "\n".join(lines)


def check_policy(policy: str, where: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is one of :data:`BAD_ANNOTATION_POLICIES`."""
    if policy not in BAD_ANNOTATION_POLICIES:
        raise ValueError(
            f"{where}: on_bad_annotation={policy!r} is not one of {BAD_ANNOTATION_POLICIES}"
        )


@dataclass(frozen=True)
class AnnotationRef:
    """Where a set of boxes came from, for error messages and problem records."""

    file: str
    image_id: int | str


_LAYOUTS: dict[str, tuple[str, str]] = {
    "xyxy": ("box", "(x1, y1, x2, y2)"),
    "xywh": ("bbox", "(x, y, w, h)"),
    "voc": ("bndbox", "(xmin, ymin, xmax, ymax), 1-based"),
}
_REVERSED: dict[str, str] = {"xyxy": "x2 < x1 or y2 < y1", "voc": "xmax < xmin or ymax < ymin"}
_NOT_EMPTY: dict[str, str] = {
    "xyxy": "x2 > x1 and y2 > y1",
    "xywh": "w > 0 and h > 0",
    "voc": "xmax >= xmin and ymax >= ymin",
}


def to_xyxy(boxes: np.ndarray, box_format: BoxFormat) -> np.ndarray:
    """Float64 ``[G, 4]`` 0-based ``(x1, y1, x2, y2)`` from boxes written in ``box_format``."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    if box_format == "xywh":
        out[:, 2:] += out[:, :2]
    elif box_format == "voc":
        out[:, :2] -= 1.0
    elif box_format != "xyxy":
        raise ValueError(f"box_format={box_format!r} is not one of 'xyxy', 'xywh', 'voc'")
    return out


def describe_box(written: Sequence[float], box_format: BoxFormat) -> str:
    """A box as its file writes it, e.g. ``bbox [1, 2, nan, 4] (x, y, w, h)``."""
    name, layout = _LAYOUTS[box_format]
    values = ", ".join(f"{float(v):g}" for v in written)
    return f"{name} [{values}] {layout}"


def sanitize_boxes(
    written: np.ndarray,
    annotation_ids: Sequence[int | str | None],
    image_size: tuple[int, int],
    policy: BadAnnotationPolicy,
    ref: AnnotationRef,
    log: ProblemLog,
    box_format: BoxFormat = "xyxy",
) -> tuple[np.ndarray, list[int | str | None]]:
    """Check boxes ``[G, 4]`` written in ``box_format`` against an image of size ``(h, w)``, apply ``policy``.

    Returns the kept (possibly clipped) boxes as float32 xyxy ``[G', 4]`` and their annotation
    ids. Messages quote each box as written. Raises :class:`DataError` for a structural error
    under ``policy="raise"``; records every clip and skip in ``log``. Sources that write
    corners (``xyxy``, ``voc``) name boxes that look like ``(x, y, w, h)`` as such.
    """
    written = np.asarray(written, dtype=np.float64).reshape(-1, 4)
    # judged as they will be stored: a box only float64 can tell from empty is empty in float32
    boxes = to_xyxy(written, box_format).astype(np.float32).astype(np.float64)
    height, width = float(image_size[0]), float(image_size[1])
    with np.errstate(invalid="ignore"):  # NaN compares False: such a box is not clean
        clean = ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
                 & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    if clean.all():  # the usual image: nothing to report, every box kept as it is (no per-box loop)
        return boxes.astype(np.float32), list(annotation_ids)
    tol_x = max(OUTSIDE_TOLERANCE_PX, OUTSIDE_TOLERANCE_FRACTION * width)
    tol_y = max(OUTSIDE_TOLERANCE_PX, OUTSIDE_TOLERANCE_FRACTION * height)
    image = f"{int(width)}x{int(height)} image"
    kept: list[np.ndarray] = []
    kept_ids: list[int | str | None] = []
    for box, as_written, ann_id, is_clean in zip(boxes, written, annotation_ids, clean):
        if is_clean:
            kept.append(box)
            kept_ids.append(ann_id)
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        text = describe_box(as_written, box_format)

        def fail(kind: str, detail: str, repairable: bool = False) -> bool:
            """Apply the policy to a structural error; True when the box is to be clipped."""
            if policy == "raise":
                raise DataError(
                    f"{detail} (set on_bad_annotation='skip' or 'clip' to drop or repair such boxes)",
                    file=ref.file, image_id=ref.image_id, annotation_id=ann_id,
                )
            action = "clipped" if (policy == "clip" and repairable) else "skipped"
            log.add(Problem(kind, action, detail, ref.file, ref.image_id, ann_id))
            return action == "clipped"

        if not all(np.isfinite((x1, y1, x2, y2))):
            fail("non_finite", f"{text} has non-finite coordinates")
            continue
        if x2 <= x1 or y2 <= y1:
            if (box_format != "xywh" and (x2 < x1 or y2 < y1) and 0 < x2 and 0 < y2
                    and x1 + x2 <= width and y1 + y2 <= height):
                fail(
                    "looks_like_xywh",
                    f"{text} has {_REVERSED[box_format]}, but read as (x, y, w, h) it lies inside "
                    f"the {image}: it looks like (x, y, w, h); expected {_LAYOUTS[box_format][1]}",
                )
            else:
                fail("empty_box", f"{text} is empty; expected {_NOT_EMPTY[box_format]}")
            continue
        if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
            fail("outside_image", f"{text} lies entirely outside the {image}")
            continue
        overshoot_x = max(-x1, x2 - width, 0.0)
        overshoot_y = max(-y1, y2 - height, 0.0)
        if overshoot_x > 0 or overshoot_y > 0:
            detail = f"{text} extends outside the {image}"
            if overshoot_x <= tol_x and overshoot_y <= tol_y:
                log.add(Problem("slightly_outside", "clipped", detail, ref.file, ref.image_id, ann_id))
            elif not fail("outside_image", detail + " by more than the tolerance", repairable=True):
                continue
            x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
            y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        kept.append(np.array((x1, y1, x2, y2)))
        kept_ids.append(ann_id)
    out = np.stack(kept).astype(np.float32) if kept else np.zeros((0, 4), np.float32)
    return out, kept_ids
