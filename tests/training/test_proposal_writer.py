"""ProposalWriter's file names: after the checkpoint, as the metrics summary, and never over an earlier predict's.

The writer's hooks run with a stand-in trainer (rank, world size, checkpoint path, a strategy
whose barrier and broadcast are no-ops or gloo collectives); what it writes is checked with the
readers of :mod:`lightning_rpn.evaluation.proposal_files`.
"""

from __future__ import annotations

import io
import os
import subprocess
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_rpn.evaluation.proposal_files import read_coco_proposals, read_detectron2_proposals
from lightning_rpn.training.proposal_writer import ProposalWriter, proposal_paths
from lightning_rpn.training.run_files import checkpoint_stem, write_metrics_summary


class _OneProcess:
    """The strategy of a single-process run: nothing to wait for, nothing to share."""

    root_device = torch.device("cpu")

    def barrier(self, name: str | None = None) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        return tensor


class _Gloo:
    """The collectives a DDP strategy runs, on the process group of the test's workers."""

    root_device = torch.device("cpu")

    def barrier(self, name: str | None = None) -> None:
        dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor


def _trainer(ckpt_path: str | None, root: Path, rank: int = 0, world_size: int = 1, strategy: Any = None,
             callbacks: tuple = ()) -> SimpleNamespace:
    """A predicting trainer whose ``default_root_dir`` is ``root`` (its ``metrics/``); ``callbacks`` for the summary."""
    return SimpleNamespace(ckpt_path=ckpt_path, default_root_dir=str(root), global_rank=rank, world_size=world_size,
                           is_global_zero=rank == 0, strategy=strategy or _OneProcess(), callbacks=list(callbacks),
                           callback_metrics={}, state=SimpleNamespace(fn="predict"))


def _image(image_id: int, score: float) -> dict[str, Any]:
    return {"image_id": image_id, "boxes": torch.tensor([[1.0, 2.0, 11.0, 12.0]]), "scores": torch.tensor([score])}


def _predict(writer: ProposalWriter, trainer: SimpleNamespace, images: list[dict[str, Any]],
             model: Any = None) -> dict[str, Path]:
    """One ``predict`` of ``images`` through the writer's hooks; the paths it reports."""
    writer.on_predict_start(trainer, model)
    writer.write_on_batch_end(trainer, model, images, None, None, 0, 0)
    writer.on_predict_epoch_end(trainer, model)
    return writer.written


def test_images_without_a_proposal_are_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = {"image_id": 7, "boxes": torch.zeros((0, 4)), "scores": torch.zeros(0)}
    model = SimpleNamespace(hparams={"score_thresh": 0.9, "min_size": 1e-3})
    written = _predict(ProposalWriter(str(tmp_path / "some"), formats=("coco_json",)), _trainer(None, tmp_path),
                       [_image(1, 0.95), empty], model)
    err = capsys.readouterr().err
    assert ("ProposalWriter: 1 of 2 of the predicted images got no proposal (model.score_thresh 0.9, model.min_size "
            "0.001 drop proposals); their entries in the files are empty") in err
    assert [r["image_id"] for r in json.loads(written["coco_json"].read_text())] == [1]
    _predict(ProposalWriter(str(tmp_path / "none"), formats=("coco_json",)), _trainer(None, tmp_path), [empty, empty])
    assert "ProposalWriter: every one of the predicted images got no proposal; their" in capsys.readouterr().err
    _predict(ProposalWriter(str(tmp_path / "all"), formats=("coco_json",)), _trainer(None, tmp_path), [_image(1, 0.5)])
    assert "got no proposal" not in capsys.readouterr().err


def test_files_are_named_after_the_checkpoint_like_the_metrics_summary(tmp_path: Path) -> None:
    writer = ProposalWriter(str(tmp_path / "proposals"))
    written = _predict(writer, _trainer(str(tmp_path / "checkpoints/last-v1.ckpt"), tmp_path), [_image(7, 0.9)])
    assert written == {"coco_json": tmp_path / "proposals/proposals_coco-last-v1.json",
                       "detectron2_pkl": tmp_path / "proposals/proposals_detectron2-last-v1.pkl"}
    assert sorted(p.name for p in (tmp_path / "proposals").iterdir()) == [
        "proposals_coco-last-v1.json", "proposals_detectron2-last-v1.pkl"]
    assert [r["image_id"] for r in read_detectron2_proposals(written["detectron2_pkl"])] == [7]
    assert _predict(ProposalWriter(str(tmp_path / "none"), formats=("coco_json",)), _trainer(None, tmp_path),
                    [_image(7, 0.9)]) == {"coco_json": tmp_path / "none/proposals_coco-no_checkpoint.json"}
    # the metrics summary of the same predict carries the same name
    trainer = SimpleNamespace(is_global_zero=True, ckpt_path=str(tmp_path / "checkpoints/last-v1.ckpt"),
                              default_root_dir=str(tmp_path), callback_metrics={})
    model = SimpleNamespace(last_recall={"AR@100": 0.5})
    summary = write_metrics_summary(trainer, model, SimpleNamespace(), "predict")
    assert summary == tmp_path / "metrics/predict-last-v1.json"
    assert checkpoint_stem(trainer.ckpt_path) == "last-v1" and checkpoint_stem(None) == "no_checkpoint"


