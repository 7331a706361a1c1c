"""torch.export of the proposal network: dynamic image size, outputs equal to the eager RPN,
quality scoring and the cascade, whole images and sliding windows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.cascade import CascadeRPN
from lightning_rpn.tools.export import (
    ProposalNetwork,
    WindowedProposalNetwork,
    export_proposal_network,
    load_proposal_network,
)
from lightning_rpn.core.rpn import RPN
from lightning_rpn.core.windows import SlidingWindowConfig, window_grid
from lightning_rpn.training.module import RPNModule

# torchvision's fake nms kernel calls a deprecated torch API while tracing; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`create_unbacked_symint` is deprecated:FutureWarning")

# Measured: 0 (bit-identical) on CPU; the bound allows for exp() rounding in the box decoding.
BOX_ATOL = 1e-3  # pixels
SCORE_ATOL = 1e-6


@pytest.fixture(scope="module")
def module() -> RPNModule:
    torch.manual_seed(0)
    return RPNModule(
        backbone="tiny_fpn",
        anchor_sizes=((16,), (32,), (64,), (128,)),
        pre_nms_top_n_test=300,
        post_nms_top_n_test=100,
    ).eval()


@pytest.fixture(scope="module")
def loaded(module, tmp_path_factory) -> nn.Module:
    path = tmp_path_factory.mktemp("export") / "rpn.pt2"
    export_proposal_network(module, (128, 96), path)
    assert path.is_file()
    return load_proposal_network(path)


def _assert_close(ours: tuple[torch.Tensor, torch.Tensor], eager: tuple[torch.Tensor, torch.Tensor]) -> None:
    (boxes, scores), (eager_boxes, eager_scores) = ours, eager
    assert boxes.shape == eager_boxes.shape and scores.shape == eager_scores.shape
    torch.testing.assert_close(boxes, eager_boxes, rtol=0, atol=BOX_ATOL)
    torch.testing.assert_close(scores, eager_scores, rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize(
    ("padded", "image_size"),
    [
        ((128, 96), (128, 96)),  # the example size
        ((192, 160), (181, 150)),  # padded batch: boxes clipped to the unpadded size
        ((64, 224), (64, 224)),
        ((100, 150), (100, 150)),  # not a multiple of size_divisibility: runs like the eager RPN
        ((64, 64), (64, 64)),  # min_image_size: the coarsest level keeps one box after NMS
    ],
)
def test_exported_program_matches_eager_rpn(module, loaded, padded, image_size) -> None:
    generator = torch.Generator().manual_seed(sum(padded))
    images = torch.randint(0, 256, (1, 3, *padded), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        eager = module.rpn(module.backbone(module.normalize(images)), [image_size])[0][0]
        ours = loaded(images, torch.tensor(image_size))
    _assert_close(ours, eager)
    boxes, scores = ours
    assert 10 < boxes.shape[0] <= 100
    assert (boxes[:, 2] <= image_size[1]).all() and (boxes[:, 3] <= image_size[0]).all()
    assert (scores[:-1] >= scores[1:]).all()


def test_exported_program_checks_the_input(loaded) -> None:
    with pytest.raises(Exception, match="64"):  # below min_image_size = 2 * size_divisibility
        loaded(torch.zeros(1, 3, 32, 96, dtype=torch.uint8), torch.tensor([32, 96]))
    with pytest.raises(Exception, match="dtype"):  # uint8 input fixed at export
        loaded(torch.zeros(1, 3, 128, 96), torch.tensor([128, 96]))


class _TwoLevels(nn.Module):
    """A tiny float-input backbone: strides 4 and 8, 8 channels."""

    out_channels = 8
    strides = (4, 8)
    size_divisibility = 8

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        fine = self.stem(images)
        return [fine, self.down(fine)]


def _pair(objectness: str, anchor_stride: int, offset: float, score_thresh: float) -> tuple[nn.Module, RPN]:
    torch.manual_seed(1)
    generator = AnchorGenerator(((8, 16), (32, 48)), (0.5, 1.0), (4, 8), offset=offset, anchor_stride=anchor_stride)
    rpn = RPN(
        generator,
        in_channels=8,
        objectness=objectness,
        pre_nms_top_n_test=80,
        post_nms_top_n_test=50,
        nms_thresh=0.6,
        min_size=2.0,
        score_thresh=score_thresh,
    )
    for parameter in rpn.head.parameters():  # spread the scores beyond sigmoid(~0)
        nn.init.normal_(parameter, std=0.3)
    return _TwoLevels(), rpn.eval()


@pytest.mark.parametrize(
    "variant",
    [("softmax", 1, 0.0, 0.0), ("sigmoid", 2, 0.5, 0.3)],
    ids=["softmax", "anchor_stride2_offset_score"],
)
def test_proposal_network_equals_rpn_across_settings(variant) -> None:
    backbone, rpn = _pair(*variant)
    network = ProposalNetwork(backbone, rpn).eval()
    for size in ((64, 48), (40, 72)):
        images = torch.randn(1, 3, *size)
        with torch.no_grad():
            eager = rpn(backbone(images), [size])[0][0]
            ours = network(images, torch.tensor(size))
        _assert_close(ours, eager)
        assert ours[0].shape[0] > 0


def test_float_pair_exports_with_dynamic_size() -> None:
    backbone, rpn = _pair("softmax", 2, 0.5, 0.0)
    assert ProposalNetwork(backbone, rpn).min_image_size == 32  # 2 * anchor_stride * stride 8
    program = export_proposal_network((backbone, rpn), (64, 48))
    exported = program.module()
    for size in ((64, 48), (56, 88)):
        images = torch.randn(1, 3, *size)
        with torch.no_grad():
            _assert_close(exported(images, torch.tensor(size)), rpn(backbone(images), [size])[0][0])


def _quality_pair(proposal_score: str) -> tuple[nn.Module, RPN]:
    torch.manual_seed(2)
    generator = AnchorGenerator(((8, 16), (32, 48)), (0.5, 1.0), (4, 8))
    rpn = RPN(generator, in_channels=8, quality="centerness+iou", proposal_score=proposal_score,
              pre_nms_top_n_test=80, post_nms_top_n_test=50)
    for parameter in rpn.head.parameters():
        nn.init.normal_(parameter, std=0.3)
    return _TwoLevels(), rpn.eval()


def _cascade_pair(num_stages: int, **settings: object) -> tuple[nn.Module, CascadeRPN]:
    torch.manual_seed(3)
    generator = AnchorGenerator(((16,), (32,)), ((1.0,),), (4, 8), offset=0.5)
    rpn = CascadeRPN(generator, in_channels=8, num_stages=num_stages, pre_nms_top_n_test=80,
                     post_nms_top_n_test=50, nms_thresh=0.6, **settings)
    for parameter in rpn.parameters():  # stage-1 boxes away from the anchors, scores spread
        nn.init.normal_(parameter, std=0.1)
    return _TwoLevels(), rpn.eval()


@pytest.mark.parametrize(
    ("pair", "exported"),
    [
        (lambda: _quality_pair("quality"), False),
        (lambda: _quality_pair("geometric_mean"), True),
        (lambda: _cascade_pair(3), False),
        (lambda: _cascade_pair(2), True),
        (lambda: _cascade_pair(2, quality="iou", proposal_score="geometric_mean"), True),
        (lambda: _cascade_pair(2, test_iterations=1), True),
    ],
    ids=["quality", "quality_geometric_mean_exported", "cascade_3_stages", "cascade_exported",
         "cascade_quality_exported", "cascade_test_iteration_exported"],
)
def test_quality_heads_and_cascades_export_equal_to_eager(pair, exported: bool) -> None:
    """The scores are the eager ones: the quality combination, or the cascade's last stage."""
    backbone, rpn = pair()
    network = ProposalNetwork(backbone, rpn).eval()
    if exported:
        program = export_proposal_network((backbone, rpn), (64, 48))
        names = {str(node.target) for node in program.graph.nodes}
        assert isinstance(rpn, RPN) or "aten.grid_sampler.default" in names
        network = program.module()
    for size in ((64, 48), (56, 88), (40, 72)):
        images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            eager = rpn(backbone(images), [size])[0][0]
            ours = network(images, torch.tensor(size))
        _assert_close(ours, eager)
        assert 10 < ours[0].shape[0] <= 50 and (ours[1][:-1] >= ours[1][1:]).all()


