"""The resolved config a command writes never replaces a file the user made or the training's own:
not the ``--config`` file given, not ``config.yaml`` for an evaluation, nothing for a refused run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from helpers.cli import TINY_CONFIG, assert_ok, run_cli

pytestmark = pytest.mark.slow  # end to end through the real command


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_config_in_the_run_folder_given_with_config_is_not_written_over(tmp_path: Path) -> None:
    # logger false and no default_root_dir: the run folder is the working folder, where config.yaml
    # was the user's own file; the resolved config replaced it (comments gone, the flags written in)
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(logger=False, default_root_dir=None)
    given = "# my settings\n" + yaml.safe_dump(config)
    (tmp_path / "config.yaml").write_text(given)
    result = run_cli(["fit", "--config", "config.yaml", "--trainer.max_steps", "1"], tmp_path)
    assert_ok(result)
    assert (tmp_path / "config.yaml").read_text() == given
    resolved = yaml.safe_load((tmp_path / "config-fit-resolved.yaml").read_text())
    assert resolved["trainer"]["max_steps"] == 1
    assert "the resolved config is written to" in result.stderr and "not over the config file you gave" in result.stderr


def test_a_config_given_before_the_subcommand_is_not_written_over_either(tmp_path: Path) -> None:
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(logger=False, default_root_dir=None, max_steps=1)
    given = "# my settings, one section per subcommand\n" + yaml.safe_dump({"fit": config})
    (tmp_path / "config.yaml").write_text(given)
    assert_ok(run_cli(["--config", "config.yaml", "fit"], tmp_path))
    assert (tmp_path / "config.yaml").read_text() == given
    assert yaml.safe_load((tmp_path / "config-fit-resolved.yaml").read_text())["trainer"]["max_steps"] == 1


def test_a_refused_resume_leaves_the_runs_config_and_wandb_run_as_they_were(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    assert_ok(run_cli(["fit", "--config", "config.yaml"], tmp_path))
    before = _files(tmp_path / "run")
    refused = run_cli(["fit", "--config", "config.yaml", "--ckpt_path", "last", "--model.optimizer", "sgd",
                       "--trainer.max_steps", "4"], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "lightning-rpn: RPNModule: fit cannot resume the checkpoint" in refused.stderr
    # config.yaml held the refused optimizer, and a W&B segment of the run was opened and closed
    assert _files(tmp_path / "run").keys() == before.keys()
    assert (tmp_path / "run/config.yaml").read_bytes() == before["config.yaml"]


def test_an_evaluation_writes_its_own_config_beside_the_trainings(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    assert_ok(run_cli(["fit", "--config", "config.yaml", "--trainer.logger", "false"], tmp_path))
    trained = (tmp_path / "run/config.yaml").read_bytes()
    for command in ("validate", "predict"):
        assert_ok(run_cli([command, "--config", "config.yaml", "--ckpt_path", "last", "--trainer.logger", "false"],
                          tmp_path))
        written = yaml.safe_load((tmp_path / f"run/config-{command}.yaml").read_text())
        assert written["ckpt_path"] == str(tmp_path / "run/checkpoints/last.ckpt")
    # predict's config (return_predictions) is not one fit can read back
    assert (tmp_path / "run/config.yaml").read_bytes() == trained
    # an evaluation with no batch (Lightning skips its start hooks) writes its config too
    (tmp_path / "run/config-validate.yaml").unlink()
    assert_ok(run_cli(["validate", "--config", "config.yaml", "--ckpt_path", "last", "--trainer.logger", "false",
                       "--trainer.limit_val_batches", "0"], tmp_path))
    assert yaml.safe_load((tmp_path / "run/config-validate.yaml").read_text())["trainer"]["limit_val_batches"] == 0