def test_a_second_predict_never_replaces_the_first_ones_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "proposals"
    writer = ProposalWriter(str(out))
    first = _predict(writer, _trainer("ckpts/last.ckpt", tmp_path), [_image(1, 0.9)])
    first_bytes = {name: path.read_bytes() for name, path in first.items()}
    # another checkpoint: its own files, no notice
    other = _predict(writer, _trainer("ckpts/last-v1.ckpt", tmp_path), [_image(2, 0.8)])
    assert other["coco_json"].name == "proposals_coco-last-v1.json"
    assert capsys.readouterr().err == ""
    # the same checkpoint again (other images): a repeat number, not Lightning's -v1 (which would
    # read as checkpoint last-v1's), and one notice naming only that checkpoint's files
    again = _predict(writer, _trainer("ckpts/last.ckpt", tmp_path), [_image(3, 0.7)])
    assert again == proposal_paths(out, "last", 1)
    assert again["detectron2_pkl"].name == "proposals_detectron2-last.2.pkl"
    (notice,) = capsys.readouterr().err.splitlines()
    assert str(out) in notice and "they stay" in notice and "last-v1" not in notice
    for name in ("proposals_coco-last.json", "proposals_detectron2-last.pkl", "proposals_coco-last.2.json",
                 "proposals_detectron2-last.2.pkl"):
        assert name in notice
    assert {name: path.read_bytes() for name, path in first.items()} == first_bytes
    assert [r["image_id"] for r in read_coco_proposals(again["coco_json"])] == [3]
    assert [r["image_id"] for r in read_coco_proposals(other["coco_json"])] == [2]
    # the files of one predict share one version, even when it writes one format
    (out / "proposals_detectron2-last.3.pkl").write_bytes(b"a user's file")
    third = _predict(ProposalWriter(str(out), formats=("coco_json",)), _trainer("ckpts/last.ckpt", tmp_path), [_image(4, 0.6)])
    assert third == {"coco_json": out / "proposals_coco-last.4.json"}
    assert (out / "proposals_detectron2-last.3.pkl").read_bytes() == b"a user's file"
    assert "proposals_detectron2-last.3.pkl" in capsys.readouterr().err
    assert {name: path.read_bytes() for name, path in first.items()} == first_bytes

