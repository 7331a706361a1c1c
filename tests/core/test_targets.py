"""assign_anchor_targets: labels + deltas, crowd regions, seeding, config validation."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.matching import match_anchors
from lightning_rpn.core import targets
from lightning_rpn.core.targets import (
    AnchorTargetConfig,
    assign_anchor_targets,
    assign_batch_targets,
    sample_generator,
)

IMAGE = (256, 320)
GENERATOR = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64))
GT = torch.tensor([[20.0, 30.0, 90.0, 120.0], [150.0, 40.0, 300.0, 200.0], [200.0, 210.0, 230.0, 250.0]])


def test_positive_deltas_decode_back_to_their_gt_box() -> None:
    grid = GENERATOR.grid(GENERATOR.feature_shapes_for(IMAGE))
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    labels, deltas = assign_anchor_targets(grid, GT, IMAGE, AnchorTargetConfig(), coder, sample_generator(0, 1))
    assert labels.dtype == torch.int64 and deltas.dtype == torch.float32
    assert deltas.shape == (grid.num_anchors, 4)
    positive = labels == 1
    assert 0 < positive.sum() <= 128 and (labels >= 0).sum() == 256
    _, matched = match_anchors(grid, GT)
    decoded = coder.decode(deltas[positive], grid.anchors[positive])
    torch.testing.assert_close(decoded, GT[matched[positive]], rtol=1e-5, atol=1e-3)
    assert (deltas[~positive] == 0).all()


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_grid_tensor_and_backends_give_identical_targets(backend: str) -> None:
    grid = GENERATOR.grid(GENERATOR.feature_shapes_for(IMAGE))
    config = AnchorTargetConfig(allowed_border=0.0)
    coder = BoxCoder()
    a = assign_anchor_targets(grid, GT, IMAGE, config, coder, sample_generator(3, "img"))
    b = assign_anchor_targets(grid.anchors.clone(), GT, IMAGE, config, coder, sample_generator(3, "img"), backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_crowd_regions_ignore_covered_non_positive_anchors() -> None:
    grid = GENERATOR.grid(GENERATOR.feature_shapes_for(IMAGE))
    crowd = torch.tensor([[0.0, 150.0, 140.0, 256.0]])
    everything = AnchorTargetConfig(batch_size_per_image=10**6, positive_fraction=1.0)
    with_crowd = AnchorTargetConfig(batch_size_per_image=10**6, positive_fraction=1.0, crowd_ioa=0.7)
    labels, _ = assign_anchor_targets(grid, GT, IMAGE, with_crowd, BoxCoder(), crowd_boxes=crowd)
    plain, _ = assign_anchor_targets(grid, GT, IMAGE, everything, BoxCoder())
    a = grid.anchors
    inter_w = (torch.minimum(a[:, 2], crowd[0, 2]) - torch.maximum(a[:, 0], crowd[0, 0])).clamp(min=0)
    inter_h = (torch.minimum(a[:, 3], crowd[0, 3]) - torch.maximum(a[:, 1], crowd[0, 1])).clamp(min=0)
    covered = inter_w * inter_h / ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])) >= 0.7
    assert covered.any()
    assert (labels[covered & (plain != 1)] == -1).all()
    assert torch.equal(labels[~covered], plain[~covered])
    assert torch.equal(labels[plain == 1], plain[plain == 1])  # crowd never touches positives
    # Without crowd_ioa the crowd boxes are not used; they are never matched either way.
    unused, _ = assign_anchor_targets(grid, GT, IMAGE, everything, BoxCoder(), crowd_boxes=crowd)
    assert torch.equal(unused, plain)


def test_no_gt_boxes_gives_only_negatives() -> None:
    grid = GENERATOR.grid(GENERATOR.feature_shapes_for(IMAGE))
    labels, deltas = assign_anchor_targets(grid, torch.zeros(0, 4), IMAGE, AnchorTargetConfig(), BoxCoder())
    assert (labels == 1).sum() == 0 and (labels == 0).sum() == 256
    assert (deltas == 0).all()


def test_same_generator_state_same_targets_and_seed_dependence() -> None:
    anchors = torch.cat(GENERATOR(GENERATOR.feature_shapes_for(IMAGE)))
    config, coder = AnchorTargetConfig(), BoxCoder()
    first = assign_anchor_targets(anchors, GT, IMAGE, config, coder, sample_generator(0, 42))
    again = assign_anchor_targets(anchors, GT, IMAGE, config, coder, sample_generator(0, 42))
    other = assign_anchor_targets(anchors, GT, IMAGE, config, coder, sample_generator(0, 43))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_sample_generator_mixes_in_the_epoch() -> None:
    draw = lambda *key: torch.randint(0, 10**9, (4,), generator=sample_generator(*key)).tolist()  # noqa: E731
    assert draw(3, "img", 0) == draw(3, "img") == draw(3, "img", 0)
    assert draw(3, "img", 1) == draw(3, "img", 1)
    assert len({str(draw(3, "img", epoch)) for epoch in range(5)}) == 5
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        sample_generator(3, "img", -1)


def test_sample_generator_is_stable_across_processes() -> None:
    keys = [(0, 1), (5, "a/b.jpg")]
    here = [torch.randint(0, 10**9, (3,), generator=sample_generator(s, i)).tolist() for s, i in keys]
    code = (
        "import torch\nfrom lightning_rpn.core.targets import sample_generator\n"
        "print([torch.randint(0, 10**9, (3,), generator=sample_generator(s, i)).tolist() "
        "for s, i in [(0, 1), (5, 'a/b.jpg')]])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(here)
    assert here[0] != torch.randint(0, 10**9, (3,), generator=sample_generator(1, 1)).tolist()


PAPER_ANCHORS = AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),), (16,))


def border_warnings(image_sizes: list[tuple[int, int]], allowed_border: float | None, **kwargs) -> list[str]:
    """The border warnings of one assignment of a box in each image (the VGG16 C4 recipe's anchors)."""
    padded = (max(h for h, _ in image_sizes), max(w for _, w in image_sizes))
    grid = PAPER_ANCHORS.grid(PAPER_ANCHORS.feature_shapes_for(padded))
    gt = [torch.tensor([[10.0, 10.0, 60.0, 60.0]])] * len(image_sizes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels, _ = assign_batch_targets(grid, gt, image_sizes, AnchorTargetConfig(allowed_border=allowed_border),
                                         BoxCoder(), [None] * len(image_sizes), **kwargs)
    found = [str(w.message) for w in caught if "allowed_border" in str(w.message)]
    assert not found or (labels[-1] >= 0).sum() == 0  # the warned image keeps no anchor
    return found


def test_border_filter_leaving_an_image_no_anchor_warns_once(monkeypatch) -> None:
    """allowed_border 0 (the paper's rule) on a 128 px image with 128-512 px anchors: every anchor is
    ignored and the loss is exactly 0; this said nothing."""
    monkeypatch.setattr(targets, "_warned_no_anchor_inside", False, raising=False)
    (message,) = border_warnings([(600, 800), (128, 170)], 0.0)
    for part in ("image 1 of the batch", "170x128 px", "1 gt box", "model.allowed_border=0 px",
                 "smallest anchor is 182x90 px", "model.allowed_border: null"):
        assert part in message
    assert border_warnings([(128, 170)], 0.0) == []  # once per process
    monkeypatch.setattr(targets, "_warned_no_anchor_inside", False)
    (named,) = border_warnings([(600, 800), (128, 170)], 0.0, image_ids=["big", "small"])
    assert named.startswith("image 'small' (170x128 px")


def test_border_filter_keeping_anchors_or_off_does_not_warn(monkeypatch) -> None:
    monkeypatch.setattr(targets, "_warned_no_anchor_inside", False, raising=False)
    assert border_warnings([(600, 800)], 0.0) == []
    assert border_warnings([(128, 170)], None) == []
    assert border_warnings([(128, 170)], 200.0) == []


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(fg_iou=0.3, bg_iou=0.5), r"bg_iou <= fg_iou.*bg_iou=0.5, fg_iou=0.3"),
        (dict(batch_size_per_image=0), "batch_size_per_image must be a positive int, got 0"),
        (dict(positive_fraction=2.0), r"positive_fraction must be in \[0, 1\]"),
        (dict(crowd_ioa=0.0), r"crowd_ioa must be in \(0, 1\]"),
        (dict(allowed_border=-1.0), "allowed_border must be >= 0"),
    ],
)
def test_config_validation(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        AnchorTargetConfig(**kwargs)


def test_config_is_frozen_with_paper_defaults() -> None:
    config = AnchorTargetConfig()
    assert (config.fg_iou, config.bg_iou, config.batch_size_per_image, config.positive_fraction) == (0.7, 0.3, 256, 0.5)
    assert config.allowed_border is None and config.crowd_ioa is None and config.allow_low_quality
    with pytest.raises(AttributeError):
        config.fg_iou = 0.5  # type: ignore[misc]
