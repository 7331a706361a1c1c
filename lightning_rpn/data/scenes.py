"""DenseScenes: generated aerial-like scenes, many small touching objects, no download.

Shapes: ``H x W`` scene, ``G`` objects (boxes) of a scene.

The built-in synthetic shapes have a few large, high-contrast objects per image; the real
case where proposal networks struggle looks different: large orthophotos with a few hundred
small objects (tree crowns, cars, cells) of 15-70 px, touching and overlapping, with low
contrast against a textured background. This generator makes such scenes, so that training
on random crops and evaluating on whole held-out scenes can be measured on this CPU.

Two independent choices make a scene, so that a model can be evaluated on a family it was not
trained on (the generalisation check):

- ``objects``: ``"crowns"`` (roughly round, irregular outline, radial shading and leaf
  texture: tree crowns seen from above) or ``"roofs"`` (axis-aligned rectangles with a
  lit and a shaded half, sharp edges: buildings or cars).
- ``background``: ``"field"`` (green-brown fractal noise with soil patches) or ``"urban"``
  (grey asphalt noise with lines).

A box is the object's full extent clipped to the scene (as annotators draw crowns that
touch), objects are placed with a minimum centre distance of ``overlap`` times the sum of
their radii (``< 1``: they overlap), and contrast is the colour difference between object
and background (``contrast`` in 0..255, low by default). Item ``i`` of split ``s`` depends
only on ``(seed, s, i)``: the same in every process, worker and run.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from torch.utils.data import Dataset

from lightning_rpn.data.sample import DetectionSample

__all__ = ["DenseScenes", "SceneStyle", "draw_dense_scene", "SCENE_OBJECTS", "SCENE_BACKGROUNDS"]

SceneObjects = Literal["crowns", "roofs"]
SceneBackground = Literal["field", "urban"]
SCENE_OBJECTS: tuple[str, ...] = ("crowns", "roofs")
SCENE_BACKGROUNDS: tuple[str, ...] = ("field", "urban")


def _fractal_noise(rng: np.random.Generator, height: int, width: int, octaves: int = 5) -> np.ndarray:
    """Float32 ``H x W`` noise in about -1..1, with structure at every scale."""
    noise = np.zeros((height, width), dtype=np.float32)
    amplitude, total = 1.0, 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = rng.normal(size=(cells, cells)).astype(np.float32)
        noise += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += amplitude
        amplitude *= 0.55
    return noise / total


def _background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A float32 ``H x W x 3`` background in 0..255."""
    if kind == "field":
        base = np.array([rng.uniform(70, 110), rng.uniform(95, 135), rng.uniform(50, 80)], np.float32)
        soil = np.array([rng.uniform(110, 150), rng.uniform(95, 125), rng.uniform(70, 95)], np.float32)
        mix = np.clip(_fractal_noise(rng, height, width, 4) * 1.5 + 0.5, 0, 1)[:, :, None]
        image = base * mix + soil * (1 - mix)
        image += 18.0 * _fractal_noise(rng, height, width)[:, :, None]
    else:
        grey = rng.uniform(90, 150)
        image = np.full((height, width, 3), grey, np.float32) + np.array([0, 2, 6], np.float32)
        image += 14.0 * _fractal_noise(rng, height, width)[:, :, None]
        for _ in range(int(rng.integers(2, 6))):
            horizontal = rng.random() < 0.5
            position = int(rng.integers(0, height if horizontal else width))
            thickness = int(rng.integers(2, 6))
            shade = float(rng.uniform(-40, 60))
            if horizontal:
                image[position:position + thickness, :, :] += shade
            else:
                image[:, position:position + thickness, :] += shade
    return image


def _crown_mask(rng: np.random.Generator, radius_x: float, radius_y: float) -> tuple[np.ndarray, np.ndarray]:
    """A crown's float32 alpha mask (irregular round outline) and its radial shading, same patch."""
    half_w, half_h = int(math.ceil(radius_x * 1.15)), int(math.ceil(radius_y * 1.15))
    ys, xs = np.mgrid[-half_h:half_h + 1, -half_w:half_w + 1].astype(np.float32)
    angle = np.arctan2(ys, xs)
    wobble = np.ones_like(angle)
    for harmonic in (3, 5, 7):
        wobble += float(rng.uniform(0.02, 0.08)) * np.cos(harmonic * angle + float(rng.uniform(0, 2 * math.pi)))
    distance = np.sqrt((xs / radius_x) ** 2 + (ys / radius_y) ** 2) / wobble
    alpha = np.clip((1.0 - distance) * max(radius_x, radius_y) / 1.5, 0.0, 1.0)
    shading = np.clip(1.0 - distance, 0.0, 1.0) ** 0.7
    return alpha, shading


