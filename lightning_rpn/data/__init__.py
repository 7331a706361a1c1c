"""Data for RPN training: datasets (synthetic shapes, dense scenes, COCO, Pascal VOC), transforms, collate.

The data layer imports ``core`` and itself, never Lightning, so DataLoader workers (which
unpickle the collate and the datasets) stay light. Names are imported lazily;
:class:`RPNDataModule` (a LightningDataModule, in ``training/``) is still served here.
"""

from __future__ import annotations

from lightning_rpn._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DetectionSample": "lightning_rpn.data.sample",
    "RPNBatch": "lightning_rpn.data.batch",
    "DataError": "lightning_rpn.data.problems",
    "Problem": "lightning_rpn.data.problems",
    "ProblemLog": "lightning_rpn.data.problems",
    "SyntheticShapes": "lightning_rpn.data.synthetic",
    "DenseScenes": "lightning_rpn.data.scenes",
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
    "TileConfig": "lightning_rpn.data.tiles",
    "TiledDataset": "lightning_rpn.data.tiles",
    "WindowSampler": "lightning_rpn.data.window_sampler",
    "ShuffledEpochs": "lightning_rpn.data.draws",
    "RPNCollate": "lightning_rpn.data.collate",
    # the LightningDataModule lives in training/; served here too, as before the layer folders
    "RPNDataModule": "lightning_rpn.training.datamodule",
    "validate_dataset": "lightning_rpn.data.validation",
    "DatasetReport": "lightning_rpn.data.dataset_report",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
