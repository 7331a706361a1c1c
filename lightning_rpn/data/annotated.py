"""The shared base of file-backed datasets (COCO, VOC): parsed records, lazy image loading.

A subclass parses its annotation format into :class:`ImageRecord` s (boxes already converted
to xyxy pixels and checked against the annotated image size); this base loads the image on
``__getitem__``, converts it to 8-bit RGB, and checks the decoded size against the annotation.
With ``verify_images=True`` every image header is read at construction (with a progress bar),
so that missing, corrupt and mis-sized images are found, and handled by the policy, up front
(``skip`` drops such images, ``clip`` keeps a mis-sized image and clips its boxes to the file).
Without it, a missing or corrupt file raises when loaded, and a size mismatch found while
loading raises under ``raise`` and otherwise re-checks the boxes against the file (recorded
in the item's ``problems``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, TypeVar

import numpy as np
from rich.progress import track
from torch.utils.data import Dataset

from lightning_rpn.data.image_io import load_rgb_image, read_image_size
from lightning_rpn.data.problems import (
    AnnotationRef,
    BadAnnotationPolicy,
    DataError,
    Problem,
    ProblemLog,
    check_policy,
    sanitize_boxes,
)
from lightning_rpn.data.sample import DetectionSample, empty_boxes

__all__ = ["ImageRecord", "AnnotatedDataset"]

T = TypeVar("T")

PROGRESS_MIN_ITEMS = 2000
"""Loops over at least this many images or annotations show a progress bar."""


@dataclass
class ImageRecord:
    """One image of an annotated dataset: file, annotated size and checked xyxy boxes.

    ``size`` is the ``(h, w)`` the annotation declares (``None`` when it declares none: boxes
    are then checked once the image is decoded). ``raw_*`` keep the unchecked boxes for that case.
    """

    image_id: int | str
    file: Path
    annotation_file: str
    size: tuple[int, int] | None
    boxes: np.ndarray = field(default_factory=empty_boxes)
    annotation_ids: list[int | str | None] = field(default_factory=list)
    crowd_boxes: np.ndarray = field(default_factory=empty_boxes)
    crowd_annotation_ids: list[int | str | None] = field(default_factory=list)
    checked: bool = True


class AnnotatedDataset(Dataset):
    """A map-style dataset of :class:`ImageRecord` s returning :class:`DetectionSample` s."""

    stores_xyxy: bool = True
    """Whether the source format stores xyxy (boxes that look like xywh are then named so)."""

    def __init__(self, on_bad_annotation: BadAnnotationPolicy = "raise", verify_images: bool = False) -> None:
        check_policy(on_bad_annotation, type(self).__name__)
        self.on_bad_annotation: BadAnnotationPolicy = on_bad_annotation
        self.verify_images = verify_images
        self.records: list[ImageRecord] = []
        self.problems = ProblemLog()

    def _finish(self) -> None:
        """Subclasses call this after filling ``records``: optional header verification."""
        if self.verify_images:
            self.records = [r for r in self._progress(self.records, "Verifying images") if self._verify(r)]

    def _progress(self, items: list[T], description: str) -> Iterable[T]:
        """``items`` with a transient rich progress bar when there are many."""
        return track(items, description=description, disable=len(items) < PROGRESS_MIN_ITEMS, transient=True)

    def _check_boxes(
        self, boxes: np.ndarray, ids: list, size: tuple[int, int], ref: AnnotationRef, log: ProblemLog
    ) -> tuple[np.ndarray, list]:
        return sanitize_boxes(boxes, ids, size, self.on_bad_annotation, ref, log, self.stores_xyxy)

    def _apply_size(self, record: ImageRecord, size: tuple[int, int], log: ProblemLog) -> None:
        """Check ``record`` 's boxes against the real image ``size``; a mismatch follows the policy."""
        if record.checked and record.size == size:
            return
        if record.checked and record.size is not None:
            detail = (
                f"image file {record.file} is {size[1]}x{size[0]} (w x h) but the annotation "
                f"says {record.size[1]}x{record.size[0]}"
            )
            if self.on_bad_annotation == "raise":
                raise DataError(detail + " (set on_bad_annotation='clip' to trust the file)",
                                file=record.annotation_file, image_id=record.image_id)
            log.add(Problem("size_mismatch", "clipped", detail + "; boxes re-checked against the file",
                            record.annotation_file, record.image_id))
        ref = AnnotationRef(record.annotation_file, record.image_id)
        record.boxes, record.annotation_ids = self._check_boxes(
            record.boxes, record.annotation_ids, size, ref, log)
        record.crowd_boxes, record.crowd_annotation_ids = self._check_boxes(
            record.crowd_boxes, record.crowd_annotation_ids, size, ref, log)
        record.size, record.checked = size, True

    def _verify(self, record: ImageRecord) -> bool:
        """Read the header of ``record`` 's image; False drops the image (policy ``skip``/``clip``)."""
        try:
            size = read_image_size(record.file, image_id=record.image_id)
        except DataError as error:
            if self.on_bad_annotation == "raise":
                raise
            self.problems.add(Problem("unreadable_image", "skipped", str(error), record.annotation_file, record.image_id))
            return False
        if self.on_bad_annotation == "skip" and record.size is not None and record.size != size:
            self.problems.add(Problem(
                "size_mismatch", "skipped",
                f"image file {record.file} is {size[1]}x{size[0]} (w x h) but the annotation says "
                f"{record.size[1]}x{record.size[0]}", record.annotation_file, record.image_id))
            return False
        self._apply_size(record, size, self.problems)
        return True

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DetectionSample:
        record = self.records[index]
        image = load_rgb_image(record.file, image_id=record.image_id)
        size = (int(image.shape[0]), int(image.shape[1]))
        log = ProblemLog()
        if not record.checked or record.size != size:
            record = ImageRecord(**vars(record))
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
