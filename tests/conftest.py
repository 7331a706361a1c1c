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
