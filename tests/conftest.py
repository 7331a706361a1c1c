"""Test-wide settings: offline W&B, deterministic seeds, no stray network use."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> None:
    """The suite's tensors are small: on 2 cores, intra-op threads only add barrier waits, and
    DataLoader workers and DDP processes already use the cores."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_fit(tmp_path_factory: pytest.TempPathFactory):
    """``helpers.cli.fit_tiny_run`` once per session, started in the background (``.result()``
    waits for the ``FitRun``) so that CLI runs which do not need it go beside it. The CLI and
    security tests read it; the ones that write (resume) work on a copy."""
    from helpers.cli import fit_tiny_run, in_background

    run = in_background(fit_tiny_run, tmp_path_factory.mktemp("tiny_fit"))
    yield run
    run.exception()  # finished before the session's folders are cleaned up


@pytest.fixture
def tiny_cli_config(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``helpers.cli.TINY_CONFIG`` written as ``tiny.yaml`` in ``tmp_path``, made the working folder,
    for an in-process ``lightning_rpn.cli.main`` (which reads ``sys.argv`` only for the program name)."""
    import sys

    import yaml
    from helpers.cli import TINY_CONFIG

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-rpn"])
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    return "tiny.yaml"
