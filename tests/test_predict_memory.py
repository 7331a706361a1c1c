"""``lightning-rpn predict`` keeps no predictions in memory when a writer streams them to disk, and the
checkpoint-only predict prints neither Lightning's missing-callbacks warning nor "No seed found";
``fit`` resuming without the checkpoint's callbacks keeps that warning."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lightning_rpn.cli import RPNLightningCLI
from lightning_rpn.evaluation.proposal_files import read_detectron2_proposals

from helpers.builders import save_image
from helpers.cli import TINY_CONFIG, assert_ok, run_cli

MISSING_CALLBACKS = "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided"
NO_SEED = "No seed found"
_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _without_seed_variables() -> dict[str, str]:
    """Take Lightning's seed variables out of the environment (a seeded run leaves them; with
    ``PL_GLOBAL_SEED`` set, Lightning seeds from it and says nothing); what was there."""
    return {name: os.environ.pop(name) for name in _SEED_VARIABLES if name in os.environ}


def _restore_seed_variables(saved: dict[str, str]) -> None:
    for name in _SEED_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_seed_variables() -> Iterator[None]:
    saved = _without_seed_variables()
    yield
    _restore_seed_variables(saved)


def _config(root: Path, callbacks: list) -> dict:
    """``TINY_CONFIG`` under ``root``, no logger, no seed, the given callbacks."""
    config = copy.deepcopy(TINY_CONFIG)
    del config["seed_everything"]
    config["trainer"].update(logger=False, default_root_dir=str(root / "run"), callbacks=callbacks)
    return config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step fit whose ``last.ckpt`` holds the states of a monitored ``ModelCheckpoint`` and of
    ``LastCheckpoint``, as the shipped configs' checkpoints do."""
    root = tmp_path_factory.mktemp("fit")
    folder = str(root / "run/checkpoints")
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": folder, "filename": "best", "monitor": "val/AR@100", "mode": "max"}},
                 {"class_path": "lightning_rpn.training.callbacks.LastCheckpoint", "init_args": {"dirpath": folder}}]
    (root / "config.yaml").write_text(yaml.safe_dump(_config(root, callbacks)))
    saved = _without_seed_variables()
    try:
        RPNLightningCLI(args=["fit", "--config", str(root / "config.yaml")])
    finally:
        _restore_seed_variables(saved)
    return root / "run/checkpoints/last.ckpt"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i in range(3):
        save_image(tmp_path / "images" / f"{i}.png", 70, 90, seed=i)
    return tmp_path / "images"


def _predict(checkpoint: Path, images: Path, root: Path, *extra: str) -> tuple[RPNLightningCLI, list[str]]:
    """The checkpoint-only predict (batches of 2) in this process; the run and the messages of the warnings it raised."""
    args = ["predict", "--ckpt_path", str(checkpoint), "--data.predict_images", str(images), "--data.batch_size", "2",
            "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root), *extra]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = RPNLightningCLI(args=args)
        left = [f for f in warnings.filters if f[1] is not None and f[1].match(MISSING_CALLBACKS)]
        assert not left, "the run left its filter of the missing-callbacks warning behind"
    return cli, [str(w.message) for w in caught]


def test_predict_with_a_writer_keeps_no_predictions(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    cli, messages = _predict(checkpoint, images, tmp_path / "out")
    loop = cli.trainer.predict_loop
    # Lightning's default (return_predictions None: True on one process) kept every image's proposals
    assert loop.return_predictions is False
    assert loop.predictions == []
    records = read_detectron2_proposals(tmp_path / "out/proposals/proposals_detectron2-last.pkl")
    assert len(records) == 3 and all(len(r["boxes"]) for r in records)
    assert not any(MISSING_CALLBACKS in m or NO_SEED in m for m in messages), messages


def test_predict_keeps_the_predictions_when_asked(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    cli, _ = _predict(checkpoint, images, tmp_path / "out", "--return_predictions", "true")
    loop = cli.trainer.predict_loop
    assert loop.return_predictions is True
    assert [len(batch) for batch in loop.predictions] == [2, 1]


def test_fit_resumed_without_the_checkpoints_callbacks_still_warns(checkpoint: Path, tmp_path: Path) -> None:
    # no callbacks in the config: Lightning's own ModelCheckpoint is not the monitored one the checkpoint holds
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_config(tmp_path, [])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = RPNLightningCLI(args=["fit", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(checkpoint),
                                    "--trainer.max_steps", "3"])
    messages = [str(w.message) for w in caught]
    assert cli.trainer.global_step == 3
    assert any(MISSING_CALLBACKS in m for m in messages), messages
    # a config without a seed is seeded 0, as Lightning's default did, without its "No seed found" warning
    assert cli.config["fit"]["seed_everything"] == 0 and os.environ["PL_GLOBAL_SEED"] == "0"
    assert not any(NO_SEED in m for m in messages), messages


@pytest.mark.slow
def test_checkpoint_only_predict_prints_neither_misleading_line(checkpoint: Path, images: Path, tmp_path: Path) -> None:
    result = run_cli(["predict", "--ckpt_path", str(checkpoint), "--data.predict_images", str(images),
                      "--trainer.logger", "false", "--trainer.accelerator", "cpu"], tmp_path)
    assert_ok(result)
    output = result.stdout + result.stderr
    assert MISSING_CALLBACKS not in output and NO_SEED not in output, output[-3000:]
    assert "Seed set to 0" in output  # seeded, as every run is
    assert (tmp_path / "proposals/proposals_detectron2-last.pkl").is_file()
