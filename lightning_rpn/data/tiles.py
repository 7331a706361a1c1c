"""Tiled training: random windows drawn from large images, an epoch being a number of windows.

Shapes: ``H x W`` a source image, ``h x w`` a window (``h = min(size, H)``), ``G`` boxes of the
source image, ``K`` boxes kept in a window.

Four aerial orthophotos give four items an epoch when a data module iterates files; training
wants many random crops of them instead. :class:`TiledDataset` wraps any dataset of this
package (COCO, VOC, synthetic shapes, dense scenes): its item ``epoch * per_epoch + i`` is
window ``i`` of ``epoch``, drawn from ``(seed, epoch, i)`` alone, so the same window comes out
in any worker, process or run. :class:`~lightning_rpn.data.window_sampler.WindowSampler` hands
the DataLoader the ``per_epoch`` indices of the epoch Lightning gives it. The index is the
item's ``dataset_index``, hence its anchor-sampling key in the workers and in the model alike.

A window is drawn in three steps: an image, chosen with probability proportional to its area
(``weighting="area"``), its box count (``"boxes"``) or uniformly; a position, which with
probability ``box_probability`` is one whose window holds a randomly chosen box of the image
whole (where the box fits), and otherwise is uniform; with ``overlap`` set, positions are the
sliding-window grid of stride ``size - overlap`` (the windows :mod:`lightning_rpn.core.windows`
predicts on), else any pixel offset. An image smaller than the window is one window. The draw
needs each image's size (and its box count): from the annotation, else, for a file-backed
dataset, from the file's header (no decode), else from the image itself.

Boxes are clipped to the window; a box cut so that less than ``min_visibility`` of its area
stays inside is dropped and counted in ``removed_boxes`` (the data report); boxes wholly outside
the window are not counted (they belong to other windows). A box so much larger than the window
that no window keeps ``min_visibility`` of it is never trained: the image's first window says so
in its ``problems`` (kind ``box_larger_than_window``, warned once by the data report), naming the
image and the window size that would hold those boxes. Decoded source images are kept per
process in an LRU cache bounded by ``cache_mb`` (:mod:`~lightning_rpn.data.image_cache`), plus
the image last cut (an image larger than the budget is decoded once per window).

Windowed reads (``window_reads``): an image of a file-backed dataset (COCO, VOC) whose file
stores its pixels uncompressed row by row (``.npy``, uncompressed TIFF, PPM / PGM, BMP: see
:func:`~lightning_rpn.data.image_io.raster_layout`) can be read by window from a memory map
instead, touching only the window's rows: ``"auto"`` does so for images larger than
``cache_mb`` (which the cache could not keep), ``"always"`` for every such image, ``"never"``
not at all. It needs the annotation to give the image's size, and the file's header to agree
(otherwise the image is decoded whole, and checked, as always). A window comes out the same
either way: pixels, boxes, ids and counts.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_rpn.core.config import SettingError
from lightning_rpn.core.windows import clip_to_window, config_from_mapping, window_key, window_starts
from lightning_rpn.data.annotated import AnnotatedDataset, ImageRecord, boxes_at_size
from lightning_rpn.data.image_cache import ImageCache
from lightning_rpn.data.image_io import RasterLayout, raster_layout, read_image_size
from lightning_rpn.data.problems import DataError, Problem, ProblemLog
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.window_fit import boxes_no_window_keeps, untrainable_boxes_problem
from lightning_rpn.data.window_sampler import WindowSampler

__all__ = [
    "TileConfig", "TiledDataset", "WindowSampler", "ImageCache", "cut_window", "boxes_no_window_keeps",
    "untrainable_boxes_problem",
]

TileWeighting = Literal["area", "uniform", "boxes"]
_WEIGHTINGS = ("area", "uniform", "boxes")
WindowReads = Literal["auto", "always", "never"]
_WINDOW_READS = ("auto", "always", "never")


@dataclass(frozen=True)
class TileConfig:
    """The ``tiles`` option of :class:`~lightning_rpn.training.datamodule.RPNDataModule` (see the module docstring).

    Args:
        size: window side in pixels.
        per_epoch: windows in one training epoch.
        overlap: ``None``: windows at any pixel offset; pixels (``0 <= overlap < size``):
            windows on the sliding-window grid of stride ``size - overlap``.
        weighting: how often an image is drawn: by ``"area"``, by ``"boxes"`` (box count) or
            ``"uniform"``.
        box_probability: chance that a window is placed to hold a chosen box whole.
        cache_mb: decoded images kept per worker process (LRU, megabytes).
        window_reads: read windows from a memory map of files that allow it: ``"auto"`` for
            images larger than ``cache_mb``, ``"always"`` or ``"never"``.
    """

    size: int
    per_epoch: int
    overlap: int | None = None
    weighting: TileWeighting = "area"
    box_probability: float = 0.5
    cache_mb: float = 1024.0
    window_reads: WindowReads = "auto"

    def __post_init__(self) -> None:
        where = "data.tiles"
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 16:
            raise SettingError(f"{where}.size={self.size!r} must be an int >= 16 (window side, pixels)")
        if isinstance(self.per_epoch, bool) or not isinstance(self.per_epoch, int) or self.per_epoch < 1:
            raise SettingError(f"{where}.per_epoch={self.per_epoch!r} must be a positive int (windows per epoch)")
        if self.overlap is not None and (
            isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap < self.size
        ):
            raise SettingError(f"{where}.overlap={self.overlap!r} must be null or an int in [0, size={self.size}) "
                             "(pixels shared by neighbouring grid windows)")
        if self.weighting not in _WEIGHTINGS:
            raise SettingError(f"{where}.weighting={self.weighting!r} is not one of {', '.join(_WEIGHTINGS)}")
        if not 0.0 <= float(self.box_probability) <= 1.0:
            raise SettingError(f"{where}.box_probability={self.box_probability!r} must be in [0, 1]")
        if not float(self.cache_mb) >= 0.0:
            raise SettingError(f"{where}.cache_mb={self.cache_mb!r} must be >= 0 (megabytes per worker)")
        if self.window_reads not in _WINDOW_READS:
            raise SettingError(f"{where}.window_reads={self.window_reads!r} is not one of {', '.join(_WINDOW_READS)}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | TileConfig) -> TileConfig:
        """A config from the YAML mapping ``data.tiles`` (unknown or missing keys are named)."""
        return config_from_mapping(cls, options, "data.tiles", "{size: 512, per_epoch: 1000}", ("size", "per_epoch"))


def cut_window(
    sample: DetectionSample, window: tuple[int, int, int, int], min_visibility: float
) -> DetectionSample:
    """``sample`` cropped to ``window = (x0, y0, x1, y1)``, boxes in window pixels.

    Boxes keeping less than ``min_visibility`` of their area (and any positive area) are
    dropped and added to ``removed_boxes``; boxes wholly outside are left out uncounted;
    crowd boxes are kept wherever they reach into the window. The rule is
    :func:`~lightning_rpn.core.windows.clip_to_window`, which sliding-window losses apply too.
    """
    x0, y0, x1, y1 = window
    boxes, inside, keep = (t.numpy() for t in clip_to_window(torch.from_numpy(sample.boxes), window, min_visibility))
    crowd, crowd_inside, _ = (t.numpy() for t in clip_to_window(torch.from_numpy(sample.crowd_boxes), window, 0.0))
    return replace(
        sample,
        image=np.array(sample.image[y0:y1, x0:x1], order="C"),  # a copy: keeps no source image or file map
        boxes=boxes[keep],
        crowd_boxes=crowd[crowd_inside],
        image_id=window_key(sample.image_id, window),
        source=f"{sample.source} window (x0, y0, x1, y1) = ({x0}, {y0}, {x1}, {y1})",
        original_size=(y1 - y0, x1 - x0),
        removed_boxes=sample.removed_boxes + int((inside & ~keep).sum()),
        problems=list(sample.problems),
    )


class TiledDataset(Dataset):
    """Random windows of the images of ``dataset`` (see the module docstring).

    Item ``epoch * config.per_epoch + i`` is window ``i`` of ``epoch``; ``len()`` is
    ``per_epoch``. ``min_visibility`` is the data module's; ``seed`` and ``split`` make the draws.
    """

    def __init__(
        self, dataset: Dataset, config: TileConfig, min_visibility: float = 0.0, seed: int = 0, split: str = "train"
    ) -> None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"data.tiles: split {split!r} has no images to draw windows from")
        self.dataset = dataset
        self.config = config
        self.min_visibility = min_visibility
        self.seed = seed
        self.split = split
        self._split_key = zlib.crc32(f"tiles:{split}".encode("utf-8"))
        self._cache: ImageCache | None = None
        self._cache_pid: int | None = None
        self._weights: np.ndarray | None = None
        self._problems_sent: set[int] = set()
        self._last: tuple[int, DetectionSample] | None = None
        self._rasters: dict[int, tuple[ImageRecord, RasterLayout] | None] = {}
        self._described: dict[int, tuple[tuple[int, int], int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_cache_pid"], state["_problems_sent"], state["_last"] = None, None, set(), None
        state["_rasters"] = {}
        return state

    def __len__(self) -> int:
        return self.config.per_epoch

    @property
    def problems(self) -> Any:
        """The wrapped dataset's annotation problems (``None`` when it keeps none), reported at setup."""
        return getattr(self.dataset, "problems", None)

    # ---- images ---------------------------------------------------------------------------
    def _image(self, index: int) -> DetectionSample:
        """Image ``index`` of the wrapped dataset, through this process's cache."""
        if self._cache is None or self._cache_pid != os.getpid():
            self._cache = ImageCache(int(self.config.cache_mb * 2**20))
            self._cache_pid, self._problems_sent, self._last = os.getpid(), set(), None
        sample = self._cache.get(index)
        if sample is None and self._last is not None and self._last[0] == index:
            sample = self._last[1]
        if sample is None:
            sample = self.dataset[index]
            self._cache.put(index, sample)
        self._last = (index, sample)  # an image over the budget is still decoded once per window
        return sample

    def _raster(self, index: int) -> tuple[ImageRecord, RasterLayout] | None:
        """``(record, layout)`` when image ``index`` is read by window (see the module docstring), else ``None``."""
        if index not in self._rasters:
            self._rasters[index] = None
            records = self.dataset.records if isinstance(self.dataset, AnnotatedDataset) else None
            record = None if records is None or self.config.window_reads == "never" else records[index]
            if record is not None and record.checked and record.size is not None and (
                self.config.window_reads == "always"
                or record.size[0] * record.size[1] * 3 > self.config.cache_mb * 2**20
            ):
                layout = raster_layout(record.file)
                if layout is not None and (layout.height, layout.width) == record.size:
                    self._rasters[index] = (record, layout)
        return self._rasters[index]

    def _boxes(self, index: int) -> np.ndarray:
        """The gt boxes of image ``index`` (from the annotation when it is read by window)."""
        raster = self._raster(index)
        return self._image(index).boxes if raster is None else raster[0].boxes

    def _describe(self, index: int) -> tuple[tuple[int, int], int]:
        """``((H, W), G)`` of image ``index`` (see the module docstring), found once per process."""
        if index not in self._described:
            self._described[index] = self._read_description(index)
        return self._described[index]

    def _read_description(self, index: int) -> tuple[tuple[int, int], int]:
        """``((H, W), G)`` from the annotation, else the file's header, else the image."""
        records = getattr(self.dataset, "records", None)
        if records is not None and records[index].size is not None and records[index].checked:
            return records[index].size, len(records[index].boxes)
        side = getattr(self.dataset, "size", None)  # DenseScenes: every scene is size x size
        if isinstance(side, int) and self.config.weighting != "boxes":
            return (side, side), 1
        described = self._header_description(index) if isinstance(self.dataset, AnnotatedDataset) else None
        if described is not None:
            return described
        sample = self._image(index)
        return sample.image_size, len(sample.boxes)

    def _header_description(self, index: int) -> tuple[tuple[int, int], int] | None:
        """``((H, W), G)`` of an annotated image whose annotation gives no size: the size from its
        file's header, its boxes checked against that size as decoding it would (the dataset's
        ``on_bad_annotation``, problems left to the decode); ``None`` when the header cannot be
        read (the decode then applies ``on_bad_annotation`` to the file)."""
        dataset: AnnotatedDataset = self.dataset  # type: ignore[assignment]
        record = dataset.records[index]
        try:
            size = read_image_size(record.file, image_id=record.image_id)
        except DataError:
            return None
        boxes, _ = boxes_at_size(record, size, dataset.on_bad_annotation, ProblemLog(), dataset.box_format)
        return size, len(boxes)

    def image_weights(self) -> np.ndarray:
        """Probability of each image being drawn (``weighting``), computed once per process."""
        if self._weights is None:
            count = len(self.dataset)  # type: ignore[arg-type]
            if self.config.weighting == "uniform":
                weights = np.ones(count)
            else:
                described = [self._describe(i) for i in range(count)]
                if self.config.weighting == "area":
                    weights = np.array([float(h * w) for (h, w), _ in described])
                else:
                    weights = np.array([float(g) for _, g in described])
                    if weights.sum() == 0:
                        raise ValueError(f"data.tiles.weighting='boxes': split {self.split!r} has no boxes")
            self._weights = weights / weights.sum()
        return self._weights

    # ---- windows --------------------------------------------------------------------------
    def _position(self, rng: np.random.Generator, length: int, box: tuple[float, float] | None) -> int:
        """A window start along one axis of ``length`` px (holding ``box = (low, high)`` when it fits)."""
        size = min(self.config.size, length)
        if self.config.overlap is not None:
            starts = np.asarray(window_starts(length, self.config.size, self.config.overlap))
            if box is not None:
                holding = starts[(starts <= box[0]) & (starts + size >= box[1])]
                centre = 0.5 * (box[0] + box[1])
                starts = holding if len(holding) else starts[(starts <= centre) & (starts + size >= centre)]
            return int(rng.choice(starts))
        low, high = 0, length - size
        if box is not None:
            if box[1] - box[0] <= size:
                low, high = max(low, int(np.ceil(box[1])) - size), min(high, int(np.floor(box[0])))
            else:  # a box longer than the window: a window inside it
                low, high = max(low, int(box[0])), min(high, int(np.ceil(box[1])) - size)
            low, high = min(low, high), max(low, high)
        return int(rng.integers(low, high + 1))

    def window(self, index: int) -> tuple[int, tuple[int, int, int, int]]:
        """``(image index, (x0, y0, x1, y1))`` of item ``index``, from ``(seed, epoch, i)`` only."""
        epoch, i = divmod(int(index), self.config.per_epoch)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self._split_key, epoch, i])
        weights = self.image_weights()
        image = int(rng.choice(len(weights), p=weights))
        (height, width), count = self._describe(image)
        box = None
        if count and rng.random() < self.config.box_probability:
            boxes = self._boxes(image)
            if len(boxes):
                box = boxes[int(rng.integers(len(boxes)))]
        x0 = self._position(rng, width, None if box is None else (float(box[0]), float(box[2])))
        y0 = self._position(rng, height, None if box is None else (float(box[1]), float(box[3])))
        return image, (x0, y0, min(x0 + self.config.size, width), min(y0 + self.config.size, height))

    def __getitem__(self, index: int) -> DetectionSample:
        if index < 0:
            raise IndexError(f"TiledDataset: index {index} must be >= 0 (epoch * per_epoch + window)")
        image, (x0, y0, x1, y1) = self.window(index)
        raster = self._raster(image)
        if raster is None:
            sample = self._image(image)
        else:  # what the dataset would return, with the file mapped instead of decoded
            record, layout = raster
            sample = DetectionSample(image=layout.pixels(), boxes=record.boxes, image_id=record.image_id,
                                     source=str(record.file), crowd_boxes=record.crowd_boxes,
                                     original_size=record.size)
        height, width = sample.image_size  # the decoded size rules where an annotation said otherwise
        x0, y0 = min(x0, max(0, width - self.config.size)), min(y0, max(0, height - self.config.size))
        window = (x0, y0, min(x0 + self.config.size, width), min(y0 + self.config.size, height))
        # an image's load problems travel with its first window in this process: counted once
        problems = [] if image in self._problems_sent else sample.problems + self._untrainable_boxes(sample)
        self._problems_sent.add(image)
        return cut_window(replace(sample, problems=problems), window, self.min_visibility)

    def _untrainable_boxes(self, sample: DetectionSample) -> list[Problem]:
        """The problem of the boxes of ``sample`` that no window keeps, if any (:func:`untrainable_boxes_problem`)."""
        problem = untrainable_boxes_problem(sample.boxes, sample.image_size, self.config.size, self.min_visibility,
                                            sample.source, sample.image_id)
        return [] if problem is None else [problem]
