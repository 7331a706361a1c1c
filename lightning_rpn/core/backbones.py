"""Feature backbones for the RPN: torchvision networks (+ FPN) with their channel/stride metadata.

Shapes: ``B`` images, ``L`` levels, ``H_l x W_l`` the feature size of level ``l``.

A backbone has the interface of :mod:`lightning_rpn.core.backbone_interface` (levels finest
first, ``out_channels``, ``strides`` measured by a dry run, ``size_divisibility``); a user's own
``nn.Module`` with it works as well.

Built-in backbones (:data:`BACKBONES`): ``resnet18_fpn``, ``resnet34_fpn``, ``resnet50_fpn``
(P2-P6, strides 4-64), ``mobilenet_v3_large_fpn`` (P3-P6 on the last block of each of the
stride-8/16/32 stages, strides 8-64), ``vgg16_c4`` (conv5_3, one level, stride 16, 512
channels: the 14x14x512 map of a 224x224 input), and ``tiny_fpn`` (a small plain CNN with an
FPN, strides 4-32, for fast CPU runs on the synthetic data set).

Two rules say how a named backbone is built from its settings, so that a checkpoint's settings can
be compared by what they build (:mod:`lightning_rpn.training.checkpoint_agreement`):
:func:`batch_norm_layer` (frozen with pretrained weights by default) and :func:`trainable_stages`
(freezing applies to pretrained weights only: a frozen random stage never learns).
"""

from __future__ import annotations

import os
import socket
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .backbone_interface import check_backbone, infer_strides  # importable from here too (older code)
from .config import SettingError

__all__ = [
    "BACKBONES",
    "StagedBackbone",
    "batch_norm_layer",
    "build_backbone",
    "check_backbone",
    "infer_strides",
    "trainable_stages",
    "weights_from_checkpoint",
]

DOWNLOAD_TIMEOUT_S = 60.0
"""Seconds a pretrained-weight download may wait for the network before it is an error."""
_LOAD_PRETRAINED: ContextVar[bool] = ContextVar("load_pretrained", default=True)
DEFAULT_TRAINABLE_LAYERS = 3
"""Stages, from the top, that train on pretrained weights when ``trainable_layers`` is not given."""


