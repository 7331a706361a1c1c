"""The shared base of file-backed datasets (COCO, VOC): parsed records, lazy image loading.

A subclass parses its annotation format into :class:`ImageRecord` s (boxes kept as written,
plus their xyxy pixels checked against the annotated image size); this base loads the image
on ``__getitem__``, converts it to 8-bit RGB, and checks the decoded size against the
annotation. With ``verify_images=True`` every image is decoded at construction (with a
progress bar), so that missing, corrupt, truncated and mis-sized images are found, and handled
by the policy, before training starts (``raise`` stops there, ``skip`` drops such images,
``clip`` keeps a mis-sized image and clips its boxes to the file). Without it, such a file is
found when loaded: under ``raise`` that is an error naming the file and the image (and saying
that ``verify_images`` finds these up front); under ``skip`` / ``clip`` the item is replaced
by the next readable image, marked as a stand-in (``DetectionSample.stand_in``: training uses
it, evaluation leaves it out, so no image is counted twice), and the skip is recorded in the
item's ``problems`` (counted and reported like every other problem). A size mismatch found
while loading raises under ``raise``, skips the image under ``skip`` (as above) and under
``clip`` re-checks the boxes against the file.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
from rich.progress import track
from torch.utils.data import Dataset

from lightning_rpn.data.image_io import exif_turns_image, load_rgb_image, read_image_size, verify_image
from lightning_rpn.data.listed_twice import files_listed_twice
from lightning_rpn.data.problems import (
    AnnotationRef,
    BadAnnotationPolicy,
    BoxFormat,
    DataError,
    Problem,
    ProblemLog,
    as_written,
    check_policy,
    sanitize_boxes,
    to_xyxy,
)
from lightning_rpn.data.sample import DetectionSample, empty_boxes

__all__ = [
    "ImageRecord",
    "AnnotatedDataset",
    "boxes_at_size",
    "gc_paused",
    "size_mismatch_detail",
    "unreadable_image_problem",
]

T = TypeVar("T")

PROGRESS_MIN_ITEMS = 2000
"""Loops over at least this many images or annotations show a progress bar."""


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused, then as it was: while a large annotation file is
    read and its boxes checked, every collection walks all the live dicts and lists (millions for
    COCO train2017: the parsed JSON, the records), though reading makes no reference cycle to
    collect; that was over a third of the time to read such a file. The pause is process-wide:
    other threads' cycles wait for its end."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _written(boxes: list[list[float]]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


@dataclass
class ImageRecord:
    """One image of an annotated dataset: file, annotated size, boxes as written and as checked xyxy.

    ``size`` is the ``(h, w)`` the annotation declares (``None`` when it declares none).
    ``written_boxes`` / ``written_crowd_boxes`` are float64 ``[G, 4]`` as the file writes them
    (in the dataset's ``box_format``), with their ``annotation_ids`` / ``crowd_annotation_ids``.
    ``boxes`` / ``crowd_boxes`` are float32 xyxy pixels: checked against ``size`` when
    ``checked``, else converted only (they are checked once the image is decoded).
    """

    image_id: int | str
    file: Path
    annotation_file: str
    size: tuple[int, int] | None
    written_boxes: np.ndarray = field(default_factory=lambda: _written([]))
    annotation_ids: list[int | str | None] = field(default_factory=list)
    written_crowd_boxes: np.ndarray = field(default_factory=lambda: _written([]))
    crowd_annotation_ids: list[int | str | None] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=empty_boxes)
    crowd_boxes: np.ndarray = field(default_factory=empty_boxes)
    checked: bool = False


def boxes_at_size(
    record: ImageRecord, size: tuple[int, int], policy: BadAnnotationPolicy, log: ProblemLog, box_format: BoxFormat
) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes, crowd_boxes)`` float32 xyxy: ``record`` 's written boxes checked against an image of
    ``size (h, w)`` under ``policy``, their problems added to ``log``."""
    ref = AnnotationRef(record.annotation_file, record.image_id)
    boxes, _ = sanitize_boxes(record.written_boxes, record.annotation_ids, size, policy, ref, log, box_format)
    crowd, _ = sanitize_boxes(record.written_crowd_boxes, record.crowd_annotation_ids, size, policy, ref, log,
                              box_format)
    return boxes, crowd


def _boxes_passing_as_written(
    records: Sequence[ImageRecord], box_format: BoxFormat
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The ``(boxes, crowd_boxes)`` of each record (by index) with an annotated size whose boxes
    all pass :func:`sanitize_boxes` without a problem: what :func:`boxes_at_size` gives it.

    Found with one :func:`sanitize_boxes` per image size instead of two per image (their fixed
    cost was most of the time to check a large COCO file). A record left out (a box with a
    problem, or no size) is checked on its own as before, so that every problem is reported as
    before, in the same order, under the dataset's policy.
    """
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if record.size is not None:
            by_size[record.size].append(index)
    passing: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for size, indexes in by_size.items():
        found = _passing_at_size([records[i] for i in indexes], size, box_format)
        passing.update((indexes[k], boxes) for k, boxes in found.items())
    return passing


def _passing_at_size(
    records: list[ImageRecord], size: tuple[int, int], box_format: BoxFormat
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """:func:`_boxes_passing_as_written` for ``records`` annotated at one ``size``: all their boxes
    checked in one :func:`sanitize_boxes` call under ``skip``, each box's position in the call as
    its annotation id; a record passes when none of its boxes is reported or dropped."""
    groups = [r.written_boxes for r in records] + [r.written_crowd_boxes for r in records]
    ends = np.cumsum([len(group) for group in groups]).tolist()
    starts = [0] + ends[:-1]
    written = np.concatenate(groups)
    reported = ProblemLog()
    checked, kept = sanitize_boxes(written, list(range(len(written))), size, "skip", AnnotationRef("", ""),
                                   reported, box_format)
    is_kept = np.zeros(len(written), dtype=bool)
    is_kept[np.asarray(kept, dtype=np.intp)] = True
    unreported = is_kept.copy()
    unreported[np.asarray([p.annotation_id for p in reported], dtype=np.intp)] = False
    rows_before = np.concatenate(([0], np.cumsum(is_kept))).tolist()  # rows of ``checked`` before a position
    failed_before = np.concatenate(([0], np.cumsum(~unreported))).tolist()
    passing: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(len(records)):
        first, last = starts[k], ends[k]
        crowd_first, crowd_last = starts[len(records) + k], ends[len(records) + k]
        if failed_before[first] == failed_before[last] and failed_before[crowd_first] == failed_before[crowd_last]:
            passing[k] = (checked[rows_before[first]:rows_before[last]],
                          checked[rows_before[crowd_first]:rows_before[crowd_last]])
    return passing


def size_mismatch_detail(record: ImageRecord, size: tuple[int, int], clip_hint: bool = False) -> str:
    """Why the image file's ``size (h, w)`` and ``record`` 's annotated size disagree; with
    ``clip_hint``, how to trust the file instead (not when the file's EXIF orientation explains it)."""
    assert record.size is not None
    detail = (f"image file {record.file} is {size[1]}x{size[0]} (w x h) but the annotation says "
              f"{record.size[1]}x{record.size[0]}")
    if record.size == size[::-1] and exif_turns_image(record.file):
        return detail + (
            ": the file's EXIF orientation turns it by 90 degrees, so it was likely annotated as displayed; "
            "boxes refer to the pixels as stored (EXIF is not applied), so save the image turned "
            "(PIL.ImageOps.exif_transpose) or annotate the stored pixels"
        )
    return detail + (" (set on_bad_annotation='clip' to trust the file)" if clip_hint else "")


def unreadable_image_problem(record: ImageRecord, error: DataError, note: str = "") -> Problem:
    """The skipped-image record of ``error`` (raised reading ``record`` 's image file)."""
    return Problem("unreadable_image", "skipped", f"{record.file}: {error.reason}{note}",
                   record.annotation_file, record.image_id)


def size_mismatch_problem(record: ImageRecord, size: tuple[int, int], action: str, note: str = "") -> Problem:
    """The record of ``record`` 's file being ``size`` (h, w), not its annotated size (``action``:
    ``"skipped"`` or ``"clipped"``)."""
    return Problem("size_mismatch", action, size_mismatch_detail(record, size) + note, record.annotation_file,
                   record.image_id)


class AnnotatedDataset(Dataset):
    """A map-style dataset of :class:`ImageRecord` s returning :class:`DetectionSample` s.

    ``report_unsafe_paths=True`` records image paths that escape their root as skipped
    problems (kind ``unsafe_path``) instead of raising :class:`UnsafePathError` (what
    ``check-data`` uses to list every problem); such files are never opened either way.
    """

    box_format: BoxFormat = "xyxy"
    """How the source format writes boxes (problem messages quote them so)."""

    def __init__(
        self,
        on_bad_annotation: BadAnnotationPolicy = "raise",
        verify_images: bool = False,
        report_unsafe_paths: bool = False,
    ) -> None:
        check_policy(on_bad_annotation, type(self).__name__)
        self.on_bad_annotation: BadAnnotationPolicy = on_bad_annotation
        self.verify_images = verify_images
        self.report_unsafe_paths = report_unsafe_paths
        self.records: list[ImageRecord] = []
        self.problems = ProblemLog()

    def _finish(self) -> None:
        """Subclasses call this after filling ``records``: boxes checked, optional image verification."""
        with gc_paused():
            passing = _boxes_passing_as_written(self.records, self.box_format)
            for index, record in enumerate(self._progress(self.records, f"Checking {type(self).__name__} boxes")):
                if index in passing:
                    record.boxes, record.crowd_boxes = passing[index]
                    record.checked = True
                else:
                    self._check_annotated_boxes(record)
        if self.verify_images:
            self.records = [r for r in self._progress(self.records, "Verifying images") if self._verify(r)]

    def _note_files_listed_twice(self, records: Sequence[ImageRecord], listing: str) -> None:
        """A warning (kind ``file_listed_twice``, naming ``listing``: the file that lists the images)
        for each image file that several ``records`` name, by one path, through symbolic links or
        as hard links: it is kept once per record (as their annotations may differ), so it trains
        twice as often and its boxes count twice in recall."""
        for names in files_listed_twice([record.file for record in records]):
            positions = sorted(k for name in names for k in name)
            ids = [records[k].image_id for k in positions]
            first, *linked = dict.fromkeys(str(records[k].file) for k in names[0])  # each path once
            hard = list(dict.fromkeys(str(records[k].file) for name in names[1:] for k in name))
            also = "".join(f", also as {', '.join(paths)} (the same file, through a {kind} link)"
                           for kind, paths in (("symbolic", linked), ("hard", hard)) if paths)
            self.problems.add(Problem(
                "file_listed_twice", "kept",
                f"{first} is listed under {len(ids)} image ids ({', '.join(map(as_written, ids))}){also}: each "
                "is an image of the split, trained and evaluated (its boxes counted) once per id",
                listing, records[positions[1]].image_id))

    def _progress(self, items: list[T], description: str) -> Iterable[T]:
        """``items`` with a transient rich progress bar when there are many."""
        return track(items, description=description, disable=len(items) < PROGRESS_MIN_ITEMS, transient=True)

    def _check_annotated_boxes(self, record: ImageRecord) -> None:
        """:meth:`_set_boxes` at the annotated size; where a box fails there, the file's header is read.

        A file of another size (an annotation with width and height swapped, or from another
        version of the image) is that size mismatch, under the policy (:meth:`_apply_size`), not
        boxes outside the image: the error names the file and both sizes instead of a box, and
        ``clip`` / ``skip`` do not report boxes as dropped that the file's size keeps.
        """
        if self.on_bad_annotation == "skip":  # the image is skipped for the mismatch (verify or load): as it was
            self._set_boxes(record, record.size, self.problems)
            return
        trial = ProblemLog()
        try:
            self._set_boxes(record, record.size, trial)
        except DataError:
            file_size = self._file_size_if_other(record)
            if file_size is None:
                raise
            self._apply_size(record, file_size, self.problems)
            return
        # only for errors: a box slightly outside (a warning, frequent in COCO) costs no header read
        file_size = self._file_size_if_other(record) if trial.num_errors() else None
        if file_size is not None:
            self._apply_size(record, file_size, self.problems)
        else:
            self.problems.extend(trial)

    @staticmethod
    def _file_size_if_other(record: ImageRecord) -> tuple[int, int] | None:
        """The ``(h, w)`` in ``record`` 's file header when it differs from the annotated size, else
        ``None`` (no annotated size, or a file that cannot be read: reported when it is loaded)."""
        if record.size is None:
            return None
        try:
            size = read_image_size(record.file, image_id=record.image_id)
        except DataError:
            return None
        return size if size != record.size else None

    def _set_boxes(self, record: ImageRecord, size: tuple[int, int] | None, log: ProblemLog) -> None:
        """``record.boxes`` from its written boxes: checked against ``size`` (policy applied), or converted only."""
        if size is None:
            record.boxes = to_xyxy(record.written_boxes, self.box_format).astype(np.float32)
            record.crowd_boxes = to_xyxy(record.written_crowd_boxes, self.box_format).astype(np.float32)
            record.checked = False
            return
        record.boxes, record.crowd_boxes = boxes_at_size(record, size, self.on_bad_annotation, log, self.box_format)
        record.size, record.checked = size, True

    def _apply_size(self, record: ImageRecord, size: tuple[int, int], log: ProblemLog) -> None:
        """Check ``record`` 's boxes against the real image ``size``; a mismatch follows the policy."""
        if record.checked and record.size == size:
            return
        if record.size is not None and record.size != size:
            if self.on_bad_annotation == "raise":
                raise DataError(size_mismatch_detail(record, size, clip_hint=True),
                                file=record.annotation_file, image_id=record.image_id)
            log.add(size_mismatch_problem(record, size, "clipped", "; boxes re-checked against the file"))
        self._set_boxes(record, size, log)

    def _skips_for_size(self, record: ImageRecord, size: tuple[int, int]) -> bool:
        """Whether ``record`` is skipped because its file is ``size``, not its annotated size (``skip``)."""
        return self.on_bad_annotation == "skip" and record.size is not None and record.size != size

    def _verify(self, record: ImageRecord) -> bool:
        """Decode ``record`` 's image; False drops the image (policy ``skip``/``clip``)."""
        try:
            size = verify_image(record.file, image_id=record.image_id)
        except DataError as error:
            if self.on_bad_annotation == "raise":
                raise DataError(f"{error.reason} (found by verify_images; set on_bad_annotation='skip' "
                                "to drop unreadable images)", file=error.file, image_id=record.image_id) from error
            self.problems.add(unreadable_image_problem(record, error))
            return False
        if self._skips_for_size(record, size):
            self.problems.add(size_mismatch_problem(record, size, "skipped"))
            return False
        self._apply_size(record, size, self.problems)
        return True

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int, skipped: list[Problem]) -> tuple[ImageRecord, np.ndarray, bool]:
        """Image ``index``, else (``skip`` / ``clip``) the next usable one, its skip added to ``skipped``;
        the last value says whether the image stands in for image ``index``.

        Unusable: unreadable, or (``skip``) of another size than annotated. Only the requested
        image's failure is recorded: a replacement candidate that fails is recorded when its own
        index is loaded, so each skipped image counts once per epoch.
        """
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                image = load_rgb_image(record.file, image_id=record.image_id)
            except DataError as error:
                if self.on_bad_annotation == "raise":
                    raise DataError(
                        f"{error.reason} (verify_images=True, `data.verify_images: true` in a config, finds "
                        "missing and unreadable images before training starts; on_bad_annotation='skip' "
                        "skips them)",
                        file=error.file, image_id=record.image_id,
                    ) from error
                if offset == 0:
                    skipped.append(unreadable_image_problem(record, error, "; replaced by the next readable image"))
                continue
            size = (int(image.shape[0]), int(image.shape[1]))
            if self._skips_for_size(record, size):
                if offset == 0:
                    skipped.append(size_mismatch_problem(record, size, "skipped", "; replaced by the next usable image"))
                continue
            return record, image, offset > 0
        raise DataError(f"none of the {len(self.records)} images can be used ({skipped[0].detail})",
                        file=self.records[index].annotation_file)

    def __getitem__(self, index: int) -> DetectionSample:
        skipped: list[Problem] = []
        record, image, stand_in = self._load(index, skipped)
        size = (int(image.shape[0]), int(image.shape[1]))
        log = ProblemLog(skipped)
        if not record.checked or record.size != size:
            record = replace(record)
            self._apply_size(record, size, log)
        return DetectionSample(
            image=image,
            boxes=record.boxes,
            image_id=record.image_id,
            source=str(record.file),
            crowd_boxes=record.crowd_boxes,
            original_size=size,
            problems=list(log),
            stand_in=stand_in,
        )