def _roof_mask(rng: np.random.Generator, radius_x: float, radius_y: float) -> tuple[np.ndarray, np.ndarray]:
    """A roof's alpha mask (a sharp rectangle) and its shading (one lit, one shaded half)."""
    half_w, half_h = max(1, int(round(radius_x))), max(1, int(round(radius_y)))
    alpha = np.ones((2 * half_h + 1, 2 * half_w + 1), np.float32)
    shading = np.ones_like(alpha)
    if half_w >= half_h:
        shading[: half_h + 1, :] = 0.55
    else:
        shading[:, : half_w + 1] = 0.55
    shading *= float(rng.uniform(0.85, 1.0))
    return alpha, shading


@dataclass(frozen=True)
class SceneStyle:
    """What a scene looks like (see the module docstring); every scene default is declared here once.

    Args:
        objects / background: the object and background families.
        density: objects per 1000 x 1000 px.
        min_object_size / max_object_size: object side range (pixels).
        contrast: object-background colour difference (0..255).
        overlap: minimum centre distance as a fraction of the sum of two objects' radii.
    """

    objects: SceneObjects = "crowns"
    background: SceneBackground = "field"
    density: float = 250.0
    min_object_size: float = 15.0
    max_object_size: float = 70.0
    contrast: float = 45.0
    overlap: float = 0.6

    def __post_init__(self) -> None:
        if self.objects not in SCENE_OBJECTS:
            raise ValueError(f"DenseScenes: objects={self.objects!r} is not one of {SCENE_OBJECTS}")
        if self.background not in SCENE_BACKGROUNDS:
            raise ValueError(f"DenseScenes: background={self.background!r} is not one of {SCENE_BACKGROUNDS}")
        if not 2 <= self.min_object_size <= self.max_object_size:
            raise ValueError(f"DenseScenes: expected 2 <= min_object_size <= max_object_size, got "
                             f"{self.min_object_size}, {self.max_object_size}")


