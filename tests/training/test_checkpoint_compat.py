"""A checkpoint written by an earlier lightning-rpn still loads and proposes the same boxes.

``tests/fixtures/rpn_module_v0.ckpt`` was written by ``lightning-rpn fit`` at commit a094e6e (before
the package moved into layer folders and the defaults were declared once): ``tiny_fpn``, 60
AdamW steps on 64x64 synthetic shapes, with ``RecallTable`` and ``ProposalWriter`` callbacks
named by their old dotted paths. To keep it small (1 MB) its weights were stored as float16
and its optimizer state dropped (``load_from_checkpoint`` reads neither).
``rpn_module_v0_proposals.pt`` holds that commit's ``predict_images`` output on
:func:`fixed_image`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
import yaml

from lightning_rpn import RPNDataModule, RPNModule

DATA = Path(__file__).resolve().parents[1] / "fixtures"
CHECKPOINT = DATA / "rpn_module_v0.ckpt"
CONFIG_KEY = "lightning_rpn_config"  # the entry the CLI wrote the resolved config to


def fixed_image() -> np.ndarray:
    image = np.full((80, 96, 3), 30, dtype=np.uint8)
    image[10:40, 12:50] = (220, 40, 40)
    image[45:75, 55:90] = (40, 200, 60)
    image[20:35, 60:80] = (250, 250, 250)
    return image


def test_old_checkpoint_loads_with_weights_only_and_proposes_the_stored_boxes() -> None:
    model = RPNModule.load_from_checkpoint(CHECKPOINT, map_location="cpu", weights_only=True)
    assert model.hparams.box_loss == "l1" and model.hparams.post_nms_top_n_test == 50
    assert model.resize_policy is not None and model.resize_policy.fixed_size == (64, 64)
    expected = torch.load(DATA / "rpn_module_v0_proposals.pt", map_location="cpu", weights_only=True)
    got = model.predict_images(fixed_image())
    assert got["boxes"].shape == expected["boxes"].shape == (50, 4)
    torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-5, rtol=0)
    # the best ten are well separated in score: same order; the rest the same set of boxes
    torch.testing.assert_close(got["boxes"][:10], expected["boxes"][:10], atol=1e-3, rtol=0)
    distance = torch.cdist(expected["boxes"], got["boxes"], p=float("inf"))
    assert bool((distance.min(dim=1).values < 1e-3).all())


def test_old_checkpoint_config_names_importable_classes_and_builds_the_data_module() -> None:
    checkpoint = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    config = yaml.safe_load(checkpoint[CONFIG_KEY])
    paths = [callback["class_path"] for callback in config["trainer"]["callbacks"]]
    assert "lightning_rpn.callbacks.RecallTable" in paths and "lightning_rpn.proposal_io.ProposalWriter" in paths
    for path in paths:
        module, _, name = path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), path
    hparams = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    datamodule = RPNDataModule(**hparams)
    assert tuple(datamodule.hparams.fixed_size) == (64, 64)
