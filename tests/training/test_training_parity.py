"""Training parity: our real training path against torchvision's RPN in a plain loop.

Both sides start from identical weights and train on identical batches (our data module's
random crops, flips and worker-side targets); torchvision's sampler is made to draw our
sampled anchors. With the recipes set equal (smooth L1 beta 1/9, contiguous memory format,
the same parameter groups, schedule and clipping) every step must agree: anchors, labels,
matched boxes, regression targets, both losses, the gradients of head, FPN and backbone, and
the weights after the last step.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_rpn import RPNDataModule, RPNModule
from lightning_rpn.training.torchvision_reference import TorchvisionLoop, compare_training

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

CROPS = [{"RandomCrop": {"height": 128, "width": 128}}, {"HorizontalFlip": {"p": 0.5}},
         {"VerticalFlip": {"p": 0.5}}]


def _scene_data() -> RPNDataModule:
    return RPNDataModule(
        dataset="scenes", scene_options={"size": 256}, synthetic_train_images=4,
        synthetic_val_images=1, batch_size=2, num_workers=0, train_transforms=CROPS,
    )


def _module(**overrides) -> RPNModule:
    settings = dict(
        backbone="resnet18_fpn", channels_last=False, box_loss="smooth_l1", smooth_l1_beta=1 / 9,
        lr=0.02, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine", warmup_steps=4,
        anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
    )
    settings.update(overrides)
    return RPNModule(**settings)


@pytest.mark.timeout(300)
def test_training_matches_torchvision_step_by_step_for_20_steps():
    seed_everything(0)
    report = compare_training(_module(), _scene_data(), steps=20, gradient_clip_val=10.0)
    assert len(report.steps) == 20
    worst = report.worst()
    for key in ("anchors", "labels_differ", "matched_boxes", "sampled_differ", "regression_targets"):
        assert worst[key] == 0.0, (key, worst)
    for key in ("loss_cls", "loss_reg"):
        assert worst[key] < 1e-5, (key, worst)
    for part in ("head", "fpn", "backbone"):
        assert worst[f"grad_{part}"] < 1e-4, (part, worst)
        assert worst[f"weights_{part}"] < 1e-4, (part, worst)


@pytest.mark.timeout(300)
def test_training_matches_torchvision_with_adamw():
    """configs/scenes.yaml trains with AdamW: the harness replays it with the same optimiser."""
    seed_everything(0)
    report = compare_training(_module(optimizer="adamw", lr=0.002), _scene_data(), steps=4, gradient_clip_val=10.0)
    worst = report.worst()
    assert worst["sampled_differ"] == 0.0 and worst["loss_reg"] < 1e-5, worst
    for part in ("head", "fpn", "backbone"):
        assert worst[f"grad_{part}"] < 1e-4, (part, worst)
        assert worst[f"weights_{part}"] < 1e-4, (part, worst)


def test_harness_reports_a_recipe_difference():
    """Our L1 box loss against torchvision's smooth L1: the harness must see it."""
    seed_everything(0)
    report = compare_training(_module(box_loss="l1"), _scene_data(), steps=2, gradient_clip_val=10.0)
    assert report.steps[0].loss_cls < 1e-5  # same objectness
    assert report.steps[0].loss_reg > 1e-2  # different box loss
    assert report.steps[0].gradients["head"] > 1e-3


@pytest.mark.parametrize("optimizer, expected", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_torchvision_loop_uses_the_modules_optimiser(optimizer, expected):
    # bench_quality --optimizer adamw trains both sides with AdamW: the loop must follow the module
    module = _module(optimizer=optimizer, lr=0.002, weight_decay=1e-3)
    loop = TorchvisionLoop.from_module(module)
    assert type(loop.optimizer) is expected
    groups = loop.optimizer.param_groups
    assert {group["lr"] for group in groups} == {0.002}
    assert {group["weight_decay"] for group in groups} == {1e-3}  # a plain loop decays norms too
    if optimizer == "sgd":
        assert {group["momentum"] for group in groups} == {0.9}
