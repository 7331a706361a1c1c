"""AnchorGenerator: parity with torchvision, broadcasting, offsets, anchor_stride, cache."""

from __future__ import annotations

import pickle
import warnings

import pytest
import numpy as np
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from lightning_rpn.core.anchors import AnchorGenerator, AnchorGrid, level_anchors

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5
FPN_STRIDES = (4, 8, 16, 32, 64)


def _torchvision_anchors(sizes, ratios, image_size, strides) -> torch.Tensor:
    generator = TVAnchorGenerator(sizes, ratios)
    feats = [torch.zeros(1, 1, image_size[0] // s, image_size[1] // s) for s in strides]
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    return generator(images, feats)[0]


def test_fpn_five_levels_identical_to_torchvision() -> None:
    image_size = (256, 320)
    ours = AnchorGenerator(FPN_SIZES, FPN_RATIOS, FPN_STRIDES)
    levels = ours(ours.feature_shapes_for(image_size))
    assert [lvl.shape[0] for lvl in levels] == [(256 // s) * (320 // s) * 3 for s in FPN_STRIDES]
    assert torch.equal(torch.cat(levels), _torchvision_anchors(FPN_SIZES, FPN_RATIOS, image_size, FPN_STRIDES))


def test_single_level_c4_vgg_identical_to_torchvision() -> None:
    sizes, ratios = (128, 256, 512), (0.5, 1.0, 2.0)
    ours = AnchorGenerator(sizes, ratios, 16)
    assert ours.num_levels == 1 and ours.num_anchors_per_location() == 9
    (anchors,) = ours([(38, 50)])
    assert anchors.shape == (38 * 50 * 9, 4)
    expected = _torchvision_anchors((sizes,), (ratios,), (608, 800), (16,))
    assert torch.equal(anchors, expected)


def test_odd_sizes_and_ratios_round_like_torchvision() -> None:
    sizes, ratios = (24, 45, 90), (0.3, 0.75, 1.0, 1.7)
    ours = AnchorGenerator(sizes, ratios, 8)
    (anchors,) = ours([(5, 7)])
    assert torch.equal(anchors, _torchvision_anchors((sizes,), (ratios,), (40, 56), (8,)))


def test_single_tuple_is_broadcast_to_every_level() -> None:
    flat = AnchorGenerator((32, 64), (0.5, 1.0, 2.0), (8, 16, 32))
    nested = AnchorGenerator(((32, 64),), ((0.5, 1.0, 2.0),), (8, 16, 32))
    explicit = AnchorGenerator(((32, 64),) * 3, ((0.5, 1.0, 2.0),) * 3, (8, 16, 32))
    assert flat.sizes == nested.sizes == explicit.sizes == ((32.0, 64.0),) * 3
    assert flat.num_anchors_per_location() == 6
    shapes = [(4, 4), (2, 2), (1, 1)]
    for a, b in zip(flat(shapes), explicit(shapes)):
        assert torch.equal(a, b)


def test_flat_sizes_as_long_as_the_levels_warn_of_torchvision_reading() -> None:
    """torchvision reads a flat ``(32, 64, 128)`` on three levels as one size per level; here every
    size goes on every level, which a user coming from torchvision does not expect: a warning
    naming both spellings. Other flat lengths, nested forms and one level stay silent."""
    with pytest.warns(UserWarning, match=r"flat sizes \(32, 64, 128\).*all 3 sizes on each of the 3 levels.*"
                                         r"\[\[32\], \[64\], \.\.\.\].*\(\(32, 64, 128\),\)"):
        flat = AnchorGenerator([32, 64, 128], (1.0,), (8, 16, 32))
    assert flat.sizes == ((32.0, 64.0, 128.0),) * 3
    with pytest.warns(UserWarning, match="flat sizes"):
        AnchorGenerator(np.array([32.0, 64.0]), (1.0,), (8, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnchorGenerator(((32, 64, 128),), (1.0,), (8, 16, 32))
        AnchorGenerator(((32,), (64,), (128,)), (1.0,), (8, 16, 32))
        AnchorGenerator((32, 64), (1.0,), (8, 16, 32))
        AnchorGenerator((128, 256, 512), (0.5, 1.0, 2.0), 16)
        AnchorGenerator((32,), (1.0,), (8,))


def test_numpy_and_tensor_arguments_build_the_same_generator() -> None:
    # sizes from numpy (k-means, np.arange) were refused: "mixes numbers and tuples", "must be positive ints"
    expected = AnchorGenerator(((32,), (64,)), (0.5, 1.0), (8, 16), offset=0.5)
    for built in (
        AnchorGenerator([[np.int64(32)], [np.int64(64)]], [np.float32(0.5), 1.0], (np.int64(8), np.int64(16)), 0.5),
        AnchorGenerator([np.array([32.0]), np.array([64.0])], np.array([0.5, 1.0]), np.array([8, 16]), np.float64(0.5)),
        AnchorGenerator(torch.tensor([[32], [64]]), torch.tensor([0.5, 1.0]), [8, 16], torch.tensor(0.5)),
    ):
        assert (built.sizes, built.aspect_ratios, built.strides, built.offset) == (
            expected.sizes, expected.aspect_ratios, expected.strides, expected.offset)
        assert all(type(s) is int for s in built.strides)
        for mine, theirs in zip(built([(4, 4), (2, 2)]), expected([(4, 4), (2, 2)])):
            assert torch.equal(mine, theirs)


def test_level_count_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match=r"sizes has 3 levels but strides has 5"):
        AnchorGenerator(((32,), (64,), (128,)), (0.5, 1.0, 2.0), FPN_STRIDES)
    with pytest.raises(ValueError, match=r"aspect_ratios has 2 levels but strides has 5"):
        AnchorGenerator(FPN_SIZES, ((1.0,), (2.0,)), FPN_STRIDES)


def test_unequal_anchors_per_location_is_an_error() -> None:
    generator = AnchorGenerator(((32,), (64, 128)), (1.0,), (8, 16))
    with pytest.raises(ValueError, match=r"differ across levels \[1, 2\]"):
        generator.num_anchors_per_location()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(sizes=(32, -1), strides=8), r"sizes\[0\] must hold positive numbers, got -1"),
        (dict(sizes=(32,), aspect_ratios=(0.0,), strides=8), r"aspect_ratios\[0\] must hold positive"),
        (dict(sizes=(32,), strides=(8, 0)), r"strides must be positive ints"),
        (dict(sizes=(32,), strides=(8.5,)), r"strides must be positive ints"),
        (dict(sizes=(32,), strides=8, anchor_stride=0), r"anchor_stride must be a positive int"),
        (dict(sizes=(32,), strides=8, offset=1.5), r"offset must be a number in \[0, 1\)"),
        (dict(sizes=(), strides=8), r"sizes must be a non-empty tuple"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises((ValueError, TypeError), match=pattern):
        AnchorGenerator(**kwargs)


def test_feature_shape_count_mismatch_is_an_error() -> None:
    generator = AnchorGenerator(FPN_SIZES, FPN_RATIOS, FPN_STRIDES)
    with pytest.raises(ValueError, match=r"got 4 feature maps but the generator has 5 levels"):
        generator([(8, 8)] * 4)


def test_offset_shifts_centres_by_offset_times_stride() -> None:
    base = AnchorGenerator(FPN_SIZES, FPN_RATIOS, FPN_STRIDES)
    shifted = AnchorGenerator(FPN_SIZES, FPN_RATIOS, FPN_STRIDES, offset=0.5)
    shapes = base.feature_shapes_for((128, 192))
    for stride, a, b in zip(FPN_STRIDES, base(shapes), shifted(shapes)):
        assert torch.equal(b - a, torch.full_like(a, 0.5 * stride))


def test_anchor_stride_uses_every_nth_cell() -> None:
    generator = AnchorGenerator((64, 128), (0.5, 1.0, 2.0), 16, anchor_stride=2)
    assert generator.anchor_stride == 2
    assert generator.grid_shapes([(7, 10)]) == [(4, 5)]
    (anchors,) = generator([(7, 10)])
    assert anchors.shape == (4 * 5 * 6, 4)
    # Same as torchvision with stride 32 on the 4 x 5 grid: spacing 2 * 16 px.
    expected = _torchvision_anchors(((64, 128),), ((0.5, 1.0, 2.0),), (128, 160), (32,))
    assert torch.equal(anchors, expected)
    grid = anchors.view(4, 5, 6, 4)
    assert torch.equal(grid[0, 1] - grid[0, 0], torch.tensor([32.0, 0, 32, 0]).expand(6, 4))


def test_anchor_stride_grid_matches_strided_conv_output() -> None:
    conv = torch.nn.Conv2d(1, 1, 3, stride=3, padding=1)
    generator = AnchorGenerator((32,), (1.0,), 8, anchor_stride=3)
    for h, w in [(7, 10), (9, 9), (1, 2)]:
        out = conv(torch.zeros(1, 1, h, w))
        assert generator.grid_shapes([(h, w)]) == [tuple(out.shape[-2:])]


def test_feature_shapes_for_rounds_up() -> None:
    generator = AnchorGenerator(FPN_SIZES, FPN_RATIOS, FPN_STRIDES)
    assert generator.strides == FPN_STRIDES
    assert generator.feature_shapes_for((800, 1000)) == [(200, 250), (100, 125), (50, 63), (25, 32), (13, 16)]


def test_anchors_are_cached_per_shape_device_and_dtype() -> None:
    generator = AnchorGenerator(FPN_SIZES, FPN_RATIOS, FPN_STRIDES)
    shapes = generator.feature_shapes_for((128, 128))
    first, again = generator(shapes), generator(shapes)
    assert all(a is b for a, b in zip(first, again))
    half = generator(shapes, dtype=torch.float16)
    assert half[0].dtype == torch.float16 and half[0] is not first[0]
    other = generator(generator.feature_shapes_for((64, 128)))
    assert other[0].shape[0] != first[0].shape[0]
    assert generator.grid(shapes) is generator.grid(shapes)


def test_grid_layout_describes_the_anchor_rows() -> None:
    generator = AnchorGenerator(FPN_SIZES, FPN_RATIOS, FPN_STRIDES, offset=0.5)
    shapes = generator.feature_shapes_for((96, 160))
    grid = generator.grid(shapes)
    assert isinstance(grid, AnchorGrid)
    assert torch.equal(grid.anchors, torch.cat(generator(shapes)))
    level = grid.levels[2]
    y, x, a = 1, 3, 2
    row = level.start + (y * level.width + x) * 3 + a
    expected = level.cell_anchors[a] + torch.tensor([level.origin + x * level.step, level.origin + y * level.step] * 2)
    assert torch.equal(grid.anchors[row], expected)


def test_feature_tensors_are_accepted_and_empty_levels_work() -> None:
    generator = AnchorGenerator((32,), (1.0,), (8, 16))
    levels = generator([torch.zeros(2, 4, 3, 5), (0, 4)])
    assert levels[0].shape == (15, 4) and levels[1].shape == (0, 4)


def test_pickling_drops_the_cache() -> None:
    generator = AnchorGenerator(FPN_SIZES, FPN_RATIOS, FPN_STRIDES)
    generator(generator.feature_shapes_for((64, 64)))
    clone = pickle.loads(pickle.dumps(generator))
    assert len(clone._cache) == 0
    assert torch.equal(torch.cat(clone([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])),
                       torch.cat(generator([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)])))


class _LevelAnchors(torch.nn.Module):
    """``level_anchors`` on the size of its input, for torch.export."""

    def __init__(self, cell_anchors: torch.Tensor, stride: int, offset: float, anchor_stride: int) -> None:
        super().__init__()
        self.register_buffer("cell_anchors", cell_anchors)
        self.stride, self.offset, self.anchor_stride = stride, offset, anchor_stride

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return level_anchors(self.cell_anchors, self.stride, feature.shape[-2:], self.offset, self.anchor_stride)


@pytest.mark.parametrize(("offset", "anchor_stride"), [(0.0, 1), (0.5, 3)])
def test_level_anchors_exported_with_dynamic_sizes_equal_the_generator(offset: float, anchor_stride: int) -> None:
    generator = AnchorGenerator(((24, 40),), (0.5, 1.0, 2.0), (16,), offset=offset, anchor_stride=anchor_stride)
    smallest = 2 * anchor_stride  # a one-cell anchor grid would be specialised by torch.export
    dims = {"feature": {i: torch.export.Dim(name, min=smallest, max=512) for i, name in enumerate("hw")}}
    module = _LevelAnchors(generator.cell_anchors[0], 16, offset, anchor_stride)
    exported = torch.export.export(module, (torch.zeros(8, 6),), dynamic_shapes=dims).module()
    for shape in ((8, 6), (13, 29), (50, 7)):
        expected = generator([shape])[0]
        assert expected.shape[0] > 0
        assert torch.equal(exported(torch.zeros(shape)), expected)
