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

Resuming ``fit`` also restores the optimiser's state, which holds the parameters that trained
in the layout of the optimiser that trained them: :func:`check_resume_agrees` names another
``optimizer`` (:func:`check_optimizer_agrees`) and the backbone settings (``weights``,
``frozen_bn``, ``trainable_layers``) that change the parameters. They need not agree to evaluate:
FrozenBatchNorm2d and BatchNorm2d load each other's weights and compute the same in eval mode.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning_rpn.core.backbones import BACKBONES, batch_norm_layer, trainable_stages
from lightning_rpn.core.config import SettingError
from lightning_rpn.core.quality import parse_quality

__all__ = [
    "RESUME_DEFINING_HPARAMS",
    "WEIGHT_DEFINING_HPARAMS",
    "check_checkpoint_agrees",
    "check_optimizer_agrees",
    "check_resume_agrees",
]

WEIGHT_DEFINING_HPARAMS = (
    "backbone", "anchor_sizes", "aspect_ratios", "anchor_offset", "anchor_stride", "box_coder_weights",
    "head", "head_conv_depth", "head_conv_channels", "objectness", "quality", "cascade_stages",
    "cascade_dilation", "cascade_delta_scales",
)
"""``RPNModule`` arguments that a checkpoint's weights were trained for: a different value gives
tensors of other shapes or outputs of another meaning."""


CASCADE_PREFIX = "cascade_"
"""The ``RPNModule`` arguments of the cascade head alone (``model.head: cascade``)."""


RESUME_DEFINING_HPARAMS = ("optimizer", "weights", "frozen_bn", "trainable_layers")
"""``RPNModule`` arguments that decide what a checkpoint's optimiser state holds: the ``optimizer``
(SGD's momentum buffers or AdamW's moments and step counts) and, with a built-in backbone,
:data:`_TRAINING_HPARAMS`."""

_TRAINING_HPARAMS = ("weights", "frozen_bn", "trainable_layers")
"""Those that decide which backbone parameters train (:func:`~lightning_rpn.core.backbones.batch_norm_layer`,
:func:`~lightning_rpn.core.backbones.trainable_stages`)."""


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


def _normalised(name: str, value: Any) -> Any:
    """``value`` as the model reads it: ``quality`` as its branch names (``"centerness + iou"`` is
    ``"centerness+iou"``; their order stays: it is the order of the head's outputs); anchor sizes
    and ratios as one tuple when every level has the same (a flat ``[0.5, 1, 2]``, ``[[0.5, 1, 2]]``
    and that list once per level build the same anchors)."""
    if name == "quality" and isinstance(value, str):
        try:
            return parse_quality(value)
        except ValueError:
            return value
    comparable = _comparable(value)
    if name in ("anchor_sizes", "aspect_ratios") and isinstance(comparable, tuple) and comparable:
        if all(isinstance(entry, float) for entry in comparable):
            return (comparable,)
        if all(entry == comparable[0] for entry in comparable):
            return comparable[:1]
    return comparable


def check_checkpoint_agrees(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str | None = None) -> None:
    """``SettingError`` naming every :data:`WEIGHT_DEFINING_HPARAMS` value of the ``current`` model
    that differs from the ``saved`` checkpoint's (``checkpoint``: its path, for the message).

    A name the checkpoint does not record (an older version) or records as an object (a backbone
    module passed to ``load_from_checkpoint``), or that ``current`` leaves out, is not compared.
    """
    plain_heads = saved.get("head", "rpn") == "rpn" and current.get("head", "rpn") == "rpn"
    differ = [
        f"{name}: checkpoint {saved[name]!r}, this run {current[name]!r}"
        for name in WEIGHT_DEFINING_HPARAMS
        if name in saved and name in current and _comparable(saved[name]) is not _OBJECT
        and not (plain_heads and name.startswith(CASCADE_PREFIX))  # what a plain RPN never read
        and _normalised(name, saved[name]) != _normalised(name, current[name])
    ]
    if saved.get("proposal_score") == "quality" and current.get("proposal_score", "quality") != "quality":
        differ.append(f"proposal_score: checkpoint 'quality', whose objectness branch never trained, this run "
                      f"{current['proposal_score']!r}, which ranks by it")
    if differ:
        where = f" {checkpoint}" if checkpoint else ""
        raise SettingError(
            f"RPNModule: the checkpoint{where} was trained as another network than this run builds "
            f"({'; '.join(differ)}). A run follows its own config, so pass the config it was trained "
            "with (the run folder's config.yaml, or the values above as --model.* flags)"
        )


