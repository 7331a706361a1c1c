"""RPNDataModule: datasets per stage, anchors from the model, predict loader, box accounting."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers.builders import basic_coco, save_image, write_voc

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.targets import AnchorTargetConfig
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.data.problems import DataError
from lightning_rpn.data.validation import validate_dataset
from lightning_rpn.training.datamodule import RPNDataModule

from helpers.datamodule import ANCHORS, TinyModule



def small(**kwargs: object) -> RPNDataModule:
    args = dict(synthetic_train_images=16, synthetic_val_images=8, batch_size=4, num_workers=0)
    return RPNDataModule(**{**args, **kwargs})  # type: ignore[arg-type]


def fake_model(**overrides: object) -> SimpleNamespace:
    attrs = dict(anchor_generator=ANCHORS, target_config=AnchorTargetConfig(batch_size_per_image=32),
                 box_coder=BoxCoder(), size_divisibility=64, rpn=SimpleNamespace(seed=9))
    return SimpleNamespace(**{**attrs, **overrides})


def attach(dm: RPNDataModule, model: SimpleNamespace) -> None:
    dm.trainer = SimpleNamespace(lightning_module=model)  # type: ignore[assignment]


def test_synthetic_fit_loaders_with_constructor_anchors() -> None:
    dm = small(anchor_generator=ANCHORS)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, RPNBatch) and len(batch) == 4
    assert batch.images.shape[-1] % 32 == 0 and batch.images.shape[-2] % 32 == 0
    n = sum(a.shape[0] for a in ANCHORS(ANCHORS.feature_shapes_for(tuple(batch.images.shape[-2:]))))
    assert batch.anchor_labels.shape == (4, n)
    assert len(list(dm.val_dataloader())) == 2
    assert dm.train_dataloader().persistent_workers is False
    assert small(num_workers=2).hparams.num_workers == 2


def test_a_split_left_unset_names_the_setting_that_sets_it() -> None:
    dm = small(anchor_generator=ANCHORS, val_split=None)
    with pytest.raises(DataError, match=r"val_split is None.*--data.val_split NAME"):
        dm.val_dataloader()
    with pytest.raises(DataError, match=r"--data.predict_images FOLDER"):
        dm.predict_dataloader()


def test_anchor_setup_comes_from_the_model() -> None:
    dm = small()
    attach(dm, fake_model())
    dm.setup("fit")
    collate = dm.collate
    assert collate.anchor_generator is ANCHORS and collate.size_divisibility == 64 and collate.seed == 9
    assert collate.target_config.batch_size_per_image == 32
    batch = next(iter(dm.val_dataloader()))
    assert batch.images.shape[-1] % 64 == 0 and ((batch.anchor_labels != -1).sum(1) <= 32).all()


def test_a_users_module_gives_its_rpns_target_rule_to_the_workers() -> None:
    # a LightningModule of one's own exposing only its anchors: the workers assigned with the default
    # 0.7 / 0.3 rule while its RPN (named anything) used 0.5 / 0.4, and the RPN trained on the workers'
    from torch import nn

    from lightning_rpn.core.rpn import RPN

    rule = AnchorTargetConfig(fg_iou=0.5, bg_iou=0.4, batch_size_per_image=32)

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor_generator, self.size_divisibility = ANCHORS, 64
            self.proposals = RPN(ANCHORS, in_channels=8, target_config=rule, seed=9)

    dm = small()
    attach(dm, Detector())
    dm.setup("fit")
    assert dm.collate.target_config is rule and dm.collate.seed == 9
    assert dm.collate.box_coder is dm.trainer.lightning_module.proposals.box_coder


def test_disagreeing_anchor_settings_name_both_values() -> None:
    other = AnchorGenerator(((16,), (32,), (48,)), (0.5, 1.0, 2.0), (8, 16, 32))
    dm = small(anchor_generator=other)
    attach(dm, fake_model())
    with pytest.raises(ValueError, match=r"48\.0.*disagrees.*64\.0"):
        dm.setup("fit")
    dm = small(target_config=AnchorTargetConfig(fg_iou=0.6))
    attach(dm, fake_model())
    with pytest.raises(ValueError, match="target_config.*0.6.*disagrees"):
        dm.setup("fit")
    dm = small(size_divisibility=96)
    attach(dm, fake_model())
    with pytest.raises(ValueError, match="size_divisibility=96.*64"):
        dm.setup("fit")


def test_predict_loader_from_a_folder_carries_original_sizes(tmp_path: Path) -> None:
    for i, (h, w) in enumerate([(40, 60), (50, 30)]):
        save_image(tmp_path / f"{i}.png", h, w)
    dm = small(predict_images=str(tmp_path), resize="shortest_edge", min_sizes=[80], max_size=200,
               anchor_generator=ANCHORS)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch.image_ids == ["0.png", "1.png"] and batch.anchor_labels is None
    assert batch.original_sizes == [(40, 60), (50, 30)] and batch.image_sizes == [(80, 120), (133, 80)]


def test_coco_and_voc_datamodules(tmp_path: Path) -> None:
    basic_coco(tmp_path / "coco")
    dm = RPNDataModule("coco", root=str(tmp_path / "coco"), train_split="x", val_split="x", coco_images="images",
                       coco_annotations="annotations.json", batch_size=3, num_workers=0, anchor_generator=ANCHORS)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch.image_ids == [1, 2, 3] and [len(b) for b in batch.crowd_boxes] == [1, 0, 0]
    write_voc(tmp_path / "voc", {"a": {"size": (40, 50), "objects": [{"box": (1, 1, 10, 20)}]}}, split="val")
    dm = RPNDataModule("voc", root=str(tmp_path / "voc"), train_split=None, val_split="val", num_workers=0)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader())).gt_boxes[0].tolist() == [[0.0, 0.0, 10.0, 20.0]]
    with pytest.raises(ValueError, match="needs root"):
        RPNDataModule("coco")
    report = validate_dataset(dm)
    assert [s.name for s in report.splits] == ["val (val)"] and report.splits[0].boxes == 1


def test_removed_boxes_are_counted_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    crop = [{"RandomCrop": {"height": 64, "width": 64, "p": 1.0}}]
    dm = small(train_transforms=crop, min_visibility=0.9)
    dm.setup("fit")
    total_removed = 0
    for batch in dm.train_dataloader():
        dm.on_before_batch_transfer(batch, 0)
        total_removed += batch.removed_boxes
    assert total_removed > 0
    with caplog.at_level(logging.INFO):
        text = dm.report()
    assert f"{total_removed} removed by transforms" in text
    assert dm.last_report["run/removed_boxes"] == total_removed
    assert dm.report() == ""  # counts were reset



def test_fits_with_a_real_trainer_and_counts_removed_boxes(tmp_path: Path) -> None:
    dm = small(train_transforms=[{"RandomCrop": {"height": 64, "width": 64, "p": 1.0}}], min_visibility=0.9)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(TinyModule(), datamodule=dm)
    assert dm.collate.anchor_generator is ANCHORS
    assert "train/removed_boxes" in dm.last_report and dm.last_report["train/removed_boxes"] > 0


def test_the_data_report_prints_once_per_fit_covering_every_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = small(train_transforms=[{"RandomCrop": {"height": 64, "width": 64, "p": 1.0}}], min_visibility=0.9)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0)
    with caplog.at_level(logging.INFO):
        trainer.fit(TinyModule(), datamodule=dm)
    reports = [r.getMessage() for r in caplog.records if "data report" in r.getMessage()]
    assert len(reports) == 1, reports  # not once per epoch, with a train and a validate line each
    assert reports[0].startswith("RPNDataModule data report (epochs 0-2):")
    assert "train: 24 images" in reports[0] and "validate: 12 images" in reports[0]
    assert dm.last_report["train/removed_boxes"] > 0


def _two_image_batch(problems: list) -> object:
    """What the data report reads of an ``RPNBatch`` of two images without boxes."""
    fields = {"gt_boxes": [torch.zeros(0, 4)] * 2, "removed_boxes": 0, "problems": problems, "stand_ins": [],
              "evaluated": [0, 1], "__len__": lambda self: 2}
    return type("Batch", (), fields)()


def test_under_ddp_the_report_says_whose_share_and_every_rank_warns() -> None:
    from lightning_rpn.data.problems import Problem
    from lightning_rpn.training.data_report import RunDataReport

    report = RunDataReport()
    report.process = (1, 2)  # rank 1 of 2: only its own images pass through its data module
    problems = [Problem("unreadable_image", "skipped", "gone")]
    batch = _two_image_batch(problems)
    with pytest.warns(UserWarning, match=r"^\[rank 1\] RPNDataModule: train: load problems"):
        report.add_batch("train", 0, batch)  # rank_zero_warn would have dropped it on rank 1
    assert "(epoch 0, process 1 of 2: the images it loaded)" in report.report()


def test_outside_fit_the_report_names_no_epoch() -> None:
    # predict of an epoch-7 checkpoint said "(epoch 0)": Lightning's counter, which dates nothing there
    from lightning_rpn.training.data_report import RunDataReport

    report = RunDataReport()
    batch = _two_image_batch([])
    report.add_batch("predict", 0, batch)
    assert report.report().startswith("RPNDataModule data report:\n")
    report.process = (0, 2)
    report.add_batch("validate", 0, batch)
    assert report.report().startswith("RPNDataModule data report (process 0 of 2: the images it loaded):\n")


@pytest.mark.parametrize("processes, images, limit, unrepeated", [
    (2, 7, 1.0, True),  # Lightning's sampler repeated one image to even the shares out
    (1, 7, 1.0, False),
    (8, 7, 1.0, False),  # a process without an image: Lightning's padding
    (2, 7, 0.5, False),  # shares of 4 and 3 batches of 1: a fraction could round one to none
    (2, 7, 3, True),  # a number of batches: every share runs some
])
def test_evaluation_under_ddp_draws_each_image_once(processes: int, images: int, limit: float, unrepeated: bool) -> None:
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    dm = small(anchor_generator=ANCHORS)
    dataset = list(range(images))
    trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": processes, "rank": 1},
                              _accelerator_connector=SimpleNamespace(use_distributed_sampler=True),
                              limit_val_batches=limit)
    dm.trainer = trainer  # type: ignore[assignment]
    sampler = dm._unrepeated_sampler(dataset, "val")
    assert isinstance(sampler, UnrepeatedDistributedSampler) == unrepeated
    if unrepeated:
        assert list(sampler) == list(range(1, images, processes))
    trainer._accelerator_connector.use_distributed_sampler = False
    assert dm._unrepeated_sampler(dataset, "val") is None
