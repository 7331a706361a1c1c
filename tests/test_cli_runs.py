"""End to end through the real ``lightning-rpn`` command: what a new user hits (issue #13).

Tiny budgets on the synthetic set (``helpers.cli.TINY_CONFIG``), each run in its own folder; runs
that do not depend on each other go side by side (``helpers.cli.start_cli``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
from concurrent.futures import wait
from pathlib import Path

import pytest
import torch
import yaml

from lightning_rpn.training.module import RPNModule
from helpers.cli import PROBES as HELPERS, TINY_CONFIG, assert_ok, run_cli, selected_params, start_cli
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


CONFIG_NAMES = sorted(path.name for path in CONFIGS.glob("*.yaml"))


@pytest.fixture(scope="module")
def config_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each selected config's tiny fit, all started at once: {config name: (its folder, the run)}."""
    tiny = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1", "--model.weights", "null", "--data.num_workers", "0",
            "--data.batch_size", "2", "--data.min_sizes", "[96]", "--data.max_size", "128"]
    runs = {}
    for name in selected_params(request, "test_every_config_trains_with_the_logger_and_progress_bar_off", "config_name"):
        config = yaml.safe_load((CONFIGS / name).read_text())
        extra = ["--data.synthetic_train_images", "4", "--data.synthetic_val_images", "2"] \
            if config["data"]["dataset"] in ("synthetic", "scenes") else []
        workdir = tmp_path_factory.mktemp(Path(name).stem)
        args = ["fit", "--config", str(CONFIGS / name), *tiny, *extra, *dataset_root(config, workdir / "data")]
        runs[name] = (workdir, start_cli(args, workdir))
    yield runs
    wait([run for _, run in runs.values()])


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
def test_every_config_trains_with_the_logger_and_progress_bar_off(config_name: str, config_runs: dict) -> None:
    workdir, run = config_runs[config_name]
    result = run.result()
    assert_ok(result)
    assert "LearningRateMonitor is left out" in result.stderr
    config = yaml.safe_load((CONFIGS / config_name).read_text())
    if any(c["class_path"].endswith("RichProgress") for c in config["trainer"]["callbacks"]):
        assert "enable_progress_bar is false, so the config's RichProgress is left out" in result.stderr
    (checkpoints,) = {c["init_args"]["dirpath"] for c in config["trainer"]["callbacks"]
                      if c["class_path"].endswith("Checkpoint")}
    # best.ckpt only where the 2 steps reach a validation (not scenes.yaml's every 75 epochs)
    assert {p.name for p in (workdir / checkpoints).iterdir()} - {"best.ckpt"} == {"last.ckpt"}
    last = torch.load(workdir / checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2


def _checkpointing(version_counter: bool | None, monitor: str = "val/AR@100", mode: str = "max") -> list[dict]:
    """The shipped configs' checkpointing: best by ``monitor`` and the latest weights as last, in a
    fixed folder."""
    best = {"dirpath": "run/checkpoints", "filename": "best", "monitor": monitor, "mode": mode,
            "save_on_train_epoch_end": False}
    last = {"dirpath": "run/checkpoints"}
    if version_counter is not None:
        best["enable_version_counter"] = last["enable_version_counter"] = version_counter
    return [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": best},
            {"class_path": "lightning_rpn.training.callbacks.LastCheckpoint", "init_args": last}]


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.ckpt"))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step fit with the shipped configs' checkpointing (best.ckpt, last.ckpt in run/checkpoints)
    and a backbone named by class_path; the tests below read it or work on a copy."""
    workdir = tmp_path_factory.mktemp("first_run")
    backbone = {"class_path": "backbone_probes.ProbeFPN", "init_args": {"width": 6}}
    write_config(workdir, trainer={"logger": False, "callbacks": _checkpointing(None)}, model={"backbone": backbone})
    assert_ok(run_cli(["fit", "--config", "config.yaml"], workdir, env=PROBES))
    return workdir


def _copy_run(run: Path, to: Path) -> Path:
    """``run``'s config.yaml and checkpoints (with their times: ``--ckpt_path last`` picks the newest)."""
    shutil.copy2(run / "config.yaml", to / "config.yaml")
    shutil.copytree(run / "run/checkpoints", to / "run/checkpoints")
    return to


def test_load_from_checkpoint_rebuilds_a_class_path_backbone(first_run: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(HELPERS)  # the checkpoint names the class as the run imported it
    path = first_run / "run/checkpoints/last.ckpt"
    model = RPNModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert type(model.backbone).__name__ == "ProbeFPN" and model.backbone.out_channels == 6
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.state_dict(), checkpoint["state_dict"])


def test_a_second_run_keeps_the_first_runs_checkpoints_and_last_resumes_the_newest(first_run: Path, tmp_path: Path) -> None:
    workdir = _copy_run(first_run, tmp_path)
    fit = ["fit", "--config", "config.yaml"]
    folder = workdir / "run/checkpoints"
    first = _digests(folder)
    assert sorted(first) == ["best.ckpt", "last.ckpt"]
    second = run_cli([*fit, "--trainer.max_steps", "4"], workdir, env=PROBES)
    assert_ok(second)
    assert "holds checkpoints of an earlier run (best.ckpt, last.ckpt)" in " ".join(second.stderr.split())
    assert "exists and is not empty" not in second.stderr  # Lightning's warning: the notice above says more
    assert sorted(_digests(folder)) == ["best-v1.ckpt", "best.ckpt", "last-v1.ckpt", "last.ckpt"]
    assert {name: _digests(folder)[name] for name in first} == first  # untouched
    # 7 steps: the resumed run stops inside an epoch, where the best callback would find no metric
    third = run_cli([*fit, "--ckpt_path", "last", "--trainer.max_steps", "7"], workdir, env=PROBES)
    assert_ok(third)
    assert "could not find the monitored key" not in third.stderr
    assert f"Restoring states from the checkpoint path at {folder / 'last-v1.ckpt'}" in " ".join(
        (third.stdout + third.stderr).split())
    assert "exists and is not empty" not in third.stderr
    steps = {name: torch.load(folder / name, map_location="cpu", weights_only=True)["global_step"]
             for name in ("last.ckpt", "last-v1.ckpt")}
    assert steps == {"last.ckpt": 2, "last-v1.ckpt": 7}  # the newest run went on, in its own files
    assert {name: _digests(folder)[name] for name in first} == first


def test_a_run_that_would_overwrite_checkpoints_is_refused(first_run: Path, tmp_path: Path) -> None:
    workdir = _copy_run(first_run, tmp_path)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["trainer"]["callbacks"] = _checkpointing(False)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    before = _digests(workdir / "run/checkpoints")
    assert sorted(before) == ["best.ckpt", "last.ckpt"]
    refused = run_cli(["fit", "--config", "config.yaml"], workdir, env=PROBES)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr  # one line, before training
    message = " ".join(refused.stderr.split())
    assert "run/checkpoints (dirpath) holds checkpoints of an earlier run (best.ckpt, last.ckpt)" in message
    assert "enable_version_counter: false would overwrite them" in message
    assert _digests(workdir / "run/checkpoints") == before  # (resuming there: test_cli.py)


def test_a_run_whose_best_stops_improving_still_saves_its_last_weights(tmp_path: Path) -> None:
    """3 epochs whose monitored value (the epoch, mode min) never improves after the first: best.ckpt
    stays at epoch 0, LastCheckpoint's last.ckpt holds the end of the run (with Lightning 2.6's
    save_last on the best callback it would be epoch 0 too); that layout is named in a message."""
    write_config(tmp_path, trainer={"logger": False, "max_steps": 6,
                                    "callbacks": _checkpointing(None, monitor="epoch", mode="min")})
    result = run_cli(["fit", "--config", "config.yaml"], tmp_path)
    assert_ok(result)
    steps = {p.name: torch.load(p, map_location="cpu", weights_only=True)["global_step"]
             for p in (tmp_path / "run/checkpoints").glob("*.ckpt")}
    assert steps == {"best.ckpt": 2, "last.ckpt": 6}
    assert "writes last.ckpt only when" not in result.stderr
    assert "holds checkpoints of an earlier run" not in result.stderr
    best_saves_last, last = _checkpointing(None)
    best_saves_last["init_args"]["save_last"] = True
    write_config(tmp_path, trainer={"logger": False, "callbacks": [best_saves_last, last]})
    result = run_cli(["fit", "--config", "config.yaml"], tmp_path)
    assert_ok(result)
    assert "ModelCheckpoint(monitor='val/AR@100', save_last=True) writes last.ckpt only when val/AR@100 " \
           "improves (Lightning >= 2.6)" in " ".join(result.stderr.split())
    assert " ".join(result.stderr.split()).count("holds checkpoints of an earlier run") == 1  # once a folder


def test_a_run_config_with_swa_is_written_readably_and_reruns(tmp_path: Path) -> None:
    """StochasticWeightAveraging's ``device`` (a ``torch.device``) was written into the run's
    config.yaml as "Unable to serialize instance cpu", and a rerun of that file crashed when SWA
    started."""
    swa = {"class_path": "lightning.pytorch.callbacks.StochasticWeightAveraging",
           "init_args": {"swa_lrs": 0.001, "swa_epoch_start": 1}}
    write_config(tmp_path, trainer={"logger": False, "max_steps": 4, "callbacks": [*_checkpointing(None), swa]})
    assert_ok(run_cli(["fit", "--config", "config.yaml"], tmp_path))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    [written] = [c for c in saved["trainer"]["callbacks"] if c["class_path"].endswith("StochasticWeightAveraging")]
    assert written["init_args"]["device"] == "cpu"
    (tmp_path / "rerun.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    rerun = run_cli(["fit", "--config", "rerun.yaml"], tmp_path)  # a new run beside the first: -v1 files
    assert_ok(rerun)
    assert "Swapping scheduler `RunLambdaLR` for `SWALR`" in rerun.stderr  # SWA started, and went on to the end
    assert (tmp_path / "run/checkpoints/last-v1.ckpt").exists()


def test_shipped_configs_keep_the_checkpoint_version_counter_and_save_the_latest_weights_as_last() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        checkpoints = [c.get("init_args", {}) for c in callbacks if c["class_path"].endswith("Checkpoint")]
        assert all(c.get("enable_version_counter", True) for c in checkpoints), path.name
        best, last = checkpoints
        assert best["filename"] == "best" and best["monitor"].startswith("val/AR@") and not best.get("save_last")
        assert best["save_on_train_epoch_end"] is False, path.name  # saved where the metric is
        assert callbacks[1]["class_path"] == "lightning_rpn.training.callbacks.LastCheckpoint", path.name
        assert last == {"dirpath": best["dirpath"]}, path.name


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


def test_a_run_writes_only_in_its_folder_after_wandb_ran_in_the_test_process(tmp_path: Path, monkeypatch) -> None:
    """W&B started in this process leaves its service's address in ``WANDB_SERVICE``; a CLI run
    that inherited it wrote its console log under this process's working directory (the
    checkout in ``make test``). ``run_cli`` gives each run a shell's environment."""
    import wandb

    parent, workdir = tmp_path / "parent", tmp_path / "work"
    parent.mkdir()
    workdir.mkdir()
    monkeypatch.chdir(parent)
    wandb.init(mode="offline", dir=str(parent), project="lightning-rpn-tests").finish()
    assert "WANDB_SERVICE" in os.environ
    write_config(workdir)
    assert_ok(run_cli(["fit", "--config", "config.yaml"], workdir))
    assert list((workdir / "run/wandb").glob("offline-run-*/files/output.log"))
    assert sorted(path.name for path in parent.iterdir()) == ["wandb"]  # wandb.init's own folder only


def test_fit_ending_between_validations_validates_the_final_weights(tmp_path: Path) -> None:
    """8 images at batch 4 are 2 steps an epoch: a budget of 3 steps stops between validations,
    and the run still ends with the recall of the weights it saved, titled with their step."""
    write_config(tmp_path, trainer={"max_steps": 3, "logger": False})
    result = run_cli(["fit", "--config", "config.yaml"], tmp_path)
    assert_ok(result)
    assert "lightning-rpn fit: ended at step 3 (last validated at step 2); validating the final weights" in result.stderr
    assert "Proposal recall (end of fit, step 3; last validated at step 2)" in result.stdout
    # epoch 1: the epoch the fit stopped inside, as its last.ckpt has it (Lightning's counter had moved on)
    assert "Proposal recall (validate, epoch 1, step 3)" in result.stdout
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()


def test_a_fit_logged_to_a_file_prints_progress_lines_instead_of_the_rich_bar(tmp_path: Path) -> None:
    """Off a terminal rich draws its bar only when training ends; the CLI prints lines instead."""
    callbacks = [*TINY_CONFIG["trainer"]["callbacks"], {"class_path": "lightning.pytorch.callbacks.RichProgressBar"}]
    write_config(tmp_path, trainer={"max_steps": 3, "logger": False, "enable_progress_bar": True,
                                    "callbacks": callbacks})
    result = run_cli(["fit", "--config", "config.yaml"], tmp_path)  # stdout is a pipe
    assert_ok(result)
    assert "stdout is not a terminal, so progress is printed as a line every 30 s" in result.stderr
    lines = result.stdout.splitlines()
    assert "train: from step 0 of 3, a line every 30.0s" in lines
    steps = [line.split(" |")[0] for line in lines if line.startswith("train step")]
    assert steps == ["train step 1/3 (33%)", "train step 3/3 (100%)"]  # the first and the last
    # 2 steps an epoch; the tiny config's budgets are 10 and 100 proposals
    assert any(re.match(r"validation at step 2: done in .* \| AR@10 [\d.]+ \| AR@100 [\d.]+ \| val/loss", line)
               for line in lines)
    assert not [line for line in lines if line.startswith(("Epoch ", "Validation "))]  # no rich bar
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert "lightning_rpn.training.callbacks.TextProgress" in [c["class_path"] for c in saved["trainer"]["callbacks"]]


def test_fit_on_a_training_split_without_boxes_stops_with_the_data_error_alone(tmp_path: Path) -> None:
    # a category filter or an export that kept no annotation: training on it trained nothing, silently;
    # now a DataError, printed as its message (no traceback) with exit status 1, as check-data's
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images/a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}], "annotations": [],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "annotations/instances_images.json").write_text(json.dumps(coco))
    data = {"dataset": "coco", "root": str(tmp_path), "train_split": "images", "val_split": None,
            "coco_images": "{split}", "num_workers": 0}
    write_config(tmp_path, data=data)
    result = run_cli(["fit", "--config", "config.yaml", "--trainer.logger", "false"], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "instances_images.json" in message and "the train split 'images'" in message
    assert "check-data --config" in message
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # refused before training (the folder is made and checked)


def test_a_dataset_root_that_is_no_folder_stops_with_one_line(tmp_path: Path) -> None:
    # the shipped COCO / VOC configs' placeholder root: a ValueError from prepare_data, as a traceback
    write_config(tmp_path, data={"dataset": "coco", "root": str(tmp_path / "nope"), "num_workers": 0})
    result = run_cli(["fit", "--config", "config.yaml", "--trainer.logger", "false"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    expected = f"RPNDataModule: root {str(tmp_path / 'nope')!r} is not a folder (dataset='coco'); set --data.root"
    assert expected in " ".join(result.stderr.split())
