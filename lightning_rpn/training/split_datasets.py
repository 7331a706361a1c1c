"""The untransformed dataset of one split, from the data module's options (its ``hparams``).

``dataset`` chooses the kind: ``"synthetic"`` (:class:`~lightning_rpn.data.synthetic.SyntheticShapes`,
seeded by the split's name), ``"scenes"`` (:class:`~lightning_rpn.data.scenes.DenseScenes` with
``scene_options``), ``"coco"`` (``root / coco_images`` and ``root / coco_annotations``, ``{split}``
filled in) or ``"voc"`` (``ImageSets/Main/{split}.txt`` under ``root``). :func:`check_split_paths`
names the first of those files and folders that does not exist, with the setting that made its path:
the data module's ``prepare_data`` calls it before a run starts its loggers, without reading a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.problems import BadAnnotationPolicy, DataError
from lightning_rpn.data.scenes import DenseScenes
from lightning_rpn.data.synthetic import SHAPE_KINDS, SyntheticShapes
from lightning_rpn.data.voc import VOCDetection

__all__ = ["build_split_dataset", "check_split_paths"]

_VOC_ROOT = ("set --data.root to the VOC folder, e.g. VOCdevkit/VOC2007, that holds ImageSets/Main/, Annotations/ "
             "and JPEGImages/")


def build_split_dataset(
    hp: Mapping[str, Any],
    root: Path | None,
    split: str,
    train: bool,
    on_bad_annotation: BadAnnotationPolicy,
    verify_images: bool,
    report_unsafe_paths: bool = False,
) -> Dataset:
    """Split ``split`` of ``hp["dataset"]``; ``train``: it is the training split (the synthetic image counts)."""
    kind = hp["dataset"]
    if kind in ("synthetic", "scenes"):
        num = hp["synthetic_train_images"] if train else hp["synthetic_val_images"]
        if kind == "synthetic":
            kinds = SHAPE_KINDS if hp["synthetic_shape_kinds"] is None else hp["synthetic_shape_kinds"]
            return SyntheticShapes(num, hp["synthetic_min_size"], hp["synthetic_max_size"], hp["synthetic_max_shapes"],
                                   seed=hp["seed"], split=split, min_box_size=hp["synthetic_min_box_size"],
                                   shape_kinds=kinds, unannotated_kinds=hp["synthetic_unannotated_kinds"] or (),
                                   outlined_fraction=hp["synthetic_outlined_fraction"],
                                   unannotated_outlined=hp["synthetic_unannotated_outlined"],
                                   textured_fraction=hp["synthetic_textured_fraction"],
                                   unannotated_textured=hp["synthetic_unannotated_textured"])
        try:
            return DenseScenes(num, **(hp["scene_options"] or {}), seed=hp["seed"], split=split)
        except TypeError as error:
            raise ValueError(f"RPNDataModule: data.scene_options {hp['scene_options']!r}: {error}") from None
    if root is None:
        raise ValueError(f"RPNDataModule: dataset={kind!r} needs root (the dataset folder)")
    check_split_paths(hp, root, split, images=False)  # COCO's boxes and sizes need no image (analyze-anchors)
    if kind == "coco":
        return COCODetection(
            root / hp["coco_images"].format(split=split),
            root / hp["coco_annotations"].format(split=split),
            category_ids=hp["category_ids"], category_names=hp["category_names"],
            include_crowd=hp["include_crowd"], on_bad_annotation=on_bad_annotation, verify_images=verify_images,
            report_unsafe_paths=report_unsafe_paths,
        )
    return VOCDetection(root, split, keep_difficult=hp["keep_difficult"], class_names=hp["category_names"],
                        on_bad_annotation=on_bad_annotation, verify_images=verify_images,
                        report_unsafe_paths=report_unsafe_paths)


def check_split_paths(hp: Mapping[str, Any], root: Path, split: str, images: bool = True) -> None:
    """Raise the one-line :class:`DataError` of the first file or folder that split ``split`` of a COCO
    or VOC dataset (``hp["dataset"]``) reads under ``root`` and that does not exist, naming the
    settings that make its path and what to set; the dataset kinds without files pass. Nothing is
    read: the check costs a few ``stat`` s, where parsing COCO train2017's annotation file takes seconds.
    ``images=False`` leaves COCO's images folder out: its annotations alone hold the boxes and sizes
    that ``analyze-anchors`` reads, and ``check-data`` names each image it misses."""
    kind = hp["dataset"]
    root_setting = f"--data.root {str(root)!r}"
    if kind == "coco":
        annotations, image_folder = hp["coco_annotations"], hp["coco_images"]
        needed = [
            (annotations.format(split=split), False, "COCO annotation file",
             f"{root_setting} and --data.coco_annotations {annotations!r}",
             "set them to the COCO folder and the file's path in it, or correct the split name in --data.*_split"),
            (image_folder.format(split=split), True, "COCO images folder",
             f"{root_setting} and --data.coco_images {image_folder!r}",
             "set --data.coco_images to the folder in --data.root that the annotation file's file_name values are "
             "relative to"),
        ][:2 if images else 1]
    elif kind == "voc":
        needed = [
            (f"ImageSets/Main/{split}.txt", False, f"VOC split file for split {split!r}", root_setting,
             f"{_VOC_ROOT}, or the split name in --data.*_split to a list in ImageSets/Main{_voc_lists(root)}"),
            ("Annotations", True, "VOC annotations folder", root_setting, _VOC_ROOT),
            ("JPEGImages", True, "VOC images folder", root_setting, _VOC_ROOT),
        ]
    else:
        return
    for i, (relative, folder, what, settings, advice) in enumerate(needed):
        path = root / relative
        if path.is_dir() if folder else path.is_file():
            continue
        # the first path, a file, tells where the dataset is; once it exists the root is right
        off = _one_level_off(root, [(other, is_folder) for other, is_folder, *_ in needed]) if i == 0 else ""
        raise DataError(f"split {split!r} of {settings} ({advice}{off}): {what} does not exist", file=str(path))


def _one_level_off(root: Path, needed: list[tuple[str, bool]]) -> str:
    """Where the dataset is when ``root`` is set one level off in the tree: the folder above it or
    one of its subfolders holding the ``needed`` paths (``(relative path, is a folder)``, the
    first a file), as advice; one holding them all first; ``""`` where none holds the first."""
    below = [] if not root.is_dir() else sorted(Path(entry.path) for entry in os.scandir(root) if entry.is_dir())
    holding = [candidate for candidate in (root.parent, *below)
               if candidate != root and (candidate / needed[0][0]).is_file()]
    whole = [c for c in holding if all((c / path).is_dir() if folder else (c / path).is_file() for path, folder in needed)]
    return f"; {str((whole or holding)[0])!r} holds it: set --data.root to that folder" if holding else ""


def _voc_lists(root: Path) -> str:
    """The split lists in ``root/ImageSets/Main`` as advice (the per-class ones, ``aeroplane_train``
    beside ``train``, left out); ``""`` where there is none."""
    main = root / "ImageSets" / "Main"
    stems = {path.stem for path in main.glob("*.txt")} if main.is_dir() else set()
    names = sorted(name for name in stems if "_" not in name or name.rpartition("_")[2] not in stems)
    if not names:
        return ""
    return f": {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}"
