"""Bad annotations: the policy that handles them, the record of what was done, the box checks.

Every box that a dataset clips or skips is recorded as a :class:`Problem` naming the file, the
image id and the annotation id, so nothing is ever dropped silently. Structural errors (NaN or
infinite coordinates, empty boxes, boxes that look like ``(x, y, w, h)``, boxes far outside the
image, image sizes that disagree with the annotation, unknown image ids) raise by default;
``on_bad_annotation="skip"`` drops the offending box or image instead, and ``"clip"`` clips
what clipping can repair and skips the rest. Boxes only slightly outside the image (by at most
:data:`OUTSIDE_TOLERANCE_PX` or :data:`OUTSIDE_TOLERANCE_FRACTION` of the image side) are
clipped under every policy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

__all__ = [
    "BadAnnotationPolicy",
    "BAD_ANNOTATION_POLICIES",
    "OUTSIDE_TOLERANCE_PX",
    "OUTSIDE_TOLERANCE_FRACTION",
    "DataError",
    "UnsafePathError",
    "Problem",
    "ProblemLog",
    "AnnotationRef",
    "check_policy",
    "sanitize_boxes",
]

BadAnnotationPolicy = Literal["raise", "skip", "clip"]
BAD_ANNOTATION_POLICIES: tuple[str, ...] = ("raise", "skip", "clip")

OUTSIDE_TOLERANCE_PX = 2.0
"""A box may overshoot the image by this many pixels and still count as 'slightly outside'."""
OUTSIDE_TOLERANCE_FRACTION = 0.02
"""... or by this fraction of the image side, whichever is larger."""


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
        self.file = file
        self.image_id = image_id
        self.annotation_id = annotation_id


class UnsafePathError(DataError):
    """An image path that is absolute or climbs out of its root: always an error, whatever the policy."""


def _describe(file: str | None, image_id: int | str | None, annotation_id: int | str | None) -> str:
    parts = []
    if file is not None:
        parts.append(str(file))
    if image_id is not None:
        parts.append(f"image {image_id!r}")
    if annotation_id is not None:
        parts.append(f"annotation {annotation_id!r}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Problem:
    """One handled problem: what was wrong (``kind``), what was done (``action``), and where."""

    kind: str
    action: Literal["clipped", "skipped", "converted"]
    detail: str
    file: str | None = None
    image_id: int | str | None = None
    annotation_id: int | str | None = None

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

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def summary(self, max_listed: int = 10) -> str:
        """Counts per kind and action, then the first ``max_listed`` problems in full."""
        if not self.problems:
            return "no problems"
        lines = [f"{n} x {kind} ({action})" for (kind, action), n in sorted(self.counts().items())]
        lines += [f"  {p}" for p in self.problems[:max_listed]]
        if len(self.problems) > max_listed:
            lines.append(f"  ... and {len(self.problems) - max_listed} more")
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


def sanitize_boxes(
    boxes: np.ndarray,
    annotation_ids: Sequence[int | str | None],
    image_size: tuple[int, int],
    policy: BadAnnotationPolicy,
    ref: AnnotationRef,
    log: ProblemLog,
    detect_xywh: bool = True,
) -> tuple[np.ndarray, list[int | str | None]]:
    """Check xyxy ``boxes [G, 4]`` against an image of size ``(h, w)`` and apply ``policy``.

    ``detect_xywh`` names boxes that look like ``(x, y, w, h)`` as such (for sources that
    store xyxy). Returns the kept (possibly clipped) boxes as float32 ``[G', 4]`` and their annotation ids.
    Raises :class:`DataError` for a structural error under ``policy="raise"``; records every
    clip and skip in ``log``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = float(image_size[0]), float(image_size[1])
    tol_x = max(OUTSIDE_TOLERANCE_PX, OUTSIDE_TOLERANCE_FRACTION * width)
    tol_y = max(OUTSIDE_TOLERANCE_PX, OUTSIDE_TOLERANCE_FRACTION * height)
    kept: list[np.ndarray] = []
    kept_ids: list[int | str | None] = []
    for box, ann_id in zip(boxes, annotation_ids):
        x1, y1, x2, y2 = (float(v) for v in box)
        coords = f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}]"

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
            fail("non_finite", f"box {coords} has non-finite coordinates")
            continue
        if x2 <= x1 or y2 <= y1:
            if detect_xywh and (x2 < x1 or y2 < y1) and 0 < x2 and 0 < y2 and x1 + x2 <= width and y1 + y2 <= height:
                fail(
                    "looks_like_xywh",
                    f"box {coords} has x2 < x1 or y2 < y1 but x1 + x2 and y1 + y2 lie inside the "
                    f"{int(width)}x{int(height)} image: it looks like (x, y, w, h); "
                    "expected (x1, y1, x2, y2)",
                )
            else:
                fail("empty_box", f"box {coords} is empty; expected x2 > x1 and y2 > y1")
            continue
        if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
            fail("outside_image", f"box {coords} lies entirely outside the {int(width)}x{int(height)} image")
            continue
        overshoot_x = max(-x1, x2 - width, 0.0)
        overshoot_y = max(-y1, y2 - height, 0.0)
        if overshoot_x > 0 or overshoot_y > 0:
            detail = f"box {coords} extends outside the {int(width)}x{int(height)} image"
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
