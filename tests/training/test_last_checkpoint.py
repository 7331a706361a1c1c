"""``LastCheckpoint``: ``last.ckpt`` holds where fit stopped, on and off the validation cadence."""

from __future__ import annotations

import ast
import copy
import inspect
import pickle
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger

from lightning_rpn.training.callbacks import LastCheckpoint
from lightning_rpn.training.last_checkpoint import Interruption, interruption_of
from lightning_rpn.training.run_files import read_checkpoint, warn_if_budget_reached
from lightning_rpn.training.resume_state import (
    finish_saved_epoch, reopen_stopped_epoch, rerun_interrupted_validation,
    resume_where_saved,
)


class FallingModel(BoringModel):
    """Logs ``score`` = the epoch, so a ``mode="max"`` best improves every validation and a
    ``mode="min"`` one never after the first."""

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.current_epoch))
        return super().validation_step(batch, batch_idx)


def _fit(tmp_path: Path, callbacks: list, max_steps: int, **trainer_args) -> dict[str, int]:
    """Fit 4 batches an epoch for ``max_steps``; the global step of each checkpoint in ``tmp_path``."""
    trainer = Trainer(default_root_dir=tmp_path, max_steps=max_steps, max_epochs=-1, limit_train_batches=4,
                      limit_val_batches=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **trainer_args)
    trainer.fit(FallingModel())
    return _steps(tmp_path)


def _steps(folder: Path) -> dict[str, int]:
    return {p.name: torch.load(p, weights_only=True)["global_step"] for p in sorted(folder.glob("*.ckpt"))}


def test_last_holds_the_final_step_when_the_best_stops_improving(tmp_path: Path) -> None:
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="score", mode="min")
    assert _fit(tmp_path, [best, LastCheckpoint(dirpath=tmp_path)], max_steps=12) == {"best.ckpt": 4, "last.ckpt": 12}


@pytest.mark.parametrize("max_steps", [10, 14])
def test_last_is_saved_at_the_end_of_a_fit_between_validations(tmp_path: Path, max_steps: int) -> None:
    """Validation every 3 epochs (12 steps): a fit of 10 or 14 steps ends between two; Lightning's
    own monitor-less ModelCheckpoint(save_last=True) then keeps its step-12 files."""
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True)
    steps = _fit(tmp_path, [LastCheckpoint(dirpath=tmp_path), plain], max_steps=max_steps, check_val_every_n_epoch=3)
    assert steps == {"last.ckpt": max_steps}
    if max_steps > 12:
        assert _steps(tmp_path / "plain") == {"epoch=2-step=12.ckpt": 12, "last.ckpt": 12}


def test_last_keeps_other_runs_files(tmp_path: Path) -> None:
    earlier = tmp_path / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier run's")
    last = LastCheckpoint(dirpath=earlier.parent)
    _fit(tmp_path, [last], max_steps=8)
    assert earlier.read_bytes() == b"an earlier run's"
    assert last.monitor is None and last.save_top_k == 1 and not last.save_last
    (earlier.parent / "last.ckpt").unlink()
    assert _steps(earlier.parent) == {"last-v1.ckpt": 8}