def _trained_parameters(hparams: Mapping[str, Any], num_stages: int) -> tuple[str, int]:
    """The backbone's batch norm (its class name, or "none") and how many stages train."""
    norm = batch_norm_layer(hparams["backbone"], hparams["weights"], hparams["frozen_bn"])
    trainable = trainable_stages(hparams["weights"], hparams["trainable_layers"], num_stages)
    return "none" if norm is None else norm.__name__, trainable


def check_optimizer_agrees(
    saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str | None = None
) -> None:
    """``SettingError`` when ``current`` names another ``optimizer`` than ``saved`` (the checkpoint
    ``fit`` resumes): the other optimiser would read the checkpoint's state and stop at its first
    step with a bare ``KeyError`` (``'step'``, ``'momentum'``). Not compared unless both record it."""
    if "optimizer" not in saved or "optimizer" not in current or saved["optimizer"] == current["optimizer"]:
        return
    where = f" {checkpoint}" if checkpoint else ""
    trained, wanted = saved["optimizer"], current["optimizer"]
    raise SettingError(
        f"RPNModule: fit cannot resume the checkpoint{where} with another optimizer than it was trained with "
        f"(model.optimizer: checkpoint {trained!r}, this run {wanted!r}; the optimiser state it holds is "
        f"{trained}'s, which {wanted} cannot read). Resume with --model.optimizer {trained} (the run folder's "
        f"config.yaml), or start a new fit from its weights: RPNModule.load_from_checkpoint(path, "
        f"optimizer={wanted!r}), then Trainer.fit without ckpt_path"
    )


def check_resume_agrees(
    saved: Mapping[str, Any], current: Mapping[str, Any], num_stages: int, checkpoint: str | None = None
) -> None:
    """``SettingError`` naming the :data:`RESUME_DEFINING_HPARAMS` of ``current`` and ``saved`` (the
    checkpoint ``fit`` resumes) that its optimiser's state does not fit: another ``optimizer``
    (:func:`check_optimizer_agrees`), or backbone settings that train other parameters: another
    batch norm or other trainable stages (of the ``num_stages`` of the backbone both name; torch
    only says that a parameter group's size differs).

    The backbone settings are compared only for a built-in backbone named by both and settings
    recorded by both.
    """
    check_optimizer_agrees(saved, current, checkpoint)
    if not all(name in saved and name in current for name in ("backbone", *_TRAINING_HPARAMS)):
        return
    backbone = current["backbone"]
    if not isinstance(backbone, str) or backbone not in BACKBONES or saved["backbone"] != backbone:
        return
    saved_norm, saved_stages = _trained_parameters(saved, num_stages)
    norm, stages = _trained_parameters(current, num_stages)
    effects = []
    if saved_norm != norm:
        effects.append(f"the backbone's batch norm: checkpoint {saved_norm}, this run {norm}")
    if saved_stages != stages:
        effects.append(f"trainable backbone stages of {num_stages}: checkpoint {saved_stages}, this run {stages}")
    if not effects:
        return
    settings = [f"{name}: checkpoint {saved[name]!r}, this run {current[name]!r}"
                for name in _TRAINING_HPARAMS if _comparable(saved[name]) != _comparable(current[name])]
    where = f" {checkpoint}" if checkpoint else ""
    raise SettingError(
        f"RPNModule: fit cannot resume the checkpoint{where} with other trainable parameters than it was "
        f"trained with, which its optimiser state holds ({'; '.join(settings)}; so {'; '.join(effects)}). "
        "Resume with the checkpoint's model.weights, model.frozen_bn and model.trainable_layers (the run "
        "folder's config.yaml); validate, test and predict load its weights either way"
    )
