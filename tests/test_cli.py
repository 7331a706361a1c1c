"""End to end: the real ``lightning-rpn`` console script on tiny synthetic data.

The session's shared ``fit`` (``tiny_fit``: W&B offline, as the configs' default logger) feeds the
other tests: ``load_from_checkpoint``, ``validate``, ``test`` and ``predict`` (started side by
side, as they only read the checkpoint) and resuming with ``--ckpt_path last`` (on a copy).
``check-data`` and ``analyze-anchors`` need no checkpoint and run beside the fit.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, wait
from pathlib import Path

import cv2
import pytest
import torch
import yaml

from lightning_rpn.cli import CONFIG_KEY
from lightning_rpn.core.boxes import clip_boxes_to_image
from lightning_rpn.data.synthetic import SyntheticShapes
from lightning_rpn.data.transforms import ResizePolicy
from lightning_rpn.evaluation.metrics import ProposalRecall
from lightning_rpn.evaluation.proposal_files import read_detectron2_proposals
from lightning_rpn.training.module import RPNModule
from lightning_rpn.training.wandb_resume import WANDB_RUN_KEY

from helpers.builders import save_image
from helpers.cli import TINY_CONFIG, FitRun, assert_ok, run_cli, start_cli

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

EVALUATE = ["--config", "config.yaml", "--ckpt_path", "run/checkpoints/last.ckpt", "--trainer.logger", "false"]


@pytest.fixture(scope="module")
def fit(tiny_fit: Future[FitRun], tool_runs: dict) -> FitRun:
    """The session's shared fit (the tool runs, which need no checkpoint, start beside it)."""
    return tiny_fit.result()


@pytest.fixture(scope="module")
def trained(fit: FitRun) -> Path:
    """The shared fit's working directory: config.yaml and run/ (checkpoints, W&B offline run)."""
    return fit.workdir


@pytest.fixture(scope="module")
def evaluated(trained: Path, tmp_path_factory: pytest.TempPathFactory):
    """``validate``, ``test``, ``predict`` of the shared checkpoint, and ``predict`` on a folder of
    two unannotated images (in a folder of its own, so its proposal files stay apart)."""
    folder = tmp_path_factory.mktemp("unannotated")
    for i in range(2):
        save_image(folder / "images" / f"{i}.png", 70, 90, seed=i)
    shutil.copy2(trained / "config.yaml", folder / "config.yaml")
    checkpoint = str(trained / "run/checkpoints/last.ckpt")
    runs: dict[str, Future] = {
        "validate": start_cli(["validate", *EVALUATE], trained),
        "test": start_cli(["test", *EVALUATE], trained),
        "predict": start_cli(["predict", *EVALUATE], trained),
        "predict_folder": start_cli(
            ["predict", "--config", "config.yaml", "--ckpt_path", checkpoint, "--trainer.logger", "false",
             "--data.predict_images", str(folder / "images"), "--trainer.default_root_dir", str(folder / "out")],
            folder),
    }
    yield {name: (run, folder if name == "predict_folder" else trained) for name, run in runs.items()}
    wait(runs.values())  # none left writing into the shared run's folder


def test_fit_leaves_checkpoint_config_and_recall_table(fit: FitRun) -> None:
    trained = fit.workdir
    last = trained / "run/checkpoints/last.ckpt"
    assert last.is_file()
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    resolved = yaml.safe_load(checkpoint[CONFIG_KEY])
    assert resolved["model"]["backbone"] == "tiny_fpn"
    assert resolved["data"]["synthetic_train_images"] == 8
    assert checkpoint["hyper_parameters"]["anchor_sizes"] == [[16.0], [32.0], [64.0], [128.0]]
    assert (trained / "run/config.yaml").is_file()
    assert list((trained / "run/wandb").glob("offline-run-*")), "W&B offline run directory missing"
    assert "Proposal recall (end of fit" in fit.output


def test_load_from_checkpoint_needs_no_config(trained: Path) -> None:
    model = RPNModule.load_from_checkpoint(trained / "run/checkpoints/last.ckpt", map_location="cpu")
    assert model.hparams.backbone == "tiny_fpn"
    assert model.anchor_generator.strides == (4, 8, 16, 32)
    assert tuple(model.hparams.recall_max_proposals) == (10, 100)
    assert model.val_recall.max_proposals == (10, 100)


