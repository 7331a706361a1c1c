"""Optimisation of RPNModule: parameter groups for weight decay, the optimizer and the learning-rate schedule.

``weight_decay_groups`` is shared with the torchvision reference loop, so both decay the same
parameters; ``LRSchedule`` is the factor of a step (a picklable object, kept in checkpoints by
``LambdaLR``), ``RunLambdaLR`` the scheduler that follows the run it resumes in, and
``configure_optimization`` builds both from an :class:`~lightning_rpn.core.config.OptimConfig`
(``RPNModule.configure_optimizers``). ``fit_total_steps`` is the step a fit ends at, from the
step it resumed at: the cosine's length, :class:`~lightning_rpn.training.text_progress.TextProgress`'s total
and what :func:`warn_if_schedule_outlasts_run` compares the warm-up and the milestones with.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_rpn.core.config import OptimConfig, SettingError
from lightning_rpn.training.resume_state import epoch_batches_trained

__all__ = [
    "LRSchedule",
    "RunLambdaLR",
    "configure_optimization",
    "fit_total_steps",
    "warn_if_schedule_outlasts_run",
    "weight_decay_groups",
]

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def weight_decay_groups(
    modules: Sequence[nn.Module], weight_decay: float, norm_weight_decay: float
) -> list[dict[str, Any]]:
    """The trainable parameters of ``modules`` as optimiser groups: normalisation-layer
    parameters (BatchNorm, GroupNorm, LayerNorm) with ``norm_weight_decay``, the others with
    ``weight_decay``."""
    decay, norm = [], []
    for part in modules:
        for module in part.modules():
            for parameter in module.parameters(recurse=False):
                if parameter.requires_grad:
                    (norm if isinstance(module, _NORM_LAYERS) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


def fit_total_steps(trainer: Trainer) -> float:
    """The global step ``trainer``'s fit ends at: the end of ``max_epochs`` or ``max_steps``,
    whichever comes first (``inf`` when neither bounds it; with manual optimisation, whose
    optimiser steps per batch only the module knows, ``max_steps`` alone bounds it).

    Counted from the step and epoch the fit resumed at, then the epochs left at the current
    optimizer steps per epoch (batches, devices, ``accumulate_grad_batches``), where
    ``trainer.estimated_stepping_batches`` takes ``max_epochs`` x today's steps per epoch: a run
    resumed after its steps per epoch changed would end elsewhere. Lightning restores the loops
    before the schedulers, so this is right from ``RunLambdaLR.load_state_dict`` on.
    """
    max_steps = trainer.max_steps if trainer.max_steps != -1 else math.inf
    module = trainer.lightning_module
    if trainer.max_epochs is None or trainer.max_epochs < 0 or (module is not None and not module.automatic_optimization):
        return max_steps  # manual optimisation: the module's optimiser steps per batch are its own
    if trainer.train_dataloader is None:  # as estimated_stepping_batches: during configure_optimizers
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return max_steps
    accumulate = trainer.accumulate_grad_batches
    per_epoch = math.ceil(batches / accumulate)
    epochs = trainer.fit_loop.epoch_progress.current
    epochs_left = max(trainer.max_epochs - epochs.processed, 0)
    steps_left = epochs_left * per_epoch
    if epochs.started > epochs.processed and epochs_left:  # resumed inside an epoch: the rest of it
        progress = trainer.fit_loop.epoch_loop.batch_progress
        done = progress.current.processed
        if epoch_batches_trained(progress) or done >= batches:  # saved at its end (e.g. after its validation)
            steps_left -= per_epoch
        else:  # its remaining batches, stepping at every accumulate-th and the last
            steps_left -= done // accumulate
    return min(trainer.global_step + steps_left, max_steps)


@dataclass
class LRSchedule:
    """Learning-rate factor of a step: linear warm-up, then multi-step or cosine decay.

    A callable object (not a lambda) so that ``LambdaLR`` can save it in checkpoints.
    """

    warmup_steps: int
    warmup_factor: float
    kind: Literal["multistep", "cosine"]
    milestones: tuple[int, ...]
    gamma: float
    total_steps: int
    min_factor: float

    def __call__(self, step: int) -> float:
        if self.kind == "multistep":
            factor = self.gamma ** bisect.bisect_right(self.milestones, step)
        else:
            progress = min(step, self.total_steps) / max(self.total_steps, 1)
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            factor = self.min_factor + (1.0 - self.min_factor) * cosine
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            factor *= self.warmup_factor * (1.0 - alpha) + alpha
        return factor


RUN_GROUP_SETTINGS = ("weight_decay", "momentum")
"""Parameter-group settings of the config (``model.weight_decay`` / ``model.norm_weight_decay`` per
group, SGD's ``model.momentum``) that a resumed run takes from its own optimiser:
``Optimizer.load_state_dict`` restores the checkpoint's."""


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The :data:`RUN_GROUP_SETTINGS` each parameter group of ``optimizer`` holds."""
    return [{key: group[key] for key in RUN_GROUP_SETTINGS if key in group} for group in optimizer.param_groups]


_FIELDS_OF_KIND = {"multistep": ("milestones", "gamma"), "cosine": ("total_steps", "min_factor")}
"""The :class:`LRSchedule` fields each kind of decay reads (the other kind's are unused)."""


def _schedule_changes(saved: dict[str, Any] | None, schedule: LRSchedule) -> list[str]:
    """``"name saved -> now"`` for each field of ``schedule`` its kind reads that differs from the
    checkpoint's ``saved`` schedule (a multistep run's unused ``total_steps`` 0 is no change)."""
    if saved is None:
        return []
    names = ("kind", "warmup_steps", "warmup_factor", *_FIELDS_OF_KIND[schedule.kind])
    return [f"{name} {saved[name]!r} -> {getattr(schedule, name)!r}"
            for name in names if saved.get(name, getattr(schedule, name)) != getattr(schedule, name)]


class RunLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose schedule follows the run it is in, also when that run resumes.

    ``LambdaLR.load_state_dict`` writes the saved schedule's fields (``total_steps``, milestones,
    ...) and base learning rates over the resumed run's, so extending a finished cosine run
    trained at its final learning rate. Here a resumed run takes only the step count from the
    checkpoint, keeps the schedule built from its own config and trainer (``max_steps`` /
    ``max_epochs``), logs what differs from the checkpoint's, and sets the optimizer to the
    learning rate of the step it resumes at. ``cosine_steps`` (not saved) gives the cosine's
    length (:func:`fit_total_steps`) and is asked again on resume: Lightning has restored the
    loops by then, so a run whose steps per epoch changed decays to the step it really ends at.

    Lightning loads the optimiser's state just before, and torch's ``Optimizer.load_state_dict``
    restores every group setting saved with it: the groups' weight decays and momentum
    (:data:`RUN_GROUP_SETTINGS`, as built here: ``group_settings``, not saved) are set back to this
    run's too, and named in the same notice when they differ.
    """

    _RUN_ONLY = ("cosine_steps", "group_settings", "run_end")
    """Attributes of this run alone: neither saved nor loaded."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, cosine_steps: Callable[[], int] | None = None,
        run_end: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(optimizer, schedule)
        self.cosine_steps = cosine_steps
        self.group_settings = _group_settings(optimizer)
        self.run_end = run_end
        """The step the run ends at, for a resumed run's check of its schedule once the loops are restored."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for name in self._RUN_ONLY:  # a closure over the trainer, the run's own settings
            del state[name]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_lambdas = state_dict.get("lr_lambdas") or [None]
        saved_base_lrs = list(state_dict.get("base_lrs", self.base_lrs))
        self.__dict__.update(
            {k: v for k, v in state_dict.items() if k not in ("lr_lambdas", "base_lrs", *self._RUN_ONLY)}
        )
        if self.cosine_steps is not None:
            self.lr_lambdas[0].total_steps = self.cosine_steps()
        changes = _schedule_changes(saved_lambdas[0], self.lr_lambdas[0])
        if saved_base_lrs != self.base_lrs:
            changes.append(f"base lr {saved_base_lrs} -> {self.base_lrs}")
        changes += self._restore_group_settings()
        if changes:
            rank_zero_info(
                f"RPNModule: resuming at step {self.last_epoch}, the learning-rate schedule and the "
                f"optimiser's weight decays and momentum follow this run's config and trainer "
                f"(max_steps / max_epochs), not the checkpoint's: {', '.join(changes)}"
            )
        lrs = [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs
        if self.run_end is not None:
            warn_if_schedule_outlasts_run(self.lr_lambdas[0], self.run_end())

    def _restore_group_settings(self) -> list[str]:
        """Set the optimiser's groups back to this run's :data:`RUN_GROUP_SETTINGS` (the loaded state
        holds the checkpoint's); each that differed as ``"name [per group] -> [per group]"``."""
        saved = _group_settings(self.optimizer)
        for group, settings in zip(self.optimizer.param_groups, self.group_settings, strict=True):
            group.update(settings)
        changes = []
        for name in RUN_GROUP_SETTINGS:
            before = [settings.get(name) for settings in saved]
            after = [settings.get(name) for settings in self.group_settings]
            if before != after:
                changes.append(f"{name} {before} -> {after}")
        return changes


def check_optimizer_dtype(name: str, groups: list[dict[str, Any]]) -> None:
    """``ValueError`` for ``"adamw"`` over float16 parameters (``trainer.precision 16-true``, ``.half()``).

    Its ``eps`` (1e-8) is 0 in float16, and so is the square of any gradient below 2.4e-4: the
    first step where a parameter's gradient is zero or tiny divides by 0 and writes NaN or inf
    into it, whatever the learning rate or gradient clipping, and the next step's loss is
    non-finite. The mixed precisions keep float32 weights (and optimiser state) and do not
    have the problem.
    """
    if name != "adamw" or not any(p.dtype == torch.float16 for group in groups for p in group["params"]):
        return
    raise SettingError(
        "model.optimizer='adamw' cannot update float16 parameters (trainer.precision '16-true', or a model "
        "cast with .half()): AdamW's eps=1e-8 is 0 in float16, so its first step with a zero or tiny gradient "
        "writes NaN into the weights, whatever model.lr or trainer.gradient_clip_val. Train with "
        "--trainer.precision 16-mixed, bf16-mixed or bf16-true, or keep 16-true with --model.optimizer sgd"
    )


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``) or ``"adamw"`` over parameter ``groups`` at ``lr``
    (:func:`check_optimizer_dtype` first)."""
    check_optimizer_dtype(name, groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def _cosine_length(run_steps: Callable[[], float | int]) -> int:
    """``run_steps()`` as the cosine's length; an unbounded run has none."""
    steps = run_steps()
    if not math.isfinite(steps):
        raise SettingError(
            "model.lr_schedule='cosine' decays over the whole run, and this run has no step count to end at "
            "(trainer.max_steps and trainer.max_epochs unlimited, or no training batch per epoch to count): set "
            "trainer.max_steps, or trainer.max_epochs with training batches, or use --model.lr_schedule multistep "
            "(e.g. for a run bounded by trainer.max_time)"
        )
    return int(steps)


def _run_end(model: nn.Module, run_steps: Callable[[], float | int]) -> float:
    """``run_steps()`` while a Trainer runs ``model``; ``inf`` (no end to compare with) for a
    multi-step schedule built without one (``configure_optimizers`` called by hand)."""
    return run_steps() if getattr(model, "_trainer", None) is not None else math.inf


def warn_if_schedule_outlasts_run(schedule: LRSchedule, run_end: float) -> None:
    """Warn (rank zero) when ``schedule``'s warm-up or a milestone reaches ``run_end``, the
    optimizer step the run ends at (:func:`fit_total_steps`).

    The defaults are the COCO recipe's (1000 warm-up steps, x0.1 at 60k and 80k of 90k steps),
    which a shorter run inherits from a config that leaves them out: its learning rate then
    never reaches ``model.lr``, or never decays. A run of unknown length is not compared. A
    resumed run is compared with its own end once Lightning has restored its loops
    (:meth:`RunLambdaLR.load_state_dict`; in ``configure_optimizers`` a run whose steps per
    epoch changed, e.g. ``accumulate_grad_batches``, seemed to end elsewhere), so extending a
    short run past its warm-up is not warned again.
    """
    if not math.isfinite(run_end) or run_end <= 0:
        return
    end = int(run_end)
    if schedule.warmup_steps >= end:
        peak = max(schedule(step) for step in range(end))
        rank_zero_warn(
            f"RPNModule: model.warmup_steps={schedule.warmup_steps} is not shorter than this run, which "
            f"ends at optimizer step {end} (trainer.max_steps / max_epochs): the warm-up never ends and "
            f"the learning rate peaks at {peak:.2g} x model.lr. Set --model.warmup_steps below {end} "
            + (f"(e.g. {end // 10}, a tenth of the run)" if end >= 10 else "(e.g. 0: no warm-up in so short a run)")
            + (f"; the default {OptimConfig.warmup_steps} is the COCO recipe's"
               if schedule.warmup_steps == OptimConfig.warmup_steps else "")
        )
    late = [step for step in schedule.milestones if step >= end]
    if schedule.kind == "multistep" and late:
        rank_zero_warn(
            f"RPNModule: model.milestones={list(schedule.milestones)}: {', '.join(map(str, late))} "
            f"{'is' if len(late) == 1 else 'are'} not before the optimizer step this run ends at ({end}; "
            f"trainer.max_steps / max_epochs), so the learning rate is never multiplied by model.gamma there. "
            f"Set the milestones inside the run (the COCO recipe's 60000 and 80000 are 2/3 and 8/9 of its "
            f"90000 steps) or use --model.lr_schedule cosine"
        )


def configure_optimization(
    config: OptimConfig, model: nn.Module, run_steps: Callable[[], float | int]
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer for ``model``: SGD (momentum) or AdamW over
    :func:`weight_decay_groups`, and a per-step :class:`RunLambdaLR` of ``config``'s schedule.

    ``run_steps`` gives the step the run ends at (:func:`fit_total_steps`), the cosine's length
    (asked again when a checkpoint is restored) and what the warm-up and the milestones are
    compared with (:func:`warn_if_schedule_outlasts_run`); for the multi-step schedule only while
    a Trainer runs ``model``.
    """
    groups = weight_decay_groups([model], config.weight_decay, config.norm_weight_decay)
    optimizer = build_optimizer(config.optimizer, groups, config.lr, config.momentum)
    cosine_steps = partial(_cosine_length, run_steps) if config.lr_schedule == "cosine" else None
    total = cosine_steps() if cosine_steps is not None else 0
    run_end = total if cosine_steps is not None else _run_end(model, run_steps)
    schedule = LRSchedule(
        warmup_steps=config.warmup_steps,
        warmup_factor=config.warmup_factor,
        kind=config.lr_schedule,
        milestones=config.milestones,
        gamma=config.gamma,
        total_steps=total,
        min_factor=config.min_lr_factor,
    )
    trainer = getattr(model, "_trainer", None)
    if trainer is not None and trainer.ckpt_path is not None and trainer.state.fn == TrainerFn.FITTING:
        # a resumed run: checked once its loops are restored, which fix the step it ends at
        run_end_after_restore = cosine_steps or partial(_run_end, model, run_steps)
    else:
        run_end_after_restore = None
        warn_if_schedule_outlasts_run(schedule, run_end)
    scheduler = RunLambdaLR(optimizer, schedule, cosine_steps, run_end_after_restore)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
