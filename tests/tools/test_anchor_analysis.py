"""Anchor analysis: exact best-anchor IoU, coverage per area range, optimisation, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from lightning_rpn.tools.anchor_analysis import (
    GTBoxSet,
    anchor_coverage,
    best_anchor_iou,
    collect_gt_boxes,
    optimize_anchors,
    plot_anchor_analysis,
    run_analyze_anchors,
    write_config_snippet,
)
from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.boxes import box_iou
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.transforms import DetectionTransform, ResizePolicy
from lightning_rpn.data.validation import validate_dataset
from lightning_rpn.training.datamodule import RPNDataModule


def random_boxes(height: int, width: int, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([width, height]) - 4
    wh = torch.exp(torch.rand(count, 2, generator=g) * 4.5) * 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


@pytest.mark.parametrize(
    "generator",
    [
        AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),), (4, 8, 16)),
        AnchorGenerator(((20, 40), (80, 160)), ((0.33, 1.0, 3.0), (0.5, 1.0, 2.0)), (8, 16), offset=0.5,
                        anchor_stride=2),
    ],
)
def test_best_anchor_iou_equals_dense_iou_over_real_anchors(generator: AnchorGenerator) -> None:
    divisibility = 32
    images = [((100, 130), random_boxes(100, 130, 200, 1)), ((37, 250), random_boxes(37, 250, 200, 2))]
    boxes = GTBoxSet.from_images([(size, b.numpy()) for size, b in images], divisibility)
    best, group = best_anchor_iou(boxes, generator)
    expected = []
    for (height, width), image_boxes in images:
        padded = (-(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility)
        anchors = torch.cat(generator(generator.feature_shapes_for(padded)))
        keep = (image_boxes[:, 2] > image_boxes[:, 0]) & (image_boxes[:, 3] > image_boxes[:, 1])
        expected.append(box_iou(image_boxes[keep], anchors).amax(dim=1))
    assert torch.equal(best, torch.cat(expected))
    assert int(group.max()) < sum(c.shape[0] for c in generator.cell_anchors)


def test_coverage_per_area_range_hand_checked() -> None:
    generator = AnchorGenerator(((32,),), ((1.0,),), (16,))
    # Anchors of size 32 centred on multiples of 16: [-16, -16, 16, 16] + 16 * (x, y).
    boxes = torch.tensor([
        [0.0, 0.0, 32.0, 32.0],  # an anchor exactly (area 1024: medium) -> IoU 1
        [16.0, 16.0, 24.0, 24.0],  # 8x8 inside an anchor -> IoU 64 / 1024 (small)
        [16.0, 16.0, 40.0, 40.0],  # 24x24 (small), centre 28: nearest anchor centre 32 -> IoU 576 / 1024
    ])
    box_set = GTBoxSet(boxes, torch.full((3, 2), 64, dtype=torch.int64))
    coverage = anchor_coverage(box_set, generator)
    best, _ = best_anchor_iou(box_set, generator)
    assert best[0] == 1.0 and best[1] == pytest.approx(64 / 1024)
    assert best[2] == pytest.approx(24 * 24 / 1024)
    assert coverage["boxes"] == 3 and coverage["boxes_small"] == 2 and coverage["boxes_medium"] == 1
    assert coverage["coverage@0.50"] == pytest.approx(2 / 3)
    assert coverage["coverage@0.70"] == pytest.approx(1 / 3)
    assert coverage["coverage_small@0.50"] == pytest.approx(1 / 2)
    assert coverage["coverage_medium@0.70"] == 1.0
    assert np.isnan(coverage["coverage_large@0.70"])


def thin_boxes(num_images: int = 40, seed: int = 0) -> GTBoxSet:
    """Boxes of aspect 8:1 and 1:8 that ratios 0.5 / 1 / 2 fit badly."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        image = []
        for j in range(6):
            scale = rng.uniform(40, 90)
            long_side, short_side = scale * np.sqrt(8), scale / np.sqrt(8)
            w, h = (long_side, short_side) if j % 2 else (short_side, long_side)
            x, y = rng.uniform(0, 256 - w), rng.uniform(0, 256 - h)
            image.append([x, y, x + w, y + h])
        images.append(((256, 256), np.asarray(image)))
    return GTBoxSet.from_images(images, 32)


