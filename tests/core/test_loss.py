"""rpn_loss against values worked out by hand, plus training, autocast and error behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.head import RPNHead
from lightning_rpn.core.loss import rpn_loss


BETA = 1.0 / 9.0

# One image, N = 6 anchors (2 locations x A = 3 anchors).
# labels: anchors 0 and 2 positive, 1 and 4 negative, 3 and 5 not sampled -> 4 sampled.
LABELS = torch.tensor([[1, 0, 1, -1, 0, -1]])
LOGITS = torch.tensor([[2.0, -1.0, 0.5, 7.0, 3.0, -9.0]])
# Softmax pairs (background, object); their difference l1 - l0 equals LOGITS for anchors 0..2.
PAIRS = torch.tensor([[[0.0, 2.0], [0.5, -0.5], [-0.25, 0.25], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
PRED = torch.tensor(
    [[[0.05, -0.2, 1.0, 0.0], [9, 9, 9, 9], [0.0, 0.0, 0.0, 0.0], [9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]]]
)
TARGET = torch.tensor(
    [[[0.0, 0.0, 0.0, 0.1], [0, 0, 0, 0], [0.5, 0.0, 0.0, 0.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]
)

# Log loss by hand: y=1 -> log(1 + e^-x), y=0 -> log(1 + e^x).
CLS_SUM_SIGMOID = math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.5)) + math.log(
    1 + math.exp(3.0)
)
# Cross-entropy by hand: -log(e^{l_y} / (e^{l_0} + e^{l_1})).
CLS_SUM_SOFTMAX = (
    -math.log(math.exp(2.0) / (math.exp(0.0) + math.exp(2.0)))  # anchor 0, y = 1
    - math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5)))  # anchor 1, y = 0
    - math.log(math.exp(0.25) / (math.exp(-0.25) + math.exp(0.25)))  # anchor 2, y = 1
    - math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.0)))  # anchor 4, y = 0
)
# Smooth L1 by hand (beta = 1/9): |d| < beta -> 0.5 d^2 / beta, else |d| - beta / 2.
# anchor 0 differences 0.05, -0.2, 1.0, -0.1; anchor 2 differences -0.5, 0, 0, 0.
REG_SUM_SMOOTH = (0.5 * 0.05**2 / BETA) + (0.2 - BETA / 2) + (1.0 - BETA / 2) + (0.5 * 0.1**2 / BETA) + (0.5 - BETA / 2)
REG_SUM_L1 = 0.05 + 0.2 + 1.0 + 0.1 + 0.5
NUM_SAMPLED = 4
NUM_LOCATIONS = 2


def _check(losses: dict[str, torch.Tensor], cls: float, reg: float) -> None:
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_reg"}
    assert losses["loss_rpn_cls"].dtype == losses["loss_rpn_reg"].dtype == torch.float32
    assert losses["loss_rpn_cls"].item() == pytest.approx(cls, rel=1e-6)
    assert losses["loss_rpn_reg"].item() == pytest.approx(reg, rel=1e-6)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_sampled_normalisation_by_hand(mode: str) -> None:
    objectness = LOGITS if mode == "sigmoid" else PAIRS
    cls_sum = CLS_SUM_SIGMOID if mode == "sigmoid" else CLS_SUM_SOFTMAX
    losses = rpn_loss(objectness, PRED, LABELS, TARGET, box_loss="smooth_l1")
    # N_cls = N_reg = 4 sampled anchors, lambda = 1.
    _check(losses, cls_sum / NUM_SAMPLED, 1.0 * REG_SUM_SMOOTH / NUM_SAMPLED)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_paper_normalisation_by_hand(mode: str) -> None:
    objectness = LOGITS if mode == "sigmoid" else PAIRS
    cls_sum = CLS_SUM_SIGMOID if mode == "sigmoid" else CLS_SUM_SOFTMAX
    losses = rpn_loss(objectness, PRED, LABELS, TARGET, normalization="paper", num_anchor_locations=NUM_LOCATIONS,
                      box_loss="smooth_l1")
    # N_cls = 4 sampled anchors; N_reg = 2 locations x 1 image; lambda = 10.
    _check(losses, cls_sum / NUM_SAMPLED, 10.0 * REG_SUM_SMOOTH / (NUM_LOCATIONS * 1))


def test_paper_normalisation_counts_locations_of_every_image() -> None:
    two = rpn_loss(
        LOGITS.repeat(2, 1), PRED.repeat(2, 1, 1), LABELS.repeat(2, 1), TARGET.repeat(2, 1, 1),
        normalization="paper", num_anchor_locations=NUM_LOCATIONS, reg_weight=3.0, box_loss="smooth_l1",
    )
    # Twice the sampled / positive anchors, N_cls = 8, N_reg = 2 locations x 2 images.
    _check(two, 2 * CLS_SUM_SIGMOID / 8, 3.0 * 2 * REG_SUM_SMOOTH / (NUM_LOCATIONS * 2))


def test_default_box_loss_is_the_recipe_l1() -> None:
    """``rpn_loss``, ``RPN`` and ``RPNModule`` share ``LossConfig``'s default: L1 (detectron2's beta 0)."""
    _check(rpn_loss(LOGITS, PRED, LABELS, TARGET), CLS_SUM_SIGMOID / NUM_SAMPLED, REG_SUM_L1 / NUM_SAMPLED)


def test_l1_box_loss_by_hand() -> None:
    losses = rpn_loss(LOGITS, PRED, LABELS, TARGET, box_loss="l1")
    _check(losses, CLS_SUM_SIGMOID / NUM_SAMPLED, REG_SUM_L1 / NUM_SAMPLED)


def test_giou_box_loss_by_hand() -> None:
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 1, 1], [0, 0, 4, 4]])
    labels = torch.tensor([[1, 0, 1]])
    gt = torch.tensor([[5.0, 0, 15, 10], [0, 0, 1, 1], [6, 6, 8, 8]])
    target = coder.encode(gt, anchors)[None]
    pred = torch.zeros(1, 3, 4)  # zero deltas decode to the anchors themselves
    logits = torch.tensor([[1.0, -1.0, 0.0]])
    losses = rpn_loss(logits, pred, labels, target, box_loss="giou", anchors=anchors, box_coder=coder)
    # anchor 0 vs [5,0,15,10]: inter 50, union 150, hull 150 -> GIoU = 1/3.
    # anchor 2 vs [6,6,8,8]: inter 0, union 16 + 4 = 20, hull 8 x 8 = 64 -> GIoU = -(64 - 20) / 64.
    reg_sum = (1 - 1 / 3) + (1 + 44 / 64)
    cls_sum = math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.0))
    assert losses["loss_rpn_reg"].item() == pytest.approx(reg_sum / 3, rel=1e-5)
    assert losses["loss_rpn_cls"].item() == pytest.approx(cls_sum / 3, rel=1e-6)
    with pytest.raises(ValueError, match="anchors and box_coder"):
        rpn_loss(torch.zeros(1, 3), pred, labels, target, box_loss="giou")


def test_per_level_lists_equal_concatenated_tensors() -> None:
    whole = rpn_loss(LOGITS, PRED, LABELS, TARGET)
    split = rpn_loss(list(LOGITS.split([4, 2], 1)), list(PRED.split([4, 2], 1)), LABELS, TARGET)
    assert torch.equal(whole["loss_rpn_cls"], split["loss_rpn_cls"])
    assert torch.equal(whole["loss_rpn_reg"], split["loss_rpn_reg"])


def test_sampled_normalisation_matches_torchvision_compute_loss() -> None:
    generator = torch.Generator().manual_seed(3)
    objectness = torch.randn(2, 500, generator=generator)
    deltas = torch.randn(2, 500, 4, generator=generator)
    labels = torch.randint(-1, 2, (2, 500), generator=generator)
    targets = torch.randn(2, 500, 4, generator=generator)
    tv = RegionProposalNetwork(
        None, TVRPNHead(1, 1), 0.7, 0.3, 256, 0.5, {"training": 1, "testing": 1}, {"training": 1, "testing": 1}, 0.7
    )
    # torchvision samples itself; feed it our sampled labels through a stand-in sampler.
    tv.fg_bg_sampler = lambda lab: ([(x == 1).to(torch.uint8) for x in lab], [(x == 0).to(torch.uint8) for x in lab])
    expected_cls, expected_reg = tv.compute_loss(
        objectness.reshape(-1, 1), deltas.reshape(-1, 4), list(labels.float()), list(targets)
    )
    ours = rpn_loss(objectness, deltas, labels, targets, box_loss="smooth_l1")  # torchvision: smooth L1, beta 1/9
    assert ours["loss_rpn_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-5)
    assert ours["loss_rpn_reg"].item() == pytest.approx(expected_reg.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_no_sampled_anchors_gives_zero_losses_with_a_grad_path(mode: str) -> None:
    objectness = (LOGITS if mode == "sigmoid" else PAIRS).clone().requires_grad_(True)
    deltas = PRED.clone().requires_grad_(True)
    losses = rpn_loss(objectness, deltas, torch.full_like(LABELS, -1), TARGET)
    assert losses["loss_rpn_cls"].item() == 0.0 and losses["loss_rpn_reg"].item() == 0.0
    (losses["loss_rpn_cls"] + losses["loss_rpn_reg"]).backward()
    assert objectness.grad is not None and torch.count_nonzero(objectness.grad) == 0
    assert deltas.grad is not None and torch.count_nonzero(deltas.grad) == 0


def test_non_finite_inputs_raise_naming_the_input() -> None:
    bad_logits = LOGITS.clone()
    bad_logits[0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"pred_objectness.*image 0, anchor 2"):
        rpn_loss(bad_logits, PRED, LABELS, TARGET)
    bad_pred = PRED.clone()
    bad_pred[0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"pred_deltas.*anchor 0"):
        rpn_loss(LOGITS, bad_pred, LABELS, TARGET)
    bad_target = TARGET.clone()
    bad_target[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"target_deltas.*anchor 2"):
        rpn_loss(LOGITS, PRED, LABELS, bad_target, box_loss="l1")
    # Non-finite values where nothing is sampled do not reach the loss.
    ignored = LOGITS.clone()
    ignored[0, 3] = float("nan")
    ignored_pred = PRED.clone()
    ignored_pred[0, 1] = float("inf")
    losses = rpn_loss(ignored, ignored_pred, LABELS, TARGET)
    assert torch.isfinite(losses["loss_rpn_cls"]) and torch.isfinite(losses["loss_rpn_reg"])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_anchor_locations"):
        rpn_loss(LOGITS, PRED, LABELS, TARGET, normalization="paper")
    with pytest.raises(ValueError, match="normalization"):
        rpn_loss(LOGITS, PRED, LABELS, TARGET, normalization="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="box_loss"):
        rpn_loss(LOGITS, PRED, LABELS, TARGET, box_loss="ciou")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pred_deltas has shape \(1, 5, 4\)"):
        rpn_loss(LOGITS, PRED[:, :5], LABELS, TARGET)
    with pytest.raises(ValueError, match="found 2"):
        rpn_loss(LOGITS, PRED, LABELS + 1, TARGET)
    with pytest.raises(TypeError, match="integer"):
        rpn_loss(LOGITS, PRED, LABELS.float(), TARGET)


def _toy_problem(mode: str):
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 8, 2, 2, generator=generator)]
    num = 3 * (16 + 4)
    labels = torch.randint(-1, 2, (2, num), generator=generator)
    targets = torch.randn(2, num, 4, generator=generator) * 0.5
    return RPNHead(8, 3, conv_channels=32, objectness=mode), features, labels, targets


@pytest.mark.parametrize("mode, normalization", [("sigmoid", "sampled"), ("softmax", "paper")])
def test_training_drives_both_losses_down(mode: str, normalization: str) -> None:
    head, features, labels, targets = _toy_problem(mode)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    history = []
    for _ in range(200):
        objectness, deltas = head(features)
        losses = rpn_loss(objectness, deltas, labels, targets, normalization=normalization, num_anchor_locations=20)
        optimiser.zero_grad()
        (losses["loss_rpn_cls"] + losses["loss_rpn_reg"]).backward()
        optimiser.step()
        history.append((losses["loss_rpn_cls"].item(), losses["loss_rpn_reg"].item()))
    (cls0, reg0), (cls1, reg1) = history[0], history[-1]
    assert cls1 < 0.5 * cls0
    assert reg1 < 0.5 * reg0


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_finite_fp32_losses_under_bf16_autocast(mode: str, box_loss: str) -> None:
    head, features, labels, _ = _toy_problem(mode)
    generator = AnchorGenerator(((16,), (32,)), (0.5, 1.0, 2.0), (4, 8))
    anchors = torch.cat(generator([(4, 4), (2, 2)]))
    gt = anchors + torch.tensor([1.0, -2.0, 3.0, 1.0])
    targets = BoxCoder().encode(gt, anchors).expand(2, -1, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objectness, deltas = head(features)
        assert objectness[0].dtype == torch.bfloat16
        losses = rpn_loss(objectness, deltas, labels, targets, box_loss=box_loss, anchors=anchors, box_coder=BoxCoder())
    for value in losses.values():
        assert value.dtype == torch.float32 and torch.isfinite(value)
    (losses["loss_rpn_cls"] + losses["loss_rpn_reg"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
