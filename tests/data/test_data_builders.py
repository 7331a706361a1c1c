"""Builders of tiny COCO and VOC datasets on disk, shared by the tests/test_data_*.py files."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from helpers.builders import basic_coco, write_voc



def test_builders_write_loadable_files(tmp_path: Path) -> None:
    images_root, ann_file = basic_coco(tmp_path / "coco")
    assert Image.open(images_root / "sub" / "b.png").size == (30, 50)
    assert len(json.loads(ann_file.read_text())["annotations"]) == 4
    root = write_voc(tmp_path / "voc", {"x": {"size": (20, 30), "objects": [{"box": (1, 1, 5, 5)}]}})
    assert "<xmin>1</xmin>" in (root / "Annotations" / "x.xml").read_text()
