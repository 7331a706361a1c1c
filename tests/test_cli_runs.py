"""End to end through the real ``lightning-rpn`` command: what a new user hits (issue #13).

Tiny budgets on the synthetic set (``test_cli.TINY_CONFIG``), each test in its own folder.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from lightning_rpn.module import RPNModule
from test_cli import TINY_CONFIG, assert_ok, run_cli
from test_data_builders import save_image, write_voc

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parent / "configs"
# backbone_probes.ProbeFPN by class_path, ahead of any PYTHONPATH already set
PROBES = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def write_config(workdir: Path, **sections: dict) -> dict:
    """TINY_CONFIG with ``sections`` merged into its top-level sections, saved as config.yaml."""
    config = copy.deepcopy(TINY_CONFIG)
    for name, values in sections.items():
        config[name].update(values)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def test_load_from_checkpoint_rebuilds_a_class_path_backbone(tmp_path: Path) -> None:
    backbone = {"class_path": "backbone_probes.ProbeFPN", "init_args": {"width": 6}}
    write_config(tmp_path, model={"backbone": backbone})
    assert_ok(run_cli(["fit", "--config", "config.yaml", "--trainer.logger", "false"], tmp_path, env=PROBES))
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
    assert _digests(tmp_path / "run/checkpoints") == before
    assert_ok(run_cli(["fit", "--config", "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "3"],
                      tmp_path))  # resuming writes into the folder, as it should


def test_shipped_configs_keep_the_checkpoint_version_counter() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        (checkpoint,) = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
        assert checkpoint["init_args"].get("enable_version_counter", True), path.name
