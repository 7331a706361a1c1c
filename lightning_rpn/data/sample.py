"""One dataset item: an image and its boxes, as every dataset of the package returns it.

Shapes: ``H x W`` image, ``G`` ground-truth boxes, ``C`` crowd boxes. Boxes are
``(x1, y1, x2, y2)`` float32 in pixels of ``image``; crowd boxes (COCO ``iscrowd``) are kept
apart: they are neither positives nor negatives for anchor matching and do not count for recall.
A source that annotates each object's area (COCO's ``area``) gives the ground-truth boxes their
``annotation_areas`` (float32 ``[G]``, in pixels of the image as stored), which sort them into the
recall's area ranges as COCOeval does; without them the box area sorts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lightning_rpn.data.problems import Problem

__all__ = ["DetectionSample", "empty_boxes"]


def empty_boxes() -> np.ndarray:
    """A float32 ``[0, 4]`` array."""
    return np.zeros((0, 4), dtype=np.float32)


@dataclass
class DetectionSample:
    """An image (``H x W x 3`` uint8 RGB) with its boxes and where it came from.

    ``original_size`` is the ``(h, w)`` of the image as stored, before any transform;
    ``removed_boxes`` counts ground-truth boxes that transforms removed (e.g. cropped away);
    ``problems`` lists what was clipped or skipped while loading this item;
    ``dataset_index`` is the item's index in the dataset it came from (set by
    :class:`~lightning_rpn.data.transforms.TransformedDataset`; in training, the draw's
    ``epoch * n + j``, :mod:`~lightning_rpn.data.draws`): with the seed and the epoch it seeds the
    item's anchor sampling, so an image listed twice in a split draws two samples;
    ``stand_in`` says the item is another image standing in for one that could not be used
    (unreadable, or skipped for its size under ``on_bad_annotation='skip'``): training uses it,
    so that batches stay full, and evaluation leaves it out, so that no image counts twice;
    ``annotation_areas`` (``None``: the source gives none) is each ground-truth box's annotated
    area, row for row with ``boxes``, given by :meth:`set_annotation_areas`. It is no constructor
    argument, so ``dataclasses.replace`` leaves it out: code that changes the boxes without
    knowing of it cannot pair areas with other boxes (evaluation then sorts by the box area);
    code that knows (the transforms) sets the kept boxes' areas again.
    """

    image: np.ndarray
    boxes: np.ndarray
    image_id: int | str
    source: str
    crowd_boxes: np.ndarray = field(default_factory=empty_boxes)
    original_size: tuple[int, int] | None = None
    removed_boxes: int = 0
    problems: list[Problem] = field(default_factory=list)
    dataset_index: int | None = None
    stand_in: bool = False
    annotation_areas: np.ndarray | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"{self.source}, image {self.image_id!r}: expected an H x W x 3 uint8 image, "
                f"got shape {self.image.shape} dtype {self.image.dtype}"
            )
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.crowd_boxes = np.asarray(self.crowd_boxes, dtype=np.float32).reshape(-1, 4)
        if self.original_size is None:
            self.original_size = self.image_size

    def set_annotation_areas(self, areas: np.ndarray | None) -> None:
        """Give the ground-truth boxes their annotated areas (``[G]``, in the boxes' order), or none."""
        if areas is None:
            self.annotation_areas = None
            return
        areas = np.asarray(areas, dtype=np.float32).reshape(-1)
        if len(areas) != len(self.boxes):
            raise ValueError(
                f"{self.source}, image {self.image_id!r}: {len(areas)} annotation areas for {len(self.boxes)} "
                "boxes; give one per box, in the boxes' order"
            )
        self.annotation_areas = areas

    @property
    def image_size(self) -> tuple[int, int]:
        """``(h, w)`` of the image as it is now."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def sampling_key(self) -> int | str:
        """What seeds this item's anchor sampling (with seed and epoch): its dataset index, else its id."""
        return self.image_id if self.dataset_index is None else self.dataset_index
