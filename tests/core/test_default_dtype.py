"""Torch's default dtype changes no label, target or loss.

Lightning's ``bf16-true`` / ``16-true`` / ``64-true`` precisions set it inside the forward, where
the model assigns its own targets (the cascade's passes, ``assign_targets: false``, the ``"torch"``
matching backend of GPUs). Matching, targets and the cascade's losses build their float tensors
in float32: under any default dtype they give the float32 answer, bit for bit. Before, the
cascade raised ("Index put requires the source and destination dtypes match") and the
``"torch"`` backend rounded the best IoUs to bf16 and lost most low-quality positives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest
import torch

import lightning_rpn.core.cascade as cascade
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.cascade import CascadeRPN, best_levels, gt_levels
from lightning_rpn.core.config import AnchorTargetConfig
from lightning_rpn.core.matching import match_anchors_batched, match_stats
from lightning_rpn.core.targets import assign_batch_targets

T = TypeVar("T")
DTYPES = [torch.bfloat16, torch.float16, torch.float64]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Torch's default dtype set to ``dtype`` (as Lightning's ``*-true`` precisions do in the forward)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def under(dtype: torch.dtype, compute: Callable[[], T]) -> T:
    with default_dtype(dtype):
        return compute()


def _scene() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Anchors of 3 ratios on 4 levels of a 192-pixel image; 30 random gt boxes and an empty image."""
    generator = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),), (4, 8, 16, 32))
    anchors = torch.cat(generator([(48, 48), (24, 24), (12, 12), (6, 6)]))
    rng = torch.Generator().manual_seed(0)
    corner = torch.rand(30, 2, generator=rng) * 150
    gt = torch.cat([corner, corner + 10 + torch.rand(30, 2, generator=rng) * 80], 1)
    return anchors, [gt, torch.zeros(0, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_matching_ignores_the_default_dtype(dtype: torch.dtype) -> None:
    anchors, gt = _scene()
    crowd = [torch.tensor([[0.0, 100.0, 90.0, 190.0]]), None]

    def match(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        return match_anchors_batched(anchors, gt, 0.7, 0.3, True, image_sizes=[(192, 192)] * 2, allowed_border=8.0,
                                     crowd_boxes=crowd, crowd_ioa=0.5, backend=backend)

    expected = match("compiled")
    labels, matched = under(dtype, lambda: match("torch"))
    assert int((expected[0] == 1).sum()) == 49  # a bf16 default dtype lost most of them before
    assert labels.equal(expected[0]) and matched.equal(expected[1])
    stats = under(dtype, lambda: match_stats(anchors, gt, None, 0.3, True, "torch"))
    assert {stats.best_iou.dtype, stats.gt_best_iou.dtype, stats.pair_iou.dtype} == {torch.float32}
    nothing = under(dtype, lambda: match_stats(anchors, [torch.zeros(0, 4)], None, 0.3, True, "torch"))
    assert nothing.gt_best_iou.dtype == nothing.pair_iou.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_anchor_targets_ignore_the_default_dtype(dtype: torch.dtype, backend: str) -> None:
    anchors, gt = _scene()

    def targets() -> tuple[torch.Tensor, torch.Tensor]:
        generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
        return assign_batch_targets(anchors, gt, [(192, 192)] * 2, AnchorTargetConfig(), BoxCoder(), generators,
                                    backend=backend)

    labels, deltas = targets()
    other_labels, other_deltas = under(dtype, targets)
    assert other_labels.equal(labels) and other_deltas.equal(deltas)


def _cascade(objectness_level: str) -> CascadeRPN:
    """Two stages and a training pass, with weights large enough that the stage-1 boxes move."""
    generator = AnchorGenerator(((16,), (32,)), ((1.0,),), (4, 8))
    config = AnchorTargetConfig(fg_iou=0.4, bg_iou=0.3, batch_size_per_image=64)
    rpn = CascadeRPN(generator, in_channels=8, target_config=config, objectness_level=objectness_level,
                     train_iterations=1, seed=5)
    for parameter in rpn.parameters():
        torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(parameter.numel()))
    return rpn.train()


FEATURES = [torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1)),
            torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))]
TARGETS = [{"boxes": torch.tensor([[5.0, 5, 27, 27], [2, 12, 14, 30]])}, {"boxes": torch.tensor([[4.0, 4, 28, 28]])}]


def _losses_and_labels(rpn: CascadeRPN, features: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The cascade's training losses and the objectness labels they were computed against."""
    seen: list[torch.Tensor] = []
    original = torch.nn.functional.binary_cross_entropy_with_logits

    def spy(logits: torch.Tensor, labels: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append(labels.clone())
        return original(logits, labels, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(cascade.F, "binary_cross_entropy_with_logits", spy)
        losses = rpn(features, [(32, 32)] * 2, TARGETS, image_ids=[0, 1], sampling_epoch=0, need_proposals=False)[1]
    (labels,) = seen
    return losses, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objectness_level", ["any", "size", "best"])
def test_cascade_losses_ignore_the_default_dtype(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                 objectness_level: str) -> None:
    rpn = _cascade(objectness_level)
    losses, labels = _losses_and_labels(rpn, FEATURES, monkeypatch)
    other_losses, other_labels = under(dtype, lambda: _losses_and_labels(rpn, FEATURES, monkeypatch))
    assert int(labels.sum()) > 0 and other_labels.equal(labels)
    assert all(other_losses[k].dtype == torch.float32 and other_losses[k].equal(v) for k, v in losses.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objectness_level", ["size", "best"])
def test_cascade_trains_in_a_true_precision(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                            objectness_level: str) -> None:
    """Weights, features and the default dtype all ``dtype``, as under ``--trainer.precision bf16-true``."""
    rpn = _cascade(objectness_level).to(dtype)
    losses, labels = under(dtype, lambda: _losses_and_labels(rpn, [f.to(dtype) for f in FEATURES], monkeypatch))
    assert int(labels.sum()) > 0 and all(torch.isfinite(v) for v in losses.values())
    (losses["loss_rpn_cls"] + losses["loss_rpn_reg"]).backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in rpn.parameters())


def test_level_helpers_read_float32_under_a_bf16_default_dtype() -> None:
    # best_levels: a float32 IoU compared with its own per-gt maximum (a bf16 one raised in scatter)
    positive = torch.tensor([True, True, True, False, True])
    matched, levels = torch.tensor([0, 1, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 2])
    ious = torch.tensor([0.6, 0.9000001, 0.8, 0.99, 0.9])  # 0.9000001 and 0.9 are one number in bf16
    assert under(torch.bfloat16, lambda: best_levels(positive, matched, ious, levels, 3)).tolist() == [1, 0, -1]
    # gt_levels: anchor size 514 is 512 in bf16, which moves the level boundary past this 362.4-pixel box
    grid = AnchorGenerator(((256,), (514,)), ((1.0,),), (16, 32)).grid([(1, 1), (1, 1)])
    box = torch.tensor([[0.0, 0.0, 362.4, 362.4]])
    assert gt_levels(grid, box).tolist() == under(torch.bfloat16, lambda: gt_levels(grid, box)).tolist() == [0]
