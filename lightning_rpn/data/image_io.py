"""Reading image files safely: paths kept inside the images root, every mode to 8-bit RGB.

Grayscale, palette, CMYK and alpha images become RGB (alpha is dropped); 16-bit images are
scaled from the full 16-bit range to 8 bits (value / 257), whatever range their data uses (what
a trained model saw stays the same): a file whose maximum is below :data:`NARROW_RANGE_LIMIT`
(12-bit sensor data stored in 16 bits) keeps only a few grey levels, and reading it warns, once
per file and process (:func:`narrow_sixteen_bit_range` says why). EXIF orientation is not applied:
annotations refer to the pixels as stored, as in COCO.

Decoding is strict: a truncated file is an error even where ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
was switched on (PIL would fill the missing rows with grey). PIL's decompression-bomb limit
(``Image.MAX_IMAGE_PIXELS``, about 179 million pixels) does not apply to dataset files: they are
the user's own, and orthophotos exceed it (an uncompressed one is then read by window, below). :func:`verify_image` decodes the
whole file, as training will (header checks pass truncated JPEGs); :func:`read_image_size`
reads the header only.

``.npy`` files (``H x W x 3`` or ``H x W`` uint8, C or Fortran order: ``np.asfortranarray``,
MATLAB and other column-major tools save the latter) are images too, read with numpy.

Windowed reads (:func:`raster_layout`, :meth:`RasterLayout.read`): where a file stores its
pixels uncompressed, one row after another (C-order ``.npy``; uncompressed 8-bit RGB or grayscale TIFF
whose strips PIL reads as one block; binary PPM / PGM; 24-bit BMP) or one column after another
(Fortran-order ``.npy``: a plane per channel), a window is read from a memory map of the file,
touching only the pages of its rows' (columns') spans. Compressed formats (PNG, JPEG, compressed
TIFF) have no such layout: PIL decodes them whole, also to crop them (and it keeps RGB in 4 bytes
a pixel, so it maps no RGB file either), as ``bench/bench_window_reads.py`` measures.
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from lightning_rpn.data.problems import DataError, UnsafePathError, quoted

__all__ = [
    "resolve_image_path",
    "load_rgb_image",
    "verify_image",
    "read_image_size",
    "exif_turns_image",
    "to_rgb_uint8",
    "NARROW_RANGE_LIMIT",
    "narrow_sixteen_bit_range",
    "RasterLayout",
    "raster_layout",
]

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)

_EXIF_ORIENTATION = 0x0112

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

NARROW_RANGE_LIMIT = 4096
"""A 16-bit image whose maximum is below this (12-bit data or narrower) keeps at most 17 of the
256 grey levels once scaled to 8 bits: :func:`narrow_sixteen_bit_range` reports it."""

_NARROW_WARNED: set[str] = set()  # files warned about in this process


def resolve_image_path(
    root: Path | str, name: str, *, file: str | None = None, image_id: int | str | None = None
) -> Path:
    """``root / name``, refusing absolute names and names that climb out of ``root`` with ``..``.

    ``file`` and ``image_id`` name where ``name`` came from, for the error message (which quotes a
    ``name`` that is no string as a COCO file writes it: ``null``, ``true``).
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"image file name {quoted(name)} is not a non-empty string", file=file, image_id=image_id)
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


def narrow_sixteen_bit_range(image: Image.Image) -> str | None:
    """Why the 16-bit ``image`` turns nearly black in 8 bits (its maximum is below
    :data:`NARROW_RANGE_LIMIT`), else ``None`` (also for every other mode, without decoding it)."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return None
    low, high = (max(int(v), 0) for v in image.getextrema())
    if high >= NARROW_RANGE_LIMIT:
        return None
    levels = round(high / 257) - round(low / 257) + 1
    return (f"16-bit image with maximum value {high} (below {NARROW_RANGE_LIMIT}: 12-bit or narrower data "
            f"stored in 16 bits) is scaled from the full 16-bit range to 8 bits (value / 257) and keeps "
            f"{levels} grey level(s), nearly black; rescale the file to the full 0..65535 range, or to 8 bits, "
            "before training on it")


def _warn_narrow_range(image: Image.Image, path: Path) -> None:
    """Warn (once per file and process: windows of a large image decode it again) when
    :func:`narrow_sixteen_bit_range` finds ``image`` 's range too narrow."""
    key = os.path.abspath(path)
    if key in _NARROW_WARNED:
        return
    reason = narrow_sixteen_bit_range(image)
    if reason is not None:
        _NARROW_WARNED.add(key)
        warnings.warn(f"{path}: {reason}", UserWarning, stacklevel=3)


