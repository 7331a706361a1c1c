"""Trainer settings that Lightning refuses while the command builds the trainer (``--trainer.accelerator
gpu`` on a machine without one, an unknown strategy) are one line and exit 2 for every command that
builds one; the same exception raised later, while the command runs, keeps its traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_rpn import cli
from lightning_rpn.training.module import RPNModule

CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "max_steps": 1},
    "model": {"backbone": "tiny_fpn", "anchor_sizes": [[16], [32], [64], [128]]},
    "data": {"dataset": "synthetic", "synthetic_train_images": 2, "synthetic_val_images": 2, "num_workers": 0},
}


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny synthetic config in ``tmp_path``, the working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


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


def test_a_misconfiguration_raised_while_fitting_keeps_its_traceback(config: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the trainer's construction is a setting problem: later, it may be our own misuse of Lightning."""
    def misused(*_: object, **__: object) -> None:
        raise MisconfigurationException("misused during fit")

    monkeypatch.setattr(RPNModule, "training_step", misused)
    with pytest.raises(MisconfigurationException, match="misused during fit"):
        cli.main(["fit", "--config", str(config)])
