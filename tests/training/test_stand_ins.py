"""An image that cannot be used (unreadable, or of another size than annotated under ``skip``) is
replaced by the next usable one so that training batches stay full; evaluation leaves that
stand-in out, so the split's recall and predictions count every usable image once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.builders import save_image, write_coco
from helpers.model import quiet_trainer, tiny_model

from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.proposal_writer import ProposalWriter

GOOD = [{"id": i, "file_name": f"ok{i}.png", "height": 64, "width": 80} for i in range(1, 5)]
BOXES = [{"id": 10 + i, "image_id": i, "bbox": [8 * i, 6, 24, 30], "category_id": 1, "iscrowd": 0} for i in range(1, 5)]


def _split(root: Path, bad: list[dict]) -> Path:
    """``root/val/*.png`` and ``root/annotations/instances_val.json``: ``bad`` entries first, then GOOD."""
    images_root, annotations = write_coco(root, bad + GOOD, BOXES + [
        {"id": 100 + entry["id"], "image_id": entry["id"], "bbox": [2, 2, 20, 20], "category_id": 1, "iscrowd": 0}
        for entry in bad])
    (root / "annotations").mkdir()
    annotations.rename(root / "annotations" / "instances_val.json")
    images_root.rename(root / "val")
    return root


def _evaluate(root: Path, tmp_path: Path) -> tuple[list[int], list[int]]:
    """Validate and predict ``root``'s val split under ``skip``: the number of images the recall
    counted in each, and the image ids predict wrote."""
    data = RPNDataModule(dataset="coco", root=str(root), train_split=None, val_split="val", val_batch_size=2,
                         batch_size=2, num_workers=0, on_bad_annotation="skip")
    model = tiny_model()
    counted: list[int] = []
    update = model.val_recall.update

    def counting(proposals, gt_boxes, *args, **kwargs):
        counted.append(len(gt_boxes))
        return update(proposals, gt_boxes, *args, **kwargs)

    model.val_recall.update = counting
    quiet_trainer(tmp_path).validate(model, datamodule=data, verbose=False)
    validated = sum(counted)
    writer = ProposalWriter(str(tmp_path / f"proposals-{root.name}"), formats=("coco_json",))
    quiet_trainer(tmp_path, callbacks=[writer]).predict(model, datamodule=data, return_predictions=False)
    written = json.loads(writer.written["coco_json"].read_text())
    return [validated, sum(counted) - validated], sorted({r["image_id"] for r in written})


@pytest.mark.parametrize("bad", ["unreadable", "size_mismatch"])
def test_evaluation_counts_no_image_twice(tmp_path: Path, bad: str) -> None:
    clean = _split(tmp_path / "clean", [])
    entries = [{"id": i, "file_name": f"bad{i}.png", "height": 64, "width": 80} for i in (5, 6, 7)]
    broken = _split(tmp_path / "broken", entries)
    for entry in entries:
        path = broken / "val" / entry["file_name"]
        if bad == "unreadable":
            path.write_bytes(b"")
        else:  # annotated 64 x 80, the file 80 x 64
            save_image(path, 80, 64)
    assert _evaluate(clean, tmp_path) == _evaluate(broken, tmp_path) == ([4, 4], [1, 2, 3, 4])


def test_the_data_report_counts_the_images_each_stage_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The report counted every image loaded: 7 validated images where the recall counted 4."""
    entries = [{"id": i, "file_name": f"bad{i}.png", "height": 64, "width": 80} for i in (5, 6, 7)]
    broken = _split(tmp_path / "broken", entries)
    for entry in entries:
        (broken / "val" / entry["file_name"]).write_bytes(b"")
    data = RPNDataModule(dataset="coco", root=str(broken), train_split="val", val_split="val", val_batch_size=2,
                         batch_size=2, num_workers=0, on_bad_annotation="skip")
    with caplog.at_level("INFO"):
        quiet_trainer(tmp_path).validate(tiny_model(), datamodule=data, verbose=False)
        quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(tiny_model(), datamodule=data)
    validated, trained = [line for line in caplog.text.splitlines() if line.startswith(("validate:", "train:"))]
    assert validated.startswith("validate: 4 images (3 stand-ins for unusable images not counted, as in the "
                                "recall), 4 boxes kept,")
    # an epoch: the 7 entries, each unreadable one replaced by a readable image (its boxes too)
    assert trained.startswith("train: 7 images (3 of them stand-ins for unusable images, trained on), 7 boxes kept,")
