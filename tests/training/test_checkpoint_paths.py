"""What ``--ckpt_path`` loads and what the run then writes.

A ``fit`` from a checkpoint that is not the latest of its run (``best.ckpt``, a copy) starts a new run
whose files get a version suffix: Lightning restores the callbacks' file names from any checkpoint,
and the fit replaced that run's newer ``last.ckpt``. A file Lightning cannot load is one line naming
what it is (exit 2), not a traceback after the data were set up. ``fit --ckpt_path best`` / ``hpc``
are found on disk or refused in one line. A checkpoint that has already reached the budget says so
before training. A ``val_check_interval`` beyond an epoch is one line (exit 2).
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers.cli import TINY_CONFIG, assert_ok, run_cli, start_cli
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rpn.core.config import SettingError
from lightning_rpn.training.last_checkpoint import LastCheckpoint
from lightning_rpn.training.run_files import (
    continued_folders,
    evaluation_checkpoint,
    read_checkpoint,
    warn_if_budget_reached,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rpn_module_v0.ckpt"
"""A checkpoint of 30 epochs, 60 steps."""


class Pickled:
    """An object a ``weights_only`` load refuses."""


def _zip_with(path: Path, *names: str) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")


def _truncated(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "pytorch-lightning_version": "2.6.0"}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNREADABLE = {
    "empty": (lambda p: p.write_bytes(b""), "an empty file (0 bytes"),
    "text": (lambda p: p.write_text("garbage\n"), "not a PyTorch checkpoint (it starts with b'garb'"),
    "truncated": (_truncated, "truncated or corrupt: a zip archive without its end"),
    "export": (lambda p: _zip_with(p, "rpn/archive_format", "rpn/models/model.json"),
               "a torch.export program (as export_proposal_network writes), not a Lightning checkpoint: load it in "
               "Python with lightning_rpn.load_proposal_network(path)"),
    "state_dict": (lambda p: torch.save({"head.weight": torch.zeros(2)}, p),
                   "a bare state_dict (1 tensors, as torch.save(model.state_dict()) writes"),
    "other dict": (lambda p: torch.save({"model": 1, "step": 2}, p),
                   "not a Lightning checkpoint (a dict with the keys model, step; one holds 'state_dict'"),
    "object": (lambda p: torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "x": Pickled()}, p),
               "Pickled) that a weights_only load refuses, as it could run code; pass --weights_only false only"),
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_a_file_lightning_cannot_load_is_named_in_one_line(tmp_path: Path, kind: str) -> None:
    write, expected = UNREADABLE[kind]
    path = tmp_path / "x.ckpt"
    write(path)
    with pytest.raises(ValueError) as refused:
        read_checkpoint(path, "validate")
    message = str(refused.value)
    assert message.startswith(f"lightning-rpn validate --ckpt_path {path}: ") and "\n" not in message
    assert expected in message


def test_checkpoints_lightning_loads_are_read_lazily(tmp_path: Path) -> None:
    assert read_checkpoint(FIXTURE, "fit")["global_step"] == 60
    trusted = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "x": Pickled()}, trusted)
    assert isinstance(read_checkpoint(trusted, "fit", weights_only=False)["x"], Pickled)  # --weights_only false
    legacy = tmp_path / "legacy.ckpt"  # torch.save's format before the zip archive (no mmap there)
    torch.save({"state_dict": {}, "pytorch-lightning_version": "1.0"}, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy, "fit")["pytorch-lightning_version"] == "1.0"


def _states(folder: Path) -> dict:
    """The callback states of a checkpoint written by the shipped configs' callbacks in ``folder``."""
    return {"callbacks": {
        "ModelCheckpoint{'monitor': 'val/AR@100'}": {
            "monitor": "val/AR@100", "dirpath": str(folder), "best_model_path": str(folder / "best.ckpt"),
            "last_model_path": ""},
        "LastCheckpoint{'monitor': None}": {
            "monitor": None, "dirpath": str(folder), "best_model_path": str(folder / "last.ckpt"),
            "last_model_path": ""},
    }}


def _trainer_writing_to(folder: Path) -> SimpleNamespace:
    return SimpleNamespace(checkpoint_callbacks=[
        ModelCheckpoint(dirpath=folder, filename="best", monitor="val/AR@100", mode="max"), LastCheckpoint(folder)])


