"""Truncated and missing image files: found by the checks, and handled by the policy in training."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from PIL import Image, ImageFile
from helpers.builders import write_coco
from helpers.datamodule import ANCHORS, TinyModule

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.image_io import load_rgb_image, raster_layout, read_image_size, verify_image
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.validation import validate_dataset
from lightning_rpn.training.datamodule import RPNDataModule


def save_truncated_jpeg(path: Path, height: int = 48, width: int = 64, keep: float = 0.6) -> Path:
    """A JPEG whose last ``1 - keep`` of the bytes are cut off (a half-downloaded file)."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def coco_with_bad_images(root: Path) -> tuple[Path, Path]:
    """Four 48x64 images, one box each: 1 and 4 fine, 2 truncated, 3 missing."""
    names = ["ok1.png", "cut.jpg", "gone.png", "ok2.png"]
    images = [{"id": i + 1, "file_name": n, "height": 48, "width": 64} for i, n in enumerate(names)]
    anns = [{"id": 10 + i, "image_id": i + 1, "bbox": [4, 4, 20, 20], "category_id": 1} for i in range(4)]
    images_root, ann = write_coco(root, images, anns)
    save_truncated_jpeg(images_root / "cut.jpg")
    (images_root / "gone.png").unlink()
    return images_root, ann


def test_truncated_jpeg_passes_the_header_but_not_the_decoding_check(tmp_path: Path, monkeypatch) -> None:
    path = save_truncated_jpeg(tmp_path / "cut.jpg")
    assert read_image_size(path) == (48, 64)  # the header is intact
    with pytest.raises(DataError, match=r"cut\.jpg, image 5: .*truncated"):
        verify_image(path, image_id=5)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone switched PIL to grey-filling
    for read in (verify_image, load_rgb_image):
        with pytest.raises(DataError, match="truncated"):
            read(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def save_float_rgb_tiff(path: Path, height: int = 6, width: int = 5) -> Path:
    """An uncompressed little-endian TIFF of float32 RGB samples (a valid file PIL cannot open):
    header, BitsPerSample and SampleFormat triples, pixels, then the one IFD."""
    triples = struct.pack("<6H", 32, 32, 32, 3, 3, 3)  # 32 bits, IEEE float, per sample
    pixels = np.random.default_rng(0).random((height, width, 3), dtype=np.float32).tobytes()
    triples_at, pixels_at = 8, 8 + len(triples)
    tags = {256: (3, 1, width), 257: (3, 1, height), 258: (3, 3, triples_at), 259: (3, 1, 1),
            262: (3, 1, 2), 273: (4, 1, pixels_at), 277: (3, 1, 3), 278: (3, 1, height),
            279: (4, 1, len(pixels)), 284: (3, 1, 1), 339: (3, 3, triples_at + 6)}
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, *entry) for tag, entry in tags.items())
    header = b"II*\x00" + struct.pack("<I", pixels_at + len(pixels))
    path.write_bytes(header + triples + pixels + ifd + b"\x00" * 4)
    return path


def test_a_tiff_pil_cannot_decode_says_how_to_convert_it(tmp_path: Path) -> None:
    tiff = save_float_rgb_tiff(tmp_path / "ortho.tif")
    for read in (load_rgb_image, verify_image, read_image_size):
        with pytest.raises(DataError, match=r"ortho\.tif, image 7: a TIFF that PIL cannot decode .*uint8 \.npy"):
            read(tiff, image_id=7)
    (tmp_path / "noise.tif").write_bytes(b"not an image at all")  # no TIFF signature: corrupt
    with pytest.raises(DataError, match="image file is corrupt, truncated or unreadable"):
        load_rgb_image(tmp_path / "noise.tif")


def test_check_data_finds_truncated_and_missing_images(tmp_path: Path) -> None:
    report = validate_dataset(COCODetection(*coco_with_bad_images(tmp_path)))
    problems = {p.image_id: p for p in report.splits[0].problems}
    assert set(problems) == {2, 3} and {p.kind for p in problems.values()} == {"unreadable_image"}
    assert "cut.jpg" in problems[2].detail and "truncated" in problems[2].detail
    assert "gone.png" in problems[3].detail and "does not exist" in problems[3].detail
    assert report.num_errors == 2 and not report.ok


def test_verify_images_raises_or_skips_up_front(tmp_path: Path) -> None:
    args = coco_with_bad_images(tmp_path)
    with pytest.raises(DataError, match=r"cut\.jpg, image 2: .*truncated.*found by verify_images"):
        COCODetection(*args, verify_images=True)
    verified = COCODetection(*args, verify_images=True, on_bad_annotation="skip")
    assert [r.image_id for r in verified.records] == [1, 4]
    assert sorted(p.image_id for p in verified.problems) == [2, 3]