def test_optimize_raises_coverage_on_thin_boxes_with_the_same_anchor_count() -> None:
    boxes = thin_boxes()
    default = AnchorGenerator(((32,), (64,), (128,)), ((0.5, 1.0, 2.0),), (8, 16, 32))
    before = anchor_coverage(boxes, default)
    optimized = optimize_anchors(boxes, default, seed=0)
    after = anchor_coverage(boxes, optimized)
    assert before["coverage@0.70"] < 0.05
    assert after["coverage@0.70"] > before["coverage@0.70"] + 0.3
    assert after["coverage@0.50"] > before["coverage@0.50"]
    assert optimized.strides == default.strides
    assert optimized.num_anchors_per_location() == default.num_anchors_per_location()
    assert [len(s) for s in optimized.sizes] == [len(s) for s in default.sizes]
    # both thin orientations are covered: ratios far below and far above 1
    ratios = [r for level in optimized.aspect_ratios for r in level]
    assert min(ratios) < 0.25 and max(ratios) > 4
    again = optimize_anchors(boxes, default, seed=0)
    assert again.sizes == optimized.sizes and again.aspect_ratios == optimized.aspect_ratios


def test_optimize_never_worse_than_a_well_fitting_design() -> None:
    boxes = thin_boxes(10, seed=1)
    good = optimize_anchors(boxes, AnchorGenerator(((32,), (64,), (128,)), ((0.5, 1.0, 2.0),), (8, 16, 32)))
    again = optimize_anchors(boxes, good)
    assert anchor_coverage(boxes, again)["coverage@0.70"] >= anchor_coverage(boxes, good)["coverage@0.70"]


def test_config_snippet_loads_back_into_the_same_anchors() -> None:
    generator = AnchorGenerator(((30.5,), (61.0,)), ((0.125, 1.0, 8.0), (0.2, 1.0, 5.0)), (8, 16))
    text = write_config_snippet(generator)
    model = yaml.safe_load(text)["model"]
    assert set(model) == {"anchor_sizes", "aspect_ratios"}
    rebuilt = AnchorGenerator(model["anchor_sizes"], model["aspect_ratios"], (8, 16))
    assert rebuilt.sizes == generator.sizes and rebuilt.aspect_ratios == generator.aspect_ratios


