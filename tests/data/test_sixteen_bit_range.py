"""16-bit images whose data uses a small part of the range (12-bit sensors) warn, once per file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_rpn.data import annotated
from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data import image_io
from lightning_rpn.data.image_io import load_rgb_image
from lightning_rpn.data.tiles import TileConfig, TiledDataset


def save_16_bit(path: Path, maximum: int, height: int = 30, width: int = 40) -> Path:
    values = np.random.default_rng(0).integers(0, maximum + 1, (height, width)).astype(np.uint16)
    values[0, 0] = maximum
    Image.fromarray(values).save(path)
    return path


def narrow_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "grey level" in str(w.message)]


def test_12_bit_data_in_a_16_bit_file_warns_once_naming_file_maximum_and_levels(tmp_path: Path) -> None:
    path = save_16_bit(tmp_path / "sensor.tif", 4095)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = [load_rgb_image(path, image_id=1) for _ in range(3)]
    (message,) = narrow_warnings(caught)
    assert str(path) in message and "maximum value 4095" in message and "17 grey level(s)" in message
    assert caught[0].category is UserWarning
    assert len(np.unique(images[0])) == 17  # the conversion itself is unchanged: value / 257
    np.testing.assert_array_equal(images[0][:, :, 0], np.round(np.asarray(Image.open(path)) / 257.0))


@pytest.mark.parametrize("maximum", [4096, 65535])
def test_16_bit_data_using_the_range_does_not_warn(tmp_path: Path, maximum: int) -> None:
    path = save_16_bit(tmp_path / "full.png", maximum)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_rgb_image(path)
    assert narrow_warnings(caught) == []
    with Image.open(path) as image:
        assert image_io.narrow_sixteen_bit_range(image) is None


def test_narrow_range_check_ignores_8_bit_images(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 5), 3, np.uint8)).save(tmp_path / "dark.png")
    with Image.open(tmp_path / "dark.png") as image:
        assert image_io.narrow_sixteen_bit_range(image) is None
    with Image.open(save_16_bit(tmp_path / "narrow.png", 1000)) as image:
        assert "maximum value 1000" in (image_io.narrow_sixteen_bit_range(image) or "")


def test_windows_of_large_16_bit_images_warn_once_per_file(tmp_path: Path, monkeypatch) -> None:
    """Two images over the (empty) cache budget: each window decodes its image again."""
    images, annotations = [], []
    for index in (1, 2):
        save_16_bit(tmp_path / f"ortho{index}.png", 4095, height=96, width=128)
        images.append({"id": index, "file_name": f"ortho{index}.png", "height": 96, "width": 128})
        annotations.append({"id": index, "image_id": index, "bbox": [10, 10, 20, 20], "category_id": 1})
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}))
    decoded: list[str] = []

    def counting_load(path, **kwargs):
        decoded.append(str(path))
        return load_rgb_image(path, **kwargs)

    monkeypatch.setattr(annotated, "load_rgb_image", counting_load)
    tiled = TiledDataset(COCODetection(tmp_path, tmp_path / "ann.json"),
                         TileConfig(size=32, per_epoch=20, cache_mb=0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(20):
            tiled[index]
    assert len(decoded) > len(set(decoded)) == 2  # decoded again for later windows
    found = narrow_warnings(caught)
    assert len(found) == 2 and all(any(f"ortho{i}.png" in message for message in found) for i in (1, 2))
