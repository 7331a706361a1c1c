"""What every proposal network shares: its proposal settings, its call interface and their checks.

Shapes: ``B`` images, ``L`` levels, ``H_l x W_l`` the feature size of level ``l``, ``N_l``
anchors (or boxes) of level ``l`` of an image, ``P`` proposals of an image.

:class:`RegionProposer` is the base of :class:`~lightning_rpn.core.rpn.RPN` and
:class:`~lightning_rpn.core.cascade.CascadeRPN`, so that both are called alike by
``RPNModule``, the torchvision drop-in and the export:

- the proposal settings: one :class:`~lightning_rpn.core.config.ProposalConfig` (built by
  each subclass from its flat keywords), read into the attributes the proposal step uses
  (``pre_nms_top_n`` / ``post_nms_top_n`` as ``{"train", "test"}`` dicts, ``nms_thresh``,
  ``min_size``, ``score_thresh``), which stay the one source of truth (code may set them:
  ``pre_nms_top_n`` / ``post_nms_top_n`` to such a dict, to torchvision's
  ``{"training", "testing"}`` one, or to one int for both modes, or change an entry, by either
  name: a :class:`TopN` checks each change as it is made); ``proposal_config`` is derived from them;
- ``forward(features, image_sizes, targets, *, ...)``, documented once here, which checks the
  levels and the batch and hands a subclass's ``_forward`` the call as one
  :class:`ProposalInputs`;
- the gt boxes of ``targets``, checked (``_gt_boxes``), with each image's sampling generator;
- :func:`~lightning_rpn.core.proposals.generate_proposals` with the train or test settings
  chosen by ``self.training`` (``_proposals``).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .backbone_interface import Features, feature_levels
from .box_coder import BoxCoder
from .config import AnchorTargetConfig, ProposalConfig
from .matching import check_gt_box_batch
from .proposals import generate_proposals
from .targets import sample_generator

__all__ = ["ProposalInputs", "RegionProposer", "TopN", "top_n_by_mode"]

Proposals = list[tuple[Tensor, ...]]


@dataclass(frozen=True)
class ProposalInputs:
    """One call of :meth:`RegionProposer.forward`, its levels and sizes checked (see there)."""

    levels: list[Tensor]
    image_sizes: list[tuple[int, int]]
    targets: Sequence[Mapping[str, Tensor]] | None
    anchor_targets: tuple[Tensor, Tensor] | None
    image_ids: Sequence[int | str] | None
    sampling_keys: Sequence[int | str] | None
    sampling_epoch: int | None
    need_proposals: bool
    proposal_logits: bool

    @property
    def batch(self) -> int:
        return self.levels[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.levels[0].device

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """``(H_l, W_l)`` of every level."""
        return [(int(level.shape[-2]), int(level.shape[-1])) for level in self.levels]

    def keys(self, where: str) -> tuple[list[int | str], list[int | str]]:
        """``(ids, sampling keys)`` of the images (default: the index in the batch)."""
        batch = self.batch
        ids = list(range(batch)) if self.image_ids is None else list(self.image_ids)
        keys = ids if self.sampling_keys is None else list(self.sampling_keys)
        if len(ids) != batch or len(keys) != batch:
            raise ValueError(
                f"{where}: {len(ids)} image_ids and {len(keys)} sampling_keys for a batch of {batch} images"
            )
        return ids, keys


def _fresh_generator() -> torch.Generator:
    """A CPU generator seeded from torch's global generator: a new sample at every call, repeatable
    under ``torch.manual_seed``."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
    return generator