def test_collect_gt_boxes_applies_the_configured_resize() -> None:
    data = RPNDataModule(synthetic_train_images=6, synthetic_min_size=60, synthetic_max_size=90, resize="fixed",
                         fixed_size=[128, 96], size_divisibility=32)
    boxes = collect_gt_boxes(data, split="train", progress=False)
    raw = SyntheticShapes(6, 60, 90, data.hparams.synthetic_max_shapes, seed=0, split="train")
    transform = DetectionTransform(resize=ResizePolicy("fixed", fixed_size=(128, 96)))
    expected = np.concatenate([transform(raw[i]).boxes for i in range(6)])
    assert boxes.num_images == 6
    assert len(boxes) == len(expected) > 0
    np.testing.assert_allclose(boxes.boxes.numpy(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(boxes.padded_sizes, torch.tensor([[128, 96]]).expand(len(boxes), 2))
    for bad in (0, -1):  # `--max_images -1` read "no ground-truth boxes found (empty dataset or split?)"
        with pytest.raises(ValueError, match=f"max_images must be a positive int or None \\(all\\), got {bad}"):
            collect_gt_boxes(data, split="train", progress=False, max_images=bad)


def test_run_analyze_anchors_writes_plot_report_and_snippet(tmp_path, capsys) -> None:
    from types import SimpleNamespace

    generator = AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),), (8, 16, 32))
    model = SimpleNamespace(anchor_generator=generator, size_divisibility=32)
    data = RPNDataModule(synthetic_train_images=8, synthetic_min_size=64, synthetic_max_size=96)
    analysis = run_analyze_anchors(model, data, optimize=True, output_dir=tmp_path, max_images=8)
    printed = capsys.readouterr().out
    assert "anchor coverage" in printed and "anchor_sizes" in printed
    assert (tmp_path / "anchor_analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "anchor_analysis.json").read_text())
    assert report["coverage"]["coverage@0.70"] == pytest.approx(analysis.coverage["coverage@0.70"])
    assert report["optimized_coverage"]["coverage@0.70"] >= report["coverage"]["coverage@0.70"] - 0.05
    snippet = yaml.safe_load((tmp_path / "anchors.yaml").read_text())
    assert len(snippet["model"]["anchor_sizes"]) == 3


def test_plot_without_optimized_design(tmp_path) -> None:
    path = plot_anchor_analysis(thin_boxes(3), AnchorGenerator((32,), (1.0,), 16), tmp_path / "a.png")
    assert path.stat().st_size > 1000


def test_errors_name_the_problem() -> None:
    empty = GTBoxSet(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        optimize_anchors(empty, AnchorGenerator((32,), (1.0,), 16))
    with pytest.raises(TypeError, match="Dataset or RPNDataModule"):
        collect_gt_boxes(object())
    with pytest.raises(ValueError, match="padded_sizes"):
        GTBoxSet(torch.zeros(2, 4), torch.zeros(3, 2, dtype=torch.int64))


def test_check_data_and_analyze_anchors_report_the_same_best_anchor_ious() -> None:
    """One coverage computation (core.coverage): check-data's probe over every image equals
    analyze-anchors' collection after the same resize, box for box."""
    dataset = SyntheticShapes(12, min_size=60, max_size=140, max_shapes=4, split="coverage")
    generator = AnchorGenerator(((16,), (32,), (64,)), (0.5, 1.0, 2.0), (8, 16, 32))
    resize = ResizePolicy(mode="fixed", fixed_size=(96, 96))
    report = validate_dataset(dataset, check_images=False, anchor_generator=generator, size_divisibility=32,
                              resize=resize)
    probed = torch.tensor(report.splits[0].best_anchor_iou)
    collected, _ = best_anchor_iou(collect_gt_boxes(dataset, resize=resize, size_divisibility=32, progress=False),
                                   generator)
    assert len(probed) == len(collected) == sum(len(dataset[i].boxes) for i in range(len(dataset)))
    torch.testing.assert_close(probed, collected, rtol=0, atol=1e-6)


def blob_images(count: int = 50, seed: int = 0) -> list:
    """``count`` 640 x 640 images of four 10-110 px boxes each."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        wh = torch.rand(4, 2, generator=g) * 100 + 10
        xy = torch.rand(4, 2, generator=g) * 500
        images.append(((640, 640), torch.cat([xy, xy + wh], 1).numpy()))
    return images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimize_is_not_derailed_by_one_extreme_box(seed: int) -> None:
    """One 2500 x 1 px line among 200 boxes: k-means++ seeded a cluster on it, whose 1 / 2500
    ratio rounded to 0.0 (ValueError); it no longer claims an anchor shape of its own."""
    default = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),), (4, 8, 16, 32))
    images = blob_images()
    boxes = GTBoxSet.from_images(images + [((3000, 3000), np.array([[0.0, 100.0, 2500.0, 101.0]]))], 32)
    optimized = optimize_anchors(boxes, default, seed=seed)
    before, after = anchor_coverage(boxes, default), anchor_coverage(boxes, optimized)
    assert after["coverage@0.50"] >= before["coverage@0.50"] and after["coverage@0.70"] >= before["coverage@0.70"]
    ratios = [r for level in optimized.aspect_ratios for r in level]
    assert 1 / 8 < min(ratios) and max(ratios) < 8  # no anchor spent on the line
    without = optimize_anchors(GTBoxSet.from_images(images, 32), default, seed=seed)
    assert after["coverage@0.70"] >= anchor_coverage(boxes, without)["coverage@0.70"] - 0.03


@pytest.mark.parametrize(
    "image_boxes",
    [
        [[10.0, 10.0, 10.03, 10.03]],  # a 0.03 px box: size 0.03 rounded to 1 decimal was 0.0
        [[5.0, 5.0, 5.2, 5.01]],  # 0.2 x 0.01 px
        [[0.0, 100.0, 3990.0, 101.0], [0.0, 200.0, 3000.0, 201.0]],  # ratios 1/3990 and 1/3000
        [[100.0, 0.0, 101.0, 3990.0]],  # ratio 3990
        [[10.0, 10.0, 50.0, 40.0]],  # one ordinary box
    ],
)
def test_optimize_builds_every_design_it_proposes(image_boxes: list) -> None:
    default = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),), (4, 8, 16, 32))
    boxes = GTBoxSet.from_images([((4000, 4000), np.array(image_boxes))], 32)
    optimized = optimize_anchors(boxes, default)
    values = [v for design in (optimized.sizes, optimized.aspect_ratios) for level in design for v in level]
    assert all(v > 0 and float(f"{v:.3g}") == v for v in values)  # 3 significant digits, never 0
    cells = torch.cat(optimized.cell_anchors)
    assert bool((cells[:, 2:] > cells[:, :2]).all())  # no zero-width or zero-height anchor
    before, after = anchor_coverage(boxes, default), anchor_coverage(boxes, optimized)
    assert after["coverage@0.50"] >= before["coverage@0.50"] and after["coverage@0.70"] >= before["coverage@0.70"]


@pytest.mark.parametrize("fg_iou", [None, 0.3, 0.5])
def test_optimize_lowers_no_coverage_of_the_current_design(fg_iou: float | None) -> None:
    """The shapes data with the shapes config's anchors: the search traded 4% of the boxes at IoU
    0.5 (shapes.yaml's fg_iou) for more at 0.7 (0.935 -> 0.895)."""
    default = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),), (4, 8, 16, 32))
    data = RPNDataModule(synthetic_train_images=40, synthetic_val_images=2)
    boxes = collect_gt_boxes(data, size_divisibility=32, progress=False)
    thresholds = (0.3, 0.5, 0.7)
    optimized = optimize_anchors(boxes, default, **({} if fg_iou is None else {"fg_iou": fg_iou}))
    before = anchor_coverage(boxes, default, thresholds)
    after = anchor_coverage(boxes, optimized, thresholds)
    for t in (0.5, 0.7) + (() if fg_iou is None else (fg_iou,)):
        assert after[f"coverage@{t:.2f}"] >= before[f"coverage@{t:.2f}"], t
    assert after["coverage@0.50"] + after["coverage@0.70"] > before["coverage@0.50"] + before["coverage@0.70"]


