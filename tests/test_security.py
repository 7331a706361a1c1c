"""Security: safe checkpoint loading, configs that cannot run code, no credentials in outputs.

Dataset paths that escape their root are rejected by the data package (tests/test_data_*.py).
"""

from __future__ import annotations

import argparse
import copy
import re
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import yaml

from lightning_rpn.cli import CONFIG_KEY, main
from lightning_rpn.training.module import RPNModule
from helpers.cli import SECRET, TINY_CONFIG, FitRun, run_cli

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_rpn"

FORBIDDEN = {
    "eval()": re.compile(r"(?<![.\w])eval\("),
    "exec()": re.compile(r"(?<![.\w])exec\("),
    "yaml.load / unsafe_load": re.compile(r"yaml\.(unsafe_|full_)?load\("),
    "unsafe YAML loader": re.compile(r"(Unsafe|Full)Loader|yaml\.Loader\b"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)"),
    "pickle.load": re.compile(r"pickle\.load\("),
}
# detectron2's proposal-file format is a pickle; reading one means trusting that file. The CLI's
# check of a --ckpt_path file loads it as the command will, so a user's --weights_only false
# (for a file they trust) reaches it as it reaches Lightning's load
ALLOWED = {("pickle.load", "proposal_files.py"), ("torch.load without weights_only=True", "run_files.py")}


def test_package_source_never_evaluates_code_or_loads_unsafely() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name, pattern in FORBIDDEN.items():
                if pattern.search(line) and (name, path.name) not in ALLOWED:
                    found.append(f"{path.name}:{number}: {name}: {line.strip()}")
    assert not found, "\n".join(found)


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_python_tags_in_a_config_do_not_run(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_dump(TINY_CONFIG).replace(
        "max_steps: 2", f"max_steps: !!python/object/apply:os.system ['touch {marker}']"
    )
    assert "python/object" in config
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config_file(tmp_path, config)), "--print_config"])
    assert not marker.exists()


def test_class_path_must_name_a_class_of_the_declared_type(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"]["logger"] = {"class_path": "os.system", "init_args": {"command": "touch pwned"}}
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config_file(tmp_path, yaml.safe_dump(config))), "--print_config"])
    assert not (tmp_path / "pwned").exists()
    assert "os.system" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_with_a_key(tiny_fit: Future[FitRun]) -> tuple[Path, str]:
    """The session's shared 2-step W&B-offline fit, run with ``WANDB_API_KEY=SECRET`` in its environment."""
    run = tiny_fit.result()
    return run.workdir, run.output


@pytest.mark.slow
def test_wandb_key_reaches_no_log_config_or_checkpoint(trained_with_a_key) -> None:
    workdir, output = trained_with_a_key
    assert list((workdir / "run/wandb").glob("offline-run-*/files"))
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert workdir / "run/config.yaml" in files and workdir / "run/checkpoints/last.ckpt" in files
    leaks = [str(p.relative_to(workdir)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks
    assert SECRET not in output


@pytest.mark.slow
def test_our_checkpoint_loads_with_weights_only(trained_with_a_key) -> None:
    workdir, _ = trained_with_a_key
    path = workdir / "run/checkpoints/last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert CONFIG_KEY in checkpoint and checkpoint["hyper_parameters"]["backbone"] == "tiny_fpn"
    model = RPNModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.state_dict(), checkpoint["state_dict"])


@pytest.mark.slow
def test_cli_loads_checkpoints_with_weights_only_by_default(trained_with_a_key, tmp_path) -> None:
    workdir, _ = trained_with_a_key
    # a checkpoint that only a full unpickler could load: weights_only refuses it
    checkpoint = torch.load(workdir / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["payload"] = argparse.Namespace(note="importable, but not on torch's allowlist")
    torch.save(checkpoint, tmp_path / "unsafe.ckpt")
    result = run_cli(["validate", "--config", "config.yaml", "--trainer.logger", "false",
                      "--ckpt_path", str(tmp_path / "unsafe.ckpt")], workdir)
    assert result.returncode == 2  # refused before the model and the data are built, in one line
    assert "holds a Python object (argparse.Namespace) that a weights_only load refuses" in result.stderr
    assert "Traceback" not in result.stderr