@pytest.mark.parametrize("image_id, name, reason", [(2, "cut.jpg", "truncated"), (3, "gone.png", "does not exist")])
def test_unreadable_image_in_training_names_file_image_and_verify_images(
    tmp_path: Path, image_id: int, name: str, reason: str
) -> None:
    dataset = COCODetection(*coco_with_bad_images(tmp_path))
    with pytest.raises(DataError, match=rf"{name}, image {image_id}: .*{reason}.*verify_images"):
        dataset[image_id - 1]


def test_skip_replaces_unreadable_images_and_records_them(tmp_path: Path) -> None:
    dataset = COCODetection(*coco_with_bad_images(tmp_path), on_bad_annotation="skip")
    items = [dataset[i] for i in range(len(dataset))]
    assert [item.image_id for item in items] == [1, 4, 4, 4]  # 2 and 3 replaced by the next readable image
    assert [(p.kind, p.image_id) for p in items[1].problems] == [("unreadable_image", 2)]
    assert [(p.kind, p.image_id) for p in items[2].problems] == [("unreadable_image", 3)]
    assert "replaced by the next readable image" in items[2].problems[0].detail
    assert items[0].problems == [] and items[3].problems == []


def test_training_with_skip_goes_on_and_counts_the_skips(tmp_path: Path) -> None:
    images_root, ann = coco_with_bad_images(tmp_path)
    dm = RPNDataModule("coco", root=str(tmp_path), train_split="x", val_split=None, coco_images="images",
                       coco_annotations="annotations.json", on_bad_annotation="skip", batch_size=2,
                       num_workers=0, anchor_generator=ANCHORS, train_transforms=[])
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    with pytest.warns(UserWarning, match="load problems") as warned:
        trainer.fit(TinyModule(), datamodule=dm)
    printed = "\n".join(str(w.message) for w in warned)  # one warning per batch that met a problem
    assert "cut.jpg" in printed and "gone.png" in printed
    assert trainer.global_step == 4  # every batch of both epochs trained
    assert dm.last_report["train/load_problems"] == 2 * 2  # two skips per epoch


def test_verify_images_raises_before_the_first_step(tmp_path: Path) -> None:
    coco_with_bad_images(tmp_path)
    dm = RPNDataModule("coco", root=str(tmp_path), train_split="x", val_split=None, coco_images="images",
                       coco_annotations="annotations.json", verify_images=True, batch_size=2, num_workers=0,
                       anchor_generator=ANCHORS)
    module = TinyModule()
    steps: list[int] = []
    module.on_train_batch_start = lambda batch, index: steps.append(index)  # type: ignore[method-assign]
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(DataError, match=r"cut\.jpg, image 2: .*truncated"):
        trainer.fit(module, datamodule=dm)
    assert steps == []


def test_images_over_pils_decompression_bomb_limit_are_read(tmp_path: Path, monkeypatch) -> None:
    # an orthophoto over PIL's limit (about 179 million pixels) is the user's own file, not an attack
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2 x 1000 < 48 x 64: PIL alone raises
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 48)).save(path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert load_rgb_image(path).shape == (48, 64, 3)
    assert verify_image(path) == read_image_size(path) == (48, 64)
    raw = tmp_path / "big.ppm"
    Image.new("RGB", (64, 48)).save(raw)
    assert raster_layout(raw) is not None  # read by window, the way very large files are
    assert Image.MAX_IMAGE_PIXELS == 1000 and ImageFile.LOAD_TRUNCATED_IMAGES is False  # both restored


def test_an_empty_split_fails_setup_naming_it(tmp_path: Path) -> None:
    write_coco(tmp_path, [], [])
    dm = RPNDataModule("coco", root=str(tmp_path), train_split="x", val_split=None, coco_images="images",
                       coco_annotations="annotations.json", num_workers=0, anchor_generator=ANCHORS)
    with pytest.raises(DataError, match=r"annotations\.json: RPNDataModule: the train split 'x' holds no images"):
        dm.setup("fit")
    images = [{"id": i, "file_name": f"gone{i}.png", "height": 48, "width": 64} for i in (1, 2)]
    write_coco(tmp_path, images, [], create_files=False)  # every image missing: dropped by skip + verify_images
    dm = RPNDataModule("coco", root=str(tmp_path), train_split="x", val_split=None, coco_images="images",
                       coco_annotations="annotations.json", num_workers=0, anchor_generator=ANCHORS,
                       on_bad_annotation="skip", verify_images=True)
    with pytest.raises(DataError, match=r"holds no images .*every image was dropped"):
        dm.setup("fit")