class StagedBackbone(nn.Module):
    """A chain of stages; chosen stage outputs, optionally through an FPN, are the levels.

    Args:
        stages: run in order; stage ``i`` consumes the output of stage ``i - 1``.
        taps: indices of the stages whose outputs feed the levels (increasing).
        tap_channels: channels of each tapped output.
        fpn_channels: FPN width; ``None`` returns the tapped outputs as they are.
        extra_max_pool: add a stride-2 max-pooled level on top of the FPN (P6).
        probe_size: dry-run input side used to measure the strides.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        taps: Sequence[int],
        tap_channels: Sequence[int],
        fpn_channels: int | None = 256,
        extra_max_pool: bool = True,
        probe_size: int = 128,
    ) -> None:
        super().__init__()
        if list(taps) != sorted(set(taps)) or not taps or taps[-1] >= len(stages):
            raise ValueError(
                f"StagedBackbone: taps must be increasing stage indices below {len(stages)}, "
                f"got {list(taps)}"
            )
        if len(tap_channels) != len(taps):
            raise ValueError(
                f"StagedBackbone: {len(taps)} taps but {len(tap_channels)} tap_channels"
            )
        self.stages = nn.ModuleList(stages[: taps[-1] + 1])
        self.taps = tuple(taps)
        self.fpn: FeaturePyramidNetwork | None = None
        if fpn_channels is not None:
            self.fpn = FeaturePyramidNetwork(
                list(tap_channels),
                fpn_channels,
                extra_blocks=LastLevelMaxPool() if extra_max_pool else None,
            )
            self.out_channels = int(fpn_channels)
        else:
            if len(set(tap_channels)) != 1:
                raise ValueError(
                    f"StagedBackbone: without an FPN every level needs the same channels, "
                    f"got {list(tap_channels)}"
                )
            self.out_channels = int(tap_channels[0])
        self.strides = infer_strides(self, probe_size)
        self.size_divisibility = max(self.strides)

    def forward(self, images: Tensor) -> list[Tensor]:
        if self.training and images.shape[0] == 1:
            self._check_batch_statistics(images)
        x = images
        tapped: OrderedDict[str, Tensor] = OrderedDict()
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.taps:
                tapped[str(index)] = x
        if self.fpn is None:
            return list(tapped.values())
        return list(self.fpn(tapped).values())

    def _check_batch_statistics(self, images: Tensor) -> None:
        """``ValueError`` naming the batch and image size where training BatchNorm would see one
        value per channel (one image whose last stage is a 1x1 map): torch's own error names
        neither, and a norm without batch statistics would change what every other batch computes."""
        stride = self.strides[len(self.taps) - 1]  # the last stage's
        height, width = images.shape[-2:]
        if height > stride or width > stride:
            return
        if any(isinstance(m, nn.BatchNorm2d) and m.training for m in self.stages.modules()):
            raise ValueError(
                f"{type(self).__name__}: a training batch of 1 image of {height}x{width} px leaves a 1x1 "
                f"map at stride {stride}, one value per channel, and BatchNorm needs more for batch "
                f"statistics. Train with batches of 2 or more images (data.batch_size; a last batch of one "
                f"image too) or with images larger than {stride} px on a side"
            )

    def freeze_stages(self, trainable_layers: int) -> None:
        """Stop gradients in all but the last ``trainable_layers`` stages (FPN stays trainable)."""
        _check_trainable_layers(trainable_layers, len(self.stages))
        for index, stage in enumerate(self.stages):
            trainable = index >= len(self.stages) - trainable_layers
            for parameter in stage.parameters():
                parameter.requires_grad_(trainable)


def _check_trainable_layers(trainable_layers: int, num_stages: int) -> None:
    if not 0 <= trainable_layers <= num_stages:
        raise ValueError(
            f"trainable_layers must be in [0, {num_stages}] for this backbone, got {trainable_layers}"
        )


def trainable_stages(weights: str | None, trainable_layers: int | None, num_stages: int) -> int:
    """How many of ``num_stages`` stages, from the top, train: ``trainable_layers`` (default
    :data:`DEFAULT_TRAINABLE_LAYERS`) with pretrained ``weights``, every stage without (a frozen
    random stage never learns; :func:`build_backbone` warns when it ignores ``trainable_layers``)."""
    if trainable_layers is not None:
        _check_trainable_layers(trainable_layers, num_stages)
    if weights is None:
        return num_stages
    return DEFAULT_TRAINABLE_LAYERS if trainable_layers is None else trainable_layers


def batch_norm_layer(name: str, weights: str | None, frozen_bn: bool | None) -> type[nn.Module] | None:
    """The batch norm of backbone ``name`` built with ``weights`` and ``frozen_bn``: FrozenBatchNorm2d
    (``frozen_bn=None``: with pretrained weights, the usual recipe for small detection batches) or
    BatchNorm2d; ``None`` for ``vgg16_c4``, which has none. The two hold other parameters (an
    optimiser's state of one does not fit the other) but load each other's weights."""
    if name == "vgg16_c4":
        return None
    if name == "tiny_fpn":
        if frozen_bn:
            raise ValueError("tiny_fpn: frozen_bn=True is not supported (it is trained from scratch)")
        return nn.BatchNorm2d
    frozen = weights is not None if frozen_bn is None else frozen_bn
    return FrozenBatchNorm2d if frozen else nn.BatchNorm2d


def _resolve_weights(
    arch: str, weights: str | None
) -> tuple[torchvision.models.WeightsEnum | None, str | None]:
    """Split ``weights`` into a torchvision weight enum or a local checkpoint path."""
    if weights is None:
        return None, None
    if os.path.exists(weights):
        return None, weights
    if weights.lower() in ("none", "null", ""):
        raise ValueError(f"weights={weights!r}: for no pretrained weights write null (YAML and the command "
                         "line: --model.weights null); this is read as a name")
    try:
        enum = torchvision.models.get_weight(weights)
    except (ValueError, KeyError, AttributeError) as error:
        raise ValueError(
            f"weights={weights!r}: not an existing file and not a torchvision weight name like "
            f"'ResNet50_Weights.IMAGENET1K_V1' ({error})"
        ) from None
    expected = torchvision.models.get_model_weights(arch)
    if not isinstance(enum, expected):
        raise ValueError(
            f"weights={weights!r} are {type(enum).__name__}, but the {arch} backbone needs "
            f"{expected.__name__}.*"
        )
    return enum, None


def _load_checkpoint(network: nn.Module, path: str, what: str, unused: tuple[str, ...] = ()) -> None:
    """Load a state dict saved by ``torch.save`` (optionally under 'state_dict' or 'model').

    ``what`` names the network the file must hold, for the error. Keys under the ``unused`` prefixes (a
    classifier's head, which no backbone keeps) may be missing. Weights that do not fit are a
    ``ValueError`` summing up the mismatch (see :func:`_mismatch`), not the list of every key.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"weights={path!r}: expected a state dict, got {type(state).__name__}")
    expected = network.state_dict()
    reshaped = [
        key for key, value in state.items()
        if key in expected and isinstance(value, Tensor) and value.shape != expected[key].shape
    ]
    # not strict: the network's own loading rules apply first (frozen batch norm drops
    # num_batches_tracked), then what is left over is summed up; the state's _metadata (layer
    # versions) is kept unless other-shaped entries, an error anyway, have to be left out
    fitting = {k: v for k, v in state.items() if k not in reshaped} if reshaped else state
    result = network.load_state_dict(fitting, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(unused)]
    problem = _mismatch(missing, list(result.unexpected_keys), reshaped, set(expected))
    if problem:
        raise ValueError(
            f"model.weights={path!r} do not fit {type(network).__name__}: {problem}. model.weights must "
            f"be the state_dict of {what}, as torch.save(network.state_dict(), path) writes it"
        )


_LISTED_KEYS = 3
"""Keys named per kind of mismatch in a weights error (a detection checkpoint has hundreds)."""


def _mismatch(missing: list[str], unexpected: list[str], reshaped: list[str], expected: set[str]) -> str:
    """What kept a state dict from loading into a network of state-dict keys ``expected`` ('' if
    nothing): the counts and first keys of the missing, unexpected and other-shaped entries, and a
    prefix under which the unexpected keys hold the network's (a detection model's checkpoint)."""
    parts = [
        f"{len(keys)} {kind} key(s) ({_first_keys(keys)})"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("other-shaped", reshaped))
        if keys
    ]
    prefix = _stripped_prefix(unexpected, expected)
    if prefix:
        parts.append(
            f"the file holds the network's weights under {prefix!r} (a detection model's or a wrapper's "
            f"checkpoint): save the network's own state_dict, or the entries under {prefix!r} with the "
            "prefix stripped"
        )
    return "; ".join(parts)