# ---------------------------------------------------------------- W&B model artifacts
@pytest.mark.parametrize("log_model", ["all", True])
def test_wandb_gives_the_best_alias_to_the_best_file_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_model: str | bool
) -> None:
    """Lightning's WandbLogger gives ``best`` to each checkpoint callback's own
    ``best_model_path``: a LastCheckpoint's is its last save, so last.ckpt, logged after
    best.ckpt, took ``best`` too, and ``model:best`` downloaded the last weights. Here the best is
    the first validation's (step 4) and the fit goes on to step 12; every last.ckpt save is
    still logged, as ``latest``, and the file still records itself as its callback's best."""
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                        "WANDB_CONSOLE": "off"}.items():  # offline=True refuses log_model
        monkeypatch.setenv(name, value)
    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-rpn-test", log_model=log_model)
    run, logged, folder = logger.experiment, [], tmp_path / "checkpoints"
    log_artifact = run.log_artifact

    def record(artifact, *args, aliases=None, **kwargs):  # the file's name and step, and its aliases
        file = folder / artifact.metadata["original_filename"]
        logged.append((file.name, torch.load(file, weights_only=True)["global_step"], sorted(aliases)))
        return log_artifact(artifact, *args, aliases=aliases, **kwargs)

    monkeypatch.setattr(run, "log_artifact", record)
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor="score", mode="min")
    last = LastCheckpoint(dirpath=folder)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=12, max_epochs=-1, limit_train_batches=4,
                      limit_val_batches=1, callbacks=[best, last], logger=logger, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    try:
        trainer.fit(FallingModel())
    finally:
        wandb.finish()

    saves = [4, 8, 12] if log_model == "all" else [12]  # True: the files there at the end of fit
    assert logged == [("best.ckpt", 4, ["best", "latest"])] + [("last.ckpt", step, ["latest"]) for step in saves]
    state = torch.load(folder / "last.ckpt", weights_only=True)["callbacks"][last.state_key]
    assert state["best_model_path"] == str(folder / "last.ckpt") and state["last_model_path"] == ""


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda callback: pickle.loads(pickle.dumps(callback))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_shows_loggers_its_own_latest_file(tmp_path: Path, duplicate) -> None:
    """What loggers are shown of a LastCheckpoint follows the copy, not the callback copied."""
    copied = duplicate(LastCheckpoint(dirpath=tmp_path))
    copied._last_checkpoint_saved = str(tmp_path / "last.ckpt")
    shown = copied._as_latest
    assert (shown.last_model_path, shown.best_model_path) == (str(tmp_path / "last.ckpt"), "")
    assert shown.dirpath == str(tmp_path)  # the callback's own settings
    assert shown.__class__ is LastCheckpoint  # whose name W&B's artifact metadata takes


# ---------------------------------------------------------------- Ctrl-C and SIGTERM during fit
class StopAt(Callback):
    """Raises ``stop()`` (or sets Lightning's SIGTERM flag) at the end of batch ``step``, and
    counts the training batches run."""

    def __init__(self, step: int, stop: type[BaseException] | None) -> None:
        self.step, self.stop, self.batches = step, stop, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if trainer.global_step == self.step:
            if self.stop is None:
                trainer._signal_connector.received_sigterm = True  # as Lightning's SIGTERM handler does
            else:
                raise self.stop()


def _interrupted_fit(tmp_path: Path, stop: type[BaseException] | None, step: int = 6):
    """Fit 4 batches an epoch, validating every 2 epochs, stopped at ``step`` (mid-epoch); the
    exception that left ``fit`` and the LastCheckpoint."""
    last = LastCheckpoint(dirpath=tmp_path)
    with pytest.raises(BaseException) as raised:
        _fit(tmp_path, [last, StopAt(step, stop)], max_steps=20, check_val_every_n_epoch=2)
    return raised.value, last


@pytest.mark.parametrize("stop, signum", [(KeyboardInterrupt, signal.SIGINT), (None, signal.SIGTERM)])
def test_an_interrupted_fit_saves_the_step_reached(tmp_path: Path, stop, signum) -> None:
    """Ctrl-C (Lightning then calls sys.exit(1)) and SIGTERM (SIGTERMException) at step 6, before
    the first validation (step 8): last.ckpt is step 6, which resume_state leaves to Lightning."""
    error, last = _interrupted_fit(tmp_path, stop)
    assert isinstance(error, SystemExit)  # both: a bare SIGTERMException exits 0 without main()'s handling
    assert _steps(tmp_path) == {"last.ckpt": 6}
    assert interruption_of(error) == Interruption(signum, 6, str(tmp_path / "last.ckpt"), 6)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert not finish_saved_epoch(checkpoint) and not reopen_stopped_epoch(checkpoint)


def test_other_errors_save_nothing_more(tmp_path: Path) -> None:
    error, _ = _interrupted_fit(tmp_path, ZeroDivisionError, step=10)
    assert isinstance(error, ZeroDivisionError) and interruption_of(error) is None
    assert _steps(tmp_path) == {"last.ckpt": 8}  # the validation of epoch 2, not step 10


def test_an_interruption_at_a_saved_step_writes_nothing_new(tmp_path: Path) -> None:
    error, _ = _interrupted_fit(tmp_path, KeyboardInterrupt, step=8)  # the end of epoch 2's validation save
    record = interruption_of(error)
    assert (record.step, record.saved_step) == (8, 8) and _steps(tmp_path) == {"last.ckpt": 8}


