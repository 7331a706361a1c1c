"""RPNCollate: padding, worker-side targets (== direct call == the RPN's in-model path), workers."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.rpn import RPN
from lightning_rpn.core.targets import AnchorTargetConfig, assign_anchor_targets, sample_generator
from lightning_rpn.data.collate import RPNCollate, padded_size, set_sampling_epoch
from lightning_rpn.data.sample import DetectionSample
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.transforms import DetectionTransform, TransformedDataset

ANCHORS = AnchorGenerator(((16,), (32,), (64,)), (0.5, 1.0, 2.0), (8, 16, 32))


def item(h: int, w: int, boxes: list, image_id: int | str = 0, crowd: list | None = None) -> DetectionSample:
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return DetectionSample(image=image, boxes=np.array(boxes, np.float32), image_id=image_id, source="mem",
                           crowd_boxes=np.array(crowd or [], np.float32))


def test_pads_to_the_size_divisibility_keeping_sizes_and_content() -> None:
    samples = [item(30, 50, [[1, 2, 20, 25]], 1), item(45, 20, [], "b")]
    batch = RPNCollate(size_divisibility=32)(samples)
    assert batch.images.shape == (2, 3, 64, 64) and batch.images.dtype == torch.uint8
    assert batch.image_sizes == [(30, 50), (45, 20)] and batch.original_sizes == [(30, 50), (45, 20)]
    assert torch.equal(batch.images[0, :, :30, :50], torch.from_numpy(samples[0].image).permute(2, 0, 1))
    assert batch.images[0, :, 30:].sum() == 0 and batch.images[1, :, :, 20:].sum() == 0
    assert batch.image_ids == [1, "b"] and batch.gt_boxes[1].shape == (0, 4)
    assert batch.anchor_labels is None and batch.anchor_targets is None
    assert padded_size([(64, 65)], 32) == (64, 96)


def test_a_read_only_image_is_copied_without_a_warning() -> None:
    # np.asarray(PIL image) is read-only: torch.from_numpy warned "The given NumPy array is not writable"
    sample = item(30, 50, [[1, 2, 20, 25]])
    sample.image.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = RPNCollate(size_divisibility=32)([sample])
    assert torch.equal(batch.images[0, :, :30, :50], torch.from_numpy(sample.image.copy()).permute(2, 0, 1))


@pytest.mark.parametrize("backend", ["compiled", "torch"])  # the direct assignment's backend
def test_targets_equal_a_direct_assignment_for_the_padded_size(backend: str) -> None:
    config = AnchorTargetConfig(batch_size_per_image=64)
    samples = [item(70, 90, [[5, 5, 40, 60], [50, 10, 88, 30]], 11), item(100, 40, [[0, 0, 30, 30]], "x")]
    batch = RPNCollate(ANCHORS, config, seed=7)(samples)
    assert batch.images.shape[-2:] == (128, 96)
    anchors = torch.cat(ANCHORS(ANCHORS.feature_shapes_for((128, 96))))
    assert batch.anchor_labels.shape == (2, anchors.shape[0]) and batch.target_deltas.shape == (2, anchors.shape[0], 4)
    assert batch.anchor_labels.dtype == torch.int8  # compact: what workers send is small
    assert batch.positive_deltas.shape == (int((batch.anchor_labels == 1).sum()), 4)
    for i, sample in enumerate(samples):
        labels, deltas = assign_anchor_targets(
            anchors, torch.from_numpy(sample.boxes), sample.image_size, config, BoxCoder(),
            generator=sample_generator(7, sample.image_id), backend=backend)
        assert torch.equal(batch.anchor_labels[i].long(), labels) and torch.equal(batch.target_deltas[i], deltas)
        assert (labels == 1).any() and (labels != -1).sum() <= 64
    assert not batch.anchor_labels.is_inference()


def test_empty_image_gets_only_negatives() -> None:
    batch = RPNCollate(ANCHORS)([item(128, 128, [])])  # 1008 anchors
    labels = batch.anchor_labels[0]
    assert not (labels == 1).any() and (labels == 0).sum() == 256 and batch.target_deltas.abs().sum() == 0


def test_size_divisibility_must_be_a_multiple_of_the_largest_stride() -> None:
    with pytest.raises(ValueError, match="size_divisibility=48 .* largest stride 32"):
        RPNCollate(ANCHORS, size_divisibility=48)
    assert RPNCollate(ANCHORS).size_divisibility == 32


def test_collate_pickles_and_gives_the_same_batch() -> None:
    collate = RPNCollate(ANCHORS, seed=3)
    samples = [item(50, 60, [[3, 3, 40, 40]], 5)]
    first = collate(samples)
    clone = pickle.loads(pickle.dumps(collate))
    again = clone(samples)
    assert torch.equal(first.anchor_labels, again.anchor_labels) and torch.equal(first.images, again.images)


def test_worker_targets_equal_the_rpn_in_model_targets() -> None:
    torch.manual_seed(0)
    config = AnchorTargetConfig(batch_size_per_image=128, crowd_ioa=0.5)
    rpn = RPN(ANCHORS, in_channels=8, target_config=config, seed=5)
    samples = [item(70, 90, [[5, 5, 40, 60], [50, 10, 88, 30]], 11, crowd=[[60, 40, 90, 70]]),
               item(96, 64, [], 12), item(60, 60, [[10, 10, 50, 20]], "s")]
    batch = RPNCollate(ANCHORS, config, seed=5)(samples)
    features = [torch.randn(len(samples), 8, h, w) for h, w in ANCHORS.feature_shapes_for(tuple(batch.images.shape[-2:]))]
    _, from_worker = rpn(features, batch.image_sizes, anchor_targets=batch.anchor_targets, need_proposals=False)
    _, in_model = rpn(features, batch.image_sizes, batch.targets, image_ids=batch.image_ids, sampling_epoch=0,
                      need_proposals=False)
    assert set(from_worker) == {"loss_rpn_cls", "loss_rpn_reg"}
    for key in from_worker:
        assert torch.equal(from_worker[key], in_model[key]), key
    _, other_seed = rpn(features, batch.image_sizes, batch.targets, image_ids=[0, 1, 2], sampling_epoch=0,
                        need_proposals=False)
    assert not torch.equal(other_seed["loss_rpn_cls"], from_worker["loss_rpn_cls"])
    # a later epoch: the collate and the in-model path mix in the same epoch
    collate = RPNCollate(ANCHORS, config, seed=5)
    collate.set_epoch(3)
    batch = collate(samples)
    assert batch.sampling_epoch == 3
    _, from_worker = rpn(features, batch.image_sizes, anchor_targets=batch.anchor_targets, need_proposals=False)
    _, in_model = rpn(features, batch.image_sizes, batch.targets, image_ids=batch.image_ids, sampling_epoch=3,
                      need_proposals=False)
    _, epoch_0 = rpn(features, batch.image_sizes, batch.targets, image_ids=batch.image_ids, sampling_epoch=0,
                     need_proposals=False)
    for key in from_worker:
        assert torch.equal(from_worker[key], in_model[key]), key
    assert not torch.equal(epoch_0["loss_rpn_cls"], in_model["loss_rpn_cls"])


def test_every_epoch_samples_afresh_and_reproducibly() -> None:
    """Without augmentation an image's sample used to be the same 256 anchors every epoch."""
    samples = [item(96, 128, [[5, 5, 40, 60], [50, 10, 120, 60]], 11), item(128, 96, [[10, 10, 50, 90]], "b")]
    collate = RPNCollate(ANCHORS, seed=4)
    assert collate.epoch == 0
    epoch_0 = collate(samples)
    collate.set_epoch(1)
    epoch_1 = collate(samples)
    assert (epoch_0.sampling_epoch, epoch_1.sampling_epoch) == (0, 1)
    for row in range(len(samples)):
        assert not torch.equal(epoch_0.anchor_labels[row], epoch_1.anchor_labels[row]), row
        # the same matching: only the sampled subset changes
        assert (epoch_0.anchor_labels[row] == 1).sum() == (epoch_1.anchor_labels[row] == 1).sum()
    again = RPNCollate(ANCHORS, seed=4)
    again.set_epoch(1)
    assert torch.equal(again(samples).anchor_labels, epoch_1.anchor_labels)  # same seed + epoch: same sample
    collate.set_epoch(0)
    assert torch.equal(collate(samples).anchor_labels, epoch_0.anchor_labels)
    assert RPNCollate(size_divisibility=32)(samples).sampling_epoch is None  # no targets, no epoch
    with pytest.raises(ValueError, match="epoch must be a non-negative int, got -1"):
        collate.set_epoch(-1)


