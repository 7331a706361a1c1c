"""Export and stride measurement leave a user's modules in the modes they were in: every
submodule's ``training`` flag, not only the top one (a frozen part kept in eval mode stays so,
and a model exported between fits trains afterwards with its BatchNorm in train mode)."""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

from lightning_rpn.core.backbone_interface import infer_strides
from lightning_rpn.tools.export import ProposalNetwork, export_proposal_network
from lightning_rpn.tools.torchvision_adapter import TorchvisionRPN
from helpers.model import tiny_model

# torchvision's fake nms kernel calls a deprecated torch API while tracing; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`create_unbacked_symint` is deprecated:FutureWarning")


def _train_with_eval_part(model: nn.Module, part: nn.Module) -> None:
    """The model in train mode, one part of it frozen in eval mode (BatchNorm statistics kept)."""
    model.train()
    part.eval()


def _eval_with_train_part(model: nn.Module, part: nn.Module) -> None:
    model.eval()
    part.train()


def _eval(model: nn.Module, part: nn.Module) -> None:
    model.eval()


MODES: dict[str, Callable[[nn.Module, nn.Module], None]] = {
    "train_with_eval_part": _train_with_eval_part,
    "eval_with_train_part": _eval_with_train_part,
    "eval": _eval,
}


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: submodule.training for name, submodule in model.named_modules()}


@pytest.mark.parametrize("setting", ["train_with_eval_part", "eval"])
def test_export_keeps_every_submodule_mode(setting: str) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    MODES[setting](model, model.backbone.stages[0])
    before = _modes(model)
    program = export_proposal_network(model, (64, 64))
    assert _modes(model) == before
    # the program is the evaluation-mode network whatever mode the model was in
    eager = ProposalNetwork(model.backbone, model.rpn, model.pixel_mean, model.pixel_std)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    size = torch.tensor([64, 64])
    with torch.no_grad():
        expected = deepcopy(eager).eval()(images, size)
        ours = program.module()(images, size)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


class _Body(nn.Module):
    """Two levels (strides 2 and 4), BatchNorm in each part."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4))
        self.down = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        fine = self.stem(images)
        return [fine, self.down(fine)]


@pytest.mark.parametrize("setting", sorted(MODES))
def test_infer_strides_keeps_every_submodule_mode(setting: str) -> None:
    body = _Body()
    MODES[setting](body, body.stem)
    before = _modes(body)
    assert infer_strides(body, size=32) == (2, 4)
    assert _modes(body) == before


@pytest.mark.parametrize("setting", ["train_with_eval_part", "eval"])
def test_from_detector_keeps_every_submodule_mode(setting: str) -> None:
    detector = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3)
    MODES[setting](detector, detector.backbone.body)
    before = _modes(detector)
    TorchvisionRPN.from_detector(detector)
    assert _modes(detector) == before
