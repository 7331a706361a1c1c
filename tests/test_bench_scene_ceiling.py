"""bench/bench_scene_ceiling.py: the held-out scenes are the config's, the oracle boxes what is visible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.scripts import load_script

from lightning_rpn.data import DenseScenes


@pytest.fixture(scope="module")
def ceiling():
    return load_script("bench/bench_scene_ceiling.py", "bench_scene_ceiling")


def test_the_held_out_scenes_are_the_configs_validation_scenes(ceiling) -> None:
    scenes = ceiling.held_out_scenes(0)
    assert (len(scenes), scenes.size, scenes.split, scenes.seed) == (4, 640, "val", 0)
    assert ceiling.held_out_scenes(1).seed == 1


def test_apart_objects_are_wholly_visible_and_recalled_exactly(ceiling) -> None:
    scenes = DenseScenes(2, size=160, density=150.0, overlap=2.0, seed=1)
    visible = ceiling.visible_boxes(scenes)
    targets = [torch.from_numpy(scenes[index].boxes) for index in range(2)]
    assert all(torch.equal(v, t) for v, t in zip(visible, targets))
    assert ceiling.recall(visible, targets) == {key: 1.0 for key in ceiling.FIGURES}


def test_objects_drawn_over_lose_the_hidden_part_of_their_box(ceiling) -> None:
    scenes = DenseScenes(1, size=160, density=900.0, overlap=0.4, seed=1)
    (visible,), boxes = ceiling.visible_boxes(scenes), torch.from_numpy(scenes[0].boxes)
    overlap = ceiling._matched_iou(visible, boxes)
    assert len(visible) <= len(boxes) and (overlap < 0.95).any() and np.isclose(float(overlap.max()), 1.0)
    figures = ceiling.recall([visible], [boxes])
    assert figures["AR0.7+@1000"] < figures["AR@1000"] < 1.0
