"""Where images come from: VOC's image path fallback, Fortran-order ``.npy``, listing vs reader."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.builders import save_image, write_voc
from PIL import Image

from lightning_rpn.data.folder import IMAGE_SUFFIXES, ImageFolder
from lightning_rpn.data.image_io import load_rgb_image, raster_layout, read_image_size, verify_image
from lightning_rpn.data.loose_images import as_hwc_uint8
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.validation import validate_dataset
from lightning_rpn.data.voc import VOCDetection
from lightning_rpn.training.datamodule import RPNDataModule

BOX = {"box": (2, 2, 9, 9)}


# ---- VOC: which file is the image --------------------------------------------------------------
def test_voc_reads_id_jpg_where_the_filename_element_is_stale(tmp_path: Path) -> None:
    # files renamed to {id}.jpg after annotation: <filename> still names the old file
    root = write_voc(tmp_path, {"000001": {"size": (20, 30), "file_name": "IMG_4711.JPG", "no_image": True,
                                           "objects": [BOX]}})
    save_image(root / "JPEGImages" / "000001.jpg", 20, 30)
    item = VOCDetection(root, "train")[0]
    assert item.image.shape == (20, 30, 3) and item.source == str(root / "JPEGImages" / "000001.jpg")


def test_voc_reads_id_with_the_filename_extension_and_prefers_id_jpg(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"a": {"size": (20, 30), "file_name": "old name.png", "no_image": True,
                                      "objects": [BOX]},
                                "b": {"size": (20, 30), "file_name": "other.png", "objects": [BOX]}})
    save_image(root / "JPEGImages" / "a.png", 20, 30)  # renamed PNGs keep their extension
    save_image(root / "JPEGImages" / "b.jpg", 20, 30)  # both exist: the id wins, as in torchvision
    assert [r.file.name for r in VOCDetection(root, "train").records] == ["a.png", "b.jpg"]


def test_voc_image_at_no_path_names_every_path_the_annotation_and_the_id(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"ok": {"size": (20, 20), "objects": [BOX]},
                                "gone": {"size": (20, 20), "file_name": "old.png", "no_image": True,
                                         "objects": [BOX]}})
    images, xml = root / "JPEGImages", str(root / "Annotations" / "gone.xml")
    with pytest.raises(DataError) as info:
        VOCDetection(root, "train")  # found while reading the annotations, before any training step
    message = str(info.value)
    assert message.startswith(f"{xml}, image 'gone': image file does not exist; tried ")
    for path in (images / "gone.jpg", images / "old.png", images / "gone.png"):
        assert str(path) in message
    skipped = VOCDetection(root, "train", on_bad_annotation="skip")
    assert [r.image_id for r in skipped.records] == ["ok"]
    (problem,) = skipped.problems
    assert (problem.kind, problem.file, problem.image_id) == ("unreadable_image", xml, "gone")


def test_check_data_reads_the_file_training_reads(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"a": {"size": (20, 30), "file_name": "stale.png", "no_image": True, "objects": [BOX]},
                                "b": {"size": (20, 30), "file_name": "gone.png", "no_image": True, "objects": [BOX]}})
    save_image(root / "JPEGImages" / "a.jpg", 20, 30)
    dm = RPNDataModule("voc", root=str(root), train_split="train", val_split=None, num_workers=0)
    (split,) = validate_dataset(dm, splits=("train",), check_images=True).splits
    assert split.images == 1 and split.boxes == 1
    (problem,) = split.problems
    assert problem.kind == "unreadable_image" and problem.image_id == "b"
    assert str(root / "JPEGImages" / "b.jpg") in problem.detail and "gone.png" in problem.detail


# ---- Fortran-order .npy ------------------------------------------------------------------------
@pytest.mark.parametrize("gray", [False, True])
def test_fortran_order_npy_reads_whole_and_by_window(tmp_path: Path, gray: bool) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    stored = rgb[:, :, 1] if gray else rgb
    expected = np.repeat(stored[:, :, None], 3, axis=2) if gray else rgb
    path = tmp_path / "f.npy"
    np.save(path, np.asfortranarray(stored))  # as MATLAB or np.asfortranarray leave it
    whole = load_rgb_image(path)
    np.testing.assert_array_equal(whole, expected)
    assert whole.flags.c_contiguous and read_image_size(path) == verify_image(path) == (45, 61)
    layout = raster_layout(path)
    assert layout is not None and layout.column_major
    window = layout.read((7, 3, 50, 41))
    np.testing.assert_array_equal(window, expected[3:41, 7:50])
    assert window.flags.c_contiguous and window.flags.writeable
    np.testing.assert_array_equal(layout.pixels(), expected)
    short = tmp_path / "short.npy"
    short.write_bytes(path.read_bytes()[:-5])
    assert raster_layout(short) is None  # the whole-image reader reports it
    with pytest.raises(DataError, match="truncated or unreadable"):
        load_rgb_image(short)


# ---- what a folder lists, the readers read -----------------------------------------------------
def _save_as(path: Path, pixels: np.ndarray) -> None:
    """``pixels`` saved in the format of ``path`` 's suffix, in a mode that format stores."""
    if path.suffix.lower() == ".npy":
        np.save(path, pixels)
        return
    mode = {".pbm": "1", ".pgm": "L"}.get(path.suffix.lower(), "RGB")
    Image.fromarray(pixels).convert(mode).save(path)


def test_every_listed_suffix_is_read_and_hidden_files_are_not_listed(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    for index, suffix in enumerate(IMAGE_SUFFIXES):
        _save_as(tmp_path / f"{index:02d}{suffix.upper() if index % 2 else suffix}", pixels)
    (tmp_path / "._00.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # a macOS resource fork
    folder = ImageFolder(tmp_path)
    assert len(folder) == len(IMAGE_SUFFIXES) and all(not p.name.startswith(".") for p in folder.files)
    for index in range(len(folder)):
        assert folder[index].image.shape == (12, 16, 3), folder.files[index].name
    assert {".jfif", ".jpe", ".pbm"} <= set(IMAGE_SUFFIXES)  # JPEG as browsers save it; all of PNM


def test_a_folder_passed_as_one_loose_image_says_to_pass_its_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"predict_images: image 0 is the folder .*pass its image files"):
        as_hwc_uint8(tmp_path, 0)
    assert as_hwc_uint8(torch.zeros(3, 4, 5), 0).shape == (4, 5, 3)


def test_a_pil_image_of_8_bit_values_in_a_wide_mode_warns_as_its_file_does() -> None:
    # Image.fromarray of an int32 array of 0..255 (mode "I") turns nearly black in 8 bits
    narrow = Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 256).astype(np.int32))
    with pytest.warns(UserWarning, match=r"predict_images: image 3: .*maximum value 255"):
        as_hwc_uint8(narrow, 3)
    full = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_hwc_uint8(full, 0).max() == 255


def test_a_missing_file_names_its_twin_in_another_unicode_form(tmp_path: Path) -> None:
    """A COCO file_name written composed (NFC) and the file on disk decomposed (NFD), as macOS
    archives write names: the two look the same in every listing, and the error said only
    "does not exist"."""
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    save_image(tmp_path / decomposed, 8, 8)
    if (tmp_path / composed).is_file():  # a file system that normalises names itself: nothing to tell
        pytest.skip("this file system maps both forms to one file")
    with pytest.raises(DataError, match=r"image file does not exist; .*\.png is the same name in another Unicode "
                                        r"form, decomposed \(NFD\): rename"):
        load_rgb_image(tmp_path / composed)
    with pytest.raises(DataError, match=r"image file does not exist$"):
        load_rgb_image(tmp_path / "other.png")