WORLD_SIZE = 2


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    """One rank of a two-process predict: half the images each, the writer's names checked on both."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        writer = ProposalWriter(out)
        trainer = _trainer("ckpts/best.ckpt", Path(out).parent, rank, WORLD_SIZE, _Gloo())
        runs = [{name: str(path) for name, path in _predict(writer, trainer, [_image(2 * i + rank, 0.5)]).items()}
                for i in range(2)]  # the same checkpoint twice: the second gets .2
        Path(out, f"rank{rank}.json").write_text(json.dumps({"runs": runs, "stderr": sys.stderr.getvalue()}))
    finally:
        sys.stderr = stderr
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_ranks_agree_on_one_set_of_files_rank_zero_names(tmp_path: Path) -> None:
    out = tmp_path / "proposals"
    out.mkdir()
    # fork (as test_metrics_ddp does): the children reuse the parent's imports
    mp.start_processes(_ddp_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD_SIZE, start_method="fork")
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    expected = [{name: str(path) for name, path in proposal_paths(out, "best", version).items()} for version in (0, 1)]
    assert ranks[0]["runs"] == ranks[1]["runs"] == expected
    assert "proposals_coco-best.2.json" in ranks[0]["stderr"] and ranks[1]["stderr"] == ""
    assert sorted(p.name for p in out.glob("proposals_*")) == sorted(
        Path(path).name for run in expected for path in run.values())
    assert not (out / ".parts").exists()
    for run, images in zip(expected, ([0, 1], [2, 3])):
        assert [r["image_id"] for r in read_detectron2_proposals(run["detectron2_pkl"])] == images


def test_a_second_metrics_summary_of_a_checkpoint_keeps_the_first(tmp_path: Path, capsys) -> None:
    trainer = SimpleNamespace(is_global_zero=True, ckpt_path="ckpts/last.ckpt", default_root_dir=str(tmp_path),
                              callback_metrics={})
    first = write_metrics_summary(trainer, SimpleNamespace(last_recall={"AR@100": 0.5}), SimpleNamespace(), "validate")
    again = write_metrics_summary(trainer, SimpleNamespace(last_recall={"AR@100": 0.6}), SimpleNamespace(), "validate")
    assert (first.name, again.name) == ("validate-last.json", "validate-last.2.json")
    assert json.loads(first.read_text())["metrics"] == {"AR@100": 0.5}  # another evaluation's record, kept
    assert f"{tmp_path / 'metrics/validate-last.json'} stay" in capsys.readouterr().err


def test_a_metrics_summary_says_what_limited_the_evaluation(tmp_path: Path) -> None:
    # validate --trainer.limit_val_batches 0.25 wrote a summary that read as one of the whole split
    def summary(**limits: Any) -> dict:
        trainer = SimpleNamespace(is_global_zero=True, ckpt_path=None, default_root_dir=str(tmp_path),
                                  callback_metrics={}, **limits)
        path = write_metrics_summary(trainer, SimpleNamespace(last_recall={"AR@100": 0.5}), SimpleNamespace(), "validate")
        return json.loads(path.read_text())["dataset"]

    assert summary(limit_val_batches=1.0, fast_dev_run=False)["limited_by"] is None
    assert summary(limit_val_batches=0.25, fast_dev_run=False)["limited_by"] == "limit_val_batches=0.25"
    assert summary(limit_val_batches=1, fast_dev_run=True)["limited_by"] == "fast_dev_run"
    assert summary(limit_val_batches=1, fast_dev_run=False)["limited_by"] == "limit_val_batches=1"  # one batch
    assert summary(limit_val_batches=2, fast_dev_run=False, val_dataloaders=[0, 1, 2])["limited_by"] == (
        "limit_val_batches=2")
    assert summary(limit_val_batches=5, fast_dev_run=False, val_dataloaders=[0, 1, 2])["limited_by"] is None  # all 3


# ---------------------------------------------------------------- COCO category of the results


def _coco_split(tmp_path: Path, categories: list[int], filter_ids: list[int] | None = None) -> Any:
    """A predict loader over a one-image COCO split whose box ``[10, 20, 30, 40]`` (xywh) has category 7."""
    from helpers.builders import write_coco
    from torch.utils.data import DataLoader

    from lightning_rpn.data.coco import COCODetection
    from lightning_rpn.data.transforms import TransformedDataset

    images_root, annotations = write_coco(
        tmp_path / "coco", [{"id": 5, "file_name": "a.png", "height": 80, "width": 60}],
        [{"id": 1, "image_id": 5, "bbox": [10, 20, 30, 40], "category_id": 7, "area": 1200, "iscrowd": 0}],
        categories=[{"id": i, "name": f"c{i}"} for i in categories],
    )
    dataset = COCODetection(images_root, annotations, category_ids=filter_ids)
    return DataLoader(TransformedDataset(dataset, None)), annotations


def _box_of_the_gt() -> dict[str, Any]:
    return {"image_id": 5, "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "scores": torch.tensor([0.9])}


@pytest.mark.parametrize(("categories", "filter_ids", "expected"), [([7], None, 7), ([9, 7], None, 7), ([3, 7], [7], 7)])
def test_coco_results_carry_a_category_of_the_predicted_dataset(tmp_path, categories, filter_ids, expected) -> None:
    loader, annotations = _coco_split(tmp_path, categories, filter_ids)
    Path(annotations).write_text("{}")  # read once, when the dataset was built: not again at the end of predict
    trainer = _trainer("ckpts/last.ckpt", tmp_path)
    trainer.predict_dataloaders = loader
    written = _predict(ProposalWriter(str(tmp_path / "out"), formats=("coco_json",)), trainer, [_box_of_the_gt()])
    assert {entry["category_id"] for entry in json.loads(written["coco_json"].read_text())} == {expected}


def test_coco_results_category_without_dataset_categories_or_given(tmp_path) -> None:
    loader, _ = _coco_split(tmp_path, [7])
    trainer = _trainer("ckpts/last.ckpt", tmp_path)
    trainer.predict_dataloaders = [loader]
    written = _predict(ProposalWriter(str(tmp_path / "given"), category_id=3), trainer, [_box_of_the_gt()])
    assert json.loads(written["coco_json"].read_text())[0]["category_id"] == 3  # an explicit id is kept
    folder = _trainer("ckpts/last.ckpt", tmp_path)  # a folder of images: no categories
    folder.predict_dataloaders = SimpleNamespace(dataset=SimpleNamespace(root="images"))
    written = _predict(ProposalWriter(str(tmp_path / "folder")), folder, [_box_of_the_gt()])
    assert json.loads(written["coco_json"].read_text())[0]["category_id"] == 1


def test_pycocotools_class_agnostic_recall_of_the_written_results(tmp_path) -> None:
    pytest.importorskip("pycocotools")
    import contextlib

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    loader, annotations = _coco_split(tmp_path, [7])
    trainer = _trainer("ckpts/last.ckpt", tmp_path)
    trainer.predict_dataloaders = loader
    written = _predict(ProposalWriter(str(tmp_path / "out")), trainer, [_box_of_the_gt()])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluation = COCOeval(gt, gt.loadRes(str(written["coco_json"])), "bbox")
        evaluation.params.useCats = 0
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[8] == pytest.approx(1.0)  # AR@100: the proposal is the gt box (0 with category 1)


# ---------------------------------------------------------------- predict's summary and its proposal files


def test_the_predict_summary_names_its_files_and_top_k_and_shares_their_version(tmp_path) -> None:
    out = tmp_path / "proposals"
    # an earlier predict of the checkpoint on images without gt: proposal files, no summary
    _predict(ProposalWriter(str(out)), _trainer("ckpts/last.ckpt", tmp_path), [_image(1, 0.9)])
    writer = ProposalWriter(str(out), top_k=5)
    trainer = _trainer("ckpts/last.ckpt", tmp_path, callbacks=[writer])
    written = _predict(writer, trainer, [_image(2, 0.8)])
    recall = {"AR@1": 0.25, "AR@10": 0.5, "AR@100": 0.75}
    summary = write_metrics_summary(trainer, SimpleNamespace(last_recall=recall), SimpleNamespace(), "predict")
    assert written["coco_json"].name == "proposals_coco-last.2.json"
    assert summary == tmp_path / "metrics/predict-last.2.json"  # the files' repeat, not the free first name
    proposals = json.loads(summary.read_text())["proposals"]
    assert "every proposal predict_step returned" in proposals["recall_of"]
    (files,) = proposals["files"]
    assert files["top_k"] == 5
    assert files["paths"] == {name: str(path.resolve()) for name, path in written.items()}
    assert "k = 10, 100 (> 5)" in files["note"]
    # an earlier predict without a writer left a summary: this predict's files skip its version
    (tmp_path / "metrics/predict-best.json").write_text("{}")
    writer = ProposalWriter(str(out), top_k=None)
    trainer = _trainer("ckpts/best.ckpt", tmp_path, callbacks=[writer])
    written = _predict(writer, trainer, [_image(3, 0.7)])
    summary = write_metrics_summary(trainer, SimpleNamespace(last_recall=recall), SimpleNamespace(), "predict")
    assert (written["coco_json"].name, summary.name) == ("proposals_coco-best.2.json", "predict-best.2.json")
    assert "note" not in json.loads(summary.read_text())["proposals"]["files"][0]  # top_k None: every proposal


def test_a_failed_predict_removes_its_parts(tmp_path: Path) -> None:
    """Ctrl+C or an error in predict: Lightning's on_exception closes and removes this rank's parts file."""
    writer, trainer = ProposalWriter(output_dir=str(tmp_path / "proposals")), _trainer("run/last.ckpt", tmp_path)
    writer.on_predict_start(trainer, None)
    writer.write_on_batch_end(trainer, None, [_image(1, 0.9)], None, None, 0, 0)
    writer.on_exception(trainer, None, KeyboardInterrupt())
    assert not (tmp_path / "proposals").exists()  # the folder this predict made, left empty
    assert _predict(writer, trainer, [_image(2, 0.8)])  # the next predict writes as usual


def test_a_failed_predict_keeps_a_folder_it_did_not_make(tmp_path: Path) -> None:
    folder = tmp_path / "proposals"
    folder.mkdir()
    writer, trainer = ProposalWriter(output_dir=str(folder)), _trainer("run/last.ckpt", tmp_path)
    writer.on_predict_start(trainer, None)
    writer.on_exception(trainer, None, RuntimeError("failed"))
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_predict_removes_the_unfinished_files_of_a_killed_one_only(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "proposals"
    folder.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    stale = folder / f".proposals_coco-last-v1.json.tmp{dead}"
    kept = [folder / f".proposals_coco-best.json.tmp{os.getpid()}",  # a write in progress
            folder / f".notes.json.tmp{dead}", folder / f"proposals_coco-last.json.tmp{dead}"]  # a user's
    for path in (stale, *kept):
        path.write_text("[")
    _predict(ProposalWriter(output_dir=str(folder)), _trainer("run/last.ckpt", tmp_path), [_image(1, 0.9)])
    assert not stale.exists() and all(path.exists() for path in kept)
    assert f"removed {stale.name} from {folder}" in capsys.readouterr().err
