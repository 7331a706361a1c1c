"""A ``fit`` resumed in a moved run folder goes on with that run's files (``moved_run``).

Lightning's ``ModelCheckpoint.load_state_dict`` dropped the record of the best files and scores
of a checkpoint saved in another folder: the resumed run wrote ``best-v1.ckpt`` / ``last-v1.ckpt``
beside its own files and took its next validation as the best, whatever its score.
"""

from __future__ import annotations

import shutil
import warnings
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from lightning_rpn.training.last_checkpoint import LastCheckpoint
from lightning_rpn.training.moved_run import follow_moved_folders, follow_moved_run

from helpers.model import quiet_trainer, tiny_model, training_batches


def _best(folder: Path, save_top_k: int = 1) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, filename="best", monitor="score", mode="max", save_top_k=save_top_k)


def _saved_state(callback: ModelCheckpoint, scores: dict[str, float]) -> dict:
    """``callback``'s state after saving files ``scores`` (name: score) in its folder, as Lightning records it."""
    folder = Path(callback.dirpath)
    callback.best_k_models = {str(folder / name): torch.tensor(score) for name, score in scores.items()}
    callback.best_model_path = max(callback.best_k_models, key=callback.best_k_models.get)
    callback.best_model_score = callback.best_k_models[callback.best_model_path]
    if callback.save_top_k == -1 or len(scores) == callback.save_top_k:
        callback.kth_best_model_path = min(callback.best_k_models, key=callback.best_k_models.get)
        callback.kth_value = callback.best_k_models[callback.kth_best_model_path]
    return deepcopy(callback.state_dict())


def _files(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"a checkpoint")


def _moved_checkpoint(old: Path, best: ModelCheckpoint, last: LastCheckpoint) -> dict:
    """A checkpoint saved in ``old`` with ``best.ckpt`` (score 0.7) and ``last.ckpt``."""
    return {"callbacks": {
        best.state_key: _saved_state(_best(old), {"best.ckpt": 0.7}),
        last.state_key: {**LastCheckpoint(dirpath=old).state_dict(), "best_model_path": str(old / "last.ckpt")},
    }}


def _trainer(fn: TrainerFn, callbacks: list, ckpt_path: Path) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(fn=fn), checkpoint_callbacks=callbacks, ckpt_path=str(ckpt_path))


