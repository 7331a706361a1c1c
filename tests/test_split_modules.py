"""Modules split by idea (issue 15) keep every name where it was: the same objects, not copies."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import fields

import numpy as np
import pytest

from lightning_rpn.data.scenes import DenseScenes, SceneStyle, draw_dense_scene

_LOOP = "lightning_rpn.training.torchvision_loop"
MOVED_NAMES = {
    "lightning_rpn.training.callbacks": {
        "RecallTable": "lightning_rpn.training.recall_table", "recall_table": "lightning_rpn.training.recall_table",
        "RecallCurves": "lightning_rpn.training.recall_curves",
        "recall_curves_figure": "lightning_rpn.training.recall_curves",
        "ProposalImages": "lightning_rpn.training.proposal_images",
        "GT_COLOR": "lightning_rpn.training.proposal_images",
    },
    "lightning_rpn.training.torchvision_reference": {
        "TorchvisionLoop": _LOOP, "copy_weights": _LOOP, "InjectedSampler": _LOOP, "StepRecord": _LOOP,
    },
    "lightning_rpn.cli": {
        "check_checkpoint_dirs": "lightning_rpn.training.run_files",
        "write_metrics_summary": "lightning_rpn.training.run_files",
        "wandb_credentials_available": "lightning_rpn.training.wandb_mode",
        "default_wandb_offline": "lightning_rpn.training.wandb_mode",
    },
    "lightning_rpn.training.datamodule": {"MAX_WARNED_PROBLEMS": "lightning_rpn.training.data_report"},
    "lightning_rpn.data.validation": {
        "DatasetReport": "lightning_rpn.data.dataset_report", "SplitReport": "lightning_rpn.data.dataset_report",
        "report_path": "lightning_rpn.data.dataset_report", "MAX_LISTED": "lightning_rpn.data.dataset_report",
    },
    "lightning_rpn.data.tiles": {
        "ImageCache": "lightning_rpn.data.image_cache", "WindowSampler": "lightning_rpn.data.window_sampler",
    },
}


@pytest.mark.parametrize("old", sorted(MOVED_NAMES))
def test_names_stay_importable_where_they_were(old: str) -> None:
    module = importlib.import_module(old)
    for name, new in MOVED_NAMES[old].items():
        assert getattr(module, name) is getattr(importlib.import_module(new), name), (old, name)
        assert name in getattr(module, "__all__", [name]), (old, name)


def test_data_package_serves_the_new_homes() -> None:
    import lightning_rpn.data as data
    from lightning_rpn.data.dataset_report import DatasetReport
    from lightning_rpn.data.window_sampler import WindowSampler

    assert data.DatasetReport is DatasetReport and data.WindowSampler is WindowSampler


def test_evaluation_hooks_serve_test_as_validation() -> None:
    from lightning_rpn.training.proposal_images import ProposalImages
    from lightning_rpn.training.recall_curves import RecallCurves

    assert ProposalImages.on_test_batch_end is ProposalImages.on_validation_batch_end
    assert ProposalImages.on_test_epoch_start is ProposalImages.on_validation_epoch_start
    assert ProposalImages.on_test_end is ProposalImages.on_validation_end
    assert RecallCurves.on_test_end is RecallCurves.on_validation_end


def test_scene_defaults_are_declared_once() -> None:
    defaults = {name: p.default for name, p in inspect.signature(DenseScenes).parameters.items()}
    assert {f.name: defaults[f.name] for f in fields(SceneStyle)} == {f.name: f.default for f in fields(SceneStyle)}
    scenes = DenseScenes(1, size=128, objects="roofs", density=600.0, min_object_size=8, max_object_size=20, seed=4)
    image, boxes = draw_dense_scene(np.random.default_rng([4, scenes._split_key, 0]), 128, 128, scenes.style)
    assert len(boxes) > 0
    np.testing.assert_array_equal(scenes[0].image, image)
    np.testing.assert_array_equal(scenes[0].boxes, boxes)


@pytest.mark.parametrize("options, message", [
    ({"objects": "cars"}, "objects='cars' is not one of"),
    ({"background": "sea"}, "background='sea' is not one of"),
    ({"min_object_size": 30, "max_object_size": 20}, "2 <= min_object_size <= max_object_size"),
    ({"max_object_size": 200}, "max_object_size=200 must be <= size=128"),
])
def test_scene_options_are_checked(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DenseScenes(1, size=128, **options)