@contextmanager
def _open_dataset_image(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)`` as a dataset file is read: truncation raises whatever
    ``LOAD_TRUNCATED_IMAGES`` says, and no decompression-bomb limit (both restored after)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        with Image.open(path) as image:
            yield image
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = previous


_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def _is_tiff(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(4) in _TIFF_SIGNATURES
    except OSError:
        return False


def _unreadable(path: Path, error: Exception, image_id: int | str | None) -> DataError:
    """The error for a file PIL cannot decode. A TIFF that PIL does not recognise is most often a
    valid one in a layout PIL lacks (aerial and satellite rasters), so it says how to convert it."""
    if isinstance(error, UnidentifiedImageError) and _is_tiff(path):
        return DataError(
            f"a TIFF that PIL cannot decode ({error}): valid TIFFs with floating-point samples, more than four "
            "bands or a compression PIL lacks are read this way too; convert it to 8- or 16-bit RGB or grey "
            "(e.g. `gdal_translate -ot Byte -scale -b 1 -b 2 -b 3`), or to an H x W x 3 uint8 .npy",
            file=str(path), image_id=image_id)
    return DataError(f"image file is corrupt, truncated or unreadable ({error})", file=str(path), image_id=image_id)


def _check_exists(path: Path, image_id: int | str | None) -> None:
    if not path.is_file():
        raise DataError("image file does not exist" + _other_normalisation(path), file=str(path), image_id=image_id)


def _other_normalisation(path: Path) -> str:
    """A hint naming a file of ``path``'s folder whose name differs from ``path``'s only in Unicode
    normalisation (``café`` composed or decomposed, as macOS archives write names), else ``""``."""
    if path.name.isascii() or not path.parent.is_dir():
        return ""
    wanted = unicodedata.normalize("NFC", path.name)
    try:
        twin = next((entry for entry in os.listdir(path.parent)
                     if entry != path.name and unicodedata.normalize("NFC", entry) == wanted), None)
    except OSError:
        return ""
    if twin is None:
        return ""
    form = "decomposed (NFD)" if unicodedata.is_normalized("NFD", twin) else "composed (NFC)"
    return (f"; {path.parent / twin} is the same name in another Unicode form, {form}: rename the file or the "
            "annotation's file name to one form")


def load_rgb_image(path: Path | str, *, image_id: int | str | None = None) -> np.ndarray:
    """Decode ``path`` to ``H x W x 3`` uint8 RGB; a missing, corrupt or truncated file is a :class:`DataError`."""
    path = Path(path)
    _check_exists(path, image_id)
    if _is_npy(path):
        _npy_layout(path, image_id)  # shape, dtype and length checked
        array = np.load(path, allow_pickle=False)  # read, not mapped: the mapped pages would count twice
        rgb = np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array
        return np.ascontiguousarray(rgb)  # a Fortran-order file: copied to C order, as every reader returns
    try:
        with _open_dataset_image(path) as image:
            image.load()
            _warn_narrow_range(image, path)
            return to_rgb_uint8(image)
    except _DECODE_ERRORS as error:
        raise _unreadable(path, error, image_id) from error


def verify_image(path: Path | str, *, image_id: int | str | None = None) -> tuple[int, int]:
    """``(h, w)`` of ``path`` after decoding all of it; missing, corrupt or truncated is a :class:`DataError`.

    JPEGs decode at reduced resolution (``Image.draft``), which still reads every byte of the
    compressed data, so truncation is found at a fraction of the full decoding cost.
    """

    def decode(image: Image.Image) -> None:
        width, height = image.size
        image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        image.load()

    return _checked_size(Path(path), image_id, decode)


def read_image_size(path: Path | str, *, image_id: int | str | None = None) -> tuple[int, int]:
    """``(h, w)`` from the file header only (fast; a truncated file passes); missing or unreadable is a :class:`DataError`."""
    return _checked_size(Path(path), image_id, lambda image: image.verify())  # the format's own header check


def exif_turns_image(path: Path | str) -> bool:
    """Whether ``path`` 's EXIF orientation (5-8) turns it by 90 degrees for display (False when
    it has none or cannot be read): an annotation tool that applies it sees width and height swapped."""
    try:
        with _open_dataset_image(Path(path)) as image:
            return image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except _DECODE_ERRORS:
        return False


def _checked_size(path: Path, image_id: int | str | None, check: Callable[[Image.Image], None]) -> tuple[int, int]:
    """``(h, w)`` of an existing ``path`` whose opened image passes ``check`` (``.npy``: its header)."""
    _check_exists(path, image_id)
    if _is_npy(path):
        layout = _npy_layout(path, image_id)
        return layout.height, layout.width
    try:
        with _open_dataset_image(path) as image:
            width, height = image.size
            check(image)
    except _DECODE_ERRORS as error:
        raise _unreadable(path, error, image_id) from error
    return int(height), int(width)


@dataclass(frozen=True)
class RasterLayout:
    """Where an uncompressed 8-bit image lies in its file: rows of ``stride`` bytes from ``offset``.

    ``order`` is the stored channel order: ``"RGB"``, ``"BGR"`` or ``"L"`` (gray); ``bottom_up``:
    the first stored row is the image's last (BMP). ``column_major``: the file stores columns of
    ``stride`` bytes instead, one channel plane after another (a Fortran-order ``.npy``).
    """

    path: Path
    offset: int
    height: int
    width: int
    stride: int
    order: str
    bottom_up: bool = False
    column_major: bool = False

    @property
    def channels(self) -> int:
        return 1 if self.order == "L" else 3

    @property
    def nbytes(self) -> int:
        """Bytes of the file the pixels span from ``offset`` (a shorter file is truncated)."""
        return self.channels * self.width * self.stride if self.column_major else self.height * self.stride

    def pixels(self) -> np.ndarray:
        """A read-only ``H x W x 3`` uint8 RGB view of the mapped file: slicing it reads only the slice's
        rows (columns, when ``column_major``).

        The file stays mapped while the view (or a view of it) lives; copy what is kept.
        """
        if self.column_major:
            planes = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset,
                               shape=(self.channels, self.width, self.stride))
            view = planes[:, :, : self.height].transpose(2, 1, 0)
            return np.broadcast_to(view, (self.height, self.width, 3))  # gray: one plane for all three
        rows = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.height, self.stride))
        if self.bottom_up:
            rows = rows[::-1]
        view = rows[:, : self.width * self.channels].reshape(self.height, self.width, self.channels)
        if self.order == "L":
            return np.broadcast_to(view, (self.height, self.width, 3))
        return view[:, :, ::-1] if self.order == "BGR" else view

    def read(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """A copy of the ``h x w x 3`` pixels of ``window = (x0, y0, x1, y1)`` (the file is unmapped after)."""
        x0, y0, x1, y1 = window
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise ValueError(f"RasterLayout.read: window {window} is not inside the {self.width}x{self.height} "
                             f"(w x h) image {str(self.path)!r}")
        return np.array(self.pixels()[y0:y1, x0:x1], order="C")


_RAW_ORDERS = {("RGB", "RGB"): "RGB", ("RGB", "BGR"): "BGR", ("L", "L"): "L"}


def raster_layout(path: Path | str) -> RasterLayout | None:
    """The :class:`RasterLayout` of ``path`` when it can be read by window, else ``None``.

    ``None`` also for a file that is missing, unreadable or shorter than its header says: the
    whole-image path then reports it (:func:`load_rgb_image`).
    """
    path = Path(path)
    try:
        if _is_npy(path):
            layout = _npy_layout(path, None)
        else:
            with _open_dataset_image(path) as image:
                tiles = list(getattr(image, "tile", None) or [])
                if len(tiles) != 1 or tiles[0][0] != "raw" or tuple(tiles[0][1]) != (0, 0, *image.size):
                    return None
                args = tiles[0][3] if isinstance(tiles[0][3], tuple) else (tiles[0][3],)
                rawmode, stride, orientation = (*args, 0, 1)[:3]
                order = _RAW_ORDERS.get((image.mode, rawmode))
                if order is None or orientation not in (1, -1):
                    return None
                width, height = image.size
                channels = 1 if order == "L" else 3
                layout = RasterLayout(path, int(tiles[0][2]), height, width, int(stride) or width * channels,
                                      order, bottom_up=orientation == -1)
        return layout if os.path.getsize(path) >= layout.offset + layout.nbytes else None
    except (DataError, *_DECODE_ERRORS):
        return None


def _is_npy(path: Path) -> bool:
    return path.suffix.lower() == ".npy"


def _npy_layout(path: Path, image_id: int | str | None) -> RasterLayout:
    """An ``.npy`` image's layout from its header; a wrong shape or dtype, or truncation, is a :class:`DataError`."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # maps the file, reads the header only
    except (OSError, ValueError) as error:
        raise _unreadable(path, error, image_id) from error
    shape, dtype = array.shape, array.dtype
    if dtype != np.uint8 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
        raise DataError(f".npy image has shape {shape}, dtype {dtype}; expected H x W x 3 or H x W uint8",
                        file=str(path), image_id=image_id)
    column_major = not array.flags.c_contiguous  # np.load maps C or Fortran order, as the header says
    order = "RGB" if len(shape) == 3 else "L"
    offset = int(array.offset)
    del array
    height, width = int(shape[0]), int(shape[1])
    stride = height if column_major else width * (1 if order == "L" else 3)
    return RasterLayout(path, offset, height, width, stride, order, column_major=column_major)
