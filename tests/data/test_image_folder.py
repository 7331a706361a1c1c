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


def test_subfolder_images_are_counted_in_a_warning_and_a_dangling_link_is_unreadable(tmp_path: Path) -> None:
    """Both were left out without a word."""
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "top.png")
    for name, count in (("day1", 2), ("day2", 1)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    with pytest.warns(UserWarning, match=r"3 image files in subfolders \(day1/ \(2\), day2/ \(1\)\) are not read"):
        folder = ImageFolder(tmp_path, on_bad_annotation="skip")
    assert [path.name for path in folder.files] == ["top.png"]
    assert [(p.kind, p.image_id) for p in folder.skipped] == [("unreadable_image", "gone.jpg")]
    with pytest.raises(DataError, match="gone.jpg"), pytest.warns(UserWarning):
        ImageFolder(tmp_path, verify_images=True)
