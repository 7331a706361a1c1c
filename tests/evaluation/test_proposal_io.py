"""Proposal files: COCO JSON and detectron2 pickle round trips, part merging, Trainer.predict."""

from __future__ import annotations

import json
import pickle

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.training.datamodule import RPNDataModule
from lightning_rpn.training.module import RPNModule
from lightning_rpn.evaluation.proposal_files import (
    merge_proposal_parts,
    read_coco_proposals,
    read_detectron2_proposals,
    write_coco_proposals,
    write_detectron2_proposals,
)
from lightning_rpn.training.proposal_writer import ProposalWriter


def make_records() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    records = []
    for image_id, count in ((7, 5), ("img_b", 3), (np.int64(9), 1)):
        xy = torch.rand(count, 2, generator=g) * 200
        boxes = torch.cat([xy, xy + 1 + torch.rand(count, 2, generator=g) * 50], dim=1)
        scores = torch.rand(count, generator=g).sort(descending=True).values
        records.append({"image_id": image_id, "boxes": boxes, "scores": scores})
    records[0]["scores"][0] = 1.0  # extreme probabilities survive the logit round trip
    records[0]["scores"][-1] = 0.0
    return records


def test_coco_round_trip(tmp_path) -> None:
    records = make_records()
    path = write_coco_proposals(tmp_path / "p.json", records)
    entries = json.loads(path.read_text())
    assert len(entries) == 9
    assert entries[0]["category_id"] == 1
    x1, y1, x2, y2 = records[0]["boxes"][0].tolist()
    assert entries[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.006)
    back = read_coco_proposals(path)
    assert [r["image_id"] for r in back] == [7, "img_b", 9]
    for original, loaded in zip(records, back):
        assert loaded["boxes"].dtype == torch.float32
        torch.testing.assert_close(loaded["boxes"], original["boxes"], atol=0.011, rtol=0)
        torch.testing.assert_close(loaded["scores"], original["scores"], atol=0, rtol=0)
    assert not list(tmp_path.glob(".*tmp*"))


def test_coco_scores_are_float32_shortest(tmp_path) -> None:
    """Scores take the digits that hold a float32, not a float64's 17, and read back exactly."""
    scores = torch.tensor([0.1, 1 / 3, 0.987654321, 1e-7, 1.0, 0.0], dtype=torch.float32)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(len(scores), 1)
    path = write_coco_proposals(tmp_path / "s.json", [{"image_id": 1, "boxes": boxes, "scores": scores}])
    written = [line.split('"score": ')[1].rstrip("},]\n") for line in path.read_text().splitlines()]
    assert written[:2] == ["0.1", "0.33333334"]
    assert all(len(text.replace("0.", "").replace("e-", "")) <= 10 for text in written)
    assert torch.equal(read_coco_proposals(path)[0]["scores"], scores.sort(descending=True).values)


def test_detectron2_round_trip_and_format(tmp_path) -> None:
    records = make_records()
    path = write_detectron2_proposals(tmp_path / "p.pkl", records)
    with path.open("rb") as handle:
        raw = pickle.load(handle)
    assert set(raw) == {"ids", "boxes", "objectness_logits", "bbox_mode"} and raw["bbox_mode"] == 0
    assert raw["ids"] == [7, "img_b", 9] and type(raw["ids"][2]) is int
    assert raw["boxes"][0].dtype == np.float32 and raw["boxes"][0].shape == (5, 4)
    assert raw["objectness_logits"][0].dtype == np.float32
    assert np.isfinite(raw["objectness_logits"][0]).all()
    assert raw["objectness_logits"][1][0] == pytest.approx(float(torch.logit(records[1]["scores"][0].double())), abs=1e-5)
    back = read_detectron2_proposals(path)
    for original, loaded in zip(records, back):
        assert loaded["image_id"] == original["image_id"]
        assert torch.equal(loaded["boxes"], original["boxes"])
        torch.testing.assert_close(loaded["scores"], original["scores"], atol=1e-6, rtol=1e-5)