def draw_dense_scene(
    rng: np.random.Generator, height: int, width: int, style: SceneStyle = SceneStyle(),
    owners: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene. Returns the uint8 ``H x W x 3`` image and float32 ``[G, 4]`` xyxy boxes.

    ``style.density`` objects per 1000 x 1000 px (fewer where they do not fit at the minimum
    distance); object sizes (the longer side) are log-uniform in
    ``[style.min_object_size, style.max_object_size]``.

    ``owners``, an integer ``H x W`` array, receives for each pixel the index of the box whose
    object covers it last (alpha above one half, the rule that makes the boxes), -1 where no
    object does: what stays visible of each object once later ones are drawn over it (the
    localisation ceiling, ``bench/bench_scene_ceiling.py``). The scene drawn is the same.
    """
    objects, density, overlap = style.objects, style.density, style.overlap
    min_object_size, max_object_size, contrast = style.min_object_size, style.max_object_size, style.contrast
    image = _background(rng, style.background, height, width)
    target = int(rng.poisson(density * height * width / 1e6))
    centres = np.zeros((0, 2), np.float32)
    radii = np.zeros((0,), np.float32)
    boxes = []
    make_mask = _crown_mask if objects == "crowns" else _roof_mask
    if owners is not None:
        if owners.shape != (height, width):
            raise ValueError(f"draw_dense_scene: owners has shape {owners.shape}, expected {(height, width)}")
        owners[...] = -1
    for _ in range(target):
        size = math.exp(rng.uniform(math.log(min_object_size), math.log(max_object_size)))
        aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)) if objects == "crowns"
                          else rng.uniform(math.log(0.4), math.log(2.5)))
        radius_x = size / 2 * min(1.0, aspect)
        radius_y = size / 2 * min(1.0, 1.0 / aspect)
        radius = max(radius_x, radius_y)
        for _attempt in range(6):
            centre = np.array([rng.uniform(0, width), rng.uniform(0, height)], np.float32)
            if not len(radii) or (np.hypot(*(centres - centre).T) >= overlap * (radii + radius)).all():
                break
        else:
            continue
        alpha, shading = make_mask(rng, radius_x, radius_y)
        patch_h, patch_w = alpha.shape
        x0 = int(round(centre[0])) - patch_w // 2
        y0 = int(round(centre[1])) - patch_h // 2
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + patch_w, width), min(y0 + patch_h, height)
        if xb - xa < 2 or yb - ya < 2:
            continue
        alpha = alpha[ya - y0:yb - y0, xa - x0:xb - x0]
        shading = shading[ya - y0:yb - y0, xa - x0:xb - x0]
        inside_y, inside_x = np.nonzero(alpha > 0.5)
        if len(inside_x) == 0:
            continue
        local = image[ya:yb, xa:xb]
        mean = local.reshape(-1, 3).mean(axis=0)
        # mostly a brightness change (darker crowns, brighter roofs), a little hue
        brightness = -1.0 if objects == "crowns" else float(rng.choice((-1.0, 1.0)))
        direction = brightness * np.full(3, 3 ** -0.5, np.float32) + 0.5 * rng.normal(size=3).astype(np.float32)
        direction /= float(np.linalg.norm(direction)) + 1e-6
        colour = mean + contrast * float(rng.uniform(0.6, 1.2)) * direction
        texture = 10.0 * rng.normal(size=alpha.shape).astype(np.float32)
        value = colour * (0.6 + 0.4 * shading)[:, :, None] + texture[:, :, None]
        local += alpha[:, :, None] * (value - local)
        if owners is not None:
            owners[ya:yb, xa:xb][alpha > 0.5] = len(boxes)
        centres = np.vstack([centres, centre[None]])
        radii = np.append(radii, radius)
        boxes.append((xa + inside_x.min(), ya + inside_y.min(), xa + inside_x.max() + 1, ya + inside_y.max() + 1))
    image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.6, 1.2)))
    image += rng.normal(0.0, float(rng.uniform(2, 6)), size=(height, width, 1)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(boxes, np.float32).reshape(-1, 4)


class DenseScenes(Dataset):
    """``num_images`` generated aerial-like scenes of ``size x size`` px (see the module docstring).

    Args:
        num_images: scenes in the split.
        size: side of every scene in pixels.
        objects / background / density / min_object_size / max_object_size / contrast / overlap:
            the :class:`SceneStyle` (its defaults).
        seed: with ``split`` and the index, determines each scene.
        split: split name (``"train"``, ``"val"``, ...): different names give different scenes.
        cache_bytes: keep drawn scenes in memory up to this many bytes (per process, so per
            DataLoader worker): random crops of a few large scenes then draw each scene once.
    """

    def __init__(
        self,
        num_images: int = 8,
        size: int = 1000,
        objects: SceneObjects = SceneStyle.objects,
        background: SceneBackground = SceneStyle.background,
        density: float = SceneStyle.density,
        min_object_size: float = SceneStyle.min_object_size,
        max_object_size: float = SceneStyle.max_object_size,
        contrast: float = SceneStyle.contrast,
        overlap: float = SceneStyle.overlap,
        seed: int = 0,
        split: str = "train",
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        if num_images < 0:
            raise ValueError(f"DenseScenes: num_images={num_images} must be >= 0")
        if size < 64:
            raise ValueError(f"DenseScenes: size={size} must be >= 64 pixels")
        if max_object_size > size:
            raise ValueError(f"DenseScenes: max_object_size={max_object_size} must be <= size={size}")
        self.style = SceneStyle(objects, background, density, min_object_size, max_object_size, contrast, overlap)
        self.num_images = num_images
        self.size = size
        self.seed = seed
        self.split = split
        self._split_key = zlib.crc32(f"scenes:{split}".encode("utf-8"))
        self.cache_bytes = cache_bytes
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> DetectionSample:
        index = self._checked(index)
        drawn = self._cache.get(index)
        if drawn is None:
            drawn = draw_dense_scene(self._rng(index), self.size, self.size, self.style)
            if self._cached_bytes + drawn[0].nbytes <= self.cache_bytes:
                self._cache[index] = drawn
                self._cached_bytes += drawn[0].nbytes
        image, boxes = drawn[0].copy(), drawn[1].copy()  # callers may modify their copy
        return DetectionSample(
            image=image, boxes=boxes, image_id=index,
            source=f"scenes://{self.style.objects}-{self.style.background}/{self.split}/{index}",
        )

    def owners(self, index: int) -> np.ndarray:
        """Scene ``index``'s int64 ``H x W`` map of which box's object each pixel shows (-1: none).

        See :func:`draw_dense_scene`; the scene is drawn again (not cached).
        """
        owners = np.empty((self.size, self.size), np.int64)
        draw_dense_scene(self._rng(self._checked(index)), self.size, self.size, self.style, owners=owners)
        return owners

    def _checked(self, index: int) -> int:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"DenseScenes({self.split!r}): index {index} out of range for {self.num_images} scenes")
        return index % self.num_images

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self._split_key, index])
