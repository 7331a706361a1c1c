"""SyntheticShapes: a no-download detection dataset of drawn shapes, deterministic from a seed.

Each image (its size drawn between ``min_size`` and ``max_size`` per side) has a textured
background (smooth colour noise, sometimes stripes, pixel noise) and 0..``max_shapes``
rectangles, ellipses and triangles, filled or outlined (``outlined_fraction`` of them), whose shorter side is at least
``min_box_size`` pixels, whose longer side reaches up to ``max_box_fraction`` of the image, and
whose aspect ratio lies between 1:4 and 4:1. Shapes of ``unannotated_kinds`` are drawn like the
others but get no box: objects of classes nobody labelled, as in a real training set (what
open-world proposal methods are tested against); with ``unannotated_outlined`` so are the outlined
shapes of every kind (an unseen style rather than an unseen kind), and with ``unannotated_textured``
the ``textured_fraction`` of filled shapes painted with a two-colour checkerboard instead of one
colour (an unseen texture). Shapes may overlap: a box is the tight box of the
shape's visible pixels, and a shape left with less than ``min_visible_fraction`` of its pixels
visible is removed from the image's boxes. A fraction ``empty_fraction`` of images has no
shapes at all. Item ``i`` of split ``s`` depends only on ``(seed, s, i)``: the same in every
process, worker and run. Drawing uses OpenCV and vectorised numpy (about a millisecond per
image at the default sizes).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import cv2
import numpy as np
from torch.utils.data import Dataset

from lightning_rpn.data.sample import DetectionSample

__all__ = ["SyntheticShapes", "draw_shapes_image", "SHAPE_KINDS"]

SHAPE_KINDS: tuple[str, ...] = ("rectangle", "ellipse", "triangle")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float32 ``H x W x 3`` textured background in 0..255."""
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    grid = rng.normal(0.0, 1.0, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3)).astype(np.float32)
    smooth = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    image = base + float(rng.uniform(10, 45)) * smooth
    if rng.random() < 0.35:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 40)
        ys, xs = np.ogrid[:height, :width]
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period)
        image += (float(rng.uniform(8, 30)) * np.sin(phase).astype(np.float32))[:, :, None]
    return image


def _shape_color(rng: np.random.Generator, background: np.ndarray) -> tuple[float, float, float]:
    """A colour that differs from the mean background colour by a visible margin."""
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(8):
        color = rng.uniform(0, 255, size=3)
        if np.abs(color - mean).max() >= 70:
            break
    else:
        color = np.where(mean > 127, 0.0, 255.0)
    return float(color[0]), float(color[1]), float(color[2])


def _draw(
    canvas: np.ndarray,
    kind: str,
    corners: tuple[int, int, int, int],
    triangle: np.ndarray,
    value: tuple[float, float, float] | int,
    thickness: int,
) -> None:
    """Draw one shape inside the inclusive pixel box ``corners`` (filled when ``thickness < 0``)."""
    x1, y1, x2, y2 = corners
    if kind == "rectangle":
        cv2.rectangle(canvas, (x1, y1), (x2, y2), value, thickness)
    elif kind == "ellipse":
        center = ((x1 + x2) / 2, (y1 + y2) / 2)
        cv2.ellipse(canvas, (center, (float(x2 - x1 + 1), float(y2 - y1 + 1)), 0.0), value, thickness)
    elif thickness < 0:
        cv2.fillPoly(canvas, [triangle], value)
    else:
        cv2.polylines(canvas, [triangle], True, value, thickness)