def test_stale_targets_are_not_used_for_another_epoch() -> None:
    collate = RPNCollate(ANCHORS, seed=4)
    batch = collate([item(64, 64, [[5, 5, 40, 60]], 1)])
    assert batch.anchor_targets_for(0) is not None and batch.anchor_targets_for(1) is None
    assert pickle.loads(pickle.dumps(batch)).sampling_epoch == 0


@pytest.mark.parametrize("context", [None, "spawn"])
def test_persistent_workers_follow_set_epoch_made_in_the_main_process(context: str | None) -> None:
    dataset = TransformedDataset(SyntheticShapes(8, seed=2), DetectionTransform())
    collate = RPNCollate(ANCHORS, seed=1)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=1, persistent_workers=True,
                        multiprocessing_context=context)
    epochs = []
    for epoch in range(3):
        set_sampling_epoch([loader, {"val": None}], epoch)  # what RPNModule does at each epoch start
        epochs.append(list(loader))
    reference = RPNCollate(ANCHORS, seed=1)
    for epoch, batches in enumerate(epochs):
        reference.set_epoch(epoch)
        expected = list(DataLoader(dataset, batch_size=4, collate_fn=reference))
        for got, want in zip(batches, expected):
            assert got.sampling_epoch == epoch
            assert torch.equal(got.anchor_labels, want.anchor_labels)
    assert not torch.equal(epochs[0][0].anchor_labels, epochs[1][0].anchor_labels)


@pytest.mark.parametrize("context, workers", [(None, 2), ("spawn", 1)])
def test_workers_give_the_same_batches_as_the_main_process(context: str | None, workers: int) -> None:
    dataset = TransformedDataset(SyntheticShapes(12, seed=2), DetectionTransform())
    collate = RPNCollate(ANCHORS, seed=1)
    main = list(DataLoader(dataset, batch_size=4, collate_fn=collate))
    in_workers = list(DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=workers,
                                 multiprocessing_context=context))
    assert len(in_workers) == 3
    for a, b in zip(main, in_workers):
        assert torch.equal(a.images, b.images) and torch.equal(a.anchor_labels, b.anchor_labels)
        assert torch.equal(a.target_deltas, b.target_deltas) and a.image_ids == b.image_ids


def test_worker_side_modules_do_not_import_lightning() -> None:
    code = (
        "import sys\n"
        "import lightning_rpn.data.collate, lightning_rpn.data.coco, lightning_rpn.data.voc\n"
        "import lightning_rpn.data.synthetic, lightning_rpn.data.transforms\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