class RegionProposer(nn.Module):
    """Base of the proposal networks (see the module docstring); subclasses implement ``_forward``.

    Args:
        anchor_generator: anchors per level.
        box_coder: delta parametrisation (``None``: ``BoxCoder()``).
        target_config: anchor labelling and sampling (``None``: ``AnchorTargetConfig()``).
        seed: mixed with the epoch and each image's sampling key to seed its sampling.
        proposal_config: the proposal settings.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        box_coder: BoxCoder | None,
        target_config: AnchorTargetConfig | None,
        seed: int,
        proposal_config: ProposalConfig,
    ) -> None:
        super().__init__()
        config = proposal_config
        self.anchor_generator = anchor_generator
        self.box_coder = BoxCoder() if box_coder is None else box_coder
        self.target_config = AnchorTargetConfig() if target_config is None else target_config
        self.seed = seed
        self.pre_nms_top_n = {"train": config.pre_nms_top_n_train, "test": config.pre_nms_top_n_test}
        self.post_nms_top_n = {"train": config.post_nms_top_n_train, "test": config.post_nms_top_n_test}
        self.nms_thresh = config.nms_thresh
        self.min_size = config.min_size
        self.score_thresh = config.score_thresh

    @property
    def pre_nms_top_n(self) -> TopN:
        """Candidates kept per image and level before NMS, ``{"train": n, "test": n}`` (an entry may
        be changed in place, also as torchvision's ``["testing"]``; set an int for both modes, or
        torchvision's ``{"training", "testing"}``)."""
        return self._pre_nms_top_n_by_mode

    @pre_nms_top_n.setter
    def pre_nms_top_n(self, value: int | Mapping[str, int]) -> None:
        self._pre_nms_top_n_by_mode = TopN(value, f"{type(self).__name__}.pre_nms_top_n")

    @property
    def post_nms_top_n(self) -> TopN:
        """Proposals kept per image after NMS, ``{"train": n, "test": n}`` (set as ``pre_nms_top_n``)."""
        return self._post_nms_top_n_by_mode

    @post_nms_top_n.setter
    def post_nms_top_n(self, value: int | Mapping[str, int]) -> None:
        self._post_nms_top_n_by_mode = TopN(value, f"{type(self).__name__}.post_nms_top_n")

    def _top_n(self, mode: str) -> tuple[int, int]:
        """``(pre_nms_top_n, post_nms_top_n)`` of ``mode``."""
        return self.pre_nms_top_n[mode], self.post_nms_top_n[mode]

    @property
    def proposal_config(self) -> ProposalConfig:
        """The current proposal settings, read from the attributes the proposal step uses."""
        (pre_train, post_train), (pre_test, post_test) = self._top_n("train"), self._top_n("test")
        return ProposalConfig(
            pre_nms_top_n_train=pre_train,
            post_nms_top_n_train=post_train,
            pre_nms_top_n_test=pre_test,
            post_nms_top_n_test=post_test,
            nms_thresh=self.nms_thresh,
            min_size=self.min_size,
            score_thresh=self.score_thresh,
        )

    def forward(
        self,
        features: Features,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        *,
        anchor_targets: tuple[Tensor, Tensor] | None = None,
        image_ids: Sequence[int | str] | None = None,
        sampling_keys: Sequence[int | str] | None = None,
        sampling_epoch: int | None = None,
        need_proposals: bool = True,
        proposal_logits: bool = False,
    ) -> tuple[Proposals, dict[str, Tensor]]:
        """Proposals per image ``(boxes [P, 4], probabilities [P])`` and the loss dict.

        Args:
            features: per-level ``[B, C, H_l, W_l]`` maps (a dict is taken in its order, a single
                tensor is one level).
            image_sizes: ``(h, w)`` of each image before padding.
            targets: per image ``{"boxes": [G, 4], "crowd_boxes": [C, 4] (optional)}``.
            anchor_targets: precomputed ``(labels [B, N] integer, deltas float32 [B, N, 4])``;
                takes precedence over ``targets`` where the network can use them (the RPN).
            image_ids: ids naming each image in errors, and seeding its sampling unless
                ``sampling_keys`` are given (default: index in the batch).
            sampling_keys: what seeds each image's sampling (``RPNBatch.sampling_keys``: the
                items' dataset positions, so that an image listed twice draws two samples).
            sampling_epoch: the training epoch, mixed with ``seed`` and each image's key into its
                sampling seed, so that every epoch samples afresh and a run is reproducible and
                resumable: the data pipeline's targets (pass the epoch it used:
                ``RPNCollate.set_epoch``). ``None``: every call draws a fresh sample from torch's
                global generator, as torchvision's sampler does (a training loop of one's own
                that passes no epoch must not sample the same anchors at every step).
            need_proposals: ``False`` skips proposal generation and returns ``[]``.
            proposal_logits: proposals as ``(boxes, probabilities, logits [P])``: the logits
                keep the ranking that float32 probabilities lose once they round to 1.0.

        Losses ``{"loss_rpn_cls", "loss_rpn_reg"}`` are computed whenever targets are given,
        in train and eval mode alike; ``{}`` otherwise (in training mode with gradients on and
        trainable parameters, with a warning: a training loop that forgot its targets would
        otherwise train without them).
        """
        name = type(self).__name__
        if (self.training and targets is None and anchor_targets is None and torch.is_grad_enabled()
                and any(parameter.requires_grad for parameter in self.parameters())):  # not a frozen RPN
            warnings.warn(
                f"{name} is in training mode but got no targets, so it returns no losses ({{}}); pass "
                "targets=[{'boxes': Tensor[G, 4]}, ...] to train it, or call .eval() (or torch.no_grad()) "
                "for proposals only",
                UserWarning,
                stacklevel=4,  # the caller of the module: forward, Module._call_impl, Module.__call__
            )
        levels = feature_levels(features, name)
        if len(levels) != self.anchor_generator.num_levels:
            raise ValueError(
                f"{name}: got {len(levels)} feature levels but the anchor generator has "
                f"{self.anchor_generator.num_levels} (strides {self.anchor_generator.strides})"
            )
        batch = levels[0].shape[0]
        if len(image_sizes) != batch:
            raise ValueError(f"{name}: {len(image_sizes)} image_sizes for a batch of {batch} feature maps")
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        self._check_sizes_fit(levels[0], sizes)
        return self._forward(
            ProposalInputs(levels, sizes, targets, anchor_targets, image_ids, sampling_keys, sampling_epoch,
                           need_proposals, proposal_logits)
        )

    def _check_sizes_fit(self, finest: Tensor, sizes: list[tuple[int, int]]) -> None:
        """``ValueError`` for an image size that the finest level cannot come from: a stride or more
        beyond what it covers (``H_0 * stride``), so not the batch's size, and its proposals would be
        clipped to a place no feature saw. Less than a stride beyond is what a backbone that pools
        with floor rounding gives an unpadded image (VGG16: 600 px -> 37 cells of 16 px)."""
        stride = self.anchor_generator.strides[0]
        covered = (int(finest.shape[-2]) * stride, int(finest.shape[-1]) * stride)
        for index, (height, width) in enumerate(sizes):
            if height >= covered[0] + stride or width >= covered[1] + stride:
                raise ValueError(
                    f"{type(self).__name__}: image_sizes[{index}] is {(height, width)} (h, w), larger than the "
                    f"{covered} px that the features cover ({tuple(finest.shape[-2:])} at stride {stride}; an "
                    f"image of up to {(covered[0] + stride - 1, covered[1] + stride - 1)} px gives them with "
                    "floor rounding); image_sizes are the (h, w) of the images the features were computed from, "
                    "before padding"
                )

    def _forward(self, inputs: ProposalInputs) -> tuple[Proposals, dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement _forward")

    def _gt_boxes(self, inputs: ProposalInputs) -> tuple[list[Tensor], list[torch.Generator]]:
        """Every image's gt boxes (float32 ``[G, 4]`` on the features' device) and sampling generator.

        Every gt box must be finite, non-empty and at least partly inside its image; errors name
        the image by its index and id.
        """
        name = type(self).__name__
        targets = inputs.targets
        assert targets is not None
        if len(targets) != inputs.batch:
            raise ValueError(f"{name}: {len(targets)} targets for a batch of {inputs.batch} images")
        ids, keys = inputs.keys(name)
        gt_boxes = []
        for index, (target, image_id) in enumerate(zip(targets, ids)):
            if not isinstance(target, Mapping):
                raise TypeError(
                    f"{name} targets[{index}] (image_id={image_id!r}): expected a dict {{'boxes': Tensor[G, 4]}} "
                    f"per image (torchvision's format), got {_describe(target)}; for plain box tensors pass "
                    "[{'boxes': b} for b in boxes]"
                )
            boxes = target.get("boxes")
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                got = "nothing" if boxes is None else _describe(boxes)
                raise ValueError(
                    f"{name} targets[{index}] (image_id={image_id!r}): the 'boxes' entry must be gt boxes "
                    f"[G, 4], got {got}"
                )
            gt_boxes.append(boxes.to(device=inputs.device, dtype=torch.float32))
        check_gt_box_batch(gt_boxes, lambda i: f"{name} targets[{i}] (image_id={ids[i]!r})", inputs.image_sizes)
        if inputs.sampling_epoch is None:
            return gt_boxes, [_fresh_generator() for _ in keys]
        return gt_boxes, [sample_generator(self.seed, key, inputs.sampling_epoch) for key in keys]

    def _proposals(
        self,
        logits: Sequence[Tensor],
        deltas: Sequence[Tensor],
        anchors: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        return_logits: bool,
    ) -> Proposals:
        """:func:`~lightning_rpn.core.proposals.generate_proposals` with this network's settings
        (the train ones while ``self.training``, else the test ones)."""
        pre_nms_top_n, post_nms_top_n = self._top_n("train" if self.training else "test")
        return generate_proposals(
            logits,
            deltas,
            anchors,
            image_sizes,
            pre_nms_top_n,
            post_nms_top_n,
            self.nms_thresh,
            self.min_size,
            self.score_thresh,
            box_coder=self.box_coder,
            return_logits=return_logits,
        )


_TOP_N_KEYS = {"train": "train", "test": "test", "training": "train", "testing": "test"}
"""The modes' keys of a top-n setting: ours and torchvision's (``RegionProposalNetwork``)."""


def top_n_by_mode(value: object, where: str) -> dict[str, int]:
    """A top-n setting as ``{"train": n, "test": n}``: from one positive int (both modes), from such a
    dict, or from torchvision's ``{"training": n, "testing": n}``; a ``ValueError`` naming the
    accepted forms otherwise."""
    if _positive_int(value):
        return {"train": int(value), "test": int(value)}
    if isinstance(value, Mapping):
        modes = {_TOP_N_KEYS.get(key): count for key, count in value.items()}
        if len(value) == 2 and set(modes) == {"train", "test"} and all(map(_positive_int, modes.values())):
            return {mode: int(count) for mode, count in modes.items()}
    raise ValueError(
        f"{where} must be a positive int (both modes), {{'train': n, 'test': n}} or torchvision's "
        f"{{'training': n, 'testing': n}} with positive ints, got {value!r}"
    )


class TopN(dict):
    """A top-n setting ``{"train": n, "test": n}`` that checks every change as it is made.

    Built by :func:`top_n_by_mode`; torchvision's keys ``"training"`` / ``"testing"`` read and
    write the same two entries, so code written for torchvision's ``rpn._pre_nms_top_n`` works on
    it; another key, a value that is not a positive int, or removing an entry is an error at once.
    """

    where = "top-n"  # a class default: unpickling sets the entries before the instance's own

    def __init__(self, value: object, where: str) -> None:
        super().__init__(top_n_by_mode(value, where))
        self.where = where

    def __getitem__(self, key: str) -> int:
        return super().__getitem__(_TOP_N_KEYS.get(key, key))

    def __setitem__(self, key: str, value: int) -> None:
        mode = _TOP_N_KEYS.get(key)
        if mode is None or not _positive_int(value):
            raise ValueError(f"{self.where}[{key!r}] = {value!r}: the keys are 'train' / 'test' (or torchvision's "
                             "'training' / 'testing') and the values positive ints")
        super().__setitem__(mode, int(value))  # type: ignore[arg-type]

    def update(self, *args: object, **kwargs: int) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():  # type: ignore[arg-type]
            self[key] = value

    def _fixed(self, *args: object, **kwargs: object) -> None:
        raise TypeError(f"{self.where} keeps both its entries: set one, or assign a new setting")

    __delitem__ = pop = popitem = clear = setdefault = _fixed  # type: ignore[assignment]


def _positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
