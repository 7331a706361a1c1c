"""Load problems met again every epoch (no image size in the annotation, size mismatches under
``clip``) are kept once each: memory bounded by the distinct problems, counts and report true."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers.builders import write_coco
from helpers.datamodule import ANCHORS, TinyModule

from lightning_rpn.training.datamodule import RPNDataModule

IMAGES, BOXES_PER_IMAGE = 4, 2


def coco_with_edge_boxes(root: Path, declared: str) -> None:
    """Four 48x64 images, two boxes each 1 px past the right edge; the JSON declares each image's
    size (``"true"``), none (``"none"``, as files converted from YOLO) or a wider one (``"wrong"``)."""
    images = [{"id": i + 1, "file_name": f"{i}.png", "height": 48, "width": 64} for i in range(IMAGES)]
    anns = [{"id": 10 * (i + 1) + j, "image_id": i + 1, "bbox": [40, 4 + 10 * j, 25, 8], "category_id": 1}
            for i in range(IMAGES) for j in range(BOXES_PER_IMAGE)]
    _, ann = write_coco(root, images, anns)
    data = json.loads(ann.read_text())
    for image in data["images"]:
        if declared == "none":
            del image["height"], image["width"]
        elif declared == "wrong":
            image["width"] = 80  # the boxes fit the declared size: found only when the file is loaded
    ann.write_text(json.dumps(data))


def datamodule(root: Path, num_workers: int) -> RPNDataModule:
    return RPNDataModule("coco", root=str(root), train_split="x", val_split=None, coco_images="images",
                         coco_annotations="annotations.json", on_bad_annotation="clip", batch_size=2,
                         num_workers=num_workers, anchor_generator=ANCHORS, train_transforms=[])


# distinct problems met while loading: the edge boxes, plus one size mismatch per image
LOAD_PROBLEMS = {"none": IMAGES * BOXES_PER_IMAGE, "wrong": IMAGES * (BOXES_PER_IMAGE + 1), "true": 0}


@pytest.mark.parametrize("declared", ["none", "wrong", "true"])
def test_problems_met_every_epoch_are_kept_and_reported_once(tmp_path: Path, declared: str) -> None:
    coco_with_edge_boxes(tmp_path, declared)
    dm = datamodule(tmp_path, num_workers=0)
    dm.setup("fit")
    epochs, distinct = 6, LOAD_PROBLEMS[declared]
    for _ in range(epochs):
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)
        assert len(dm.accounting.problems["run"]) == distinct  # not one entry per load
    text = dm.report()
    line = text.splitlines()[1]
    images, boxes = epochs * IMAGES, epochs * IMAGES * BOXES_PER_IMAGE
    prefix = f"run: {images} images, {boxes} boxes kept, 0 removed by transforms (0.0%), "
    if declared == "true":  # checked once at setup, as before: nothing met while loading
        assert line == prefix + "0 boxes/images clipped or skipped while loading"
    else:
        assert line == (prefix + f"{distinct} boxes/images clipped or skipped while loading (met "
                        f"{epochs * distinct} times in all: each load of an image meets its problems again)")
        assert f"  {IMAGES * BOXES_PER_IMAGE} x slightly_outside (clipped)" in text
        assert ("  4 x size_mismatch (clipped)" in text) == (declared == "wrong")
        listed = [row for row in text.splitlines() if "extends outside the 64x48 image" in row]
        assert listed and all(row.endswith("-> clipped") for row in listed)  # each once: no "(x6)"
        assert len(set(listed)) == len(listed)
    assert dm.last_report["run/distinct_load_problems"] == distinct
    assert dm.last_report["run/load_problems"] == epochs * distinct  # every load that met one


def test_problems_from_persistent_workers_are_kept_once_over_a_fit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coco_with_edge_boxes(tmp_path, "none")
    dm = datamodule(tmp_path, num_workers=1)
    kept: list[int] = []

    class Count(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            kept.append(len(dm.accounting.problems["train"]))

    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                         callbacks=[Count()])
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="load problems"):
        trainer.fit(TinyModule(), datamodule=dm)
    distinct = IMAGES * BOXES_PER_IMAGE
    assert kept == [distinct] * 3
    report = next(r.getMessage() for r in caplog.records if "data report" in r.getMessage())
    assert (f"{distinct} boxes/images clipped or skipped while loading (met {3 * distinct} times in all"
            in report)
    assert dm.last_report["train/distinct_load_problems"] == distinct