def _every_recall_key(ks: tuple[int, ...] = (10, 100)) -> set[str]:
    areas = ("", "_small", "_medium", "_large")
    ious = [f"{0.5 + 0.05 * i:.2f}" for i in range(10)]
    return {f"AR{a}@{k}" for a in areas for k in ks} | {f"recall@{t}@{k}" for t in ious for k in ks}


@pytest.mark.parametrize(("command", "split"), [("validate", "val"), ("test", "test")])
def test_validate_and_test_print_the_recall_table_and_write_a_json_summary(
    evaluated, command: str, split: str
) -> None:
    run, workdir = evaluated[command]
    result = run.result()
    assert_ok(result)
    assert f"Proposal recall ({command}" in result.stdout
    assert f"{split}/AR@100" in result.stdout
    path = workdir / "run/metrics" / f"{command}-last.json"
    assert f"lightning-rpn {command}: metrics written to {Path('run/metrics') / path.name}" in result.stderr
    summary = json.loads(path.read_text())
    assert summary["command"] == command
    assert summary["checkpoint"] == str((workdir / "run/checkpoints/last.ckpt").resolve())
    assert summary["dataset"] == {"name": "synthetic", "root": None, "split": split, "images": None,
                                  "limited_by": None}  # the whole split (validate: limit_val_batches 1, its one batch)
    assert set(summary["metrics"]) == _every_recall_key()
    assert 0 <= summary["metrics"]["AR@100"] <= 1
    assert set(summary["losses"]) == {"loss", "loss_rpn_cls", "loss_rpn_reg"}


def test_predict_writes_proposals_in_original_coordinates(evaluated) -> None:
    run, trained = evaluated["predict"]
    assert_ok(run.result())
    records = read_detectron2_proposals(trained / "run/proposals/proposals_detectron2-last.pkl")
    dataset = SyntheticShapes(4, min_size=64, max_size=96, max_shapes=3, seed=0, split="val")
    assert [r["image_id"] for r in records] == [0, 1, 2, 3]
    model = RPNModule.load_from_checkpoint(trained / "run/checkpoints/last.ckpt", map_location="cpu")
    expected = model.predict_images(
        [dataset[i].image for i in range(4)], resize=ResizePolicy("fixed", fixed_size=(64, 64))
    )
    for record, item, sample in zip(records, expected, (dataset[i] for i in range(4))):
        height, width = sample.image_size
        boxes = torch.as_tensor(record["boxes"])
        assert 0 < len(boxes) <= 100 and len(record["scores"]) == len(boxes)
        assert boxes[:, [0, 2]].max() <= width and boxes[:, [1, 3]].max() <= height
        # the same proposals as the in-process evaluation pipeline, mapped back by the same scale
        torch.testing.assert_close(boxes, item["boxes"][:100], atol=1e-3, rtol=0)
    # by hand: run the 64x64 image as it is, then scale x by w / 64 and y by h / 64 and clip
    sample = dataset[1]
    height, width = sample.image_size
    small = cv2.resize(sample.image, (64, 64), interpolation=cv2.INTER_LINEAR)
    (at_64,) = model.predict_images([small])
    scale = torch.tensor([width / 64, height / 64, width / 64, height / 64])
    by_hand = clip_boxes_to_image(at_64["boxes"][:100] * scale, (height, width))
    torch.testing.assert_close(torch.as_tensor(records[1]["boxes"]), by_hand, atol=1e-3, rtol=0)


def test_predict_reports_recall_on_an_annotated_split(evaluated) -> None:
    run, trained = evaluated["predict"]
    result = run.result()
    assert_ok(result)
    assert "Proposal recall (predict, original-image pixels" in result.stdout
    summary = json.loads((trained / "run/metrics/predict-last.json").read_text())
    assert summary["dataset"]["split"] == "val" and summary["coordinates"] == "original images"
    # the same recall as the written proposals against the original annotations
    records = read_detectron2_proposals(trained / "run/proposals/proposals_detectron2-last.pkl")
    dataset = SyntheticShapes(4, min_size=64, max_size=96, max_shapes=3, seed=0, split="val")
    recall = ProposalRecall(max_proposals=(10, 100))
    recall.update([torch.as_tensor(r["boxes"]) for r in records],
                  [torch.as_tensor(dataset[r["image_id"]].boxes).reshape(-1, 4) for r in records])
    expected = {key: float(value) for key, value in recall.compute().items()}
    assert summary["metrics"] == pytest.approx(expected, abs=1e-4)


