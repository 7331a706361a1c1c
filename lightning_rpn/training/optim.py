"""Optimisation of RPNModule: parameter groups for weight decay, the optimizer and the learning-rate schedule.

``weight_decay_groups`` is shared with the torchvision reference loop, so both decay the same
parameters; ``LRSchedule`` is the factor of a step (a picklable object, kept in checkpoints by
``LambdaLR``), ``RunLambdaLR`` the scheduler that follows the run it resumes in, and
``configure_optimization`` builds both from an :class:`~lightning_rpn.core.config.OptimConfig`
(``RPNModule.configure_optimizers``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_rpn.core.config import OptimConfig

__all__ = ["LRSchedule", "RunLambdaLR", "configure_optimization", "weight_decay_groups"]

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


class RunLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose schedule follows the run it is in, also when that run resumes.

    ``LambdaLR.load_state_dict`` writes the saved schedule's fields (``total_steps``, milestones,
    ...) and base learning rates over the resumed run's, so extending a finished cosine run
    trained at its final learning rate. Here a resumed run takes only the step count from the
    checkpoint, keeps the schedule built from its own config and trainer (``max_steps`` /
    ``max_epochs``), logs what differs from the checkpoint's, and sets the optimizer to the
    learning rate of the step it resumes at.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_lambdas = state_dict.get("lr_lambdas") or [None]
        saved_base_lrs = list(state_dict.get("base_lrs", self.base_lrs))
        self.__dict__.update(
            {k: v for k, v in state_dict.items() if k not in ("lr_lambdas", "base_lrs")}
        )
        changes = [
            f"{name} {saved_lambdas[0][name]!r} -> {value!r}"
            for name, value in vars(self.lr_lambdas[0]).items()
            if saved_lambdas[0] is not None and saved_lambdas[0].get(name, value) != value
        ]
        if saved_base_lrs != self.base_lrs:
            changes.append(f"base lr {saved_base_lrs} -> {self.base_lrs}")
        if changes:
            rank_zero_info(
                f"RPNModule: resuming at step {self.last_epoch}, the learning-rate schedule "
                f"follows this run's config and trainer (max_steps / max_epochs), not the "
                f"checkpoint's: {', '.join(changes)}"
            )
        lrs = [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, momentum: float) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``) or ``"adamw"`` over parameter ``groups`` at ``lr``."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def configure_optimization(
    config: OptimConfig, model: nn.Module, run_steps: Callable[[], float | int]
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer for ``model``: SGD (momentum) or AdamW over
    :func:`weight_decay_groups`, and a per-step :class:`RunLambdaLR` of ``config``'s schedule.

    ``run_steps`` gives the run's optimizer steps (the trainer's ``estimated_stepping_batches``),
    the cosine's length; it is only called for the cosine schedule.
    """
    groups = weight_decay_groups([model], config.weight_decay, config.norm_weight_decay)
    optimizer = build_optimizer(config.optimizer, groups, config.lr, config.momentum)
    total = 0
    if config.lr_schedule == "cosine":
        steps = run_steps()
        if not math.isfinite(steps):
            raise ValueError(
                "model.lr_schedule='cosine' decays over the whole run: set trainer.max_steps "
                "or trainer.max_epochs (both are unlimited)"
            )
        total = int(steps)
    schedule = LRSchedule(
        warmup_steps=config.warmup_steps,
        warmup_factor=config.warmup_factor,
        kind=config.lr_schedule,
        milestones=config.milestones,
        gamma=config.gamma,
        total_steps=total,
        min_factor=config.min_lr_factor,
    )
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": RunLambdaLR(optimizer, schedule), "interval": "step", "frequency": 1},
    }
