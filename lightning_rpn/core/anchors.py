"""Anchor boxes on the feature-map grids of one or more levels.

Shapes: ``L`` levels, ``A`` anchors per location, ``H_l x W_l`` the feature size of level l,
``N`` anchors of an image (all levels concatenated).

Every level has a set of *cell anchors* (one per size x aspect ratio, ratio-major, aspect
ratio = h / w) centred on the origin with coordinates rounded to whole pixels, and a grid of
centres ``(offset + j * anchor_stride) * stride``. Anchors are ordered ``(y, x, anchor)`` per
level. With ``offset=0`` and ``anchor_stride=1`` the anchors equal torchvision's
``AnchorGenerator`` output for the same sizes, ratios and strides.

:func:`level_anchors` builds one level's anchors from its feature size with torch ops only, so
that the eager generator (which caches its output per feature shape) and the exported
program (``export.py``, symbolic feature sizes under ``torch.export``) run the same code.
Besides the per-level tensors, the generator returns an :class:`AnchorGrid`: the concatenated
anchors together with the grid layout (cached per feature shape, so that matching, which
caches its spatial index per anchor tensor, reuses it in every batch).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import AnchorConfig

__all__ = ["AnchorGenerator", "AnchorGrid", "GridLevel", "grid_centres", "grid_size", "level_anchors", "padded_size"]

_CACHE_SIZE = 16


@dataclass(frozen=True)
class GridLevel:
    """Layout of one level's anchors inside :attr:`AnchorGrid.anchors`.

    Anchor ``(y, x, a)`` of this level sits at row ``start + (y * width + x) * A + a`` and
    equals ``cell_anchors[a] + (origin + x * step, origin + y * step)`` (both coordinates).
    """

    stride: int
    step: float
    origin: float
    height: int
    width: int
    cell_anchors: Tensor
    start: int

    @property
    def num_anchors(self) -> int:
        return self.height * self.width * self.cell_anchors.shape[0]


@dataclass(frozen=True)
class AnchorGrid:
    """All anchors of an image (``anchors`` float32 ``[N, 4]``) plus their grid layout.

    ``match_anchors`` / ``assign_batch_targets`` accept it in place of ``grid.anchors`` (the
    same result: matching is equally fast for any anchor tensor). Obtain it from
    ``AnchorGenerator.grid`` (the layout must describe the anchors exactly) and treat
    ``anchors`` as read-only: it is shared through the cache.
    """

    anchors: Tensor
    levels: tuple[GridLevel, ...]

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]


def _is_number(value: object) -> bool:
    """A real number (numpy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """Python numbers and lists for numpy / torch values (``np.int64(32)``, ``np.array([32, 64])``,
    a tensor): sizes computed with numpy, e.g. by k-means, are common arguments."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (list, tuple)) else value


def _warn_torchvision_reading(given: object, sizes: tuple[tuple[float, ...], ...]) -> None:
    """Warn when a flat ``sizes`` is as long as the levels: torchvision reads that as one size per
    level, here it puts every size on every level (the nested single tuple says so silently)."""
    levels, flat = len(sizes), _plain(given)
    if not (levels > 1 and isinstance(flat, Sequence) and not isinstance(flat, str) and len(flat) == levels
            and all(_is_number(_plain(size)) for size in flat)):
        return
    listed = ", ".join(f"{size:g}" for size in sizes[0])
    one_each = ", ".join(f"({size:g},)" for size in sizes[0][:2])
    warnings.warn(
        f"AnchorGenerator: the flat sizes ({listed}) (model.anchor_sizes) put all {levels} sizes on each of the "
        f"{levels} levels; torchvision reads a flat tuple as one size per level. For one size per level write "
        f"({one_each}, ...) (YAML [[{sizes[0][0]:g}], [{sizes[0][1]:g}], ...]); to keep every size on every level "
        f"without this warning, nest it once: (({listed}),) (YAML [[{listed}]])",
        UserWarning, stacklevel=3,
    )


def _per_level(name: str, value: object, num_levels: int) -> tuple[tuple[float, ...], ...]:
    """Normalise ``value`` to one tuple of positive numbers per level (broadcasting one tuple)."""
    value = _plain(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = [_plain(v) for v in value]
    if _is_number(value):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise TypeError(f"AnchorGenerator: {name} must be a non-empty tuple (or a tuple per level), got {value!r}")
    if all(_is_number(v) for v in value):
        levels = [tuple(value)] * num_levels
    elif all(isinstance(v, Sequence) and not isinstance(v, str) for v in value):
        if len(value) == 1:
            levels = [tuple(value[0])] * num_levels
        elif len(value) == num_levels:
            levels = [tuple(v) for v in value]
        else:
            raise ValueError(
                f"AnchorGenerator: {name} has {len(value)} levels but strides has {num_levels}; "
                f"give one tuple per level or a single tuple to broadcast"
            )
    else:
        raise TypeError(f"AnchorGenerator: {name} mixes numbers and tuples: {value!r}")
    for level, entries in enumerate(levels):
        if len(entries) == 0:
            raise ValueError(f"AnchorGenerator: {name}[{level}] is empty")
        for entry in entries:
            if not _is_number(entry) or not math.isfinite(entry) or entry <= 0:
                raise ValueError(f"AnchorGenerator: {name}[{level}] must hold positive numbers, got {entry!r}")
    return tuple(tuple(float(e) for e in entries) for entries in levels)


def _cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> Tensor:
    """Origin-centred ``[A, 4]`` float32 anchors, ratio-major, rounded to whole pixels.

    Computed in float32 in the same order of operations as torchvision so that the rounding
    (half to even) lands on the same pixels.
    """
    size = torch.tensor(sizes, dtype=torch.float32)
    ratio = torch.tensor(aspect_ratios, dtype=torch.float32)
    height_factor = ratio.sqrt()
    width_factor = 1 / height_factor
    widths = (width_factor[:, None] * size[None, :]).reshape(-1)
    heights = (height_factor[:, None] * size[None, :]).reshape(-1)
    return (torch.stack((-widths, -heights, widths, heights), dim=1) / 2).round()


def padded_size(sizes: Sequence[tuple[int, int]], size_divisibility: int) -> tuple[int, int]:
    """The smallest ``(Hp, Wp)`` holding every ``(h, w)`` in ``sizes``, multiples of ``size_divisibility``."""
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    d = size_divisibility
    return -(-height // d) * d, -(-width // d) * d


def grid_centres(index: Tensor, step: Tensor, origin: Tensor) -> Tensor:
    """Float32 centre coordinate of grid index ``index`` (float32, whole numbers).

    The single definition shared by anchor generation and the grid matching path, so that
    both produce the same bits. Whole-number centres (offset 0) are exact, as in torchvision.
    """
    return index * step + origin


def grid_size(length: int, anchor_stride: int) -> int:
    """Anchor-grid cells along a feature side of ``length``: ``ceil(length / anchor_stride)``.

    Integer arithmetic only, so ``length`` may be a symbolic size under ``torch.export``.
    """
    return (length + anchor_stride - 1) // anchor_stride


def level_anchors(
    cell_anchors: Tensor, stride: int, feature_size: Sequence[int], offset: float = 0.0, anchor_stride: int = 1
) -> Tensor:
    """One level's anchors ``[H_l' * W_l' * A, 4]``, ordered ``(y, x, anchor)``, float32.

    ``cell_anchors`` ``[A, 4]`` (on the output device), ``feature_size`` the level's
    ``(H_l, W_l)``; the grid is ``grid_size(H_l, anchor_stride) x grid_size(W_l, anchor_stride)``
    with centres ``(offset + j * anchor_stride) * stride``. Torch ops on the sizes only, so
    ``torch.export`` traces it with dynamic feature sizes.
    """
    height, width = feature_size
    device = cell_anchors.device
    step = torch.tensor(float(anchor_stride * stride), dtype=torch.float32, device=device)
    origin = torch.tensor(offset * stride, dtype=torch.float32, device=device)
    xs = grid_centres(torch.arange(grid_size(width, anchor_stride), dtype=torch.float32, device=device), step, origin)
    ys = grid_centres(torch.arange(grid_size(height, anchor_stride), dtype=torch.float32, device=device), step, origin)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)
    return (centres + cell_anchors[None]).reshape(-1, 4)


class AnchorGenerator:
    """Anchors for ``L`` feature levels: ``sizes x aspect_ratios`` per location.

    Args:
        sizes: anchor sizes (sqrt of area, pixels): one tuple per level, or a single tuple
            used for every level.
        aspect_ratios: ``h / w`` ratios, same broadcasting as ``sizes``.
        strides: feature stride of each level in input pixels (one int per level).
        offset: anchor centres sit at ``(offset + j * anchor_stride) * stride``; 0 matches
            torchvision, 0.5 centres anchors on the feature cells.
        anchor_stride: anchors at every n-th feature cell; the grid of level l is
            ``ceil(H_l / n) x ceil(W_l / n)`` (the output of a 3x3 conv run at stride n).

    Unlike torchvision, a flat ``sizes`` tuple means "these sizes at every level" (one tuple
    broadcast), not "one size per level"; FPN configs write ``((32,), (64,), ...)``.
    """

    def __init__(
        self,
        sizes: Sequence[float] | Sequence[Sequence[float]],
        aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
        strides: int | Sequence[int] = 16,
        offset: float = AnchorConfig.offset,
        anchor_stride: int = AnchorConfig.anchor_stride,
    ) -> None:
        strides, offset, anchor_stride = _plain(strides), _plain(offset), _plain(anchor_stride)
        if isinstance(strides, Sequence) and not isinstance(strides, str):
            strides = [_plain(s) for s in strides]
        if isinstance(strides, int) and not isinstance(strides, bool):
            strides = (strides,)
        if not isinstance(strides, Sequence) or len(strides) == 0:
            raise TypeError(f"AnchorGenerator: strides must be a non-empty tuple of ints, got {strides!r}")
        for stride in strides:
            if not isinstance(stride, int) or isinstance(stride, bool) or stride <= 0:
                raise ValueError(f"AnchorGenerator: strides must be positive ints, got {tuple(strides)!r}")
        if not isinstance(anchor_stride, int) or isinstance(anchor_stride, bool) or anchor_stride <= 0:
            raise ValueError(f"AnchorGenerator: anchor_stride must be a positive int, got {anchor_stride!r}")
        if not _is_number(offset) or not 0.0 <= offset < 1.0:
            raise ValueError(f"AnchorGenerator: offset must be a number in [0, 1), got {offset!r}")
        self.strides: tuple[int, ...] = tuple(int(s) for s in strides)
        self.sizes = _per_level("sizes", sizes, len(self.strides))
        _warn_torchvision_reading(sizes, self.sizes)
        self.aspect_ratios = _per_level("aspect_ratios", aspect_ratios, len(self.strides))
        self.offset = float(offset)
        self.anchor_stride = int(anchor_stride)
        self.cell_anchors: tuple[Tensor, ...] = tuple(
            _cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)
        )
        self._cache: OrderedDict[tuple, object] = OrderedDict()

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def num_anchors_per_location(self) -> int:
        """``A``: anchors per location, which a shared head needs equal on every level."""
        counts = [cell.shape[0] for cell in self.cell_anchors]
        if len(set(counts)) != 1:
            raise ValueError(
                f"AnchorGenerator: anchors per location differ across levels {counts} "
                f"(sizes x aspect_ratios per level); a shared RPN head needs the same count"
            )
        return counts[0]

    def feature_shapes_for(self, padded_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Feature-map sizes ``(ceil(h / stride), ceil(w / stride))`` per level for a padded input."""
        height, width = int(padded_size[0]), int(padded_size[1])
        return [(-(-height // s), -(-width // s)) for s in self.strides]

    def grid_shapes(self, feature_shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Anchor-grid size per level: ``(ceil(H_l / anchor_stride), ceil(W_l / anchor_stride))``."""
        shapes = self._check_shapes(feature_shapes)
        return [(grid_size(h, self.anchor_stride), grid_size(w, self.anchor_stride)) for h, w in shapes]

    def __call__(
        self,
        feature_shapes: Sequence[tuple[int, int]] | Sequence[Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Anchors per level, each ``[H_l' * W_l' * A, 4]`` ordered ``(y, x, anchor)``.

        ``feature_shapes`` are the backbone's ``(H_l, W_l)`` (feature tensors are accepted
        too); ``H_l' x W_l'`` is the anchor grid (see ``anchor_stride``). Cached: every call
        returns the same tensors (views of :meth:`grid`'s), so clone before changing them in
        place (clipping to an image, say), or later calls get the changed anchors.
        """
        shapes = self._check_shapes(feature_shapes)
        device = torch.device("cpu") if device is None else torch.device(device)
        key = ("levels", tuple(shapes), device, dtype)
        cached = self._cache_get(key)
        if cached is None:
            grid = self.grid(shapes, device=device)
            if dtype == torch.float32:
                cached = [grid.anchors[lvl.start : lvl.start + lvl.num_anchors] for lvl in grid.levels]
            else:
                cached = [grid.anchors[lvl.start : lvl.start + lvl.num_anchors].to(dtype) for lvl in grid.levels]
            self._cache_put(key, cached)
        return list(cached)

    def grid(
        self,
        feature_shapes: Sequence[tuple[int, int]] | Sequence[Tensor],
        device: torch.device | str | None = None,
    ) -> AnchorGrid:
        """The concatenated float32 anchors ``[N, 4]`` with their grid layout. Cached."""
        shapes = self._check_shapes(feature_shapes)
        device = torch.device("cpu") if device is None else torch.device(device)
        key = ("grid", tuple(shapes), device)
        cached = self._cache_get(key)
        if cached is None:
            cached = self._build_grid(shapes, device)
            self._cache_put(key, cached)
        return cached

    def _build_grid(self, shapes: list[tuple[int, int]], device: torch.device) -> AnchorGrid:
        levels = []
        per_level = []
        start = 0
        for shape, (height, width), stride, cell in zip(
            shapes, self.grid_shapes(shapes), self.strides, self.cell_anchors
        ):
            cell_dev = cell.to(device)
            per_level.append(level_anchors(cell_dev, stride, shape, self.offset, self.anchor_stride))
            level = GridLevel(stride, float(self.anchor_stride * stride), self.offset * stride, height, width,
                              cell_dev, start)
            levels.append(level)
            start += level.num_anchors
        return AnchorGrid(torch.cat(per_level), tuple(levels))

    def _check_shapes(self, feature_shapes: Sequence) -> list[tuple[int, int]]:
        if isinstance(feature_shapes, Tensor) or not isinstance(feature_shapes, Sequence):
            raise TypeError(
                "AnchorGenerator: feature_shapes must be a list of (H, W) per level, "
                f"got {type(feature_shapes).__name__}"
            )
        if len(feature_shapes) != self.num_levels:
            raise ValueError(
                f"AnchorGenerator: got {len(feature_shapes)} feature maps but the generator has "
                f"{self.num_levels} levels (strides {self.strides})"
            )
        shapes = []
        for level, shape in enumerate(feature_shapes):
            if isinstance(shape, Tensor):
                shape = shape.shape[-2:]
            if len(shape) != 2 or any(int(s) < 0 for s in shape):
                raise ValueError(f"AnchorGenerator: feature_shapes[{level}] must be (H, W), got {tuple(shape)!r}")
            shapes.append((int(shape[0]), int(shape[1])))
        return shapes

    def _cache_get(self, key: tuple) -> object | None:
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
        return value

    def _cache_put(self, key: tuple, value: object) -> None:
        self._cache[key] = value
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    def __getstate__(self) -> dict:
        # Do not ship cached tensors to DataLoader workers or checkpoints.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, "
            f"strides={self.strides}, offset={self.offset}, anchor_stride={self.anchor_stride})"
        )
