"""The ``lightning-rpn`` help names every subcommand and what ``--config`` takes; a command the
config gives nothing to run on, or trainer settings Lightning refuses while the command builds the
trainer (``--trainer.accelerator gpu`` on a machine without one), are refused in one line (exit 2),
and any other error keeps its traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_rpn import cli
from lightning_rpn.training.module import RPNModule

CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
    "model": {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32], [64], [128]]},
    "data": {"dataset": "synthetic", "synthetic_train_images": 4, "synthetic_val_images": 2, "num_workers": 0},
}


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny synthetic config in ``tmp_path``, the working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def help_text(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The ``--help`` output of ``lightning-rpn ARGS``, whitespace collapsed."""
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_the_top_level_help_names_configs_and_built_in_names(config: Path, capsys: pytest.CaptureFixture) -> None:
    text = help_text(capsys)
    assert "configs (the built-in configs: `lightning-rpn configs list`" in text
    # before the subcommand, a config takes a section per subcommand; a run's config goes after it
    assert ("-c CONFIG, --config CONFIG A config with one section per subcommand (fit:, validate:, ...). The "
            "built-in configs and copies of them hold one run's settings: give those after the subcommand, "
            "`lightning-rpn fit --config shapes`.") in text
    assert "A YAML or JSON config file, or the name of a built-in config" in help_text(capsys, "fit")


