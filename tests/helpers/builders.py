"""Builders of tiny COCO and VOC datasets on disk, shared by the data and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def save_image(path: Path, height: int, width: int, mode: str = "RGB", seed: int = 0) -> Path:
    """A random image of ``mode`` saved with PIL (PNG keeps 16-bit and alpha modes)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).save(path)
    elif mode in ("L", "RGBA", "RGB"):
        channels = {"L": None, "RGB": 3, "RGBA": 4}[mode]
        shape = (height, width) if channels is None else (height, width, channels)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None).save(path)
    else:
        raise ValueError(mode)
    return path


def write_coco(
    root: Path,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] | None = None,
    create_files: bool = True,
) -> tuple[Path, Path]:
    """``root/images`` + ``root/annotations.json``; image files are created at their declared size."""
    images_root = root / "images"
    images_root.mkdir(parents=True, exist_ok=True)
    if create_files:
        for i, entry in enumerate(images):
            save_image(images_root / entry["file_name"], entry["height"], entry["width"], seed=i)
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps({
        "images": images,
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }))
    return images_root, ann_file


def basic_coco(root: Path) -> tuple[Path, Path]:
    """Three images: two boxes + a crowd box, one box of category 2, and none."""
    images = [
        {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
        {"id": 2, "file_name": "sub/b.png", "height": 50, "width": 30},
        {"id": 3, "file_name": "c.png", "height": 32, "width": 32},
    ]
    annotations = [
        {"id": 10, "image_id": 1, "bbox": [5, 6, 10, 20], "category_id": 1, "iscrowd": 0},
        {"id": 11, "image_id": 1, "bbox": [30, 2, 25, 30], "category_id": 1, "iscrowd": 0},
        {"id": 12, "image_id": 1, "bbox": [0, 0, 20, 20], "category_id": 1, "iscrowd": 1},
        {"id": 13, "image_id": 2, "bbox": [1, 1, 8, 8], "category_id": 2, "iscrowd": 0},
    ]
    return write_coco(root, images, annotations)


def voc_xml(file_name: str, size: tuple[int, int] | None, objects: list[dict[str, Any]]) -> str:
    """A VOC annotation; ``size`` is ``(h, w)``; objects: name, box (xmin, ymin, xmax, ymax), difficult."""
    parts = ["<annotation>", f"<filename>{file_name}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
    for obj in objects:
        xmin, ymin, xmax, ymax = obj["box"]
        parts.append(
            f"<object><name>{obj.get('name', 'cat')}</name><difficult>{int(obj.get('difficult', 0))}</difficult>"
            f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "".join(parts)


def write_voc(root: Path, entries: dict[str, dict[str, Any]], split: str = "train") -> Path:
    """VOC tree under ``root``; ``entries[id]`` = {size (h, w), objects, [file_name, xml, no_image, mode]}."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (image_id, entry) in enumerate(entries.items()):
        file_name = entry.get("file_name", f"{image_id}.png")
        if not entry.get("no_image"):
            height, width = entry.get("file_size", entry["size"])
            save_image(root / "JPEGImages" / file_name, height, width, entry.get("mode", "RGB"), seed=i)
        xml = entry.get("xml", voc_xml(file_name, entry["size"], entry.get("objects", [])))
        if xml is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root
