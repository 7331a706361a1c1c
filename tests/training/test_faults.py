"""Fault tolerance: atomic checkpoints, resume after kill -9 (non-finite batches: test_nonfinite.py)."""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import fsspec.implementations.local
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from helpers.cli import COMMAND, PROBES, TINY_CONFIG, assert_ok, cli_environment, run_cli
from helpers.model import quiet_trainer, tiny_model, training_batches


def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch) -> None:
    """Lightning writes checkpoints to a temporary file and moves it in place on success."""
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, DataLoader(training_batches(model)[:1], batch_size=None))
    last = tmp_path / "last.ckpt"
    trainer.save_checkpoint(last)
    before = last.read_bytes()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)

    real_write = fsspec.implementations.local.LocalFileOpener.write

    def crash_halfway(self, data, *args, **kwargs):
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError("disk full (simulated crash during the checkpoint write)")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", crash_halfway)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save_checkpoint(last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt") == ["last.ckpt"]
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 1


# ---------------------------------------------------------------- kill -9 and resume (real CLI)
MAX_STEPS = 8  # 16 training images, batch 4: two epochs of four steps


def _fault_config(version: str) -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(
        max_steps=MAX_STEPS,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "run", "name": "csv", "version": version}},
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": "run/checkpoints", "every_n_train_steps": 2,
                                  "save_top_k": -1, "save_last": True,
                                  "enable_version_counter": False}}],
    )
    config["data"]["synthetic_train_images"] = 16
    return config


def _final_recall(workdir: Path, version: str) -> float:
    with open(workdir / "run/csv" / version / "metrics.csv") as handle:
        values = [row["val/AR@100"] for row in csv.DictReader(handle) if row.get("val/AR@100")]
    return float(values[-1])


def _final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(workdir / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_from_last_and_matches(tmp_path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    for workdir, version in ((whole, "whole"), (broken, "killed")):
        workdir.mkdir()
        (workdir / "config.yaml").write_text(yaml.safe_dump(_fault_config(version)))
    # the killed run starts in the background while the uninterrupted one runs
    marker = broken / "paused"
    pause = ('[{"class_path": "cli_probes.PauseAtStep", "init_args": '
             f'{{"step": 3, "marker": "{marker}"}}}}]')
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([PROBES, os.environ.get("PYTHONPATH", "")])}
    victim = subprocess.Popen(
        [*COMMAND, "fit", "--config", "config.yaml", "--trainer.callbacks+", pause],
        cwd=broken, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert_ok(run_cli(["fit", "--config", "config.yaml"], whole))
        deadline = time.monotonic() + 120
        while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the run never reached step 3:\n{victim.communicate()[0][-3000:]}"
        os.kill(victim.pid, signal.SIGKILL)  # mid-epoch 0, after the step-2 checkpoint
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    killed_at = torch.load(broken / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert killed_at["global_step"] == 2 and killed_at["epoch"] == 0

    resumed = run_cli(["fit", "--config", "config.yaml", "--ckpt_path", "last",
                       "--trainer.logger.init_args.version", "resumed"], broken)
    assert_ok(resumed)
    assert torch.load(broken / "run/checkpoints/last.ckpt", map_location="cpu",
                      weights_only=True)["global_step"] == MAX_STEPS
    # the rest of the killed epoch comes in the uninterrupted run's order with its augmentations
    # (data.draws): the same weights, to the bit (until 2026-12-07 max |dw| ~0.13: a new order)
    expected, got = _final_weights(whole), _final_weights(broken)
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    assert _final_recall(broken, "resumed") == _final_recall(whole, "whole")
    assert any(not torch.equal(got[k], killed_at["state_dict"][k]) for k in got)  # it trained on


# ---------------------------------------------------------------- Ctrl-C and SIGTERM (real CLI)
@pytest.mark.slow
@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 1)])
def test_an_interrupted_fit_exits_with_the_signal_and_says_what_last_holds(tmp_path, signum, workers) -> None:
    """Ctrl-C / SLURM's scancel (the signal to the process group, DataLoader workers included)
    after the first progress line: exit 128 + signal (not 0 or 1), one line naming the step,
    last.ckpt and `--ckpt_path last`, last.ckpt at that step, no traceback."""
    if signal.getsignal(signum) == signal.SIG_IGN:  # a background job of a shell: the CLI inherits it
        pytest.skip(f"{signal.Signals(signum).name} is ignored in this process, so in the CLI started from it")
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(max_steps=10_000, enable_progress_bar=True, callbacks=[
        {"class_path": "lightning_rpn.training.callbacks.LastCheckpoint", "init_args": {"dirpath": "run/checkpoints"}}])
    config["data"]["num_workers"] = workers
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen([*COMMAND, "fit", "--config", "config.yaml"], cwd=tmp_path, env=cli_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # reading the output waits for the process: a signal that does not stop it must fail the test, not hang it
    watchdog = threading.Timer(180, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("train step 1/"):
                os.killpg(process.pid, signum)
                break
        output = "".join(lines) + process.stdout.read()
        assert process.wait(timeout=60) == 128 + signum, output
    finally:
        watchdog.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    last = (tmp_path / "run" / "checkpoints" / "last.ckpt").resolve()
    (report,) = [line for line in output.splitlines() if line.startswith("lightning-rpn: fit interrupted")]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert step >= 1 and report == (f"lightning-rpn: fit interrupted ({name}) at step {step}; {last} holds step "
                                    f"{step}: continue with `--ckpt_path last`")
    assert "Traceback" not in output
