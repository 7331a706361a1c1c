"""Proposal and optimiser settings out of range are refused when the config is built, naming the
setting: each was accepted before and trained or predicted silently wrong (``score_thresh`` 1.5 or
NaN and ``min_size`` NaN give no proposal; a negative weight decay grows the weights, momentum 1.5
diverges, ``gamma`` 0 stops training at the first milestone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_rpn.core.config import OptimConfig, ProposalConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAN = float("nan")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"score_thresh": 1.5}, r"ProposalConfig: score_thresh must be a number in \[0, 1\), got 1.5"),
        ({"score_thresh": 1.0}, r"score_thresh must be a number in \[0, 1\)"),
        ({"score_thresh": -0.1}, r"score_thresh must be a number in \[0, 1\)"),
        ({"score_thresh": NAN}, r"score_thresh must be a number in \[0, 1\), got nan"),
        ({"min_size": NAN}, r"ProposalConfig: min_size must be a finite number >= 0, got nan"),
        ({"min_size": float("inf")}, r"min_size must be a finite number >= 0"),
        ({"min_size": -1.0}, r"min_size must be a finite number >= 0"),
    ],
)
def test_proposal_settings_out_of_range_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProposalConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"weight_decay": -0.1}, r"model.weight_decay must be a finite number >= 0, got -0.1"),
        ({"weight_decay": NAN}, r"model.weight_decay must be a finite number >= 0"),
        ({"norm_weight_decay": -1.0}, r"model.norm_weight_decay must be a finite number >= 0, got -1.0"),
        ({"momentum": 1.5}, r"model.momentum must be a number in \[0, 1\), got 1.5"),
        ({"momentum": 1.0}, r"model.momentum must be a number in \[0, 1\)"),
        ({"momentum": -0.1}, r"model.momentum must be a number in \[0, 1\)"),
        ({"gamma": 0.0}, r"model.gamma must be a number in \(0, 1\], got 0.0"),
        ({"gamma": 10.0}, r"model.gamma must be a number in \(0, 1\], got 10.0"),
        ({"warmup_factor": -1.0}, r"model.warmup_factor must be a number in \[0, 1\], got -1.0"),
        ({"warmup_factor": NAN}, r"model.warmup_factor must be a number in \[0, 1\]"),
        ({"min_lr_factor": 3.0}, r"model.min_lr_factor must be a number in \[0, 1\], got 3.0"),
        ({"momentum": True}, r"model.momentum must be a number in \[0, 1\), got True"),
    ],
)
def test_optimiser_settings_out_of_range_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimConfig(**settings)


def test_the_ends_of_each_range_and_numpy_numbers_are_accepted() -> None:
    ProposalConfig(score_thresh=0.0, min_size=0.0)
    ProposalConfig(score_thresh=0.99, min_size=16)
    ProposalConfig(score_thresh=np.float32(0.5), min_size=np.float64(2.0))
    OptimConfig(weight_decay=0.0, norm_weight_decay=0, momentum=0.0, gamma=1.0, warmup_factor=0.0, min_lr_factor=0.0)
    OptimConfig(momentum=0.99, gamma=1e-3, warmup_factor=1.0, min_lr_factor=1.0, weight_decay=np.float32(5e-4))


def test_every_shipped_config_is_in_range() -> None:
    names = {*ProposalConfig.__dataclass_fields__, *OptimConfig.__dataclass_fields__}
    for path in sorted(CONFIGS.glob("*.yaml")):
        model = yaml.safe_load(path.read_text()).get("model") or {}
        given = {name: value for name, value in model.items() if name in names}
        ProposalConfig(**{k: v for k, v in given.items() if k in ProposalConfig.__dataclass_fields__})
        OptimConfig(**{k: v for k, v in given.items() if k in OptimConfig.__dataclass_fields__})
