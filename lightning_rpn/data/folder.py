"""A folder of images without annotations, for prediction."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from lightning_rpn.data.image_io import load_rgb_image
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.sample import DetectionSample

__all__ = ["ImageFolder", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm", ".npy")
"""What :func:`~lightning_rpn.data.image_io.load_rgb_image` reads (``.npy``: uint8 arrays; PPM / PGM: the
uncompressed formats very large images are read by window from)."""


class ImageFolder(Dataset):
    """Every image file directly under ``root`` (sorted by name); ids are the file names."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError("image folder does not exist", file=str(self.root))
        self.files = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder", file=str(self.root))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> DetectionSample:
        path = self.files[index]
        image = load_rgb_image(path, image_id=path.name)
        return DetectionSample(image=image, boxes=[], image_id=path.name, source=str(path))