def _first_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    return shown if len(keys) <= _LISTED_KEYS else f"{shown}, ..."


def _stripped_prefix(unexpected: list[str], expected: set[str]) -> str:
    """The dotted prefix (``'backbone.body.'``) under which ``unexpected`` holds keys of ``expected``
    (the most of them, at least one), or ''."""
    counts: dict[str, int] = {}
    for key in unexpected:
        parts = key.split(".")
        for cut in range(1, len(parts)):
            if ".".join(parts[cut:]) in expected:
                prefix = ".".join(parts[:cut]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else ""


@contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Inside it, backbones with pretrained ``weights`` are built as with them (frozen batch norm,
    frozen layers) but their weights are neither downloaded nor read: a checkpoint loaded next
    holds every weight (``validate`` / ``test`` / ``predict --ckpt_path``), or only the anchors
    are needed (``check-data``, ``analyze-anchors``), also on a machine without internet."""
    token = _LOAD_PRETRAINED.set(False)
    try:
        yield
    finally:
        _LOAD_PRETRAINED.reset(token)


def _build_classifier(arch: str, enum: torchvision.models.WeightsEnum | None, weights: str,
                      kwargs: dict[str, object]) -> nn.Module:
    """``torchvision.models.<arch>(weights=enum, **kwargs)``; a failed or stalled download of
    ``enum`` is a ``ValueError`` naming ``model.weights`` and what to pass instead."""
    if enum is None:
        return getattr(torchvision.models, arch)(weights=None, **kwargs)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torch.hub's download sets none: a silent network hangs
    try:
        return getattr(torchvision.models, arch)(weights=enum, **kwargs)
    except OSError as error:  # URLError, timeouts, connection errors
        raise SettingError(
            f"model.weights={weights!r}: downloading them failed ({error}). Without internet pass "
            f"--model.weights null (random initialisation) or a local file of these weights; once "
            f"downloaded they are kept in {torch.hub.get_dir()}/checkpoints"
        ) from error
    finally:
        socket.setdefaulttimeout(previous)


def _classifier(arch: str, weights: str | None, norm: type[nn.Module] | None) -> nn.Module:
    """The torchvision classification network with batch norm ``norm`` and ``weights`` loaded
    (outside :func:`weights_from_checkpoint`)."""
    enum, path = _resolve_weights(arch, weights)
    kwargs: dict[str, object] = {} if norm is None else {"norm_layer": norm}
    load = _LOAD_PRETRAINED.get()
    network = _build_classifier(arch, enum if load else None, str(weights), kwargs)
    if path is not None and load:
        _load_checkpoint(network, path, f"torchvision's {arch} classification network", unused=("fc.", "classifier."))
    return network


def _resnet_fpn(arch: str, weights: str | None, norm: type[nn.Module] | None) -> StagedBackbone:
    net = _classifier(arch, weights, norm)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
    channels = [_last_conv_channels(stage) for stage in stages[1:]]
    return StagedBackbone(stages, taps=(1, 2, 3, 4), tap_channels=channels)


def _last_conv_channels(module: nn.Module) -> int:
    """Output channels of a stage: those of the last convolution it registers."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _group_by_stride(blocks: nn.Sequential, probe_size: int = 64) -> list[nn.Sequential]:
    """Split a sequential feature extractor into stages of equal output stride (dry run)."""
    was_training = blocks.training
    blocks.eval()
    sides = []
    with torch.no_grad():
        x = torch.zeros(1, 3, probe_size, probe_size)
        for block in blocks:
            x = block(x)
            sides.append(x.shape[-1])
    blocks.train(was_training)
    stages: list[list[nn.Module]] = []
    previous = None
    for block, side in zip(blocks, sides):
        if side != previous:
            stages.append([])
            previous = side
        stages[-1].append(block)
    return [nn.Sequential(*stage) for stage in stages]


def _mobilenet_v3_large_fpn(weights: str | None, norm: type[nn.Module] | None) -> StagedBackbone:
    net = _classifier("mobilenet_v3_large", weights, norm)
    stages = _group_by_stride(net.features)  # strides 2, 4, 8, 16, 32
    taps = (2, 3, 4)
    channels = [_last_conv_channels(stages[index]) for index in taps]
    return StagedBackbone(stages, taps=taps, tap_channels=channels)


def _vgg16_c4(weights: str | None, norm: type[nn.Module] | None) -> StagedBackbone:
    net = _classifier("vgg16", weights, norm)
    layers = list(net.features.children())[:-1]  # drop pool5: conv5_3 + ReLU is the output
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
    bounds = [0, *pools, len(layers)]
    stages = [nn.Sequential(*layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return StagedBackbone(
        stages,
        taps=(len(stages) - 1,),
        tap_channels=(_last_conv_channels(stages[-1]),),
        fpn_channels=None,
    )


def _tiny_fpn(weights: str | None, norm: type[nn.Module] | None) -> StagedBackbone:
    """Five conv stages (16-128 channels, BatchNorm) and a 32-channel FPN; for CPU runs.

    The FPN output convolutions and the RPN head at stride 4 dominate the cost; 32 channels
    train about 1.5x faster than 64 on CPU and reach the same recall on the synthetic shapes.
    """
    layer = norm or nn.BatchNorm2d

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            layer(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            layer(cout),
            nn.ReLU(inplace=True),
        )

    widths = (16, 32, 64, 96, 128)
    stages = [block(3, widths[0])] + [block(a, b) for a, b in zip(widths[:-1], widths[1:])]
    backbone = StagedBackbone(
        stages, taps=(1, 2, 3, 4), tap_channels=widths[1:], fpn_channels=32, extra_max_pool=False
    )
    if weights is not None and _LOAD_PRETRAINED.get():
        _load_checkpoint(backbone, weights, "a tiny_fpn backbone")
    return backbone


BACKBONES: dict[str, Callable[[str | None, type[nn.Module] | None], StagedBackbone]] = {
    "resnet18_fpn": lambda w, n: _resnet_fpn("resnet18", w, n),
    "resnet34_fpn": lambda w, n: _resnet_fpn("resnet34", w, n),
    "resnet50_fpn": lambda w, n: _resnet_fpn("resnet50", w, n),
    "mobilenet_v3_large_fpn": _mobilenet_v3_large_fpn,
    "vgg16_c4": _vgg16_c4,
    "tiny_fpn": _tiny_fpn,
}


def build_backbone(
    name: str,
    weights: str | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
) -> StagedBackbone:
    """Build a named backbone (see :data:`BACKBONES`).

    Args:
        name: one of :data:`BACKBONES`.
        weights: a torchvision weight name (``"ResNet50_Weights.IMAGENET1K_V1"``), a local
            checkpoint of the classification network (``torch.load(weights_only=True)``), or
            ``None`` for random initialisation.
        trainable_layers: how many stages, counted from the top, get gradients with pretrained
            ``weights`` (ResNet: 5 = everything incl. the stem). ``None``: 3. Without weights every
            stage trains, and a value that would freeze one is ignored with a warning.
        frozen_bn: replace BatchNorm by FrozenBatchNorm2d. ``None``: frozen with weights (the
            usual recipe for small detection batches), trainable BatchNorm without.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is unknown; expected one of {sorted(BACKBONES)}")
    backbone = BACKBONES[name](weights, batch_norm_layer(name, weights, frozen_bn))
    stages = len(backbone.stages)
    trainable = trainable_stages(weights, trainable_layers, stages)
    if trainable_layers is not None and trainable_layers != trainable:
        warnings.warn(
            f"{name}: trainable_layers={trainable_layers} is ignored: without pretrained weights "
            f"(model.weights null) all {stages} stages train, as a frozen random stage never learns. "
            "Give weights to freeze the lower stages, or leave trainable_layers unset (null)",
            UserWarning,
            stacklevel=2,
        )
    backbone.freeze_stages(trainable)
    return backbone