def test_predict_on_a_folder_without_annotations_reports_no_recall(evaluated) -> None:
    run, folder = evaluated["predict_folder"]
    result = run.result()
    assert_ok(result)
    assert "Proposal recall" not in result.stdout and "metrics written" not in result.stderr
    assert not (folder / "out/metrics").exists()
    records = read_detectron2_proposals(folder / "run/proposals/proposals_detectron2-last.pkl")
    assert len(records) == 2 and all(len(r["boxes"]) > 0 for r in records)


def test_fit_resumes_from_last_checkpoint(trained: Path, tmp_path: Path) -> None:
    shutil.copy2(trained / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(trained / "run/checkpoints", tmp_path / "run/checkpoints")
    result = run_cli(
        ["fit", "--config", "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "3",
         "--trainer.logger", "false"],
        tmp_path,
    )
    assert_ok(result)
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3  # the new budget, reached from the restored step 2
    output = " ".join((result.stdout + result.stderr).split())
    assert f"Restoring states from the checkpoint path at {tmp_path / 'run/checkpoints/last.ckpt'}" in output
    # the saved config names the file `last` found, not the keyword (a later run would load a newer one)
    last = str(tmp_path / "run/checkpoints/last.ckpt")
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["ckpt_path"] == last
    assert yaml.safe_load(checkpoint[CONFIG_KEY])["ckpt_path"] == last
    assert_ok(run_cli(["validate", "--config", "config.yaml", "--ckpt_path", "last", "--trainer.logger", "false"],
                      tmp_path))
    assert yaml.safe_load((tmp_path / "run/config-validate.yaml").read_text())["ckpt_path"] == last
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["trainer"]["max_steps"] == 3  # still fit's


def test_a_resumed_fit_goes_on_logging_to_the_checkpoints_wandb_run(trained: Path, tmp_path: Path) -> None:
    # a resumed run opened a new W&B run: one job's curves split over two runs
    shutil.copy2(trained / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(trained / "run/checkpoints", tmp_path / "run/checkpoints")
    first = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)[WANDB_RUN_KEY]
    (first_run,) = (trained / "run/wandb").glob("offline-run-*")
    assert first_run.name.endswith(f"-{first}")
    shutil.copytree(first_run, tmp_path / "run/wandb" / first_run.name)
    result = run_cli(["fit", "--config", "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "3"], tmp_path)
    assert_ok(result)
    assert f"the checkpoint was logged to W&B run {first}: this run goes on logging there" in result.stderr
    (resumed_run,) = set((tmp_path / "run/wandb").glob("offline-run-*")) - {tmp_path / "run/wandb" / first_run.name}
    assert resumed_run.name.endswith(f"-{first}")  # `wandb sync` of both folders appends, in start order
    # the upload command names both folders (it named the resumed one alone: the first fit's history was left out)
    assert (f"upload with: wandb sync run/wandb/offline-run-*-{first} (its 2 folders, one per fit, "
            "in order)") in result.stderr
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint[WANDB_RUN_KEY] == first


def test_a_checkpoint_file_keeps_the_run_config_and_refuses_another_network(trained: Path, tmp_path: Path) -> None:
    # Lightning parses a --ckpt_path file's hyperparameters over the command line; `last` it does not
    shutil.copy2(trained / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(trained / "run/checkpoints", tmp_path / "run/checkpoints")
    checkpoint = str(tmp_path / "run/checkpoints/last.ckpt")
    result = run_cli(["fit", "--config", "config.yaml", "--ckpt_path", checkpoint, "--trainer.max_steps", "3",
                      "--model.lr", "0.0123", "--trainer.logger", "false"], tmp_path)
    assert_ok(result)
    assert "-> [0.0123, 0.0123]" in result.stdout + result.stderr  # the resumed schedule's new base lr
    result = run_cli(["validate", "--config", "config.yaml", "--ckpt_path", checkpoint, "--trainer.logger", "false",
                      "--model.anchor_sizes", "[[64], [128], [256], [512]]"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a setting: one line
    output = " ".join((result.stdout + result.stderr).split())
    assert (f"the checkpoint {checkpoint} was trained as another network than this run builds (anchor_sizes: "
            "checkpoint [[16.0], [32.0], [64.0], [128.0]], this run [[64.0], [128.0], [256.0], [512.0]])") in output


def test_fit_resuming_a_checkpoint_file_reads_no_pretrained_weights(trained: Path, tmp_path: Path) -> None:
    # the checkpoint holds every weight: resuming on a machine without the weights file (or internet) works
    shutil.copy2(trained / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(trained / "run/checkpoints", tmp_path / "run/checkpoints")
    result = run_cli(["fit", "--config", "config.yaml", "--ckpt_path", str(tmp_path / "run/checkpoints/last.ckpt"),
                      "--trainer.max_steps", "3", "--trainer.logger", "false", "--model.weights",
                      str(tmp_path / "gone.pth"), "--model.trainable_layers", "5"], tmp_path)
    assert_ok(result)
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3


def test_predict_with_a_checkpoint_alone_builds_the_checkpoints_model(trained: Path, tmp_path: Path) -> None:
    # no --config: the model is the checkpoint's (tiny_fpn), not RPNModule's defaults (resnet50_fpn)
    save_image(tmp_path / "images/0.png", 70, 90)
    checkpoint = str(trained / "run/checkpoints/last.ckpt")
    result = run_cli(["predict", "--ckpt_path", checkpoint, "--data.predict_images", str(tmp_path / "images"),
                      "--trainer.logger", "false", "--trainer.accelerator", "cpu"], tmp_path)
    assert_ok(result)
    assert f"Restoring states from the checkpoint path at {checkpoint}" in " ".join(result.stderr.split())
    # no config, so no ProposalWriter of its own: one is added rather than proposals computed and dropped
    assert "no ProposalWriter among the callbacks" in result.stderr
    (record,) = read_detectron2_proposals(tmp_path / "proposals/proposals_detectron2-last.pkl")
    assert len(record["boxes"]) > 0
    # the images are resized as the checkpoint's training data was (a fixed 64 x 64), as predict_images does
    assert "images are resized as the checkpoint's training data was (resize 'fixed'" in " ".join(result.stderr.split())
    (expected,) = RPNModule.load_from_checkpoint(checkpoint, map_location="cpu").predict_images(
        [str(tmp_path / "images/0.png")])
    top = min(50, len(record["boxes"]))
    assert torch.allclose(torch.as_tensor(record["boxes"][:top]), expected["boxes"][:top], atol=0.02)
    # a resize on the command line wins, `none` included
    unresized = run_cli(["predict", "--ckpt_path", checkpoint, "--data.predict_images", str(tmp_path / "images"),
                         "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--data.resize", "none",
                         "--trainer.default_root_dir", str(tmp_path / "unresized")], tmp_path)
    assert_ok(unresized)
    assert "images are resized as the checkpoint's training data was" not in unresized.stderr


def test_validate_last_without_a_checkpoint_refuses_to_report_untrained_weights(trained: Path, tmp_path: Path) -> None:
    # Lightning warns "no last checkpoint available" and validates the weights it just initialised
    shutil.copy2(trained / "config.yaml", tmp_path / "config.yaml")
    result = run_cli(["validate", "--config", "config.yaml", "--ckpt_path", "last", "--trainer.logger", "false"],
                     tmp_path)
    assert result.returncode != 0 and "Proposal recall" not in result.stdout
    assert f"validate --ckpt_path last: no last*.ckpt in {tmp_path / 'run/checkpoints'}; train first" in result.stderr


def test_fit_with_a_wandb_logger_without_save_dir_saves_its_config_in_the_root(tmp_path: Path) -> None:
    # WandbLogger(save_dir=None) has no log_dir; Lightning's SaveConfigCallback asserted on it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    result = run_cli(["fit", "--config", "config.yaml", "--trainer.logger.init_args.save_dir", "null",
                      "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"], tmp_path)
    assert_ok(result)
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())  # the trainer's default_root_dir
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] is None and saved["trainer"]["max_steps"] == 1


def test_fit_prints_no_warning_the_user_cannot_act_on(tmp_path: Path) -> None:
    # wandb: "git root run does not exist" (the logger's save_dir made only later), "The anonymous setting
    # has no effect"; Lightning's use of torch's deprecated LeafSpec; Lightning's "HINT: Set
    # ModelCheckpoint(..., save_last=True)" for a first `--ckpt_path last`; RecallTable's "no table" for a
    # fit without validation; jsonargparse's "skip_none parameter was deprecated"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    result = run_cli(["fit", "--config", "config.yaml", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                      "--ckpt_path", "last"], tmp_path, env={"WANDB_SILENT": "false"})
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "wandb" in output and "git root" not in output and "LeafSpec" not in output
    assert "anonymous setting" not in output  # Lightning passes anonymous=None, which wandb warns about
    assert "save_last" not in output and "last_recall is empty" not in output
    assert "deprecated" not in output  # jsonargparse >= 4.49 on saving the config with skip_none
    assert f"--ckpt_path last: no last*.ckpt in {tmp_path / 'run/checkpoints'} yet" in " ".join(result.stderr.split())


def _bad_coco(root: Path) -> dict:
    """One image whose second box has a NaN width; the config that checks it."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.new("RGB", (40, 30)).save(root / "images/a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 7, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 1, "iscrowd": 0, "area": 100},
            {"id": 8, "image_id": 1, "bbox": [5, 5, float("nan"), 10], "category_id": 1, "iscrowd": 0,
             "area": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "annotations/instances_images.json").write_text(json.dumps(coco))
    return {**TINY_CONFIG, "data": {"dataset": "coco", "root": str(root), "train_split": "images",
                                    "val_split": None, "coco_images": "{split}", "num_workers": 0}}


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``check-data`` of the tiny config and of a bad COCO set, ``analyze-anchors --optimize``: each
    in a folder of its own, started at once, {name: (the run, its folder)}."""
    commands = {
        "check_data": (TINY_CONFIG, ["check-data", "--config", "config.yaml"]),
        "check_bad_data": (_bad_coco, ["check-data", "--config", "config.yaml"]),
        "analyze_anchors": (TINY_CONFIG, ["analyze-anchors", "--config", "config.yaml", "--optimize",
                                          "--output_dir", "anchors", "--max_images", "8"]),
    }
    runs = {}
    for name, (config, args) in commands.items():
        folder = tmp_path_factory.mktemp(name)
        config = config(folder) if callable(config) else config
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        runs[name] = (start_cli(args, folder), folder)
    yield runs
    wait([run for run, _ in runs.values()])


def test_check_data_reports_the_splits(tool_runs: dict) -> None:
    result = tool_runs["check_data"][0].result()
    assert_ok(result)
    assert "split train (train)" in result.stdout and "split val (val)" in result.stdout
    assert "problems found: 0" in result.stdout


def test_check_data_exits_1_on_bad_annotations(tool_runs: dict) -> None:
    result = tool_runs["check_bad_data"][0].result()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error(s), 0 warning(s)" in result.stderr
    assert "fit with data.on_bad_annotation='raise' stops at the first error" in " ".join(result.stderr.split())
    report = " ".join(result.stdout.split())  # rich wraps long lines
    assert "annotation 8: bbox [5, 5, nan, 10] (x, y, w, h) has non-finite coordinates" in report


def test_analyze_anchors_optimize_writes_plot_and_snippet(tool_runs: dict) -> None:
    run, folder = tool_runs["analyze_anchors"]
    result = run.result()
    assert_ok(result)
    assert (folder / "anchors/anchor_analysis.png").stat().st_size > 0
    snippet = yaml.safe_load((folder / "anchors/anchors.yaml").read_text())["model"]
    assert len(snippet["anchor_sizes"]) == len(snippet["aspect_ratios"]) == 4  # one per level
    assert "config snippet" in result.stdout


def test_the_run_config_is_saved_without_jsonargparse_deprecation_warnings(tmp_path: Path) -> None:
    # jsonargparse >= 4.49 deprecates skip_none: every fit warned (shown under `python -m lightning_rpn.cli`)
    import warnings

    from jsonargparse import ArgumentParser

    from lightning_rpn import cli

    parser = ArgumentParser()
    parser.add_argument("--value", type=int | None, default=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = parser.dump(parser.parse_args([]), **cli._KEEP_NONE)
        parser.save(parser.parse_args([]), tmp_path / "config.yaml", **cli._KEEP_NONE)
    assert "value: null" in text and "value: null" in (tmp_path / "config.yaml").read_text()
