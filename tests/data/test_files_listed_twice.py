"""An image file listed twice in a split (COCO or VOC) is a ``file_listed_twice`` warning, also where
the two paths differ and a symbolic link makes them one file; the check resolves only what a link
may alias."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helpers.builders import voc_xml, write_coco, write_voc

from lightning_rpn.data.listed_twice import files_listed_twice
from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.voc import VOCDetection

SPLIT_OF_IMAGE_IDS = "each is an image of the split, trained and evaluated (its boxes counted) once per id"


def coco_images(*names: str) -> list[dict[str, Any]]:
    return [{"id": k + 1, "file_name": name, "height": 40, "width": 60} for k, name in enumerate(names)]


def rows(dataset: COCODetection | VOCDetection) -> list[tuple[Any, ...]]:
    return [(p.kind, p.action, p.file, p.image_id, p.detail) for p in dataset.problems]


def test_a_coco_file_listed_again_through_a_link_to_it_is_a_warning(tmp_path: Path) -> None:
    # the paths were compared as written: a.png and link_to_a.png were two images, without a word
    images_root, ann = write_coco(tmp_path, coco_images("a.png", "b.png"), [])
    os.symlink("a.png", images_root / "link_to_a.png")
    images_root, ann = write_coco(tmp_path, coco_images("a.png", "b.png", "link_to_a.png"), [], create_files=False)
    dataset = COCODetection(images_root, ann)
    assert len(dataset) == 3  # kept: each id is an image of the split
    assert rows(dataset) == [(
        "file_listed_twice", "kept", str(ann), 3,
        f"{images_root / 'a.png'} is listed under 2 image ids (1, 3), also as {images_root / 'link_to_a.png'} "
        f"(the same file, through a symbolic link): {SPLIT_OF_IMAGE_IDS}",
    )]


def test_a_coco_folder_listed_as_it_is_and_through_a_link_is_a_warning(tmp_path: Path) -> None:
    images_root, ann = write_coco(tmp_path, coco_images("sub/a.png", "sub/b.png"), [])
    os.symlink("sub", images_root / "alias")
    images_root, ann = write_coco(tmp_path, coco_images("sub/a.png", "sub/b.png", "alias/b.png"), [],
                                  create_files=False)
    (problem,) = COCODetection(images_root, ann, on_bad_annotation="skip").problems
    assert (problem.kind, problem.image_id) == ("file_listed_twice", 3)
    assert problem.detail.startswith(f"{images_root / 'sub' / 'b.png'} is listed under 2 image ids (2, 3), also as "
                                     f"{images_root / 'alias' / 'b.png'} (the same file, through a symbolic link)")


def test_links_that_make_no_file_listed_twice_are_no_warning(tmp_path: Path) -> None:
    images_root, ann = write_coco(tmp_path / "data", coco_images("a.png", "b.png"), [])
    os.symlink("a.png", images_root / "unlisted_link.png")  # a link to a listed file, itself not listed
    os.symlink(images_root, tmp_path / "linked_root")
    assert len(COCODetection(tmp_path / "linked_root", ann).problems) == 0
    assert len(COCODetection(images_root, ann).problems) == 0


def test_only_links_and_folders_are_resolved_not_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the load time: resolving every path cost about a second for COCO train2017."""
    names = [f"{k:03d}.png" for k in range(20)]
    images_root, ann = write_coco(tmp_path, coco_images(*names), [])
    resolved: list[str] = []
    realpath = os.path.realpath

    def counted(path: Any, *args: Any, **kwargs: Any) -> str:
        resolved.append(os.fspath(path))
        return realpath(path, *args, **kwargs)

    monkeypatch.setattr(os.path, "realpath", counted)
    assert len(COCODetection(images_root, ann).problems) == 0
    assert resolved == [str(images_root)]  # the folder, once
    os.symlink("001.png", images_root / "link.png")
    resolved.clear()
    images_root, ann = write_coco(tmp_path, coco_images(*names, "link.png"), [], create_files=False)
    assert [p.image_id for p in COCODetection(images_root, ann).problems] == [21]
    # and the link's target folder, once: links are read, not resolved one by one (a folder of
    # 100k links loaded in twice the time)
    assert resolved == [str(images_root), str(images_root)]
    farm = tmp_path / "farm"  # a folder of links only (a DVC cache): two folders resolved, not 20 links
    farm.mkdir()
    for name in names:
        os.symlink(images_root / name, farm / name)
    resolved.clear()
    assert files_listed_twice([farm / name for name in names]) == []
    assert resolved == [str(farm), str(images_root)]
    assert files_listed_twice([farm / "003.png", images_root / "003.png"]) == [[[0, 1]]]


def test_a_voc_image_listed_twice_is_a_warning_naming_the_split_file(tmp_path: Path) -> None:
    # VOC did not look: neither a link (id link_to_a) nor an annotation whose <filename> is another id's image
    root = write_voc(tmp_path, {"a": {"size": (40, 60)}, "c": {"size": (40, 60)}})
    os.symlink("a.png", root / "JPEGImages" / "link_to_a.png")
    (root / "Annotations" / "link_to_a.xml").write_text(voc_xml("link_to_a.png", (40, 60), []))
    (root / "Annotations" / "b.xml").write_text(voc_xml("a.png", (40, 60), []))  # there is no b.png
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nc\nlink_to_a\nb\n")
    dataset = VOCDetection(root, "train")
    assert len(dataset) == 4
    split_file, image = str(root / "ImageSets" / "Main" / "train.txt"), root / "JPEGImages" / "a.png"
    assert rows(dataset) == [(
        "file_listed_twice", "kept", split_file, "link_to_a",
        f"{image} is listed under 3 image ids ('a', 'link_to_a', 'b'), also as {root / 'JPEGImages' / 'link_to_a.png'} "
        f"(the same file, through a symbolic link): {SPLIT_OF_IMAGE_IDS}",
    )]