# ---------------------------------------------------------------- the records rewritten
def test_the_records_follow_the_moved_folder(tmp_path: Path) -> None:
    old, new = tmp_path / "scratch" / "checkpoints", tmp_path / "home" / "checkpoints"
    best, last = _best(new), LastCheckpoint(dirpath=new)
    checkpoint = _moved_checkpoint(old, best, last)
    _files(new, "best.ckpt", "last.ckpt")
    assert follow_moved_folders(checkpoint, [best, last]) == []
    state = checkpoint["callbacks"][best.state_key]
    assert state["dirpath"] == str(new) and state["best_k_models"] == {str(new / "best.ckpt"): torch.tensor(0.7)}
    assert state["best_model_path"] == state["kth_best_model_path"] == str(new / "best.ckpt")
    assert checkpoint["callbacks"][last.state_key]["best_model_path"] == str(new / "last.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "The dirpath has changed" from Lightning
        best.load_state_dict(deepcopy(state))
    assert best.best_model_score == torch.tensor(0.7) and best.kth_value == torch.tensor(0.7)


@pytest.mark.parametrize("save_top_k, kth", [(3, None), (-1, "best-v1.ckpt")])
def test_records_of_files_not_in_the_new_folder_are_dropped(tmp_path: Path, save_top_k: int, kth: str | None) -> None:
    """best.ckpt (the best) is not in the new folder: the best and the k-th best are recounted
    from the others; with fewer files than save_top_k there is no k-th best to beat."""
    old, new = tmp_path / "old", tmp_path / "new"
    best = _best(new, save_top_k)
    recorded = {"best.ckpt": 0.9, "best-v1.ckpt": 0.5, "best-v2.ckpt": 0.7}
    checkpoint = {"callbacks": {best.state_key: _saved_state(_best(old, save_top_k), recorded)}}
    _files(new, "best-v1.ckpt", "best-v2.ckpt")
    assert follow_moved_folders(checkpoint, [best]) == [(old / "best.ckpt", new / "best.ckpt")]
    state = checkpoint["callbacks"][best.state_key]
    assert state["best_k_models"] == {str(new / "best-v1.ckpt"): torch.tensor(0.5),
                                      str(new / "best-v2.ckpt"): torch.tensor(0.7)}
    assert state["best_model_path"] == str(new / "best-v2.ckpt") and state["best_model_score"] == torch.tensor(0.7)
    if kth is None:
        assert state["kth_best_model_path"] == "" and state["kth_value"] == -torch.inf
    else:
        assert state["kth_best_model_path"] == str(new / kth) and state["kth_value"] == torch.tensor(0.5)


def test_unmoved_remote_and_unknown_records_are_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    _files(folder, "best.ckpt")
    unmoved = _saved_state(_best(folder), {"best.ckpt": 0.7})
    remote = {**deepcopy(unmoved), "dirpath": "s3://bucket/checkpoints"}
    another_monitor = ModelCheckpoint(tmp_path / "other", monitor="loss")  # holds no state in the checkpoint
    for state, callbacks in [(unmoved, [_best(folder)]), (remote, [_best(folder)]), (unmoved, [another_monitor])]:
        checkpoint = {"callbacks": {_best(folder).state_key: deepcopy(state)}}
        assert follow_moved_folders(checkpoint, callbacks) == []
        assert checkpoint == {"callbacks": {_best(folder).state_key: state}}


def test_fit_names_the_dropped_files_once(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    best, last = _best(new), LastCheckpoint(dirpath=new)
    checkpoint = _moved_checkpoint(old, best, last)
    with pytest.warns(UserWarning) as raised:
        follow_moved_run(_trainer(TrainerFn.FITTING, [best, last], new / "last.ckpt"), checkpoint)
    assert len(raised) == 1
    assert f"best.ckpt, last.ckpt (recorded in {old}) are not in {new}" in str(raised[0].message)
    assert checkpoint["callbacks"][best.state_key]["best_k_models"] == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # called again (RPNModule, then LastCheckpoint): nothing left to do
        follow_moved_run(_trainer(TrainerFn.FITTING, [best, last], new / "last.ckpt"), checkpoint)


@pytest.mark.parametrize("loaded, files", [
    # from a file outside the callbacks' folders: Lightning's rule, even where the new folder
    # holds files of the recorded names (another run's)
    ("old/last.ckpt", ("best.ckpt", "last.ckpt")),
    # not the run's latest file: the fit starts a new run, which forgets the records anyway; no
    # notice either of the last.ckpt not copied
    ("new/best.ckpt", ("best.ckpt",)),
])
def test_a_fit_that_continues_no_moved_run_leaves_the_records_quietly(
    tmp_path: Path, loaded: str, files: tuple[str, ...]
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    best, last = _best(new), LastCheckpoint(dirpath=new)
    checkpoint = _moved_checkpoint(old, best, last)
    saved = deepcopy(checkpoint)
    _files(new, *files)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        follow_moved_run(_trainer(TrainerFn.FITTING, [best, last], tmp_path / loaded), checkpoint)
    assert checkpoint == saved


def test_an_evaluation_follows_the_moved_folder_quietly(tmp_path: Path) -> None:
    """validate restores the (unused) records too: no notice, and none of Lightning's."""
    old, new = tmp_path / "old", tmp_path / "new"
    best, last = _best(new), LastCheckpoint(dirpath=new)
    checkpoint = _moved_checkpoint(old, best, last)
    _files(new, "best.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        follow_moved_run(_trainer(TrainerFn.VALIDATING, [best, last], new / "best.ckpt"), checkpoint)
        best.load_state_dict(checkpoint["callbacks"][best.state_key])
    assert best.best_model_path == str(new / "best.ckpt")


# ---------------------------------------------------------------- a run folder moved between fits
SCORES = (5.0, 3.0, 4.0, 6.0)
"""``score`` of each epoch's validation: the best is epoch 0's until epoch 3."""


class ScoredModel(BoringModel):
    def validation_step(self, batch, batch_idx):
        self.log("score", SCORES[self.current_epoch])
        return super().validation_step(batch, batch_idx)


class RestoredBest(Callback):
    """The best callback's file and score once Lightning has restored them."""

    def __init__(self, best: ModelCheckpoint) -> None:
        self.best, self.restored = best, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.restored = (self.best.best_model_path, self.best.best_model_score)


def _scored_fit(folder: Path, max_epochs: int, ckpt_path: Path | None = None) -> RestoredBest:
    best = _best(folder)
    restored = RestoredBest(best)
    trainer = Trainer(default_root_dir=folder.parent, max_epochs=max_epochs, limit_train_batches=4,
                      limit_val_batches=1, callbacks=[best, LastCheckpoint(dirpath=folder), restored], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ScoredModel(), ckpt_path=ckpt_path)
    return restored


def _steps(folder: Path) -> dict[str, int]:
    return {p.name: torch.load(p, weights_only=True)["global_step"] for p in sorted(folder.glob("*.ckpt"))}


@pytest.mark.parametrize("relocate", [shutil.move, shutil.copytree])
def test_a_moved_run_folder_resumes_with_its_best(tmp_path: Path, recwarn: pytest.WarningsRecorder, relocate) -> None:
    """A module of one's own with LastCheckpoint: the resumed run keeps epoch 0's best (5) through
    epoch 2 (4), replaces best.ckpt at epoch 3 (6), and writes no -v1 file; a copied run's
    original files stay as they were."""
    _scored_fit(tmp_path / "scratch" / "checkpoints", max_epochs=2)
    relocate(tmp_path / "scratch", tmp_path / "home")
    folder = tmp_path / "home" / "checkpoints"
    restored = _scored_fit(folder, max_epochs=4, ckpt_path=folder / "last.ckpt")
    assert _steps(folder) == {"best.ckpt": 16, "last.ckpt": 16}
    assert restored.restored == (str(folder / "best.ckpt"), torch.tensor(5.0))
    record = torch.load(folder / "last.ckpt", weights_only=True)["callbacks"]
    best = record[_best(folder).state_key]
    assert (best["best_model_path"], float(best["best_model_score"])) == (str(folder / "best.ckpt"), 6.0)
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message) or "lightning-rpn" in str(w.message)]
    if relocate is shutil.copytree:
        assert _steps(tmp_path / "scratch" / "checkpoints") == {"best.ckpt": 4, "last.ckpt": 8}


def test_an_rpn_module_follows_its_moved_run_folder_without_last_checkpoint(tmp_path: Path) -> None:
    """RPNModule.on_load_checkpoint: a monitor-less ModelCheckpoint of Lightning's own goes on
    writing its file, not latest-v1.ckpt beside it."""
    def fit(folder: Path, max_epochs: int, ckpt_path: Path | None = None) -> None:
        model = tiny_model()
        batches = training_batches(model)[:2]
        trainer = quiet_trainer(folder.parent, max_epochs=max_epochs, enable_checkpointing=True, limit_val_batches=1,
                                callbacks=[ModelCheckpoint(dirpath=folder, filename="latest")])
        trainer.fit(model, DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None),
                    ckpt_path=ckpt_path)

    fit(tmp_path / "scratch" / "checkpoints", max_epochs=1)
    shutil.move(tmp_path / "scratch", tmp_path / "home")
    folder = tmp_path / "home" / "checkpoints"
    fit(folder, max_epochs=2, ckpt_path=folder / "latest.ckpt")
    assert _steps(folder) == {"latest.ckpt": 4}
