"""End to end through the real ``lightning-rpn`` command: what a new user hits (issue #13).

Tiny budgets on the synthetic set (``test_cli.TINY_CONFIG``), each test in its own folder.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_rpn.training.module import RPNModule
from helpers.cli import PROBES as HELPERS, TINY_CONFIG, assert_ok, run_cli
from helpers.builders import save_image, write_voc

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parent / "configs"
# backbone_probes.ProbeFPN by class_path, ahead of any PYTHONPATH already set
PROBES = {"PYTHONPATH": os.pathsep.join(filter(None, [HELPERS, os.environ.get("PYTHONPATH")]))}


def write_config(workdir: Path, **sections: dict) -> dict:
    """TINY_CONFIG with ``sections`` merged into its top-level sections, saved as config.yaml."""
    config = copy.deepcopy(TINY_CONFIG)
    for name, values in sections.items():
        config[name].update(values)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def test_load_from_checkpoint_rebuilds_a_class_path_backbone(tmp_path: Path, monkeypatch) -> None:
    backbone = {"class_path": "backbone_probes.ProbeFPN", "init_args": {"width": 6}}
    write_config(tmp_path, model={"backbone": backbone})
    assert_ok(run_cli(["fit", "--config", "config.yaml", "--trainer.logger", "false"], tmp_path, env=PROBES))
    monkeypatch.syspath_prepend(HELPERS)  # the checkpoint names the class as the run imported it
    path = tmp_path / "run/checkpoints/last.ckpt"
    model = RPNModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert type(model.backbone).__name__ == "ProbeFPN" and model.backbone.out_channels == 6
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.state_dict(), checkpoint["state_dict"])


def write_coco_root(root: Path, splits: tuple[str, ...]) -> None:
    """``root/{split}/*.png`` and ``root/annotations/instances_{split}.json``: two boxed images each."""
    (root / "annotations").mkdir(parents=True)
    for split in splits:
        images = [{"id": i, "file_name": f"{i}.png", "height": 96, "width": 128} for i in (1, 2)]
        for i, image in enumerate(images):
            save_image(root / split / image["file_name"], 96, 128, seed=i)
        annotations = [{"id": 10 + i, "image_id": i, "bbox": [10, 12, 40, 30], "category_id": 1,
                        "iscrowd": 0, "area": 1200} for i in (1, 2)]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))


def dataset_root(config: dict, root: Path) -> list[str]:
    """Create the tiny dataset ``config`` reads under ``root``; the overrides that point to it."""
    data = config["data"]
    if data["dataset"] == "coco":
        write_coco_root(root, (data["train_split"], data["val_split"]))
    elif data["dataset"] == "voc":
        entries = {f"{i:06d}": {"size": (96, 128), "objects": [{"box": (11, 13, 50, 42)}]} for i in (1, 2)}
        for split in {data["train_split"], data["val_split"], data.get("test_split") or data["val_split"]}:
            write_voc(root, entries, split=split)
    else:
        return []
    return ["--data.root", str(root)]


@pytest.mark.parametrize("config_name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_config_trains_with_the_logger_off(config_name: str, tmp_path: Path) -> None:
    config = yaml.safe_load((CONFIGS / config_name).read_text())
    tiny = ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1", "--model.weights", "null", "--data.num_workers", "0",
            "--data.batch_size", "2", "--data.min_sizes", "[96]", "--data.max_size", "128"]
    if config["data"]["dataset"] in ("synthetic", "scenes"):
        tiny += ["--data.synthetic_train_images", "4", "--data.synthetic_val_images", "2"]
    result = run_cli(["fit", "--config", str(CONFIGS / config_name), *tiny,
                      *dataset_root(config, tmp_path / "data")], tmp_path)
    assert_ok(result)
    assert "LearningRateMonitor is left out" in result.stderr
    (checkpoints,) = [c["init_args"]["dirpath"] for c in config["trainer"]["callbacks"]
                      if c["class_path"].endswith("ModelCheckpoint")]
    assert (tmp_path / checkpoints / "last.ckpt").is_file()


def _checkpointing(version_counter: bool | None) -> dict:
    """The shipped configs' checkpointing: best by val/AR@100 and last, in a fixed folder."""
    init_args = {"dirpath": "run/checkpoints", "filename": "best", "monitor": "val/AR@100", "mode": "max",
                 "save_last": True}
    if version_counter is not None:
        init_args["enable_version_counter"] = version_counter
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": init_args}


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.ckpt"))}


def test_a_second_run_keeps_the_first_runs_checkpoints_and_last_resumes_the_newest(tmp_path: Path) -> None:
    write_config(tmp_path, trainer={"logger": False, "callbacks": [_checkpointing(None)]})
    fit = ["fit", "--config", "config.yaml"]
    assert_ok(run_cli(fit, tmp_path))
    folder = tmp_path / "run/checkpoints"
    first = _digests(folder)
    assert sorted(first) == ["best.ckpt", "last.ckpt"]
    second = run_cli([*fit, "--trainer.max_steps", "4"], tmp_path)
    assert_ok(second)
    assert "holds checkpoints of an earlier run (best.ckpt, last.ckpt)" in " ".join(second.stderr.split())
    assert sorted(_digests(folder)) == ["best-v1.ckpt", "best.ckpt", "last-v1.ckpt", "last.ckpt"]
    assert {name: _digests(folder)[name] for name in first} == first  # untouched
    assert_ok(run_cli([*fit, "--ckpt_path", "last", "--trainer.max_steps", "6"], tmp_path))
    steps = {name: torch.load(folder / name, map_location="cpu", weights_only=True)["global_step"]
             for name in ("last.ckpt", "last-v1.ckpt")}
    assert steps == {"last.ckpt": 2, "last-v1.ckpt": 6}  # the newest run went on, in its own files
    assert {name: _digests(folder)[name] for name in first} == first


def test_a_run_that_would_overwrite_checkpoints_is_refused(tmp_path: Path) -> None:
    write_config(tmp_path, trainer={"logger": False, "callbacks": [_checkpointing(False)]})
    assert_ok(run_cli(["fit", "--config", "config.yaml"], tmp_path))
    before = _digests(tmp_path / "run/checkpoints")
    refused = run_cli(["fit", "--config", "config.yaml"], tmp_path)
    assert refused.returncode != 0
    message = " ".join(refused.stderr.split())
    assert "run/checkpoints (dirpath) holds checkpoints of an earlier run (best.ckpt, last.ckpt)" in message
    assert "enable_version_counter: false would overwrite them" in message
    assert _digests(tmp_path / "run/checkpoints") == before  # (resuming there: test_cli.py)


def test_shipped_configs_keep_the_checkpoint_version_counter() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        (checkpoint,) = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
        assert checkpoint["init_args"].get("enable_version_counter", True), path.name


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """A 2-step fit (logger off) whose last.ckpt the evaluation commands below read."""
    workdir = tmp_path_factory.mktemp("evaluated")
    callbacks = copy.deepcopy(TINY_CONFIG["trainer"]["callbacks"])
    (writer,) = [c for c in callbacks if c["class_path"].endswith("ProposalWriter")]
    writer["init_args"]["top_k"] = 100  # every proposal the model's AR@100 sees
    write_config(workdir, trainer={"logger": False, "callbacks": callbacks}, data={"test_split": "test"})
    assert_ok(run_cli(["fit", "--config", "config.yaml"], workdir))
    return workdir


EVALUATE = ["--config", "config.yaml", "--ckpt_path", "run/checkpoints/last.ckpt"]


def _every_recall_key(ks: tuple[int, ...] = (10, 100)) -> set[str]:
    areas = ("", "_small", "_medium", "_large")
    ious = [f"{0.5 + 0.05 * i:.2f}" for i in range(10)]
    return {f"AR{a}@{k}" for a in areas for k in ks} | {f"recall@{t}@{k}" for t in ious for k in ks}


@pytest.mark.parametrize(("command", "split"), [("validate", "val"), ("test", "test")])
def test_validate_and_test_write_a_json_summary(evaluated: Path, command: str, split: str) -> None:
    result = run_cli([command, *EVALUATE], evaluated)
    assert_ok(result)
    path = evaluated / "run/metrics" / f"{command}-last.json"
    assert f"lightning-rpn {command}: metrics written to {Path('run/metrics') / path.name}" in result.stderr
    summary = json.loads(path.read_text())
    assert summary["command"] == command
    assert summary["checkpoint"] == str((evaluated / "run/checkpoints/last.ckpt").resolve())
    assert summary["dataset"] == {"name": "synthetic", "root": None, "split": split, "images": None}
    assert set(summary["metrics"]) == _every_recall_key()
    assert 0 <= summary["metrics"]["AR@100"] <= 1
    assert set(summary["losses"]) == {"loss", "loss_rpn_cls", "loss_rpn_reg"}


def test_predict_reports_recall_on_an_annotated_split(evaluated: Path) -> None:
    from lightning_rpn.data.synthetic import SyntheticShapes
    from lightning_rpn.evaluation.metrics import ProposalRecall
    from lightning_rpn.evaluation.proposal_files import FORMATS, read_detectron2_proposals

    result = run_cli(["predict", *EVALUATE], evaluated)
    assert_ok(result)
    assert "Proposal recall (predict, original-image pixels" in result.stdout
    summary = json.loads((evaluated / "run/metrics/predict-last.json").read_text())
    assert summary["dataset"]["split"] == "val" and summary["coordinates"] == "original images"
    # the same recall as the written proposals against the original annotations
    records = read_detectron2_proposals(evaluated / "run/proposals" / FORMATS["detectron2_pkl"])
    dataset = SyntheticShapes(4, min_size=64, max_size=96, max_shapes=3, seed=0, split="val")
    recall = ProposalRecall(max_proposals=(10, 100))
    recall.update([torch.as_tensor(r["boxes"]) for r in records],
                  [torch.as_tensor(dataset[r["image_id"]].boxes).reshape(-1, 4) for r in records])
    expected = {key: float(value) for key, value in recall.compute().items()}
    assert summary["metrics"] == pytest.approx(expected, abs=1e-4)


def test_predict_on_a_folder_without_annotations_reports_no_recall(evaluated: Path, tmp_path: Path) -> None:
    for i in range(2):
        save_image(tmp_path / f"{i}.png", 70, 90, seed=i)
    result = run_cli(["predict", *EVALUATE, "--data.predict_images", str(tmp_path),
                      "--trainer.default_root_dir", str(tmp_path / "out")], evaluated)
    assert_ok(result)
    assert "Proposal recall" not in result.stdout and "metrics written" not in result.stderr
    assert not (tmp_path / "out/metrics").exists()


@pytest.mark.parametrize("where", ["config", "flag"])
def test_a_class_path_typo_ends_with_its_cause(where: str, tmp_path: Path, monkeypatch, capsys) -> None:
    from lightning_rpn.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])
    config = copy.deepcopy(TINY_CONFIG)
    args = ["fit", "--config", "config.yaml"]
    if where == "config":
        config["trainer"]["callbacks"][1]["class_path"] = "lightning_rpn.training.callbacks.RecallTabel"
        key, class_path, missing = "trainer.callbacks", "lightning_rpn.training.callbacks.RecallTabel", "RecallTabel"
    else:
        args += ["--model.backbone.class_path", "lightning_rpn.core.backbones.TinyFPNX"]
        key, class_path, missing = "model.backbone", "lightning_rpn.core.backbones.TinyFPNX", "TinyFPNX"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"cause: {key}: class_path '{class_path}': module "
                         f"'{class_path.rpartition('.')[0]}' has no attribute '{missing}'")
    assert len(lines) < 25  # no usage text of every option
    assert "`lightning-rpn fit --help` lists every option" in lines[0]
