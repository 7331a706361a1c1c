"""Data for RPN training: datasets (synthetic shapes, COCO, Pascal VOC), transforms, collate.

Names are imported lazily so that DataLoader workers (which unpickle the collate and the
datasets) do not import Lightning; only :class:`RPNDataModule` and :func:`validate_dataset`
pull it in.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "DetectionSample": "lightning_rpn.data.sample",
    "RPNBatch": "lightning_rpn.data.batch",
    "DataError": "lightning_rpn.data.problems",
    "Problem": "lightning_rpn.data.problems",
    "ProblemLog": "lightning_rpn.data.problems",
    "SyntheticShapes": "lightning_rpn.data.synthetic",
    "COCODetection": "lightning_rpn.data.coco",
    "VOCDetection": "lightning_rpn.data.voc",
    "ImageFolder": "lightning_rpn.data.folder",
    "ResizePolicy": "lightning_rpn.data.transforms",
    "DetectionTransform": "lightning_rpn.data.transforms",
    "TransformedDataset": "lightning_rpn.data.transforms",
    "build_transform": "lightning_rpn.data.transforms",
    "transform_to_spec": "lightning_rpn.data.transforms",
    "load_transform_spec": "lightning_rpn.data.transforms",
    "dump_transform_spec": "lightning_rpn.data.transforms",
    "RPNCollate": "lightning_rpn.data.collate",
    "RPNDataModule": "lightning_rpn.data.datamodule",
    "validate_dataset": "lightning_rpn.data.validation",
    "DatasetReport": "lightning_rpn.data.validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lightning_rpn.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
