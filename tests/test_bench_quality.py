"""bench/bench_quality.py: our side trains with the config's optimiser, torchvision's with the
reported protocol's SGD, and ``--optimizer`` sets both."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from helpers.scripts import load_script

from lightning_rpn import RPNModule
from lightning_rpn.training.torchvision_reference import TorchvisionLoop


@pytest.fixture(scope="module")
def bench_quality():
    return load_script("bench/bench_quality.py", "bench_quality")


def _model(bench_quality, tmp_path, optimiser: Sequence[str], extra: Sequence[str] = ()) -> RPNModule:
    """The model a side of the benchmark builds: the config with ``optimiser``, then ``extra``."""
    args = bench_quality._config_args(0, 3, tmp_path, None, optimiser)
    return bench_quality._cli([*args, *extra, "--trainer.logger", "false"]).model


@pytest.mark.parametrize("both, ours, torchvision", [
    ([], (torch.optim.AdamW, 0.002), (torch.optim.SGD, 0.02)),  # the config against the protocol
    (["adamw"], (torch.optim.AdamW, 0.002), (torch.optim.AdamW, 0.002)),
    (["sgd"], (torch.optim.SGD, 0.02), (torch.optim.SGD, 0.02)),
])
def test_each_side_gets_its_optimiser(bench_quality, tmp_path, both, ours, torchvision) -> None:
    both_args = bench_quality.OPTIMISERS[both[0]] if both else []
    for side_args, (kind, lr) in ((both_args, ours), (bench_quality.torchvision_optimiser(both_args), torchvision)):
        optimiser = TorchvisionLoop.from_module(_model(bench_quality, tmp_path, side_args)).optimizer
        assert type(optimiser) is kind
        assert {group["lr"] for group in optimiser.param_groups} == {lr}


def test_the_sgd_ablation_is_the_protocols_optimiser(bench_quality) -> None:
    assert bench_quality.ABLATIONS["sgd"] == bench_quality.OPTIMISERS["sgd"]
    assert bench_quality.torchvision_optimiser([]) == bench_quality.OPTIMISERS["sgd"]


def test_torchvision_recipe_rows_differ_only_by_the_optimiser(bench_quality, tmp_path) -> None:
    """``torchvision_recipe`` is the protocol (SGD) and ``torchvision_rpn_recipe`` the config's
    AdamW, both with torchvision's box loss, memory format and norm weight decay."""
    for row, optimizer in (("torchvision_recipe", "sgd"), ("torchvision_rpn_recipe", "adamw")):
        hp = _model(bench_quality, tmp_path, [], bench_quality.ABLATIONS[row]).hparams
        assert (hp.optimizer, hp.box_loss, hp.channels_last, hp.norm_weight_decay) == (
            optimizer, "smooth_l1", False, 1e-4)
        assert hp.smooth_l1_beta == pytest.approx(1 / 9)


def test_the_cascade_ablation_is_the_shapes_cascade_configs_head(bench_quality, tmp_path) -> None:
    """``--ablations cascade`` measures the head of ``configs/shapes_cascade.yaml`` on the dense
    scenes (its anchors sized for them): the README compares the two, so they must not drift."""
    import yaml

    shapes = yaml.safe_load((bench_quality.ROOT / "configs" / "shapes_cascade.yaml").read_text())["model"]
    hp = _model(bench_quality, tmp_path, [], bench_quality.ABLATIONS["cascade"]).hparams
    keys = ["head", "aspect_ratios", "reg_weight", "fg_iou", *(key for key in shapes if key.startswith("cascade_"))]
    assert len(keys) == 4 + 5  # every cascade setting of the config is compared
    for key in keys:
        assert yaml.safe_load(yaml.safe_dump(hp[key])) == shapes[key], key  # lists and tuples alike


def test_the_scenes_cascade_row_is_the_scenes_cascade_config(bench_quality, tmp_path) -> None:
    """``--ablations scenes_cascade`` is scenes.yaml with every setting scenes_cascade.yaml adds."""
    import yaml

    configs = bench_quality.ROOT / "configs"
    plain, cascade = (yaml.safe_load((configs / name).read_text()) for name in ("scenes.yaml", "scenes_cascade.yaml"))
    added = {key: value for key, value in cascade["model"].items() if plain["model"].get(key) != value}
    assert len(added) == 12 and cascade["data"] == {**plain["data"], "assign_targets": False}
    hp = _model(bench_quality, tmp_path, [], bench_quality.ABLATIONS["scenes_cascade"]).hparams
    for key, value in added.items():
        assert yaml.safe_load(yaml.safe_dump(hp[key])) == value, key


@pytest.mark.parametrize("row, expected", [
    ("cascade_centre_0.2_train_iteration", dict(cascade_train_iterations=1, fg_iou=0.5, quality=None)),
    ("cascade_centre_0.2_fg_0.6", dict(cascade_train_iterations=0, fg_iou=0.6, quality=None)),
    ("cascade_centre_0.2_iou_quality", dict(fg_iou=0.5, quality="iou", proposal_score="geometric_mean")),
    ("cascade_centre_0.2_fg_0.6_iou_quality", dict(cascade_train_iterations=0, fg_iou=0.6, quality="iou")),
    ("cascade_centre_0.2_train_iteration_fg_0.6", dict(cascade_train_iterations=1, fg_iou=0.6, quality=None)),
    ("cascade_centre_0.2_train_iteration_reg_3", dict(cascade_train_iterations=1, reg_weight=3.0, fg_iou=0.5)),
])
def test_the_dense_cascade_rows_change_the_settings_they_name(bench_quality, tmp_path, row, expected) -> None:
    """Each README row names what it adds to ``cascade_centre_0.2``; a later flag must win."""
    hp = _model(bench_quality, tmp_path, [], bench_quality.ABLATIONS[row]).hparams
    assert hp.cascade_centre_ratio == 0.2 and hp.cascade_test_iterations == 1
    for key, value in expected.items():
        assert hp[key] == value, key