def test_only_the_latest_file_of_a_run_continues_it(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    checkpoint, trainer = _states(folder), _trainer_writing_to(folder)
    assert continued_folders(trainer, checkpoint, folder / "last.ckpt") == {folder}
    (tmp_path / "link").symlink_to(tmp_path / "run")
    assert continued_folders(trainer, checkpoint, tmp_path / "link" / "checkpoints" / "last.ckpt") == {folder}
    assert continued_folders(trainer, checkpoint, tmp_path / "run" / "hpc_ckpt_2.ckpt") == {tmp_path / "run", folder}
    for other in (folder / "best.ckpt", folder / "last-copy.ckpt", tmp_path / "backup" / "last.ckpt"):
        assert continued_folders(trainer, checkpoint, other) == set(), other
    assert continued_folders(trainer, {}, folder / "last.ckpt") == set()  # no record of its run
    moved = tmp_path / "moved" / "checkpoints"  # the run's folder copied: its checkpoints record the old one
    assert continued_folders(_trainer_writing_to(moved), checkpoint, moved / "last.ckpt") == {moved, folder}


def test_hpc_and_fit_keywords_are_found_on_disk_or_refused(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    trainer = _trainer_writing_to(folder)
    trainer.default_root_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"^lightning-rpn fit --ckpt_path hpc: no hpc_ckpt_\*\.ckpt .* in "):
        evaluation_checkpoint(trainer, "hpc", "fit")
    for number in (2, 10):
        (tmp_path / f"hpc_ckpt_{number}.ckpt").write_bytes(b"")
    assert evaluation_checkpoint(trainer, "hpc", "fit") == str(tmp_path / "hpc_ckpt_10.ckpt")
    assert evaluation_checkpoint(trainer, "last", "fit") == "last"  # none yet: a fresh start
    with pytest.raises(ValueError, match=r"fit --ckpt_path best: no best\*\.ckpt in .*; pass a checkpoint path "
                                         r"\(--ckpt_path last resumes the latest run\)"):
        evaluation_checkpoint(trainer, "best", "fit")
    folder.mkdir()
    (folder / "best.ckpt").write_bytes(b"")
    assert evaluation_checkpoint(trainer, "best", "fit") == str(folder / "best.ckpt")


@pytest.mark.parametrize(("limits", "expected"), [
    ({"max_epochs": 30, "max_steps": 100}, "has already trained 30 epoch(s), 60 step(s): max_epochs=30 reached, so "
     "this fit trains nothing (it validates those weights and ends); to train on, raise --trainer.max_epochs "
     "(Lightning stops at the first limit reached; max_steps=100 is not)"),
    ({"max_steps": 50}, "60 step(s): max_steps=50 reached, so this fit trains nothing"),
    ({"max_epochs": 31}, None),
    ({"max_epochs": 40, "max_steps": 61}, None),
])
def test_a_budget_the_checkpoint_has_reached_is_said_before_training(
    capsys: pytest.CaptureFixture, limits: dict, expected: str | None
) -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **limits)
    warn_if_budget_reached(trainer, read_checkpoint(FIXTURE, "fit"), "x.ckpt")
    err = capsys.readouterr().err
    if expected is None:
        assert err == ""
    else:
        assert err.startswith("lightning-rpn fit: x.ckpt ") and expected in err and err.count("\n") == 1


def test_a_max_epochs_below_the_checkpoints_epochs_is_refused_before_training() -> None:
    # Lightning refused it with a traceback after the data were set up, below our line promising a clean end
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=29)
    with pytest.raises(SettingError, match=r"^fit: x\.ckpt has already trained 30 epoch\(s\), more than "
                                           r"this fit's max_epochs=29, which Lightning cannot resume; to train on, "
                                           r"raise --trainer.max_epochs above 30"):
        warn_if_budget_reached(trainer, read_checkpoint(FIXTURE, "fit"), "x.ckpt")
    quick = pl.Trainer(logger=False, enable_progress_bar=False, fast_dev_run=True)
    with pytest.raises(SettingError, match=r"max_epochs=1 \(--trainer.fast_dev_run runs one\)"):
        warn_if_budget_reached(quick, read_checkpoint(FIXTURE, "fit"), "x.ckpt")


