"""The gt boxes of a dataset as the training pipeline sees them: after the evaluation resize.

Shapes: ``G`` ground-truth boxes (all images).

For ``analyze-anchors`` (:mod:`lightning_rpn.tools.anchor_analysis`): file-backed datasets
(COCO, VOC) are read from their annotations (image headers only when an annotation has no
size), other datasets are iterated; the boxes and each box's padded image size go into a
:class:`~lightning_rpn.core.coverage.GTBoxSet`, which the coverage reads. The package's
:class:`~lightning_rpn.data.transforms.TransformedDataset` is looked through (no augmentation)
and a ``torch.utils.data.Subset`` keeps to its own items; any other wrapper is iterated as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import Dataset, Subset

from lightning_rpn.core.coverage import GTBoxSet
from lightning_rpn.data.annotated import AnnotatedDataset
from lightning_rpn.data.image_io import read_image_size
from lightning_rpn.data.transforms import ResizePolicy, TransformedDataset

__all__ = ["collect_gt_boxes"]


def _items(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset to read and the indices into it of ``dataset``'s items, in order.

    Looks through :class:`TransformedDataset` (its augmentations would change the boxes) and
    ``Subset`` (its indices map into its dataset), so that a subset of a COCO set is still read
    from the annotations; stops at any other dataset, whose items are its own.
    """
    indices = list(range(len(dataset)))  # type: ignore[arg-type]
    while isinstance(dataset, (TransformedDataset, Subset)):
        if isinstance(dataset, Subset):
            indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _image_boxes(dataset: Dataset, progress: bool, description: str, max_images: int | None):
    """``(original (h, w), boxes [G_i, 4])`` per image: annotations plus headers when possible."""
    inner, indices = _items(dataset)
    if max_images is not None:
        indices = indices[:max_images]
    steps = track(indices, description=description, disable=not progress, transient=True)
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
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"collect_gt_boxes: max_images must be a positive int or None (all), got {max_images!r}")
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
