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
by the next readable image and the skip is recorded in the item's ``problems`` (counted and
reported like every other problem). A size mismatch found while loading raises under
``raise`` and otherwise re-checks the boxes against the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, TypeVar

import numpy as np
from rich.progress import track
from torch.utils.data import Dataset

from lightning_rpn.data.image_io import exif_turns_image, load_rgb_image, verify_image
from lightning_rpn.data.problems import (
    AnnotationRef,
    BadAnnotationPolicy,
    BoxFormat,
    DataError,
    Problem,
    ProblemLog,
    check_policy,
    sanitize_boxes,
    to_xyxy,
)
from lightning_rpn.data.sample import DetectionSample, empty_boxes

__all__ = ["ImageRecord", "AnnotatedDataset", "boxes_at_size", "size_mismatch_detail", "unreadable_image_problem"]

T = TypeVar("T")

PROGRESS_MIN_ITEMS = 2000
"""Loops over at least this many images or annotations show a progress bar."""


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
        for record in self._progress(self.records, f"Checking {type(self).__name__} boxes"):
            self._set_boxes(record, record.size, self.problems)
        if self.verify_images:
            self.records = [r for r in self._progress(self.records, "Verifying images") if self._verify(r)]

    def _progress(self, items: list[T], description: str) -> Iterable[T]:
        """``items`` with a transient rich progress bar when there are many."""
        return track(items, description=description, disable=len(items) < PROGRESS_MIN_ITEMS, transient=True)

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
            log.add(Problem("size_mismatch", "clipped",
                            size_mismatch_detail(record, size) + "; boxes re-checked against the file",
                            record.annotation_file, record.image_id))
        self._set_boxes(record, size, log)

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
        if self.on_bad_annotation == "skip" and record.size is not None and record.size != size:
            self.problems.add(Problem("size_mismatch", "skipped", size_mismatch_detail(record, size),
                                      record.annotation_file, record.image_id))
            return False
        self._apply_size(record, size, self.problems)
        return True

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int, skipped: list[Problem]) -> tuple[ImageRecord, np.ndarray]:
        """Image ``index``, else (``skip`` / ``clip``) the next readable one, its skip added to ``skipped``.

        Only the requested image's failure is recorded: a replacement candidate that fails is
        recorded when its own index is loaded, so each unreadable image counts once per epoch.
        """
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                return record, load_rgb_image(record.file, image_id=record.image_id)
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
        raise DataError(f"none of the {len(self.records)} images can be read ({skipped[0].detail})",
                        file=self.records[index].annotation_file)

    def __getitem__(self, index: int) -> DetectionSample:
        skipped: list[Problem] = []
        record, image = self._load(index, skipped)
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
        )