@pytest.mark.parametrize("stop", [KeyboardInterrupt, None])
def test_an_interrupted_fit_resumes_at_the_next_batch(tmp_path: Path, stop) -> None:
    """Resumed with ``ckpt_path`` to 12 steps, the run trains the 6 batches left (the rest of the
    interrupted epoch, one more), ends at step 12 with the same learning-rate schedule position."""
    _interrupted_fit(tmp_path, stop)
    counter = StopAt(step=-1, stop=None)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=12, max_epochs=-1, limit_train_batches=4,
                      limit_val_batches=1, callbacks=[counter], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=2)
    trainer.fit(FallingModel(), ckpt_path=tmp_path / "last.ckpt")
    assert (counter.batches, trainer.global_step, trainer.current_epoch) == (6, 12, 3)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # BoringModel's StepLR: once an epoch


@pytest.mark.parametrize("write", [1, 2])
def test_a_ctrl_c_while_best_is_written_leaves_the_record_of_the_file_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: int
) -> None:
    """Lightning records a new best before writing it: a Ctrl-C during the write kept, in the
    interruption's last.ckpt, a record of a best.ckpt on no disk (the first best) or of a score the
    file there does not hold (a later best, written over the last), and the resumed run saved no
    best until a validation beat that score."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    save, writes = TorchCheckpointIO.save_checkpoint, []

    def interrupted(self, checkpoint, path, storage_options=None):
        if Path(path).name == "best.ckpt":
            writes.append(path)
            if len(writes) == write:
                raise KeyboardInterrupt  # Ctrl-C as that best is written
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", interrupted)
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="score", mode="max")  # score: the epoch
    with pytest.raises(SystemExit):
        _fit(tmp_path, [best, LastCheckpoint(dirpath=tmp_path)], max_steps=20)
    states = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    [recorded] = [state for key, state in states.items() if key.startswith("ModelCheckpoint{'monitor': 'score'")]
    if write == 1:
        assert _steps(tmp_path) == {"last.ckpt": 4}
        assert recorded["best_model_path"] == "" and recorded["best_model_score"] is None
        assert recorded["best_k_models"] == {}
    else:  # best.ckpt still holds epoch 0's weights (score 0), not epoch 1's (score 1)
        assert _steps(tmp_path) == {"best.ckpt": 4, "last.ckpt": 8}
        assert recorded["best_model_path"] == str(tmp_path / "best.ckpt")
        assert float(recorded["best_model_score"]) == 0.0


class StopInHook(Callback):
    """Raises ``KeyboardInterrupt`` in ``hook`` once the global step is ``step``."""

    def __init__(self, hook: str, step: int) -> None:
        self.step = step
        setattr(self, hook, self._maybe_stop)

    def _maybe_stop(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            raise KeyboardInterrupt


@pytest.mark.parametrize("hook, step", [
    ("on_before_backward", 5),  # inside batch 6, before its optimiser step: the batch is redone
    ("on_train_batch_end", 6),  # after it
    ("on_validation_start", 6),  # in a validation inside the epoch (val_check_interval), which is rerun
])
def test_a_resumed_interruption_logs_at_the_steps_an_uninterrupted_run_does(tmp_path: Path, hook: str, step: int) -> None:
    """Lightning's loggers' step (``_batches_that_stepped``) came back one ahead after a Ctrl-C in a
    forward pass: every metric of the resumed run was logged at that offset."""
    with pytest.raises(SystemExit):
        _fit(tmp_path, [LastCheckpoint(dirpath=tmp_path), StopInHook(hook, step)], max_steps=20, val_check_interval=2)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=12, max_epochs=-1, limit_train_batches=4,
                      limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, val_check_interval=2)
    trainer.fit(FallingModel(), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 12
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 12  # as after 12 uninterrupted steps


class LoggingModel(FallingModel):
    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train_loss", output["loss"])
        return output


class InterruptingLogger(Logger):
    """Raises ``KeyboardInterrupt`` as it logs step ``step``: after the batch completed, before
    Lightning counts it for the loggers."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    name, version = "interrupting", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if step == self.step and "train_loss" in metrics:
            raise KeyboardInterrupt


