"""Monitors that validation does not log, refused at the sanity check instead of after an epoch.

A ``ModelCheckpoint`` or ``EarlyStopping`` whose ``monitor`` names a validation metric that is never
logged (a typo such as ``val/AR@10O``) fails in Lightning only at the end of training's first
validation: an epoch (or a ``val_check_interval``) of work, then a traceback, and no ``last.ckpt``.
The sanity check runs the same validation hooks first, so the metrics it logged are the ones to
check against. Only ``val/`` monitors are checked (training metrics are not logged yet then), and an
``EarlyStopping(strict=False)`` is left alone: it accepts a missing metric by design.
"""

from __future__ import annotations

import difflib
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_rpn.core.config import SettingError

__all__ = ["check_monitored_metrics", "unlogged_monitors"]

VALIDATION_PREFIX = "val/"


def unlogged_monitors(trainer: Any) -> list[tuple[str, str]]:
    """``(callback class name, monitor)`` of each checkpoint / early-stopping callback whose ``val/``
    monitor is not among ``trainer.callback_metrics`` (call right after a validation)."""
    logged = set(trainer.callback_metrics)
    found = []
    for callback in trainer.callbacks:
        if not isinstance(callback, (ModelCheckpoint, EarlyStopping)):
            continue
        if isinstance(callback, EarlyStopping) and not callback.strict:
            continue
        monitor = callback.monitor
        if isinstance(monitor, str) and monitor.startswith(VALIDATION_PREFIX) and monitor not in logged:
            found.append((type(callback).__name__, monitor))
    return found


def check_monitored_metrics(trainer: Any) -> None:
    """Raise a :class:`SettingError` naming every callback whose ``val/`` monitor the validation just
    run did not log, the closest logged name and the names it did log."""
    missing = unlogged_monitors(trainer)
    if not missing:
        return
    logged = sorted(key for key in trainer.callback_metrics if key.startswith(VALIDATION_PREFIX))
    named = []
    for callback, monitor in missing:
        close = " or ".join(map(repr, difflib.get_close_matches(monitor, logged, n=2)))
        named.append(f"{callback}(monitor={monitor!r})" + (f", did you mean {close}?" if close else ""))
    raise SettingError(
        f"{'; '.join(named)}: validation logs no such metric, so Lightning would stop at the end of training's "
        f"first validation. Validation logs {_listed(logged)}; change the monitor in the config's "
        "trainer.callbacks")


def _listed(logged: list[str]) -> str:
    """The logged names in words, the many ``val/recall@IoU@K`` ones counted rather than listed."""
    recalls = [key for key in logged if key.startswith(f"{VALIDATION_PREFIX}recall@")]
    named = [key for key in logged if key not in recalls]
    if recalls:
        named.append(f"{len(recalls)} {VALIDATION_PREFIX}recall@IoU@proposals (e.g. {recalls[0]})")
    return ", ".join(named) or f"no {VALIDATION_PREFIX} metric"
