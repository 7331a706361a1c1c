"""Tiled training under DDP: two CPU processes (gloo) through ``lightning-rpn fit`` with ``data.tiles``.

Each rank's ``WindowSampler`` takes every second window of the epoch, so the ranks draw disjoint
windows whose union is the one-process epoch of the same ``data.seed`` (its loader, built here
from the same config), epoch after epoch (``set_epoch``); the run ends within its time limit.
Resumed on one process from a checkpoint the two saved inside an epoch, the run trains the
windows of that epoch the two had not trained, each once.
"""

from __future__ import annotations

import pytest

import copy
import json
import os
from pathlib import Path

import yaml

from lightning_rpn.training.datamodule import RPNDataModule
from helpers.cli import PROBES, TINY_CONFIG, assert_ok, run_cli
from helpers.cli_probes import RecordImageIds

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

PER_EPOCH, BATCH, EPOCHS = 8, 2, 2  # two steps per epoch and rank
DATA = {"dataset": "scenes", "scene_options": {"size": 160, "density": 300.0, "max_object_size": 30},
        "synthetic_train_images": 3, "synthetic_val_images": 1, "seed": 5, "batch_size": BATCH, "num_workers": 0,
        "resize": "none", "train_transforms": [],
        "tiles": {"size": 64, "per_epoch": PER_EPOCH, "box_probability": 0.5}}


def _epoch_windows() -> list[list[str]]:
    """The image ids ("scene@x0,y0,x1,y1") of each epoch's windows in one process, in order."""
    data = RPNDataModule(**copy.deepcopy(DATA))  # the same data config in one process
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.sampler.num_replicas == 1
    windows = []
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        windows.append([image_id for batch in loader for image_id in batch.image_ids])
    return windows


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Two processes, ``EPOCHS`` epochs, a checkpoint after every step (``ckpts/``)."""
    tmp_path = tmp_path_factory.mktemp("ddp_tiles")
    config = copy.deepcopy(TINY_CONFIG)
    config["trainer"].update(max_steps=EPOCHS * PER_EPOCH // (2 * BATCH), limit_val_batches=0, logger=False, callbacks=[
        {"class_path": "cli_probes.RecordImageIds", "init_args": {"prefix": "seen"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpts", "every_n_train_steps": 1, "save_top_k": -1}}])
    config["data"] = copy.deepcopy(DATA)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = {"PYTHONPATH": os.pathsep.join([PROBES, os.environ.get("PYTHONPATH", "")])}
    assert_ok(run_cli(["fit", "--config", "config.yaml", *ddp], tmp_path, timeout=120, env=env))  # no hang
    return tmp_path, [json.loads((tmp_path / f"seen.rank{rank}.json").read_text()) for rank in (0, 1)]


def test_ddp_ranks_draw_disjoint_windows_whose_union_is_the_single_process_epoch(ddp_run) -> None:
    _, records = ddp_run
    assert [r["world_size"] for r in records] == [2, 2] and [r["rank"] for r in records] == [0, 1]
    for epoch, single in enumerate(_epoch_windows()):
        seen = [[i for e, ids in r["steps"] if e == epoch for i in ids] for r in records]
        assert [len(s) for s in seen] == [PER_EPOCH // 2] * 2
        assert seen[0] == single[0::2] and seen[1] == single[1::2], (epoch, seen, single)
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(single)
        if epoch:
            assert single != previous, "a new epoch draws new windows"
        previous = single


def test_a_ddp_checkpoint_resumed_on_one_process_trains_the_epochs_other_windows_once(ddp_run) -> None:
    """Saved after one step of two processes (windows 0-3 of 8), resumed on one (in this process):
    windows 4-7 in two batches, then the whole next epoch (the old count, one batch of two
    windows done, trained windows 2-3 again)."""
    from lightning_rpn.training.module import RPNModule
    from helpers.model import quiet_trainer

    tmp_path, records = ddp_run
    keys = RecordImageIds(str(tmp_path / "resumed"))
    trainer = quiet_trainer(tmp_path, max_steps=1 + 2 + PER_EPOCH // BATCH, limit_val_batches=0, callbacks=[keys])
    with pytest.warns(UserWarning, match="epoch 0 was resumed with 4 of its 8 windows trained"):
        trainer.fit(RPNModule(**TINY_CONFIG["model"]), RPNDataModule(**copy.deepcopy(DATA)),
                    ckpt_path=str(tmp_path / "ckpts" / "epoch=0-step=1.ckpt"))
    before = [i for r in records for i in r["steps"][0][1]]  # each rank's first batch
    epoch0, epoch1 = _epoch_windows()
    assert sorted(before + [i for e, ids in keys.steps if e == 0 for i in ids]) == sorted(epoch0)
    assert [i for e, ids in keys.steps if e == 1 for i in ids] == epoch1