def test_a_resumed_interruption_after_a_completed_batch_logs_at_the_uninterrupted_steps(tmp_path: Path) -> None:
    """A Ctrl-C while batch 6's metrics were logged (logged at step 5) came back one step behind:
    the resumed run logged step 5 again, and every later metric one step early."""
    arguments = dict(default_root_dir=tmp_path, max_epochs=-1, limit_train_batches=4, limit_val_batches=1,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     log_every_n_steps=1)
    interrupted = Trainer(max_steps=20, logger=InterruptingLogger(step=5),
                          callbacks=[LastCheckpoint(dirpath=tmp_path)], **arguments)
    with pytest.raises(SystemExit):
        interrupted.fit(LoggingModel())
    assert _steps(tmp_path) == {"last.ckpt": 6}
    resumed = Trainer(max_steps=12, logger=False, **arguments)
    resumed.fit(LoggingModel(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 12 and resumed.fit_loop.epoch_loop._batches_that_stepped == 12


# ---------------------------------------------------------------- an interrupted validation
class Validations(Callback):
    """Records each validation as (global step, epoch, loggers' step) and counts training batches."""

    def __init__(self) -> None:
        self.seen, self.batches = [], 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.batches += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.seen.append((trainer.global_step, trainer.current_epoch, trainer.fit_loop.epoch_loop._batches_that_stepped))


class ResumingModel(FallingModel):
    """Resumes a checkpoint where it was saved, as ``RPNModule`` does."""

    def on_load_checkpoint(self, checkpoint) -> None:
        resume_where_saved(checkpoint)


def _validating_fit(folder: Path, callbacks: list, max_steps: int, cadence: dict, ckpt_path: Path | None = None):
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor="score", mode="max")
    trainer = Trainer(default_root_dir=folder, max_steps=max_steps, max_epochs=-1, limit_train_batches=4,
                      limit_val_batches=2, callbacks=[best, LastCheckpoint(dirpath=folder), *callbacks], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **cadence)
    trainer.fit(ResumingModel(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("cadence, step", [
    ({"check_val_every_n_epoch": 2}, 8),  # the validation at an epoch's end, every second epoch
    ({"check_val_every_n_epoch": 1}, 4),
    ({"val_check_interval": 2}, 6),  # one inside an epoch
])
@pytest.mark.parametrize("hook", ["on_validation_start", "on_validation_batch_end"])
def test_an_interrupted_validation_runs_again_when_resumed(tmp_path: Path, cadence: dict, step: int, hook: str) -> None:
    """A Ctrl-C in a validation inside fit: the resume started the next epoch (at an epoch's end)
    or trained on (inside one, before a validation batch finished), and that validation's metrics
    and best candidate were never made. Now it runs again first, at the step, epoch and loggers'
    step of an uninterrupted run, which the rest of the run matches too."""
    reference = Validations()
    _validating_fit(tmp_path / "reference", [reference], 12, cadence)
    before = Validations()
    with pytest.raises(SystemExit) as raised:
        _validating_fit(tmp_path / "run", [before, StopInHook(hook, step)], 20, cadence)
    record = interruption_of(raised.value)
    assert record == Interruption(signal.SIGINT, step, str(tmp_path / "run" / "last.ckpt"), step, in_validation=True)
    after = Validations()
    resumed = _validating_fit(tmp_path / "run", [after], 12, cadence, ckpt_path=tmp_path / "run" / "last.ckpt")
    assert after.seen[0][0] == step
    assert before.seen + after.seen[1:] == reference.seen
    assert (after.batches, resumed.global_step) == (12 - step, 12)
    assert _steps(tmp_path / "run") == _steps(tmp_path / "reference")  # best.ckpt at the same step


def test_an_interrupted_validation_after_a_periodic_save_at_its_step_runs_again(tmp_path: Path) -> None:
    """every_n_train_steps saved last.ckpt as step 4's batch ended, before its validation: the
    interruption saved nothing more, the file had no mark, and the resume skipped that validation."""
    last = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=20, max_epochs=-1, limit_train_batches=4,
                      limit_val_batches=2, callbacks=[last, StopInHook("on_validation_batch_end", 4)], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(SystemExit) as raised:
        trainer.fit(ResumingModel())
    assert interruption_of(raised.value).in_validation
    after = Validations()
    _validating_fit(tmp_path, [after], 8, {}, ckpt_path=tmp_path / "last.ckpt")
    assert [seen[0] for seen in after.seen] == [4, 8]


def test_an_interrupted_last_validation_runs_again_when_the_fit_trains_on(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The fit's last validation interrupted: resumed with the same budget, Lightning stops before
    anything runs (the budget line says so and names `validate`); with more steps it validates
    step 8 first, and the best checkpoint gets that candidate."""
    cadence = {"check_val_every_n_epoch": 2}
    with pytest.raises(SystemExit):
        _validating_fit(tmp_path, [StopInHook("on_validation_batch_end", 8)], 8, cadence)
    assert _steps(tmp_path) == {"last.ckpt": 8}  # no best: the only validation was interrupted
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=8)
    warn_if_budget_reached(trainer, read_checkpoint(tmp_path / "last.ckpt", "fit"), "last.ckpt")
    assert capsys.readouterr().err.endswith(
        "; its validation at step 8 was interrupted and runs again only in a fit that trains on: "
        "`lightning-rpn validate --ckpt_path last.ckpt` evaluates those weights\n")
    after = Validations()
    _validating_fit(tmp_path, [after], 12, cadence, ckpt_path=tmp_path / "last.ckpt")
    assert (after.seen[0], after.batches) == ((8, 1, 7), 4)
    assert _steps(tmp_path) == {"best.ckpt": 8, "last.ckpt": 12}  # validated every 2nd epoch: step 8 only


def test_an_interrupted_last_validation_of_an_epoch_budget_runs_again_with_that_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """At max_epochs (the shipped configs' budget) Lightning finishes the epoch on resume, its
    validation included: the budget line says the fit validates, and names no `validate`."""
    arguments = dict(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=2,
                     logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(SystemExit):
        Trainer(callbacks=[LastCheckpoint(dirpath=tmp_path), StopInHook("on_validation_batch_end", 8)],
                **arguments).fit(ResumingModel())
    warn_if_budget_reached(Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=2),
                           read_checkpoint(tmp_path / "last.ckpt", "fit"), "last.ckpt")
    line = capsys.readouterr().err
    assert "max_epochs=2 reached, so this fit trains nothing (it validates those weights and ends)" in line
    assert "validate --ckpt_path" not in line
    after = Validations()
    Trainer(callbacks=[after], **arguments).fit(ResumingModel(), ckpt_path=tmp_path / "last.ckpt")
    assert (after.seen, after.batches) == ([(8, 1, 7)], 0)


def test_a_save_outside_validation_is_not_marked(tmp_path: Path) -> None:
    error, _ = _interrupted_fit(tmp_path, KeyboardInterrupt)
    assert not interruption_of(error).in_validation
    assert not rerun_interrupted_validation(torch.load(tmp_path / "last.ckpt", weights_only=True))


def test_the_command_line_says_an_interrupted_validation_runs_again(capsys: pytest.CaptureFixture) -> None:
    from lightning_rpn.cli import _report_interruption

    error = KeyboardInterrupt()
    error.lightning_rpn_interruption = Interruption(signal.SIGINT, 8, "run/last.ckpt", 8, in_validation=True)
    assert _report_interruption(error) == 130
    assert capsys.readouterr().err == (
        "lightning-rpn: fit interrupted (Ctrl-C) at step 8 in a validation; run/last.ckpt holds step 8: continue "
        "with `--ckpt_path last` (it runs the interrupted validation again first)\n")


def test_lightnings_save_is_still_the_one_last_checkpoint_repeats() -> None:
    """LastCheckpoint._save_checkpoint repeats ModelCheckpoint's (Lightning 2.6.0 to 2.6.6) but for
    what loggers are shown: a Lightning that changed it must be read again before it is admitted."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(ModelCheckpoint._save_checkpoint)))
    body = tree.body[0].body[1:]  # without the docstring
    assert [ast.unparse(statement) for statement in body] == [
        "trainer.save_checkpoint(filepath, self.save_weights_only)",
        "self._last_global_step_saved = trainer.global_step",
        "self._last_checkpoint_saved = filepath",
        "if trainer.is_global_zero:\n    for logger in trainer.loggers:\n        logger.after_save_checkpoint(proxy(self))",
    ]
