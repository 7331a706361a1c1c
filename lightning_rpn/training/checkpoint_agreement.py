"""A checkpoint's weights loaded only into the network they were trained as.

``--ckpt_path`` loads a checkpoint into the model that the command line and config build: a run
follows its own config, not the checkpoint's. (``RPNModule.load_from_checkpoint(path, **overrides)``
builds the model from the checkpoint's hyperparameters with the caller's overrides, which Lightning
writes into the checkpoint's before it loads: an explicit choice, not checked.)
The hyperparameters that say what the weights compute (:data:`WEIGHT_DEFINING_HPARAMS`: backbone,
anchors, box coding, head) must then be the checkpoint's. Otherwise the weights either fail to
load with a bare tensor-size mismatch, or load and mean something else: other anchor sizes of the
same count put every proposal in the wrong place, with no error. :func:`check_checkpoint_agrees`
names each difference instead.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

__all__ = ["WEIGHT_DEFINING_HPARAMS", "check_checkpoint_agrees"]

WEIGHT_DEFINING_HPARAMS = (
    "backbone", "anchor_sizes", "aspect_ratios", "anchor_offset", "anchor_stride", "box_coder_weights",
    "head", "head_conv_depth", "head_conv_channels", "objectness", "quality", "cascade_stages",
    "cascade_dilation", "cascade_delta_scales",
)
"""``RPNModule`` arguments that a checkpoint's weights were trained for: a different value gives
tensors of other shapes or outputs of another meaning."""


_OBJECT = object()
"""What a value that is no config data (a module, or holding one) compares as: it is not compared."""


def _comparable(value: Any) -> Any:
    """``value`` with YAML's lists and the module's tuples, ints and floats, Namespaces and dicts
    alike; :data:`_OBJECT` for anything a config does not hold."""
    if isinstance(value, (Mapping, Namespace)):
        items = value.items() if isinstance(value, Mapping) else vars(value).items()
        parts = tuple(sorted((str(key), _comparable(item)) for key, item in items))
        return _OBJECT if any(part is _OBJECT for _, part in parts) else parts
    if isinstance(value, (list, tuple)):
        parts = tuple(_comparable(item) for item in value)
        return _OBJECT if any(part is _OBJECT for part in parts) else parts
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value if value is None or isinstance(value, (str, bool)) else _OBJECT


def check_checkpoint_agrees(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str | None = None) -> None:
    """``ValueError`` naming every :data:`WEIGHT_DEFINING_HPARAMS` value of the ``current`` model
    that differs from the ``saved`` checkpoint's (``checkpoint``: its path, for the message).

    A name the checkpoint does not record (an older version) or records as an object (a backbone
    module passed to ``load_from_checkpoint``), or that ``current`` leaves out, is not compared.
    """
    differ = [
        f"{name}: checkpoint {saved[name]!r}, this run {current[name]!r}"
        for name in WEIGHT_DEFINING_HPARAMS
        if name in saved and name in current and _comparable(saved[name]) is not _OBJECT
        and _comparable(saved[name]) != _comparable(current[name])
    ]
    if differ:
        where = f" {checkpoint}" if checkpoint else ""
        raise ValueError(
            f"RPNModule: the checkpoint{where} was trained as another network than this run builds "
            f"({'; '.join(differ)}). A run follows its own config, so pass the config it was trained "
            "with (the run folder's config.yaml, or the values above as --model.* flags)"
        )
