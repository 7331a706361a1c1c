"""Recall callbacks with a tiny fake module: W&B offline run contents, CSV and TensorBoard files."""

from __future__ import annotations

import csv
import json
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch.utils.data import DataLoader

from lightning_rpn.training.callbacks import (
    GT_COLOR,
    ProposalImages,
    RecallCurves,
    RecallTable,
    recall_curves_figure,
    recall_table,
)
from lightning_rpn.data.batch import RPNBatch
from lightning_rpn.evaluation.metrics import ProposalRecall

NUM_IMAGES = 3  # ProposalImages per epoch
BATCHES = 2  # validation batches of 2 images per epoch


# ---------------------------------------------------------------- fake data and module


def make_batch(seed: int) -> RPNBatch:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(60, 80), (64, 70)]
    gt_boxes = []
    for h, w in sizes:
        xy = torch.rand(3, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        wh = torch.rand(3, 2, generator=gen) * 20 + 8
        gt_boxes.append(torch.cat([xy, xy + wh], dim=1))
    images = torch.zeros(2, 3, 64, 80, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randint(0, 120, (3, h, w), generator=gen, dtype=torch.uint8)
    return RPNBatch(
        images=images,
        image_sizes=sizes,
        original_sizes=[(2 * h, 2 * w) for h, w in sizes],
        image_ids=[f"img/{seed}-{i}" for i in range(2)],
        gt_boxes=gt_boxes,
        crowd_boxes=[torch.zeros(0, 4) for _ in sizes],
    )


def loader() -> DataLoader:
    return DataLoader([make_batch(s) for s in range(BATCHES)], batch_size=None)


class FakeRPNModule(LightningModule):
    """Obeys the callbacks' contract: val_recall, {"proposals": ...}, last_recall(_curves)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.val_recall = ProposalRecall(max_proposals=(5, 20), curve_proposals=(1, 10))
        self.last_recall: dict[str, float] = {}
        self.last_recall_curves: dict = {}

    def training_step(self, batch: RPNBatch, batch_idx: int) -> torch.Tensor:
        return (self.weight**2).sum()

    def validation_step(self, batch: RPNBatch, batch_idx: int) -> dict:
        gen = torch.Generator().manual_seed(batch_idx)
        proposals = []
        for gt, (h, w) in zip(batch.gt_boxes, batch.image_sizes, strict=True):
            near = gt.repeat(4, 1) + torch.randn(len(gt) * 4, 4, generator=gen) * 3
            near = torch.cat([near[:, :2], torch.maximum(near[:, 2:], near[:, :2] + 1)], dim=1)
            boxes = near.clamp(min=0).minimum(torch.tensor([w, h, w, h]))
            scores = torch.rand(len(boxes), generator=gen).sort(descending=True).values
            proposals.append((boxes, scores))
        self.val_recall.update([b for b, _ in proposals], batch.gt_boxes)
        return {"proposals": proposals}

    def on_validation_epoch_end(self) -> None:
        values = self.val_recall.compute()
        self.log_dict({f"val/{k}": v for k, v in values.items()})
        self.last_recall = {k: float(v) for k, v in values.items()}
        self.last_recall_curves = self.val_recall.curves()
        self.val_recall.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_trainer(tmp_path: Path, logger, callbacks, max_epochs: int = 2) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=2,
        num_sanity_val_steps=1,  # the callbacks must ignore the sanity check
        log_every_n_steps=1,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


# ---------------------------------------------------------------- W&B offline run reader


def read_wandb_records(run_file: Path) -> list:
    """Records of an offline ``run-*.wandb`` file: a leveldb-style log (32 KiB blocks of
    ``crc u32, length u16, type u8`` chunks, types full/first/middle/last) after a 7-byte
    ``:W&B`` header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # the writer is still in this chunk
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
    return records


def read_finished_wandb_run(run_file: Path, timeout_s: float = 60.0) -> list:
    """Records of the run once its ``exit`` record is on disk: wandb's service may still be
    writing the file for a moment after ``wandb.finish()`` returns, so a chunk can be cut
    short or half written when it is read."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_wandb_records(run_file)
        except DecodeError:  # a chunk read while the service was still writing it
            records = []
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {timeout_s} s"
        time.sleep(0.2)


def wandb_history(records: list) -> list[dict[str, object]]:
    """One dict per history row, keyed by the top-level key (nested keys joined by '.')."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or ".".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- tests


def test_wandb_offline_run_has_metrics_curves_and_images(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning-rpn-test")
    callbacks = [RecallTable(), RecallCurves(), ProposalImages(num_images=NUM_IMAGES, top_k=5)]
    model = FakeRPNModule()
    trainer = make_trainer(tmp_path, logger, callbacks)
    try:
        trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
        trainer.validate(model, dataloaders=loader(), verbose=False)
    finally:
        wandb.finish()

    out = capsys.readouterr().out
    # the validated epoch (the second, 1), not Lightning's next one, though the module names none
    assert "Proposal recall (end of fit, epoch 1, step 4)" in out and "Proposal recall (validate" in out
    assert "AR_small" in out and "R@0.70" in out and f"{model.last_recall['AR@20']:.3f}" in out

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run_file = next(run_dir.glob("run-*.wandb"))
    history = wandb_history(read_finished_wandb_run(run_file))
    # the reader meets files the service is still writing: every cut-short copy must parse
    written, partial = run_file.read_bytes(), tmp_path / "partial.wandb"
    whole = len(read_wandb_records(run_file))
    for cut in range(8, len(written), 997):
        partial.write_bytes(written[:cut])
        assert len(read_wandb_records(partial)) <= whole
    # metrics: logged by the module every validation epoch, the last one equals last_recall
    ar_rows = [row["val/AR@20"] for row in history if "val/AR@20" in row]
    assert len(ar_rows) == 3 and ar_rows[-1] == pytest.approx(model.last_recall["AR@20"])
    # curves: two wandb.plot.line tables per validation run (2 epochs + validate), no sanity check
    for name, columns in (
        ("recall_vs_iou", ["iou", "recall"]),
        ("recall_vs_proposals", ["proposals", "AR"]),
    ):
        rows = [row for row in history if f"val/{name}_table.path" in row]
        assert len(rows) == 3, name
        table = json.loads((run_dir / "files" / rows[-1][f"val/{name}_table.path"]).read_text())
        assert table["columns"] == columns
        xs, ys = model.last_recall_curves[name]
        assert [r[0] for r in table["data"]] == pytest.approx(xs)
        assert [r[1] for r in table["data"]] == pytest.approx(ys)
    # images: NUM_IMAGES per validation run with both box groups, written as media files
    image_rows = [row for row in history if "val/proposals.filenames" in row]
    assert [row["val/proposals.count"] for row in image_rows] == [NUM_IMAGES] * 3
    assert image_rows[0]["val/proposals.captions"] == [
        "image img/0-0",
        "image img/0-1",
        "image img/1-0",
    ]
    assert (image_rows[-1]["val/proposals.height"], image_rows[-1]["val/proposals.width"]) == (
        64,
        80,
    )
    for filename in image_rows[-1]["val/proposals.filenames"]:
        with Image.open(run_dir / "files" / filename) as png:
            assert png.size == (80, 64)  # 60x80 and 64x70 images padded to one gallery size
    boxes = image_rows[-1]["val/proposals.all_boxes"][0]
    assert set(boxes) == {"ground_truth", "proposals"}
    proposal_boxes = json.loads((run_dir / "files" / boxes["proposals"]["path"]).read_text())
    assert len(proposal_boxes["box_data"]) == 5
    first = proposal_boxes["box_data"][0]
    assert first["domain"] == "pixel" and first["class_id"] == 1 and "objectness" in first["scores"]
    assert proposal_boxes["class_labels"] == {"0": "ground truth", "1": "proposal"}
    gt_boxes = json.loads((run_dir / "files" / boxes["ground_truth"]["path"]).read_text())
    assert len(gt_boxes["box_data"]) == 3 and gt_boxes["box_data"][0]["class_id"] == 0
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == 3 * NUM_IMAGES


def test_predict_logs_its_recall_and_curves_to_the_loggers(tmp_path, monkeypatch):
    """A predict of an annotated split: its recall (``predict/AR@100``, ...) and curves reach W&B
    and the CSV logger, as a validation's do (predict's W&B run held the config only); a split
    without any box logs nothing."""
    wandb = pytest.importorskip("wandb")
    from helpers.model import quiet_trainer, tiny_model
    from lightning_rpn.training.datamodule import RPNDataModule

    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true"),
                        ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, value)
    model = tiny_model()

    def predict(root: Path, max_shapes: int) -> None:
        data = RPNDataModule(synthetic_train_images=2, synthetic_val_images=4, synthetic_min_size=64,
                             synthetic_max_size=64, synthetic_max_shapes=max_shapes, batch_size=2, num_workers=0)
        loggers = [WandbLogger(save_dir=str(root), offline=True, project="lightning-rpn-test"), CSVLogger(root)]
        trainer = quiet_trainer(root, logger=loggers, callbacks=[RecallCurves(save_png=False)])
        try:
            trainer.predict(model, datamodule=data, return_predictions=False)
        finally:
            wandb.finish()

    predict(tmp_path / "annotated", max_shapes=3)
    (run_dir,) = (tmp_path / "annotated" / "wandb").glob("offline-run-*")
    history = wandb_history(read_finished_wandb_run(next(run_dir.glob("run-*.wandb"))))
    [row] = [row for row in history if "predict/AR@100" in row]
    assert row["predict/AR@100"] == pytest.approx(model.last_recall["AR@100"]) and row["trainer/global_step"] == 0
    assert any("predict/recall_vs_iou_table.path" in row for row in history)
    with next((tmp_path / "annotated" / "lightning_logs").glob("version_*/metrics.csv")).open() as f:
        [logged] = [r for r in csv.DictReader(f) if r.get("predict/AR@100")]
    assert float(logged["predict/AR@100"]) == pytest.approx(model.last_recall["AR@100"])
    assert list((tmp_path / "annotated" / "lightning_logs").glob("version_*/recall_curves/predict_recall_vs_iou*.csv"))

    predict(tmp_path / "unannotated", max_shapes=0)
    (run_dir,) = (tmp_path / "unannotated" / "wandb").glob("offline-run-*")
    history = wandb_history(read_finished_wandb_run(next(run_dir.glob("run-*.wandb"))))
    assert not any(key.startswith("predict/") for row in history for key in row)


def test_csv_logger_gets_curve_csvs_and_pngs(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    callbacks = [RecallCurves(), ProposalImages(num_images=NUM_IMAGES, top_k=4)]
    model = FakeRPNModule()
    make_trainer(tmp_path, logger, callbacks).fit(model, loader(), loader())

    log_dir = Path(logger.log_dir)
    with (log_dir / "recall_curves" / "val_recall_vs_proposals.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["proposals"]) for r in rows] == [1, 5, 10, 20] * 2  # 2 epochs, no sanity check
    assert [int(r["epoch"]) for r in rows] == [0] * 4 + [1] * 4
    xs, ys = model.last_recall_curves["recall_vs_proposals"]
    assert [float(r["AR"]) for r in rows[4:]] == pytest.approx(ys)
    with (log_dir / "recall_curves" / "val_recall_vs_iou.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2 * 10
    assert len(list((log_dir / "recall_curves").glob("val_epoch*.png"))) == 2

    pngs = sorted((log_dir / "proposal_images").glob("*.png"))
    assert len(pngs) == 2 * NUM_IMAGES
    assert pngs[0].name == "val_epoch000_step2_0_img_0-0.png"
    image = torch.from_numpy(np.array(Image.open(pngs[0]).convert("RGB"))).permute(2, 0, 1)
    assert tuple(image.shape) == (3, 60, 80)  # cropped to the unpadded image size
    green = torch.tensor([int(GT_COLOR[i : i + 2], 16) for i in (1, 3, 5)], dtype=torch.uint8)
    assert (image == green[:, None, None]).all(dim=0).any()  # gt boxes are drawn


def test_tensorboard_logger_gets_figures_and_boxed_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callbacks = [RecallCurves(), ProposalImages(num_images=NUM_IMAGES, top_k=4)]
    make_trainer(tmp_path, logger, callbacks, max_epochs=1).fit(FakeRPNModule(), loader(), loader())
    logger.experiment.flush()

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"val/recall_curves", "val/proposals/0", "val/proposals/2"} <= tags
    assert "val/proposals/3" not in tags
    (image,) = events.Images("val/proposals/0")
    assert (image.height, image.width) == (60, 80) and image.step == 2
    assert events.Images("val/recall_curves")[0].width > 200
    assert not (Path(logger.log_dir) / "proposal_images").exists()


def test_recall_table_layout_and_missing_ranges():
    metric = ProposalRecall(max_proposals=(10, 100))
    metric.update(
        [torch.tensor([[0.0, 0.0, 40.0, 40.0]])], [torch.tensor([[0.0, 0.0, 40.0, 40.0]])]
    )
    recall = {k: float(v) for k, v in metric.compute().items()}
    table = recall_table(recall, (0.5, 0.7), title="t")
    headers = [c.header for c in table.columns]
    assert headers == ["top-k", "AR", "AR_small", "AR_medium", "AR_large", "R@0.50", "R@0.70"]
    assert list(table.columns[0].cells) == ["10", "100"]
    assert list(table.columns[1].cells) == ["1.000", "1.000"]
    assert list(table.columns[2].cells) == ["-", "-"]  # no small box: -1 shows as "-"


def test_recall_table_warns_without_recall_and_prints_every_epoch(tmp_path, capsys):
    class NoRecall(FakeRPNModule):
        def on_validation_epoch_end(self) -> None:
            self.val_recall.reset()

    trainer = make_trainer(tmp_path, False, [RecallTable(every_epoch=True)], max_epochs=1)
    with pytest.warns(UserWarning, match="last_recall is empty"):
        trainer.fit(NoRecall(), loader(), loader())
    trainer = make_trainer(tmp_path, False, [RecallTable(every_epoch=True)], max_epochs=2)
    trainer.fit(FakeRPNModule(), loader(), loader())
    out = capsys.readouterr().out
    assert out.count("Proposal recall (val, epoch") == 2 and out.count("(end of fit") == 1
    # a fit that never validated: no table and no warning (the CLI validates its final weights next)
    trainer = make_trainer(tmp_path, False, [RecallTable()], max_epochs=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RecallTable")
        trainer.fit(FakeRPNModule(), loader())
    assert "Proposal recall" not in capsys.readouterr().out


def test_curves_figure_has_two_panels():
    curves = {
        "recall_vs_iou": ([0.5, 0.75], [0.9, 0.4]),
        "recall_vs_proposals": ([1, 10], [0.1, 0.6]),
    }
    fig = recall_curves_figure(curves)
    assert len(fig.axes) == 2 and fig.axes[1].get_xscale() == "log"


def test_proposal_images_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_images"):
        ProposalImages(num_images=0)


# ---------------------------------------------------------------- file names of standalone evaluations


def _save_checkpoints(tmp_path: Path) -> list[Path]:
    """Two checkpoints of the fake module (a fit, then other weights), ``ckpts/a.ckpt`` and ``ckpts/b.ckpt``."""
    model = FakeRPNModule()
    trainer = make_trainer(tmp_path / "fit", False, [], max_epochs=1)
    trainer.fit(model, loader(), loader())
    paths = [tmp_path / "ckpts" / "a.ckpt", tmp_path / "ckpts" / "b.ckpt"]
    trainer.save_checkpoint(paths[0])
    with torch.no_grad():
        model.weight.fill_(3.0)
    trainer.save_checkpoint(paths[1])
    return paths


def _validate(root: Path, checkpoint: Path) -> None:
    """A ``validate`` of ``checkpoint`` as a new command does it: a new trainer and callbacks, no logger."""
    callbacks = [RecallCurves(), ProposalImages(num_images=NUM_IMAGES, top_k=4)]
    trainer = make_trainer(root, False, callbacks)
    trainer.validate(FakeRPNModule(), loader(), ckpt_path=str(checkpoint), verbose=False)


def test_validations_of_two_checkpoints_keep_each_others_files(tmp_path, capsys):
    a, b = _save_checkpoints(tmp_path)
    root = tmp_path / "run"
    capsys.readouterr()
    _validate(root, a)
    first = {p.name: p.read_bytes() for p in root.rglob("*.png")}
    err = capsys.readouterr().err
    # each command names its folders once, on stderr
    assert err.count(f"RecallCurves: recall curves written to {root / 'recall_curves'} (val-a.png") == 1
    assert err.count(f"ProposalImages: {NUM_IMAGES} images with gt and proposals written to "
                     f"{root / 'proposal_images'} (val-a_*.png)") == 1
    _validate(root, b)
    _validate(root, a)  # the same checkpoint again: a repeat number (.2, not -v1: a checkpoint a-v1's), the first files stay
    assert "(val-a.2.png" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "recall_curves").glob("*.png")) == ["val-a.2.png", "val-a.png", "val-b.png"]
    images = sorted(p.name for p in (root / "proposal_images").glob("*.png"))
    assert len(images) == 3 * NUM_IMAGES and images[:2] == ["val-a.2_0_img_0-0.png", "val-a.2_1_img_0-1.png"]
    assert "val-b_2_img_1-0.png" in images
    assert {p.name: p.read_bytes() for p in root.rglob("*.png") if p.name in first} == first
    # the CSV rows say which checkpoint they describe
    with (root / "recall_curves" / "val_recall_vs_proposals.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == [str(a.resolve())] * 4 + [str(b.resolve())] * 4 + [str(a.resolve())] * 4


def test_fit_files_keep_their_names_and_a_second_fit_keeps_the_first_ones(tmp_path, capsys):
    callbacks = [RecallCurves(), ProposalImages(num_images=NUM_IMAGES, top_k=4)]
    make_trainer(tmp_path, False, callbacks).fit(FakeRPNModule(), loader(), loader())
    curves = tmp_path / "recall_curves"
    assert sorted(p.name for p in curves.glob("*.png")) == ["val_epoch000_step2.png", "val_epoch001_step4.png"]
    assert capsys.readouterr().err.count("RecallCurves: recall curves written to") == 1  # once, not per epoch
    first = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    # a new run in the same folder (logger false: no version folder of its own)
    callbacks = [RecallCurves(), ProposalImages(num_images=NUM_IMAGES, top_k=4)]
    make_trainer(tmp_path, False, callbacks, max_epochs=1).fit(FakeRPNModule(), loader(), loader())
    assert (curves / "val_epoch000_step2.2.png").is_file()
    assert (tmp_path / "proposal_images" / "val_epoch000_step2.2_0_img_0-0.png").is_file()
    assert {p: p.read_bytes() for p in first} == first
    with (curves / "val_recall_vs_iou.csv").open() as f:
        first_rows = list(csv.DictReader(f))
    assert len(first_rows) == 20 and {r["checkpoint"] for r in first_rows} == {""}  # a fit's weights, no file
    with (curves / "val_recall_vs_iou-v1.csv").open() as f:  # the second fit's rows, apart from the first's
        assert [(r["epoch"], r["step"]) for r in csv.DictReader(f)] == [("0", "2")] * 10


def test_validating_a_fits_own_weights_after_it_writes_to_its_csv_files(tmp_path):
    """The CLI validates a fit's final weights (``trainer.validate(model)``) when its budget ends between
    validations: those rows belong to the fit's own ``-v1`` files, not to the earlier run's."""
    curves = tmp_path / "recall_curves"
    make_trainer(tmp_path, False, [RecallCurves()], max_epochs=1).fit(FakeRPNModule(), loader(), loader())
    trainer, model = make_trainer(tmp_path, False, [RecallCurves()], max_epochs=1), FakeRPNModule()
    trainer.fit(model, loader(), loader())
    trainer.validate(model, loader(), verbose=False)
    with (curves / "val_recall_vs_proposals.csv").open() as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2"] * 4  # the first run's alone
    with (curves / "val_recall_vs_proposals-v1.csv").open() as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2"] * 8  # the fit's validation, then the one after it


def test_a_resumed_fit_goes_on_in_its_own_csv_files(tmp_path):
    curves = tmp_path / "recall_curves"
    make_trainer(tmp_path, False, [RecallCurves()], max_epochs=1).fit(FakeRPNModule(), loader(), loader())
    trainer = make_trainer(tmp_path, False, [RecallCurves()], max_epochs=1)  # a second run: -v1 files
    trainer.fit(FakeRPNModule(), loader(), loader())
    trainer.save_checkpoint(tmp_path / "second.ckpt")
    make_trainer(tmp_path, False, [RecallCurves()], max_epochs=1).fit(FakeRPNModule(), loader(), loader())  # -v2
    resumed = make_trainer(tmp_path, False, [RecallCurves()], max_epochs=2)
    resumed.fit(FakeRPNModule(), loader(), loader(), ckpt_path=str(tmp_path / "second.ckpt"))
    with (curves / "val_recall_vs_proposals-v1.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0"] * 4 + ["1"] * 4  # the second run, resumed
    for name in ("val_recall_vs_proposals.csv", "val_recall_vs_proposals-v2.csv"):
        with (curves / name).open() as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["0"] * 4
    assert not (curves / "val_recall_vs_proposals-v3.csv").exists()


def test_rows_are_never_appended_to_a_csv_of_other_columns(tmp_path):
    curves = tmp_path / "recall_curves"
    curves.mkdir()
    older = "epoch,step,iou,recall\n0,2,0.5,0.9\n"  # an older version's layout
    (curves / "val_recall_vs_iou.csv").write_text(older)
    make_trainer(tmp_path, False, [RecallCurves()], max_epochs=1).fit(FakeRPNModule(), loader(), loader())
    assert (curves / "val_recall_vs_iou.csv").read_text() == older
    with (curves / "val_recall_vs_iou-v1.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 10
    with (curves / "val_recall_vs_proposals.csv").open() as f:
        assert next(csv.reader(f)) == ["epoch", "step", "checkpoint", "proposals", "AR"]
