"""ImageFolder (``data.predict_images``): every image format the loaders read, nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_rpn.data.folder import ImageFolder
from lightning_rpn.data.problems import DataError


def test_every_format_the_loaders_read_is_listed(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", pixels)
    Image.fromarray(pixels).save(tmp_path / "b.ppm")
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "c.pgm")
    Image.fromarray(pixels).save(tmp_path / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path)
    assert [path.name for path in folder.files] == ["a.npy", "b.ppm", "c.pgm", "d.png"]
    assert np.array_equal(folder[0].image, pixels) and np.array_equal(folder[1].image, pixels)


def test_a_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError, match="no image files"):
        ImageFolder(tmp_path)
