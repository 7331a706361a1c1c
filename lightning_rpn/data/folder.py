"""A folder of images without annotations, for prediction."""

from __future__ import annotations

from pathlib import Path

from PIL import features
from torch.utils.data import Dataset

from lightning_rpn.data.image_io import load_rgb_image
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.sample import DetectionSample

__all__ = ["ImageFolder", "IMAGE_SUFFIXES"]

_CODEC_SUFFIXES = {"webp": (".webp",), "jpg_2000": (".jp2", ".j2k")}
"""Formats PIL reads only when built with their codec (its wheels are): listed only then."""

IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".npy",
    *(suffix for codec, suffixes in _CODEC_SUFFIXES.items() if features.check(codec) for suffix in suffixes),
)
"""What :func:`~lightning_rpn.data.image_io.load_rgb_image` reads (``.npy``: uint8 arrays; PPM / PGM: the
uncompressed formats very large images are read by window from; ``.jfif``: JPEGs as browsers save them)."""


class ImageFolder(Dataset):
    """Every image file directly under ``root`` (sorted by name); ids are the file names.

    Hidden files (names starting with ``.``) are left out: macOS writes a ``._x.jpg`` resource
    fork beside ``x.jpg`` on foreign disks and in archives, and it is no image.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError("image folder does not exist", file=str(self.root))
        self.files = sorted(p for p in self.root.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not self.files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder", file=str(self.root))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> DetectionSample:
        path = self.files[index]
        image = load_rgb_image(path, image_id=path.name)
        return DetectionSample(image=image, boxes=[], image_id=path.name, source=str(path))
