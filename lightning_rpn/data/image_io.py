"""Reading image files safely: paths kept inside the images root, every mode to 8-bit RGB.

Grayscale, palette, CMYK and alpha images become RGB (alpha is dropped); 16-bit images are
scaled from the full 16-bit range to 8 bits (value / 257). EXIF orientation is not applied:
annotations refer to the pixels as stored, as in COCO.

Decoding is strict: a truncated file is an error even where ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
was switched on (PIL would fill the missing rows with grey). :func:`verify_image` decodes the
whole file, as training will (header checks pass truncated JPEGs); :func:`read_image_size`
reads the header only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from lightning_rpn.data.problems import DataError, UnsafePathError

__all__ = ["resolve_image_path", "load_rgb_image", "verify_image", "read_image_size", "to_rgb_uint8"]

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)

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


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """PIL raises on truncated files inside this block, whatever ``LOAD_TRUNCATED_IMAGES`` says."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _unreadable(path: Path, error: Exception, image_id: int | str | None) -> DataError:
    return DataError(f"image file is corrupt, truncated or unreadable ({error})", file=str(path), image_id=image_id)


def _check_exists(path: Path, image_id: int | str | None) -> None:
    if not path.is_file():
        raise DataError("image file does not exist", file=str(path), image_id=image_id)


def load_rgb_image(path: Path | str, *, image_id: int | str | None = None) -> np.ndarray:
    """Decode ``path`` to ``H x W x 3`` uint8 RGB; a missing, corrupt or truncated file is a :class:`DataError`."""
    path = Path(path)
    _check_exists(path, image_id)
    try:
        with _strict_decoding(), Image.open(path) as image:
            image.load()
            return to_rgb_uint8(image)
    except _DECODE_ERRORS as error:
        raise _unreadable(path, error, image_id) from error


def verify_image(path: Path | str, *, image_id: int | str | None = None) -> tuple[int, int]:
    """``(h, w)`` of ``path`` after decoding all of it; missing, corrupt or truncated is a :class:`DataError`.

    JPEGs decode at reduced resolution (``Image.draft``), which still reads every byte of the
    compressed data, so truncation is found at a fraction of the full decoding cost.
    """
    path = Path(path)
    _check_exists(path, image_id)
    try:
        with _strict_decoding(), Image.open(path) as image:
            width, height = image.size
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
    except _DECODE_ERRORS as error:
        raise _unreadable(path, error, image_id) from error
    return int(height), int(width)


def read_image_size(path: Path | str, *, image_id: int | str | None = None) -> tuple[int, int]:
    """``(h, w)`` from the file header only (fast; a truncated file passes); missing or unreadable is a :class:`DataError`."""
    path = Path(path)
    _check_exists(path, image_id)
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except _DECODE_ERRORS as error:
        raise _unreadable(path, error, image_id) from error
    return int(height), int(width)