def test_cascade_module_exports_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(0)
    module = RPNModule(
        backbone="tiny_fpn",
        head="cascade",
        anchor_sizes=((16,), (32,), (64,), (128,)),
        aspect_ratios=((1.0,),),
        head_conv_channels=16,
        pre_nms_top_n_test=300,
        post_nms_top_n_test=100,
    ).eval()
    path = tmp_path / "cascade.pt2"
    export_proposal_network(module, (128, 96), path)
    loaded = load_proposal_network(path)
    for padded, image_size in (((64, 64), (64, 64)), ((96, 128), (90, 121))):
        images = torch.randint(0, 256, (1, 3, *padded), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            eager = module.rpn(module.backbone(module.normalize(images)), [image_size])[0][0]
            ours = loaded(images, torch.tensor(image_size))
        _assert_close(ours, eager)
        assert ours[0].shape[0] > 10 and (ours[0][:, 2] <= image_size[1]).all()


def test_bad_arguments_are_named(module) -> None:
    with pytest.raises(ValueError, match=r"height=32 must lie in .*\[64, 4096\]"):
        export_proposal_network(module, (32, 96))
    with pytest.raises(TypeError, match="RPNModule, a \\(backbone, RPN\\) pair"):
        export_proposal_network(nn.Linear(2, 2), (64, 64))
    with pytest.raises(TypeError, match="rpn must be a lightning_rpn RPN or CascadeRPN, got Linear"):
        ProposalNetwork(nn.Identity(), nn.Linear(2, 2))


def test_loading_what_is_no_exported_program_says_what_it_is(module, tmp_path) -> None:
    # a Lightning .ckpt (both are zip archives) got torch.export's warnings and "corrupted file"
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": "2.6"}, checkpoint)
    with pytest.raises(ValueError, match=r"last\.ckpt is a PyTorch checkpoint .*export_proposal_network\("):
        load_proposal_network(checkpoint)
    (tmp_path / "notes.txt").write_text("not a program")
    with pytest.raises(ValueError, match=r"notes\.txt is not a program export_proposal_network wrote"):
        load_proposal_network(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match=r"gone\.pt2 is no file"):
        load_proposal_network(tmp_path / "gone.pt2")
    cut = tmp_path / "cut.pt2"  # a copy that did not finish: its zip's end is missing
    cut.write_bytes(checkpoint.read_bytes()[:4096])
    with pytest.raises(ValueError, match=r"cut\.pt2 is a truncated zip archive \(4096 bytes"):
        load_proposal_network(cut)


WINDOWS = {"size": 128, "overlap": 32, "window_batch": 3, "merge_metric": "ios", "top_k": 150}


@pytest.fixture(scope="module")
def windowed(tmp_path_factory) -> tuple[RPNModule, nn.Module]:
    torch.manual_seed(0)
    module = RPNModule(
        backbone="tiny_fpn",
        anchor_sizes=((16,), (32,), (64,), (128,)),
        pre_nms_top_n_test=300,
        post_nms_top_n_test=100,
        sliding_window=WINDOWS,
    ).eval()
    path = tmp_path_factory.mktemp("export") / "windowed.pt2"
    program = export_proposal_network(module, (128, 128), path)
    assert len(program.module()(torch.zeros(1, 3, 128, 128, dtype=torch.uint8), torch.tensor([128, 128]))) == 3
    return module, load_proposal_network(path)


@pytest.mark.parametrize("image_size", [(200, 330), (128, 250), (96, 100)])
def test_windowed_program_equals_eager_sliding_window(windowed, image_size) -> None:
    module, loaded = windowed
    assert isinstance(loaded, WindowedProposalNetwork)
    assert loaded.config == SlidingWindowConfig(**WINDOWS) and loaded.top_k == 150
    generator = torch.Generator().manual_seed(sum(image_size))
    image = torch.randint(0, 256, (3, *image_size), dtype=torch.uint8, generator=generator)
    eager = module.predict_images(image)  # whole images through RPNModule(sliding_window=...)
    ours = loaded(image[None], torch.tensor(image_size))
    _assert_close(ours, (eager["boxes"], eager["scores"]))
    windows = len(window_grid(image_size, WINDOWS["size"], WINDOWS["overlap"]))
    assert ours[0].shape[0] == (150 if windows > 1 else 100)  # top_k of the merge, or one window's
    assert (ours[0][:, 2] <= image_size[1]).all() and (ours[0][:, 3] <= image_size[0]).all()


def test_windowed_export_checks_the_window_size(windowed) -> None:
    module, _ = windowed
    with pytest.raises(ValueError, match=r"sliding_window.size=128 pads to 128 .* above max_image_size=100"):
        export_proposal_network(module, (64, 64), max_image_size=100)


def test_program_inputs_give_predict_images_proposals(tmp_path) -> None:
    """A model trained on resized images: the program fed the original image (as the README
    once read) gives other proposals; fed program_inputs' resized, padded image, and its boxes
    mapped back, those of predict_images."""
    from lightning_rpn.data.transforms import ResizePolicy
    from lightning_rpn.tools.program_inputs import program_inputs

    torch.manual_seed(0)
    module = RPNModule(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)), pre_nms_top_n_test=300,
                       post_nms_top_n_test=100).eval()
    module.resize_policy = ResizePolicy("shortest_edge", min_sizes=(96,), max_size=160)
    export_proposal_network(module, (128, 96), tmp_path / "rpn.pt2")
    program = load_proposal_network(tmp_path / "rpn.pt2")
    image = torch.randint(0, 256, (150, 210, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy()
    eager = module.predict_images(image)
    inputs = program_inputs(image, module.resize_policy, module.size_divisibility)
    assert inputs.images.shape == (1, 3, 96, 160) and inputs.image_size.tolist() == [96, 134]
    assert inputs.original_size == (150, 210)
    boxes, scores = program(inputs.images, inputs.image_size)
    torch.testing.assert_close(inputs.to_original(boxes), eager["boxes"], rtol=0, atol=BOX_ATOL)
    torch.testing.assert_close(scores, eager["scores"], rtol=0, atol=SCORE_ATOL)
    padded = torch.zeros(1, 3, 160, 224, dtype=torch.uint8)
    padded[0, :, :150, :210] = torch.from_numpy(image).permute(2, 0, 1)
    unresized, _ = program(padded, torch.tensor([150, 210]))
    assert unresized.shape != eager["boxes"].shape or not torch.allclose(unresized, eager["boxes"], atol=1.0)
    with pytest.raises(ValueError, match="size_divisibility must be a positive int"):
        program_inputs(image, None, 0)
    with pytest.raises(ValueError, match=r"^program_inputs: image 0 "):
        program_inputs(image[:, :, :2], None, 32)