@pytest.mark.parametrize("command", ["check-data", "analyze-anchors"])
def test_a_tool_s_help_is_headed_by_its_own_name(config: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    text = help_text(capsys, command)
    assert text.startswith(f"usage: lightning-rpn {command} [-c CONFIG]")
    assert "or the name of a built-in config" in text


def test_the_optimize_help_says_what_the_search_does(config: Path, capsys: pytest.CaptureFixture) -> None:
    text = help_text(capsys, "analyze-anchors")
    assert "also search anchor sizes and ratios per level (sizes only for model.head: cascade" in text
    assert "at the same anchor count" in text
    assert "never lowering the coverage at IoU 0.5, 0.7 or the model's fg_iou" in text


def test_test_without_a_test_split_is_one_line_naming_the_setting(config: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    # was a ValueError traceback from the data module's loader
    assert cli.main(["test", "--config", str(config), "--ckpt_path", "none.ckpt"]) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("lightning-rpn test: the config gives no test split to run on; set one in its data section or "
            "pass --data.test_split NAME") in err


def test_best_without_a_monitored_checkpoint_is_one_line(config: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["validate", "--config", str(config), "--ckpt_path", "best"]) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "lightning-rpn validate --ckpt_path best: the config has no ModelCheckpoint with a monitor" in err


def test_an_unexpected_error_keeps_its_traceback(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "evaluation_checkpoint", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["validate", "--config", str(config), "--ckpt_path", "best"])


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_process_whose_peer_failed_says_so_in_one_line(config: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture, world_size: str) -> None:
    # what gloo raises in the other process when one process of a DDP run stops (a bad image only it read)
    def peer_gone(*args: object) -> None:
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                           "[127.0.0.1]:41234\nmore lines")

    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(cli, "evaluation_checkpoint", peer_gone)
    if world_size == "1":  # one process: no peer to blame, the traceback stays
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            cli.main(["validate", "--config", str(config), "--ckpt_path", "best"])
        return
    assert cli.main(["validate", "--config", str(config), "--ckpt_path", "best"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-rpn: [rank 0] stopped: another process of this run failed")
    assert "Connection closed by peer" in err and "more lines" not in err


def test_wandb_refusing_to_start_a_run_is_one_line(config: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    from wandb.errors import UsageError

    def no_key(*args: object) -> None:
        raise UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(cli, "evaluation_checkpoint", no_key)
    assert cli.main(["validate", "--config", str(config), "--ckpt_path", "best"]) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("lightning-rpn: W&B: No API key configured.") and "WANDB_MODE=offline" in err


def test_a_data_error_from_a_dataloader_worker_prints_its_own_message(monkeypatch) -> None:
    # torch re-raises a worker's exception with the worker's whole traceback as its message
    from torch._utils import ExceptionWrapper

    from lightning_rpn.data.problems import DataError

    try:
        raise DataError("image file is corrupt", file="train/2.jpg", image_id=3)
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as raised:
        wrapped.reraise()
    assert "Original Traceback" in str(raised.value)
    assert cli._data_error_message(raised.value) == "train/2.jpg, image 3: image file is corrupt"
    assert cli._data_error_message(DataError("plain", file="a.json")) == "a.json: plain"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli._rank_prefix() == "[rank 0] "


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.backbone", "resnet18_fpn", "--model.weights", "ResNet18_Weights.IMAGENET1K_V1"],
     "lightning-rpn: model.weights='ResNet18_Weights.IMAGENET1K_V1': downloading them failed"),
    (["--trainer.precision", "16-true", "--model.optimizer", "adamw"],
     "lightning-rpn: model.optimizer='adamw' cannot update float16 parameters"),
])
def test_a_setting_that_cannot_work_is_one_line_not_a_traceback(
    args: list[str], expected: str, config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    """Weights that cannot be downloaded (no internet) and AdamW at 16-true each printed their clear message
    at the end of a 50-140-line traceback through Lightning (a SettingError now)."""
    def no_internet(*_: object, **__: object) -> None:
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_internet)
    code = cli.main(["fit", "--config", str(config), "--trainer.max_steps", "1", *args])
    err = capsys.readouterr().err
    assert code == cli.USAGE_ERROR
    assert err.strip().splitlines()[-1].startswith(expected), err
    assert "Traceback" not in err


def refusal(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one stderr line of ``lightning-rpn ARGS``, which must exit 2 without a traceback."""
    code = cli.main(list(args))
    err = capsys.readouterr().err
    assert code == cli.USAGE_ERROR, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "refused by Lightning" in line]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_a_gpu_accelerator_without_a_gpu_is_one_line(config: Path, capsys: pytest.CaptureFixture,
                                                     command: str) -> None:
    # was a 35-line traceback ending in MisconfigurationException: No supported gpu backend found!
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: Lightning accepts --trainer.accelerator gpu")
    line = refusal(capsys, command, "--config", str(config), "--trainer.accelerator", "gpu")
    assert line.startswith("lightning-rpn: the trainer settings (accelerator='gpu', ")
    assert "refused by Lightning: No supported gpu backend found! -- change the one at fault" in line
    assert "`--trainer.accelerator auto --trainer.devices auto --trainer.strategy auto`" in line


@pytest.mark.parametrize(("args", "expected"), [
    (["--trainer.strategy", "nonsense"], "You selected an invalid strategy name: `strategy='nonsense'`."),
    (["--trainer.devices", "0"], "`Trainer(devices='0')` value is not a valid input using cpu accelerator."),
])
def test_another_refused_trainer_setting_is_one_line(config: Path, capsys: pytest.CaptureFixture,
                                                     args: list[str], expected: str) -> None:
    # a ValueError and a MisconfigurationException traceback from Lightning's accelerator connector
    line = refusal(capsys, "fit", "--config", str(config), *args)
    assert "were refused by Lightning: " + expected in line


def test_checkpointing_off_with_the_configs_checkpoint_callbacks_names_them_not_the_hardware(
        config: Path, capsys: pytest.CaptureFixture) -> None:
    # the line quoted the accelerator and devices and advised `--trainer.accelerator auto`
    callbacks = '[{"class_path": "lightning_rpn.training.callbacks.LastCheckpoint", "init_args": {"dirpath": "ckpts"}}]'
    code = cli.main(["fit", "--config", str(config), "--trainer.callbacks", callbacks,
                     "--trainer.enable_checkpointing", "false"])
    err = capsys.readouterr().err
    assert code == cli.USAGE_ERROR and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("lightning-rpn: Lightning refused the trainer settings: Trainer was configured with")
    assert "also give --trainer.callbacks without them" in err and "accelerator" not in err


def test_fast_dev_run_announces_no_checkpoint_files(config: Path, capsys: pytest.CaptureFixture) -> None:
    # it said this run's files get a version suffix (last-v1.ckpt), but fast_dev_run saves none
    (config.parent / "ckpts").mkdir()
    (config.parent / "ckpts" / "last.ckpt").write_bytes(b"x")
    callbacks = '[{"class_path": "lightning_rpn.training.callbacks.LastCheckpoint", "init_args": {"dirpath": "ckpts"}}]'
    assert cli.main(["fit", "--config", str(config), "--trainer.callbacks", callbacks,
                     "--trainer.fast_dev_run", "true"]) == 0
    assert "version suffix" not in capsys.readouterr().err
    assert [p.name for p in (config.parent / "ckpts").iterdir()] == ["last.ckpt"]


def test_a_root_dir_on_the_command_line_names_the_folders_the_config_keeps(config: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    # `fit --trainer.default_root_dir X` wrote every file to the config's own folders without a word
    callbacks = '[{"class_path": "lightning_rpn.training.callbacks.LastCheckpoint", "init_args": {"dirpath": "ckpts"}}]'
    args = ["fit", "--config", str(config), "--trainer.callbacks", callbacks, "--trainer.fast_dev_run", "true"]
    assert cli.main([*args, "--trainer.default_root_dir", "moved"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"--trainer.default_root_dir moved moves only what the config leaves to Lightning; the config sets these "
            f"folders itself, and they stay: {config.parent / 'ckpts'} (LastCheckpoint dirpath) (set them too") in err
    assert cli.main([*args, "--trainer.default_root_dir", "ckpts/.."]) == 0  # the folders lie under it
    assert cli.main(args) == 0  # not given: nothing to say
    (config.parent / "link").symlink_to(config.parent)  # Lightning resolves dirpath's links, not the root's
    assert cli.main([*args, "--trainer.default_root_dir", "link"]) == 0
    assert "default_root_dir" not in capsys.readouterr().err


def test_a_misconfiguration_raised_while_fitting_keeps_its_traceback(config: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the trainer's construction is a setting problem: later, it may be our own misuse of Lightning."""
    def misused(*_: object, **__: object) -> None:
        raise MisconfigurationException("misused during fit")

    monkeypatch.setattr(RPNModule, "training_step", misused)
    with pytest.raises(MisconfigurationException, match="misused during fit"):
        cli.main(["fit", "--config", str(config)])


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.anchor_sizes", "[[16], [32]]"], "model.anchor_sizes / model.aspect_ratios do not fit the backbone"),
    (["--model.head", "cascade"], "CascadeRPN: needs one anchor per location"),
    (["--model.head", "cascade", "--model.aspect_ratios", "[[1.0]]", "--model.objectness", "softmax"],
     "model.head='cascade' does not support {'model.objectness': 'softmax'}"),
    (["--model.sliding_window", "{size: 64, overlap: 64}"], "model.sliding_window.overlap=64 must be an int in [0,"),
])
def test_a_model_setting_that_cannot_work_is_one_line(config: Path, capsys: pytest.CaptureFixture,
                                                       args: list[str], expected: str) -> None:
    # were ValueError tracebacks of about 45 lines, exit 1
    code = cli.main(["fit", "--config", str(config), *args])
    err = capsys.readouterr().err
    assert code == cli.USAGE_ERROR and "Traceback" not in err, err
    assert expected in err.strip().splitlines()[-1]



def test_a_timer_callback_is_written_into_the_run_config(config: Path) -> None:
    """Lightning's ``Timer`` annotates ``interval: str`` with the enum default ``Interval.step``: the
    run's config write crashed with "cannot represent an object" (a 120-line traceback)."""
    from lightning.pytorch.callbacks import Timer

    run = cli.RPNLightningCLI(args=["--config", str(config), "--trainer.callbacks+=lightning.pytorch.callbacks.Timer"],
                              run=False)
    assert "interval: step" in [line.strip() for line in run.parser.dump(run.config).splitlines()]
    [timer] = [c for c in run.trainer.callbacks if isinstance(c, Timer)]
    assert timer._interval == "step"