def test_optimize_checks_fg_iou() -> None:
    with pytest.raises(ValueError, match=r"fg_iou must be in \[0, 1\]"):
        optimize_anchors(thin_boxes(1), AnchorGenerator((32,), (1.0,), 16), fg_iou=1.5)


class _Listed(torch.utils.data.Dataset):
    """The samples of a list."""

    def __init__(self, samples: list) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


class _Wrapping(_Listed):
    """The samples of a list, with a ``.dataset`` (not the package's wrapper: not looked through)."""

    def __init__(self, samples: list, dataset: torch.utils.data.Dataset) -> None:
        super().__init__(samples)
        self.dataset = dataset


def test_collect_gt_boxes_reads_a_subset_s_own_items() -> None:
    """A Subset of 2 of 20 images was read as all 20 (any ``.dataset`` was unwrapped)."""
    from dataclasses import replace

    from torch.utils.data import Subset

    from lightning_rpn.data.transforms import TransformedDataset

    raw = SyntheticShapes(20, seed=0, split="train")
    expected = collect_gt_boxes(_Listed([raw[5], raw[2]]), progress=False)
    augmented = TransformedDataset(raw, lambda sample: replace(sample, boxes=sample.boxes[:1] * 0.5))
    for source in (Subset(raw, [5, 2]), Subset(augmented, [5, 2]), Subset(Subset(raw, list(range(10))), [5, 2])):
        got = collect_gt_boxes(source, progress=False)
        assert got.num_images == 2 and torch.equal(got.boxes, expected.boxes)
    assert collect_gt_boxes(Subset(raw, [5, 2, 7]), max_images=2, progress=False).num_images == 2
    wrapper = collect_gt_boxes(_Wrapping([raw[5], raw[2]], raw), progress=False)
    assert wrapper.num_images == 2 and torch.equal(wrapper.boxes, expected.boxes)


@pytest.mark.parametrize(
    "image_boxes",
    [
        [[10.0, 10.0, 34.0, 26.0]],  # one box: every fit proposed its shape, ratios [0.667, 0.667, 0.667]
        [[10.0, 10.0, 34.0, 26.0], [0.0, 0.0, 40.0, 80.0]],
        [[10.0, 10.0, 34.0, 26.0]] * 5,
    ],
)
def test_optimize_on_few_boxes_proposes_no_two_equal_anchors(image_boxes: list) -> None:
    default = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),), (4, 8, 16, 32))
    boxes = GTBoxSet.from_images([((128, 128), np.array(image_boxes))], 32)
    optimized = optimize_anchors(boxes, default)
    for level, cells in enumerate(optimized.cell_anchors):
        assert torch.unique(cells, dim=0).shape[0] == cells.shape[0], (level, optimized.aspect_ratios[level])
    before, after = anchor_coverage(boxes, default), anchor_coverage(boxes, optimized)
    assert after["coverage@0.50"] >= before["coverage@0.50"] and after["coverage@0.70"] >= before["coverage@0.70"]


def test_a_user_design_with_equal_anchors_is_still_searched() -> None:
    # the search keeps a level's count of different anchors; it does not freeze a level that has fewer
    repeated = AnchorGenerator(((32,),), ((1.0, 1.0, 1.0),), (8,))
    boxes = GTBoxSet.from_images(blob_images(10), 32)
    optimized = optimize_anchors(boxes, repeated)
    assert anchor_coverage(boxes, optimized)["coverage@0.50"] > anchor_coverage(boxes, repeated)["coverage@0.50"]


def test_plot_of_boxes_all_of_one_size(tmp_path) -> None:
    # equal histogram edges: numpy raised "bins must increase monotonically" after the analysis
    boxes = GTBoxSet.from_images([((40, 60), np.array([[1.0, 1.0, 21.0, 21.0]] * 3))], 32)
    path = plot_anchor_analysis(boxes, AnchorGenerator((32,), (1.0,), 16), tmp_path / "a.png")
    assert path.stat().st_size > 1000
