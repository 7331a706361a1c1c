"""An image file listed twice in a split (COCO or VOC) is a ``file_listed_twice`` warning, also where
the two paths differ and a symbolic link makes them one file, or they are hard links of one inode
(``cp -al``, DVC's hard-link cache); the check resolves only what a link may alias, and the inodes
come from the folders' listings, with no call per file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helpers.builders import save_image, voc_xml, write_coco, write_voc

from lightning_rpn.data import listed_twice
from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.listed_twice import files_listed_twice
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


def test_a_coco_file_listed_again_as_a_hard_link_is_a_warning(tmp_path: Path) -> None:
    # two names of one inode were two images, without a word
    images_root, ann = write_coco(tmp_path, coco_images("a.png", "b.png"), [])
    os.link(images_root / "a.png", images_root / "copy_of_a.png")
    images_root, ann = write_coco(tmp_path, coco_images("a.png", "b.png", "copy_of_a.png"), [], create_files=False)
    dataset = COCODetection(images_root, ann)
    assert len(dataset) == 3  # kept: each id is an image of the split
    assert rows(dataset) == [(
        "file_listed_twice", "kept", str(ann), 3,
        f"{images_root / 'a.png'} is listed under 2 image ids (1, 3), also as {images_root / 'copy_of_a.png'} "
        f"(the same file, through a hard link): {SPLIT_OF_IMAGE_IDS}",
    )]


def test_a_folder_copied_as_hard_links_and_listed_beside_the_original_is_a_warning(tmp_path: Path) -> None:
    # `cp -al images copy`: every file of copy/ is a hard link of one of images/
    images_root, ann = write_coco(tmp_path, coco_images("a.png", "b.png", "c.png"), [])
    (images_root / "copy").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        os.link(images_root / name, images_root / "copy" / name)
    images_root, ann = write_coco(tmp_path, coco_images("a.png", "b.png", "copy/c.png", "copy/b.png"), [],
                                  create_files=False)
    problems = COCODetection(images_root, ann, on_bad_annotation="skip").problems
    assert [(p.kind, p.image_id) for p in problems] == [("file_listed_twice", 4)]
    assert list(problems)[0].detail.startswith(
        f"{images_root / 'b.png'} is listed under 2 image ids (2, 4), also as {images_root / 'copy' / 'b.png'} "
        "(the same file, through a hard link)")


def test_symbolic_and_hard_links_of_one_file_are_named_each_as_what_it_is(tmp_path: Path) -> None:
    images_root, ann = write_coco(tmp_path, coco_images("a.png"), [])
    os.link(images_root / "a.png", images_root / "hard.png")
    os.symlink("a.png", images_root / "soft.png")
    os.symlink("hard.png", images_root / "soft_to_hard.png")
    names = ("hard.png", "soft.png", "a.png", "soft_to_hard.png")
    images_root, ann = write_coco(tmp_path, coco_images(*names), [], create_files=False)
    (problem,) = COCODetection(images_root, ann).problems
    assert (problem.image_id, problem.detail) == (2, (
        f"{images_root / 'hard.png'} is listed under 4 image ids (1, 2, 3, 4), also as "
        f"{images_root / 'soft_to_hard.png'} (the same file, through a symbolic link), also as "
        f"{images_root / 'soft.png'}, {images_root / 'a.png'} (the same file, through a hard link): "
        f"{SPLIT_OF_IMAGE_IDS}"
    ))
    assert files_listed_twice([images_root / name for name in names]) == [[[0, 3], [1, 2]]]


def test_a_link_into_an_unlisted_folder_and_a_hard_link_of_its_target_are_one_file(tmp_path: Path) -> None:
    store = tmp_path / "store"  # the links' targets, a folder no listed path is in (a link farm's store)
    save_image(store / "x.png", 40, 60)
    farm, other = tmp_path / "farm", tmp_path / "other"
    farm.mkdir()
    other.mkdir()
    os.symlink(store / "x.png", farm / "x.png")
    os.link(store / "x.png", other / "x_again.png")
    save_image(farm / "y.png", 40, 60)
    assert files_listed_twice([farm / "y.png", farm / "x.png", other / "x_again.png"]) == [[[1], [2]]]


def test_hard_links_that_make_no_file_listed_twice_are_no_warning(tmp_path: Path) -> None:
    images_root, ann = write_coco(tmp_path, coco_images("a.png", "b.png"), [])
    os.link(images_root / "a.png", images_root / "unlisted_copy.png")  # a listed file's link, itself not listed
    (tmp_path / "elsewhere").mkdir()
    os.link(images_root / "b.png", tmp_path / "elsewhere" / "b.png")
    assert len(COCODetection(images_root, ann).problems) == 0
    files = [images_root / "a.png", images_root / "b.png", images_root / "a.png"]  # listed twice by one path
    assert files_listed_twice(files) == [[[0, 2]]]


def test_a_voc_image_listed_as_a_hard_link_is_a_warning_naming_the_split_file(tmp_path: Path) -> None:
    root = write_voc(tmp_path, {"a": {"size": (40, 60)}, "c": {"size": (40, 60)}})
    os.link(root / "JPEGImages" / "a.png", root / "JPEGImages" / "copy_of_a.png")
    (root / "Annotations" / "copy_of_a.xml").write_text(voc_xml("copy_of_a.png", (40, 60), []))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nc\ncopy_of_a\n")
    dataset = VOCDetection(root, "train")
    assert len(dataset) == 3
    assert rows(dataset) == [(
        "file_listed_twice", "kept", str(root / "ImageSets" / "Main" / "train.txt"), "copy_of_a",
        f"{root / 'JPEGImages' / 'a.png'} is listed under 2 image ids ('a', 'copy_of_a'), also as "
        f"{root / 'JPEGImages' / 'copy_of_a.png'} (the same file, through a hard link): {SPLIT_OF_IMAGE_IDS}",
    )]


def test_one_inode_number_of_two_files_is_confirmed_before_they_are_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing's inode numbers are unique per file system only (an overlay's layers may repeat
    them): a shared number is checked with ``os.stat``."""
    save_image(tmp_path / "a.png", 40, 60)
    save_image(tmp_path / "b.png", 40, 60, seed=1)
    monkeypatch.setattr(listed_twice, "_inode_numbers", lambda real: (1, {"a.png": 7, "b.png": 7}))
    monkeypatch.setattr(listed_twice, "_shared_inodes", lambda folders, outside: True)
    assert files_listed_twice([tmp_path / "a.png", tmp_path / "b.png"]) == []
    os.link(tmp_path / "a.png", tmp_path / "c.png")
    monkeypatch.setattr(listed_twice, "_inode_numbers", lambda real: (1, {"a.png": 7, "b.png": 7, "c.png": 7}))
    assert files_listed_twice([tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]) == [[[0], [2]]]


def test_looking_for_hard_links_makes_no_call_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the load time: the inode of each file comes from its folder's listing (a stat per file
    cost about as much as the rest of the check)."""
    names = [f"{k:03d}.png" for k in range(20)]
    images_root, ann = write_coco(tmp_path, coco_images(*names), [])
    (images_root / "sub").mkdir()
    os.link(images_root / "000.png", images_root / "sub" / "unlisted.png")
    calls: list[str] = []
    for name in ("stat", "lstat"):
        original = getattr(os, name)

        def counted(path: Any, *args: Any, original: Any = original, **kwargs: Any) -> os.stat_result:
            calls.append(os.fspath(path))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(os, name, counted)
    files = [images_root / name for name in names] + [images_root / "sub" / "unlisted.png"]
    calls.clear()
    assert files_listed_twice(files[:-1]) == []
    assert [path for path in calls if path.endswith(".png")] == []  # the folders only
    assert files_listed_twice(files) == [[[0], [20]]]  # the listed file and its link in another folder
