"""The non-finite training-step policy, as a Lightning callback (``RPNModule(nonfinite_loss=...)``).

A training batch whose loss is non-finite (the loss raises
:class:`~lightning_rpn.core.loss.NonFiniteLossError`, naming its input), or whose loss is finite
but whose gradients are not, either stops training with a ``ValueError`` naming the batch's
image ids (``"raise"``) or is skipped (``"skip"``): no gradient reaches the optimizer, so neither
the weights nor the optimizer state change, and the running count :attr:`~NonFiniteLossPolicy.skipped`
is logged as ``train/skipped_nonfinite_batches`` and, when any were skipped, reported at the end
of ``fit``. Skipping is for the odd bad batch: at the :data:`MAX_CONSECUTIVE_SKIPS`-th non-finite
batch (or step) in a row, with no optimizer step between them, the weights themselves have most
likely diverged (every batch now fails) and training stops with the ``"raise"`` policy's
``ValueError`` saying so, rather than running on without updates to a successful exit. With
gradient accumulation a skipped batch adds nothing to its step's gradient and the other batches
of the step still train; a step whose batches were all skipped does not happen, nor one whose
summed gradient is non-finite. Under DDP the ranks agree in the training step: a batch is skipped on every rank when any rank saw a
non-finite loss, every rank then backpropagates the zero loss (so no rank's gradient of it
reaches the all-reduce), and non-finite gradients are the same on every rank after the all-reduce.

:class:`~lightning_rpn.training.module.RPNModule` installs one (``configure_callbacks``), hands it
a caught non-finite loss (:meth:`NonFiniteLossPolicy.skipped_loss`) and keeps its count in
checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_rpn.core.loss import NonFiniteLossError

__all__ = ["MAX_CONSECUTIVE_SKIPS", "NONFINITE_POLICIES", "SKIPPED_KEY", "NonFiniteLossPolicy"]

NONFINITE_POLICIES = ("raise", "skip")
SKIPPED_KEY = "skipped_nonfinite_batches"
"""The count's name: logged as ``train/{SKIPPED_KEY}``, and RPNModule's checkpoint entry."""
MAX_CONSECUTIVE_SKIPS = 10
"""Non-finite batches in a row (no optimizer step between them) at which ``"skip"`` stops training:
weights that make every batch non-finite do not recover by skipping."""


class NonFiniteLossPolicy(pl.Callback):
    """Raise on, or skip, training batches with a non-finite loss or gradient (see the module docstring)."""

    def __init__(self, mode: Literal["raise", "skip"] = "raise", max_consecutive: int = MAX_CONSECUTIVE_SKIPS) -> None:
        if mode not in NONFINITE_POLICIES:
            raise ValueError(f"model.nonfinite_loss must be 'raise' or 'skip', got {mode!r}")
        self.mode = mode
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self._consecutive = 0  # skips since the last optimizer step
        self._skipped_at_start = 0  # ``skipped`` when this fit began (a resumed run's count goes on)
        self._image_ids: list[Any] = []
        self._batches_in_step = 0  # batches accumulated since the last optimizer step ...
        self._skipped_in_step = 0  # ... and how many of them were skipped

    def step_loss(self, pl_module: pl.LightningModule, loss: Tensor | None,
                  error: NonFiniteLossError | None = None) -> Tensor:
        """The training step's loss: ``loss``, or for a non-finite one (``error``) that error again
        under ``"raise"``. Under ``"skip"`` every rank decides together whether the batch is
        skipped (any rank's loss non-finite), and a skipped batch's loss, on every rank, is a zero
        over every trainable parameter: its gradients are zeros (and DDP's all-reduce stays in
        step: Lightning refuses a ``None`` step in distributed runs)."""
        if self.mode == "raise":
            if error is not None:
                raise error
            assert loss is not None
            return loss
        trainer = pl_module._trainer
        skip = error is not None
        if trainer is not None:
            skip = trainer.strategy.reduce_boolean_decision(skip, all=False)
            self._batches_in_step += 1
        if not skip:
            if trainer is not None:
                pl_module.log(f"train/{SKIPPED_KEY}", float(self.skipped), on_step=True)
            assert loss is not None
            return loss
        self._skip(pl_module, str(error) if error is not None else "another process had a non-finite loss")
        self._skipped_in_step += 1
        return torch.stack([p.sum() for p in pl_module.parameters() if p.requires_grad]).sum() * 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._consecutive, self._skipped_at_start = 0, self.skipped  # after a resumed checkpoint's count

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say how many batches this fit skipped (none: nothing)."""
        skipped = self.skipped - self._skipped_at_start
        if skipped > 0:
            total = f" ({self.skipped} since the run began)" if self.skipped != skipped else ""
            rank_zero_warn(
                f"{type(pl_module).__name__}: this fit skipped {skipped} training batch"
                f"{'es' if skipped != 1 else ''}{total} with a non-finite loss or gradient "
                f"(model.nonfinite_loss='skip'; train/{SKIPPED_KEY})"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._image_ids = list(getattr(batch, "image_ids", []))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Keep non-finite gradients away from the weights (raise, or drop them when skipping).

        With fp16 mixed precision the gradient scaler already skips steps with inf / NaN
        gradients (that is how it calibrates its scale), so only skipped batches are handled.
        """
        all_skipped = self._batches_in_step > 0 and self._skipped_in_step == self._batches_in_step
        self._batches_in_step = self._skipped_in_step = 0
        if all_skipped:
            _drop_all_gradients(pl_module)
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads or getattr(trainer.precision_plugin, "scaler", None) is not None:
            self._consecutive = 0
            return
        # the max-abs norm is NaN / inf exactly when some gradient entry is (it cannot overflow)
        if bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))):
            self._consecutive = 0
            return
        bad = next(name for name, p in pl_module.named_parameters()
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all()))
        message = f"non-finite gradient of {bad} at global step {trainer.global_step} from images {self._image_ids}"
        if self.mode == "raise":
            raise ValueError(
                f"{type(pl_module).__name__} training step: {message}; lower model.lr, set "
                f"trainer.gradient_clip_val, or set model.nonfinite_loss='skip'"
            )
        _drop_all_gradients(pl_module)
        self._skip(pl_module, message)

    def _skip(self, pl_module: pl.LightningModule, reason: str) -> None:
        """Count a skipped batch (or step), or stop when too many came in a row."""
        self.skipped += 1
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive:
            raise ValueError(
                f"{type(pl_module).__name__} training step: {self._consecutive} training batches in a row "
                f"had a non-finite loss or gradient (model.nonfinite_loss='skip' skips at most "
                f"{self.max_consecutive - 1} in a row), the last: {reason}; the weights have most likely "
                f"diverged, so skipping cannot recover: lower model.lr, set trainer.gradient_clip_val, "
                f"or lengthen model.warmup_steps, and restart from a checkpoint saved before the divergence"
            )
        pl_module.log(f"train/{SKIPPED_KEY}", float(self.skipped), on_step=True)
        rank_zero_warn(
            f"{type(pl_module).__name__}: skipped training batch {self.skipped} with a non-finite "
            f"loss or gradient (model.nonfinite_loss='skip'): {reason}"
        )


def _drop_all_gradients(module: torch.nn.Module) -> None:
    for parameter in module.parameters():
        parameter.grad = None  # optimizers leave parameters without gradients untouched
