"""Reading image files safely: paths kept inside the images root, every mode to 8-bit RGB.

Grayscale, palette, CMYK and alpha images become RGB (alpha is dropped); 16-bit images are
scaled from the full 16-bit range to 8 bits (value / 257). EXIF orientation is not applied:
annotations refer to the pixels as stored, as in COCO.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from lightning_rpn.data.problems import DataError, UnsafePathError

__all__ = ["resolve_image_path", "load_rgb_image", "read_image_size", "to_rgb_uint8"]

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def resolve_image_path(
    root: Path | str, name: str, *, file: str | None = None, image_id: int | str | None = None
) -> Path:
    """``root / name``, refusing absolute names and names that climb out of ``root`` with ``..``.

    ``file`` and ``image_id`` name where ``name`` came from, for the error message.
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"image file name {name!r} is not a non-empty string", file=file, image_id=image_id)
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise UnsafePathError(
            f"image path {name!r} is absolute; expected a path relative to the images root {str(root)!r}",
            file=file, image_id=image_id,
        )
    normalized = os.path.normpath(name.replace("\\", "/"))
    if normalized == ".." or normalized.startswith("../"):
        raise UnsafePathError(
            f"image path {name!r} escapes the images root {str(root)!r}", file=file, image_id=image_id
        )
    return Path(root) / normalized


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """An ``H x W x 3`` uint8 RGB array from a PIL image of any mode."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        gray = np.clip(np.round(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy


def load_rgb_image(path: Path | str, *, image_id: int | str | None = None) -> np.ndarray:
    """Decode ``path`` to ``H x W x 3`` uint8 RGB; a missing or corrupt file is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError("image file does not exist", file=str(path), image_id=image_id)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_uint8(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"image file is corrupt or unreadable ({error})", file=str(path), image_id=image_id) from error


def read_image_size(path: Path | str, *, image_id: int | str | None = None) -> tuple[int, int]:
    """``(h, w)`` from the file header only (fast); missing or unreadable is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError("image file does not exist", file=str(path), image_id=image_id)
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"image file is corrupt or unreadable ({error})", file=str(path), image_id=image_id) from error
    return int(height), int(width)
