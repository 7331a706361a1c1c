"""The untransformed dataset of one split, from the data module's options (its ``hparams``).

``dataset`` chooses the kind: ``"synthetic"`` (:class:`~lightning_rpn.data.synthetic.SyntheticShapes`,
seeded by the split's name), ``"scenes"`` (:class:`~lightning_rpn.data.scenes.DenseScenes` with
``scene_options``), ``"coco"`` (``root / coco_images`` and ``root / coco_annotations``, ``{split}``
filled in) or ``"voc"`` (``ImageSets/Main/{split}.txt`` under ``root``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_rpn.data.coco import COCODetection
from lightning_rpn.data.problems import BadAnnotationPolicy
from lightning_rpn.data.scenes import DenseScenes
from lightning_rpn.data.synthetic import SHAPE_KINDS, SyntheticShapes
from lightning_rpn.data.voc import VOCDetection

__all__ = ["build_split_dataset"]


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