def _steps(folder: Path) -> dict[str, int]:
    return {p.name: torch.load(p, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            for p in sorted(folder.glob("*.ckpt"))}


@pytest.mark.slow
def test_a_fit_from_best_leaves_its_runs_files_and_best_is_found_on_disk(tmp_path: Path) -> None:
    """best stays at epoch 0 (the monitored epoch, mode min); the run goes on to step 4. LastCheckpoint
    saves first, so best.ckpt records last.ckpt as the run's latest file, which a fit from it overwrote."""
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(logger=False, max_steps=4, callbacks=[
        {"class_path": "lightning_rpn.training.callbacks.LastCheckpoint", "init_args": {"dirpath": "run/checkpoints"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "run/checkpoints", "filename": "best", "monitor": "epoch", "mode": "min"}},
    ])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    fit = ["fit", "--config", "config.yaml"]
    folder = tmp_path / "run" / "checkpoints"
    assert_ok(run_cli(fit, tmp_path))
    assert _steps(folder) == {"best.ckpt": 2, "last.ckpt": 4}
    first = {p.name: p.read_bytes() for p in folder.glob("*.ckpt")}

    branch = run_cli([*fit, "--ckpt_path", "run/checkpoints/best.ckpt", "--trainer.max_steps", "6"], tmp_path)
    assert_ok(branch)
    assert _steps(folder) == {"best-v1.ckpt": 4, "best.ckpt": 2, "last-v1.ckpt": 6, "last.ckpt": 4}
    assert all(first[name] == (folder / name).read_bytes() for name in first)  # the first run's files untouched
    said = " ".join(branch.stderr.split())
    assert "fit from run/checkpoints/best.ckpt, which is not the latest checkpoint of the run that saved it" in said
    assert "holds checkpoints of an earlier run (best.ckpt, last.ckpt); they stay" in said

    best = run_cli([*fit, "--ckpt_path", "best", "--trainer.max_steps", "6"], tmp_path)
    assert_ok(best)
    said = " ".join(best.stderr.split())
    assert f"lightning-rpn: --ckpt_path best is {folder / 'best-v1.ckpt'}" in said
    assert "not configured to save the best model" not in said and "Traceback" not in said
    assert _steps(folder)["last-v2.ckpt"] == 6 and _steps(folder)["last-v1.ckpt"] == 6

    done = run_cli([*fit, "--ckpt_path", "last", "--trainer.max_steps", "6"], tmp_path)
    assert_ok(done)
    assert (f"lightning-rpn fit: {folder / 'last-v2.ckpt'} has already trained 3 epoch(s), 6 step(s): max_steps=6 "
            "reached, so this fit trains nothing") in " ".join(done.stderr.split())


@pytest.mark.slow
def test_a_max_epochs_refusal_leaves_no_new_wandb_run_or_file(tmp_path: Path) -> None:
    """Refused before W&B starts: the first run's W&B folder and checkpoints are all the run folder holds."""
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"]["max_steps"] = 4  # 2 batches an epoch: 2 epochs
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    fit = ["fit", "--config", "config.yaml"]
    assert_ok(run_cli(fit, tmp_path))
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*"))
    refused = run_cli([*fit, "--ckpt_path", "last", "--trainer.max_epochs", "1"], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "has already trained 2 epoch(s), more than this fit's max_epochs=1" in " ".join(refused.stderr.split())
    assert "lightning-rpn: lightning-rpn" not in refused.stderr  # the prefix once
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*")) == before


@pytest.mark.slow
def test_unreadable_checkpoints_hpc_and_refused_trainer_settings_are_one_line(tmp_path: Path) -> None:
    _truncated(tmp_path / "cut.ckpt")
    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "weights.pt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY_CONFIG, "trainer": {
        **TINY_CONFIG["trainer"], "logger": False, "callbacks": [], "max_steps": 4}}))
    runs = {
        "truncated": (["fit", "--config", "shapes", "--ckpt_path", "cut.ckpt"],
                      "lightning-rpn fit --ckpt_path cut.ckpt: truncated or corrupt: a zip archive without its end"),
        "state_dict": (["predict", "--ckpt_path", "weights.pt", "--data.predict_images", "."],
                       "lightning-rpn predict --ckpt_path weights.pt: a bare state_dict (1 tensors"),
        "hpc": (["fit", "--config", "config.yaml", "--ckpt_path", "hpc"],
                f"lightning-rpn fit --ckpt_path hpc: no hpc_ckpt_*.ckpt (Lightning's saves when SLURM requeues a "
                f"job) in run; pass a checkpoint path, or --ckpt_path last"),
        "val_check_interval": (["fit", "--config", "config.yaml", "--trainer.val_check_interval", "10"],
                               "lightning-rpn: Lightning refused the trainer settings when fit set up its data: "
                               "`val_check_interval` (10) must be less than or equal to the number of the training "
                               "batches (2)."),
        # raised below the loop's setup_data (in the data connector), from configure_optimizers: a traceback
        "limit_train_batches": (["fit", "--config", "config.yaml", "--trainer.limit_train_batches", "0.1"],
                                "lightning-rpn: Lightning refused the trainer settings when fit set up its data: You "
                                "requested to check 0.1 of the `train_dataloader` but 0.1 * 2 < 1."),
    }
    started = {name: start_cli([*args, "--trainer.logger", "false"], tmp_path) for name, (args, _) in runs.items()}
    wrong = {}
    for name, (_, expected) in runs.items():
        result = started[name].result()
        if result.returncode != 2 or "Traceback" in result.stderr or expected not in " ".join(result.stderr.split()):
            wrong[name] = f"exit {result.returncode}: {result.stderr[-1500:]}"
    assert not wrong, "\n".join(f"{name}: {text}" for name, text in wrong.items())


def test_best_of_a_run_that_never_validated_points_to_last(tmp_path: Path) -> None:
    # `fit --trainer.max_steps 10 && test --ckpt_path best`: the fit validated nothing, so no best;
    # the error said "train first (fit)" right after one
    folder = tmp_path / "checkpoints"
    trainer = _trainer_writing_to(folder)
    with pytest.raises(ValueError, match=r"test --ckpt_path best: no best\*\.ckpt in .*; train first \(fit\)"):
        evaluation_checkpoint(trainer, "best", "test")
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no best\*\.ckpt in .*; a best checkpoint is saved by a validation during "
                                         r"fit, which the run has not had; --ckpt_path last takes its latest weights"):
        evaluation_checkpoint(trainer, "best", "test")