def test_empty_image_and_errors(tmp_path) -> None:
    empty = [{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}]
    assert read_detectron2_proposals(write_detectron2_proposals(tmp_path / "e.pkl", empty))[0]["boxes"].shape == (0, 4)
    assert read_coco_proposals(write_coco_proposals(tmp_path / "e.json", empty)) == []
    with pytest.raises(ValueError, match="3 boxes but 2 scores"):
        write_coco_proposals(tmp_path / "x.json", [{"image_id": 1, "boxes": torch.zeros(3, 4), "scores": torch.zeros(2)}])
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="lacks"):
        write_detectron2_proposals(tmp_path / "y.pkl", [{"image_id": 1, "boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="formats"):
        ProposalWriter(tmp_path, formats=("csv",))


def test_merge_parts_dedups_sampler_padding_and_restores_dataset_order(tmp_path) -> None:
    # Two ranks of a DistributedSampler over 5 images: rank 0 gets 0, 2, 4; rank 1 gets 1, 3, 0 (padding).
    def part(path, items):
        with path.open("wb") as handle:
            for index in items:
                boxes, ones = np.full((1, 4), index, np.float32), np.ones(1, np.float32)
                pickle.dump((index, f"im{index}", boxes, ones, ones * index), handle)
        return path

    parts = [part(tmp_path / "r0.pkl", [0, 2, 4]), part(tmp_path / "r1.pkl", [1, 3, 0])]
    merged = merge_proposal_parts(parts)
    assert [r["image_id"] for r in merged] == ["im0", "im1", "im2", "im3", "im4"]
    assert [float(r["boxes"][0, 0]) for r in merged] == [0, 1, 2, 3, 4]
    assert [float(r["objectness_logits"][0]) for r in merged] == [0, 1, 2, 3, 4]


def test_detectron2_file_keeps_the_models_logits(tmp_path) -> None:
    """Logits 17, 20, 30 are all probability 1.0 in float32; the file keeps them apart."""
    logits = torch.tensor([30.0, 20.0, 17.0, -3.0])
    record = {"image_id": 1, "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4), "scores": logits.sigmoid(),
              "objectness_logits": logits}
    assert record["scores"][:3].tolist() == [1.0, 1.0, 1.0]
    path = write_detectron2_proposals(tmp_path / "p.pkl", [record])
    with path.open("rb") as handle:
        assert pickle.load(handle)["objectness_logits"][0].tolist() == logits.tolist()
    assert read_detectron2_proposals(path)[0]["objectness_logits"].tolist() == logits.tolist()
    with pytest.raises(ValueError, match="4 scores but 3 objectness_logits"):
        write_detectron2_proposals(tmp_path / "q.pkl", [{**record, "objectness_logits": logits[:3]}])


def test_trainer_predict_writes_both_formats_in_original_coordinates(tmp_path) -> None:
    model = RPNModule(backbone="tiny_fpn", anchor_sizes=((16,), (32,), (64,), (128,)), pre_nms_top_n_test=200,
                      post_nms_top_n_test=50)
    data = RPNDataModule(synthetic_val_images=5, synthetic_min_size=48, synthetic_max_size=80,
                         synthetic_max_shapes=3, batch_size=2, num_workers=0, resize="fixed", fixed_size=[64, 64])
    writer = ProposalWriter(str(tmp_path / "out"), top_k=20)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[writer],
                         default_root_dir=tmp_path)
    trainer.predict(model, datamodule=data, return_predictions=False)
    # no checkpoint: named as its metrics summary would be (file names: tests/training/test_proposal_writer.py)
    assert writer.written == {"coco_json": tmp_path / "out/proposals_coco-no_checkpoint.json",
                              "detectron2_pkl": tmp_path / "out/proposals_detectron2-no_checkpoint.pkl"}
    assert not (tmp_path / "out" / ".parts").exists()
    d2 = read_detectron2_proposals(writer.written["detectron2_pkl"])
    coco = read_coco_proposals(writer.written["coco_json"])
    raw = SyntheticShapes(5, 48, 80, 3, seed=0, split="val")
    assert [r["image_id"] for r in d2] == [raw[i].image_id for i in range(5)]
    assert [r["image_id"] for r in coco] == [r["image_id"] for r in d2 if len(r["boxes"])]
    # expected: the model's proposals on the 64x64 inputs, scaled back by hand and clipped
    model.eval()
    expected, expected_logits = [], []
    with torch.no_grad():
        for batch in data.predict_dataloader():
            proposals, _ = model(batch, with_targets=False, proposal_logits=True)
            expected.extend(boxes[:20] for boxes, _, _ in proposals)
            expected_logits.extend(logits[:20] for _, _, logits in proposals)
    for i, record in enumerate(d2):
        height, width = raw[i].image_size
        scale = torch.tensor([width / 64, height / 64, width / 64, height / 64])
        by_hand = (expected[i] * scale).clamp(min=0)
        by_hand[:, 0::2] = by_hand[:, 0::2].clamp(max=width)
        by_hand[:, 1::2] = by_hand[:, 1::2].clamp(max=height)
        assert 0 < len(record["boxes"]) <= 20
        torch.testing.assert_close(record["boxes"], by_hand)
        assert torch.equal(record["objectness_logits"], expected_logits[i])  # the model's, not logit(score)
        assert torch.all(record["scores"][:-1] >= record["scores"][1:])
    by_id = {r["image_id"]: r for r in coco}
    for record in d2:
        torch.testing.assert_close(by_id[record["image_id"]]["boxes"], record["boxes"], atol=0.011, rtol=0)


def test_only_stale_temporary_proposal_files_are_removed(tmp_path) -> None:
    """.proposals_*-<stem>.<suffix>.tmp<pid> of a process that is gone: removed; anything else stays."""
    import os
    import subprocess
    import sys

    from lightning_rpn.evaluation.proposal_files import remove_stale_temporaries

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    stale = [tmp_path / f".proposals_coco-last.json.tmp{dead}", tmp_path / f".proposals_detectron2-best-v2.pkl.tmp{dead}"]
    kept = [tmp_path / f".proposals_coco-last.json.tmp{os.getpid()}", tmp_path / f".proposals_coco.json.tmp{dead}",
            tmp_path / f".proposals_coco-last.json.tmp{dead}x", tmp_path / f".mine.json.tmp{dead}",
            tmp_path / "proposals_coco-last.json"]
    for path in stale + kept:
        path.write_text("[")
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert all(path.exists() for path in kept)
    assert remove_stale_temporaries(tmp_path / "missing") == []


@pytest.mark.parametrize("bad", [
    {"bbox": [1, None, 3, 4]},  # JSON null: read as NaN before
    {"bbox": [1, 2, 3]},  # with another 5-number bbox, every later box shifted by one number
    {"bbox": [1, 2, 3, float("nan")]},
    {"bbox": [1, 2, 3, 10**400]},
    {"score": None},
    {"bbox": "1 2 3 4"},
])
def test_a_results_entry_without_4_finite_numbers_and_a_score_is_named(tmp_path, bad: dict) -> None:
    entries = [{"image_id": 7, "bbox": [0, 0, 5, 5], "score": 0.9},
               {"image_id": 7, "bbox": [1, 2, 3, 4], "score": 0.5, **bad}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"entry 1 of .*results.json' \(image 7\) needs a bbox of 4 finite numbers"):
        read_coco_proposals(path)


@pytest.mark.parametrize("writer", [write_coco_proposals, write_detectron2_proposals])
def test_non_finite_proposals_are_refused_not_written(tmp_path, writer) -> None:
    # read_coco_proposals refuses NaN / Infinity: the writers no longer write a file it cannot read
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, float("nan"), 3.0, 4.0]])
    with pytest.raises(ValueError, match="image 3 has non-finite boxes or scores"):
        writer(tmp_path / "p", [{"image_id": 3, "boxes": boxes, "scores": torch.tensor([0.9, 0.5])}])
    assert not list(tmp_path.iterdir())
