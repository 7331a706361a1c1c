"""torch.export of half-precision models, of channels_last models (saved without torch's
"No complete tensor" warning) and loaded programs whose outputs convert with ``.numpy()``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.rpn import RPN
from lightning_rpn.tools.export import export_proposal_network, load_proposal_network
from lightning_rpn.training.module import RPNModule
from helpers.model import tiny_model

# torchvision's fake nms kernel calls a deprecated torch API while tracing; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`create_unbacked_symint` is deprecated:FutureWarning")

# Measured: 0 (bit-identical) on CPU, float32 and half alike (the program runs the eager kernels
# in the eager dtype); the bounds allow for exp() rounding in the box decoding.
BOX_ATOL = 1e-3  # pixels
SCORE_ATOL = 1e-6
IMAGE_SIZE = (128, 96)
HEADS = {
    "plain": {},
    "quality": {"quality": "centerness+iou"},
    "cascade": {"head": "cascade", "aspect_ratios": ((1.0,),), "head_conv_channels": 16},
}


def _module(**settings: object) -> RPNModule:
    torch.manual_seed(0)
    return tiny_model(**settings).eval()


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, *IMAGE_SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _eager(module: RPNModule, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return module.rpn(module.backbone(module.normalize(images)), [IMAGE_SIZE])[0][0]


def _assert_close(ours: tuple[torch.Tensor, ...], eager: tuple[torch.Tensor, ...]) -> None:
    (boxes, scores), (eager_boxes, eager_scores) = ours, eager
    assert boxes.dtype == eager_boxes.dtype == torch.float32 and scores.dtype == eager_scores.dtype
    assert boxes.shape == eager_boxes.shape and boxes.shape[0] > 10
    torch.testing.assert_close(boxes, eager_boxes, rtol=0, atol=BOX_ATOL)
    torch.testing.assert_close(scores, eager_scores, rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize(
    ("head", "dtype"),
    [("plain", torch.bfloat16), ("plain", torch.float16), ("quality", torch.bfloat16), ("cascade", torch.bfloat16)],
    ids=["plain_bf16", "plain_fp16", "quality_bf16", "cascade_bf16"],
)
def test_half_precision_module_exports_equal_to_eager(head: str, dtype: torch.dtype) -> None:
    """Used to fail inside tracing: float32 images reached the bf16 / fp16 backbone."""
    module = _module(**HEADS[head]).to(dtype)
    program = export_proposal_network(module, IMAGE_SIZE).module()
    for seed in (1, 2):
        images = _images(seed)
        _assert_close(program(images, torch.tensor(IMAGE_SIZE)), _eager(module, images))


class _TinyBackbone(nn.Module):
    """Float input, strides 4 and 8, 8 channels."""

    strides = (4, 8)
    size_divisibility = 8

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        fine = self.stem(images).relu()
        return [fine, self.down(fine)]


def test_bf16_pair_takes_images_in_the_backbone_dtype() -> None:
    torch.manual_seed(1)
    generator = AnchorGenerator(((8, 16), (32, 48)), (0.5, 1.0), (4, 8))
    rpn = RPN(generator, in_channels=8, pre_nms_top_n_test=80, post_nms_top_n_test=50).eval()
    for parameter in rpn.head.parameters():  # spread the scores beyond sigmoid(~0)
        nn.init.normal_(parameter, std=0.3)
    backbone, rpn = _TinyBackbone().to(torch.bfloat16), rpn.to(torch.bfloat16)
    program = export_proposal_network((backbone, rpn), (64, 48)).module()
    for size in ((64, 48), (56, 88)):
        images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size))).to(torch.bfloat16)
        with torch.no_grad():
            eager = rpn(backbone(images), [size])[0][0]
        _assert_close(program(images, torch.tensor(size)), eager)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[RPNModule, Path, list[str]]:
    """A default (channels_last) module, the path of its saved program and the export's warnings."""
    module = _module()
    path = tmp_path_factory.mktemp("export") / "rpn.pt2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_proposal_network(module, IMAGE_SIZE, path)
    return module, path, [str(warning.message) for warning in caught]


def test_saving_a_channels_last_model_does_not_warn(saved) -> None:
    module, _, messages = saved
    assert not [message for message in messages if "No complete tensor" in message]
    # the user's model is not changed in place: still channels_last, still trainable
    convolutions = [p for p in module.backbone.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convolutions and all(not p.is_contiguous() for p in convolutions)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert all(p.requires_grad for p in module.parameters())


def test_loaded_program_equals_eager_and_converts_to_numpy(saved) -> None:
    """Used to raise "Can't call numpy() on Tensor that requires grad" (the README route)."""
    module, path, _ = saved
    loaded = load_proposal_network(path)
    images = _images()
    boxes, scores = loaded(images, torch.tensor(IMAGE_SIZE))
    assert not boxes.requires_grad and not scores.requires_grad
    assert boxes.numpy().shape == (boxes.shape[0], 4) and scores.numpy().shape == (boxes.shape[0],)
    _assert_close((boxes, scores), _eager(module, images))