def _fill_textured(
    image: np.ndarray,
    rng: np.random.Generator,
    kind: str,
    corners: tuple[int, int, int, int],
    triangle: np.ndarray,
    color: tuple[float, float, float],
) -> None:
    """Fill one shape inside the inclusive pixel box ``corners`` with a checkerboard of ``color`` and a
    second colour that differs from it by a visible margin (cells of 2..6 pixels, random phase)."""
    x1, y1, x2, y2 = corners
    height, width = y2 - y1 + 1, x2 - x1 + 1
    mask = np.zeros((height, width), dtype=np.uint8)
    _draw(mask, kind, (0, 0, width - 1, height - 1), triangle - np.array([x1, y1], dtype=np.int32), 1, -1)
    cell = int(rng.integers(2, 7))
    shift_y, shift_x = (int(v) for v in rng.integers(0, cell, size=2))
    second = _shape_color(rng, np.asarray(color, dtype=np.float32).reshape(1, 1, 3))
    ys, xs = np.ogrid[:height, :width]
    checker = ((ys + shift_y) // cell + (xs + shift_x) // cell) % 2 == 1
    pattern = np.where(checker[:, :, None], np.float32(second), np.float32(color))
    inside = mask > 0
    image[y1:y2 + 1, x1:x2 + 1][inside] = pattern[inside]


def draw_shapes_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_shapes: int,
    min_box_size: float = 8.0,
    max_box_fraction: float = 0.9,
    min_visible_fraction: float = 0.5,
    kinds: Sequence[str] = SHAPE_KINDS,
    unannotated_kinds: Sequence[str] = (),
    outlined_fraction: float = 0.3,
    unannotated_outlined: bool = False,
    textured_fraction: float = 0.0,
    unannotated_textured: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_shapes`` shapes of ``kinds`` and ``unannotated_kinds`` on a textured background.

    Returns the uint8 ``H x W x 3`` image and float32 ``[G, 4]`` xyxy boxes of the visible
    shapes of ``kinds`` (``G <= num_shapes``); shapes of ``unannotated_kinds`` occlude and are
    occluded like the others but have no box. Each shape is outlined with probability
    ``outlined_fraction`` (the random draws are the same whatever it is), and has no box when it
    is and ``unannotated_outlined`` is set. A filled shape is checkerboard-textured with probability
    ``textured_fraction``, drawn from a generator spawned from ``rng`` (the layout, kinds and colours
    are those of the same image without texture), and has no box when it is and
    ``unannotated_textured`` is set.
    """
    drawable = (*kinds, *unannotated_kinds)
    texture_rng = rng.spawn(1)[0] if textured_fraction > 0 else None
    image = _background(rng, height, width)
    # colours are chosen against the one-colour drawing, so that texture changes no other draw
    shown = image.copy() if texture_rng is not None else image
    labels = np.zeros((height, width), dtype=np.uint8)
    drawn_pixels: list[int] = []
    annotated: list[bool] = []
    longest_cap = max_box_fraction * min(height, width)
    specs = []
    for _ in range(num_shapes):
        aspect = math.exp(rng.uniform(math.log(0.25), math.log(4.0)))  # width / height
        short_cap = longest_cap / max(aspect, 1.0 / aspect)
        short_min = min(min_box_size, short_cap)
        short = math.exp(rng.uniform(math.log(short_min), math.log(max(short_cap, short_min))))
        box_w = max(2, int(round(short * aspect if aspect >= 1 else short)))
        box_h = max(2, int(round(short if aspect >= 1 else short / aspect)))
        box_w, box_h = min(box_w, width), min(box_h, height)
        x1 = int(rng.integers(0, width - box_w + 1))
        y1 = int(rng.integers(0, height - box_h + 1))
        specs.append((box_w * box_h, x1, y1, box_w, box_h))
    # larger shapes first, so that smaller ones occlude them only partly
    specs.sort(key=lambda spec: -spec[0])
    for index, (_, x1, y1, box_w, box_h) in enumerate(specs, start=1):
        kind = drawable[int(rng.integers(0, len(drawable)))]
        outlined = rng.random() < outlined_fraction
        thickness = -1 if not outlined else max(2, int(round(min(box_w, box_h) * rng.uniform(0.06, 0.15))))
        color = _shape_color(rng, image[y1:y1 + box_h, x1:x1 + box_w])
        x2, y2 = x1 + box_w - 1, y1 + box_h - 1  # inclusive pixel coordinates for OpenCV
        apex = x1 + int(rng.integers(0, box_w))
        base_y, apex_y = (y1, y2) if rng.random() < 0.5 else (y2, y1)
        triangle = np.array([[x1, base_y], [x2, base_y], [apex, apex_y]], dtype=np.int32)
        for canvas, value in ((image, color), (labels, index)):
            _draw(canvas, kind, (x1, y1, x2, y2), triangle, value, thickness)
        textured = texture_rng is not None and texture_rng.random() < textured_fraction and not outlined
        if textured:
            _fill_textured(shown, texture_rng, kind, (x1, y1, x2, y2), triangle, color)
        elif shown is not image:
            _draw(shown, kind, (x1, y1, x2, y2), triangle, color, thickness)
        drawn_pixels.append(int(np.count_nonzero(labels == index)))
        annotated.append(kind in kinds and not (outlined and unannotated_outlined)
                         and not (textured and unannotated_textured))
    boxes = []
    if specs:
        visible = np.bincount(labels.ravel(), minlength=len(specs) + 1)
        for index in range(1, len(specs) + 1):
            hidden = visible[index] == 0 or visible[index] < min_visible_fraction * drawn_pixels[index - 1]
            if hidden or not annotated[index - 1]:
                continue
            ys, xs = np.nonzero(labels == index)
            boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    noise_sigma = float(rng.uniform(0, 8))
    if noise_sigma > 0.5:
        shown += rng.normal(0.0, noise_sigma, size=(height, width, 1)).astype(np.float32)
    out = np.clip(shown, 0, 255).astype(np.uint8)
    return out, np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


class SyntheticShapes(Dataset):
    """``num_images`` drawn-shape images of split ``split``, deterministic from ``seed``.

    Image sides are drawn independently from ``[min_size, max_size]``; each image has
    ``1..max_shapes`` shapes (none with probability ``empty_fraction``) of ``shape_kinds``
    (a subset of :data:`SHAPE_KINDS`: train on some kinds, evaluate on the others) and of
    ``unannotated_kinds`` (drawn, never boxed: train with the others present but unlabelled).
    ``outlined_fraction`` of the shapes are outlined, not filled; ``unannotated_outlined`` leaves
    them unboxed as well (``outlined_fraction=1`` then evaluates on outlined shapes alone).
    ``textured_fraction`` of the filled shapes are checkerboard-textured (0 by default: one colour
    each); ``unannotated_textured`` leaves them unboxed (``outlined_fraction=0, textured_fraction=1``
    evaluates on textured shapes alone).
    """

    def __init__(
        self,
        num_images: int = 1000,
        min_size: int = 128,
        max_size: int = 192,
        max_shapes: int = 6,
        seed: int = 0,
        split: str = "train",
        min_box_size: float = 8.0,
        max_box_fraction: float = 0.9,
        empty_fraction: float = 0.05,
        min_visible_fraction: float = 0.5,
        shape_kinds: Sequence[str] = SHAPE_KINDS,
        unannotated_kinds: Sequence[str] = (),
        outlined_fraction: float = 0.3,
        unannotated_outlined: bool = False,
        textured_fraction: float = 0.0,
        unannotated_textured: bool = False,
    ) -> None:
        if not shape_kinds or any(kind not in SHAPE_KINDS for kind in shape_kinds):
            raise ValueError(f"SyntheticShapes: shape_kinds={list(shape_kinds)!r} must be a non-empty list of {SHAPE_KINDS}")
        if any(kind not in SHAPE_KINDS or kind in shape_kinds for kind in unannotated_kinds):
            raise ValueError(
                f"SyntheticShapes: unannotated_kinds={list(unannotated_kinds)!r} must be kinds of {SHAPE_KINDS}"
                f" not in shape_kinds={list(shape_kinds)!r}"
            )
        if num_images < 0:
            raise ValueError(f"SyntheticShapes: num_images={num_images} must be >= 0")
        if not 16 <= min_size <= max_size:
            raise ValueError(
                f"SyntheticShapes: expected 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}"
            )
        if not 0 <= max_shapes <= 254:
            raise ValueError(f"SyntheticShapes: max_shapes={max_shapes} must be in 0..254")
        if not 1 <= min_box_size <= max_box_fraction * min_size:
            raise ValueError(
                f"SyntheticShapes: min_box_size={min_box_size} must be in 1..max_box_fraction * min_size"
                f" = {max_box_fraction * min_size:g}"
            )
        if not 0.0 <= empty_fraction <= 1.0:
            raise ValueError(f"SyntheticShapes: empty_fraction={empty_fraction} must be in [0, 1]")
        if not 0.0 <= outlined_fraction <= 1.0:
            raise ValueError(f"SyntheticShapes: outlined_fraction={outlined_fraction} must be in [0, 1]")
        if not 0.0 <= textured_fraction <= 1.0:
            raise ValueError(f"SyntheticShapes: textured_fraction={textured_fraction} must be in [0, 1]")
        self.num_images = num_images
        self.min_size = min_size
        self.max_size = max_size
        self.max_shapes = max_shapes
        self.seed = seed
        self.split = split
        self.min_box_size = min_box_size
        self.max_box_fraction = max_box_fraction
        self.empty_fraction = empty_fraction
        self.min_visible_fraction = min_visible_fraction
        self.shape_kinds = tuple(shape_kinds)
        self.unannotated_kinds = tuple(unannotated_kinds)
        self.outlined_fraction = outlined_fraction
        self.unannotated_outlined = unannotated_outlined
        self.textured_fraction = textured_fraction
        self.unannotated_textured = unannotated_textured
        self._split_key = zlib.crc32(split.encode("utf-8"))

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> DetectionSample:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"SyntheticShapes({self.split!r}): index {index} out of range for {self.num_images} images")
        index = index % self.num_images
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self._split_key, index])
        height, width = (int(v) for v in rng.integers(self.min_size, self.max_size + 1, size=2))
        empty = self.max_shapes == 0 or rng.random() < self.empty_fraction
        num_shapes = 0 if empty else int(rng.integers(1, self.max_shapes + 1))
        image, boxes = draw_shapes_image(
            rng, height, width, num_shapes, self.min_box_size, self.max_box_fraction, self.min_visible_fraction,
            self.shape_kinds, self.unannotated_kinds, self.outlined_fraction, self.unannotated_outlined,
            self.textured_fraction, self.unannotated_textured,
        )
        return DetectionSample(image=image, boxes=boxes, image_id=index, source=f"synthetic://{self.split}/{index}")
