"""Drop-in replacement for torchvision's ``RegionProposalNetwork`` (Faster / Mask R-CNN).

Shapes: ``B`` images, ``L`` levels, ``Hp x Wp`` the padded batch, ``H_l x W_l`` the feature
size of level ``l``, ``G`` gt boxes of an image, ``P`` proposals of an image.

:class:`TorchvisionRPN` has the interface torchvision's detectors call,
``forward(images: ImageList, features: dict[str, Tensor], targets) -> (boxes, losses)`` with the
loss keys ``loss_objectness`` / ``loss_rpn_box_reg``, and runs our :class:`~lightning_rpn.core.rpn.RPN`
(grid-restricted anchor matching, batched proposal generation) or
:class:`~lightning_rpn.core.cascade.CascadeRPN` inside, through the interface both share
(:class:`~lightning_rpn.core.proposer.RegionProposer`). So an existing model keeps everything
else::

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(...)
    model.rpn = TorchvisionRPN.from_detector(model)

:meth:`TorchvisionRPN.from_torchvision` copies the anchor sizes and ratios, the matcher,
sampler, box coder and proposal settings and the head weights, so evaluation proposals equal
torchvision's (and, sampling aside, so do the losses). To use settings torchvision lacks
(``allowed_border``, other box losses, a softmax head, quality scoring), wrap an :class:`RPN`
of your own: ``model.rpn = TorchvisionRPN(RPN(AnchorGenerator(sizes, ratios, strides),
in_channels=256, ...))``; for cascade refinement, a :class:`CascadeRPN` (one anchor per
location): ``TorchvisionRPN(CascadeRPN(AnchorGenerator(sizes, ((1.0,),), strides), in_channels=256))``
(its losses are its own: the objectness of the last stage and every stage's IoU loss).
Differences from torchvision's class:

- anchor strides are fixed at construction (torchvision derives them per batch as
  ``padded size // feature size``, which rounds when the padded size is not a multiple of a
  level's stride); both agree whenever the padded size is a multiple of the largest stride,
  which torchvision's default ``size_divisible=32`` does not ensure for a stride-64 level
  (set ``detector.transform.size_divisible = 64`` for identical proposals);
- it is not TorchScript-scriptable.

It starts in the train / eval mode of the RPN it replaces, returns proposals in the features'
dtype (so a ``.double()`` detector runs, and under autocast they are in its dtype, as
torchvision's are), and torchvision's proposal settings read and write the wrapped network's:
``_pre_nms_top_n`` / ``_post_nms_top_n`` (a mapping edits the modes it names, an int sets both),
``nms_thresh``, ``score_thresh``, ``min_size``, and the ``pre_nms_top_n()`` /
``post_nms_top_n()`` of the current mode.

Anchor sampling draws from torch's global generator at every training step, as torchvision's
sampler does (a new sample each step, repeatable under ``torch.manual_seed``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TorchvisionRPNHead

from lightning_rpn.core.anchors import AnchorGenerator
from lightning_rpn.core.backbones import infer_strides
from lightning_rpn.core.box_coder import BoxCoder
from lightning_rpn.core.head import RPNHead
from lightning_rpn.core.proposer import RegionProposer, TopN
from lightning_rpn.core.rpn import RPN
from lightning_rpn.core.targets import AnchorTargetConfig

__all__ = ["TorchvisionRPN"]

_LOSS_KEYS = {"loss_rpn_cls": "loss_objectness", "loss_rpn_reg": "loss_rpn_box_reg"}


def _copy_head(head: nn.Module, num_anchors: int) -> RPNHead:
    """Our :class:`RPNHead` with the weights, device and dtype of torchvision's ``RPNHead`` (conv + ReLU blocks)."""
    if not isinstance(head, TorchvisionRPNHead):
        raise TypeError(
            f"TorchvisionRPN.from_torchvision: rpn.head must be torchvision's RPNHead, got "
            f"{type(head).__name__}; build an RPN with your own head and wrap it in TorchvisionRPN"
        )
    if len(head.conv) == 0:
        raise ValueError(
            "TorchvisionRPN.from_torchvision: rpn.head has no 3x3 conv (conv_depth=0); expected at least one"
        )
    convs = []
    for index, block in enumerate(head.conv):
        layers = list(block)
        conv = layers[0] if layers else None
        if (
            len(layers) != 2
            or not isinstance(conv, nn.Conv2d)
            or not isinstance(layers[1], nn.ReLU)
            or conv.kernel_size != (3, 3)
            or conv.stride != (1, 1)
            or conv.padding != (1, 1)
            or conv.bias is None
        ):
            raise ValueError(
                f"TorchvisionRPN.from_torchvision: rpn.head.conv[{index}] is {block}; only 3x3 "
                f"conv (stride 1, padding 1, bias) + ReLU blocks without normalisation can be copied"
            )
        convs.append(conv)
    channels = head.cls_logits.in_channels
    if head.cls_logits.out_channels != num_anchors:
        raise ValueError(
            f"TorchvisionRPN.from_torchvision: rpn.head.cls_logits has {head.cls_logits.out_channels} "
            f"outputs but the anchor generator has {num_anchors} anchors per location"
        )
    ours = RPNHead(channels, num_anchors, conv_depth=len(convs))
    ours_convs = [m for m in ours.conv if isinstance(m, nn.Conv2d)]
    pairs = list(zip(ours_convs, convs)) + [(ours.cls_logits, head.cls_logits), (ours.bbox_deltas, head.bbox_pred)]
    for target, source in pairs:
        if target.weight.shape != source.weight.shape:
            raise ValueError(
                f"TorchvisionRPN.from_torchvision: head layer {source} does not fit {target} "
                f"(weights {tuple(source.weight.shape)} vs {tuple(target.weight.shape)})"
            )
        target.load_state_dict(source.state_dict())
    return ours.to(head.cls_logits.weight.device, head.cls_logits.weight.dtype)  # a .double() head stays float64


def _edited_top_n(current: TopN, value: object, where: str) -> TopN:
    """``current`` after torchvision-style code assigns ``value``: a mapping changes the modes it
    names (``{"testing": 5}`` keeps the training entry), an int sets both; checked as ``TopN`` does."""
    if not isinstance(value, Mapping):
        return TopN(value, where)
    edited = TopN(dict(current), where)
    edited.update(value)
    return edited


def _forwarded(name: str, doc: str) -> property:
    """A property reading and writing the wrapped network's ``name`` (torchvision's attribute of the same name)."""

    def get(self: TorchvisionRPN) -> Any:
        return getattr(self.rpn, name)

    def set_(self: TorchvisionRPN, value: Any) -> None:
        setattr(self.rpn, name, value)

    return property(get, set_, doc=doc)


class TorchvisionRPN(nn.Module):
    """torchvision's ``RegionProposalNetwork`` interface around our :class:`RPN` or :class:`CascadeRPN`.

    Args:
        rpn: the wrapped network (its anchor strides must be the backbone's feature strides).

    In training mode ``targets`` are required and the losses are returned as
    ``{"loss_objectness", "loss_rpn_box_reg"}``; in eval mode the losses are ``{}``, as in
    torchvision. Proposals use the network's train or test top-k settings accordingly.

    torchvision's setting attributes are the wrapped network's (see the module docstring), so
    code tuning ``detector.rpn`` as torchvision's RPN changes the proposals alike.
    """

    nms_thresh = _forwarded("nms_thresh", "IoU above which NMS suppresses a proposal (the wrapped network's).")
    score_thresh = _forwarded("score_thresh", "Lowest objectness probability kept (the wrapped network's).")
    min_size = _forwarded("min_size", "Shortest box side kept, in pixels (the wrapped network's).")

    def __init__(self, rpn: RegionProposer) -> None:
        super().__init__()
        if not isinstance(rpn, RegionProposer):
            raise TypeError(
                "TorchvisionRPN: rpn must be a lightning_rpn RPN or CascadeRPN (a RegionProposer), "
                f"got {type(rpn).__name__}"
            )
        self.rpn = rpn

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Take torchvision's ``RegionProposalNetwork`` keys for a wrapped plain head too
        (``head.conv.0.0.*``, ``head.cls_logits.*``, ``head.bbox_pred.*``), mapped as
        :meth:`from_torchvision` copies those layers: a detector whose rpn was replaced still loads
        the torchvision detector's checkpoints. Keys of ours present win; a head of other shapes
        (softmax objectness, quality branches) is refused by ``load_state_dict`` naming the layer."""
        head = getattr(self.rpn, "head", None)
        if isinstance(head, RPNHead):
            convs = [name for name, layer in head.conv.named_children() if isinstance(layer, nn.Conv2d)]
            renames = {f"head.conv.{index}.0": f"rpn.head.conv.{name}" for index, name in enumerate(convs)}
            renames.update({"head.cls_logits": "rpn.head.cls_logits", "head.bbox_pred": "rpn.head.bbox_deltas"})
            for theirs, ours in renames.items():
                for field in ("weight", "bias"):
                    source, target = f"{prefix}{theirs}.{field}", f"{prefix}{ours}.{field}"
                    if source in state_dict and target not in state_dict:
                        state_dict[target] = state_dict.pop(source)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def _pre_nms_top_n(self) -> TopN:
        """torchvision's name of the wrapped network's ``pre_nms_top_n`` (``["testing"]`` reads and
        writes its test entry)."""
        return self.rpn.pre_nms_top_n

    @_pre_nms_top_n.setter
    def _pre_nms_top_n(self, value: int | Mapping[str, int]) -> None:
        self.rpn.pre_nms_top_n = _edited_top_n(self.rpn.pre_nms_top_n, value, "TorchvisionRPN._pre_nms_top_n")

    @property
    def _post_nms_top_n(self) -> TopN:
        """torchvision's name of the wrapped network's ``post_nms_top_n`` (as ``_pre_nms_top_n``)."""
        return self.rpn.post_nms_top_n

    @_post_nms_top_n.setter
    def _post_nms_top_n(self, value: int | Mapping[str, int]) -> None:
        self.rpn.post_nms_top_n = _edited_top_n(self.rpn.post_nms_top_n, value, "TorchvisionRPN._post_nms_top_n")

    def pre_nms_top_n(self) -> int:
        """Candidates kept per image and level before NMS in the current mode, as torchvision's method."""
        return self.rpn.pre_nms_top_n["train" if self.training else "test"]

    def post_nms_top_n(self) -> int:
        """Proposals kept per image in the current mode, as torchvision's method."""
        return self.rpn.post_nms_top_n["train" if self.training else "test"]

    @classmethod
    def from_torchvision(cls, rpn: RegionProposalNetwork, strides: Sequence[int]) -> TorchvisionRPN:
        """Same anchors, matcher, sampler, box coder, proposal settings, head weights and
        train / eval mode as ``rpn`` (so it fits a detector already in eval mode).

        ``strides``: the input pixels per feature cell of each level the backbone returns
        (e.g. ``(4, 8, 16, 32, 64)`` for torchvision's ResNet-FPN); see :meth:`from_detector`.
        """
        if not isinstance(rpn, RegionProposalNetwork):
            raise TypeError(
                f"TorchvisionRPN.from_torchvision: expected a torchvision RegionProposalNetwork, "
                f"got {type(rpn).__name__}"
            )
        tv_anchors = rpn.anchor_generator
        if len(tv_anchors.sizes) != len(strides):
            raise ValueError(
                f"TorchvisionRPN.from_torchvision: {len(strides)} strides {tuple(strides)} but the "
                f"anchor generator has {len(tv_anchors.sizes)} levels of sizes {tv_anchors.sizes}"
            )
        anchor_generator = AnchorGenerator(tv_anchors.sizes, tv_anchors.aspect_ratios, tuple(strides))
        head = _copy_head(rpn.head, anchor_generator.num_anchors_per_location())
        matcher, sampler = rpn.proposal_matcher, rpn.fg_bg_sampler
        ours = RPN(
            anchor_generator,
            head=head,
            box_coder=BoxCoder(rpn.box_coder.weights, rpn.box_coder.bbox_xform_clip),
            target_config=AnchorTargetConfig(
                fg_iou=matcher.high_threshold,
                bg_iou=matcher.low_threshold,
                allow_low_quality=matcher.allow_low_quality_matches,
                batch_size_per_image=sampler.batch_size_per_image,
                positive_fraction=sampler.positive_fraction,
            ),
            pre_nms_top_n_train=rpn._pre_nms_top_n["training"],
            post_nms_top_n_train=rpn._post_nms_top_n["training"],
            pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
            post_nms_top_n_test=rpn._post_nms_top_n["testing"],
            nms_thresh=rpn.nms_thresh,
            min_size=rpn.min_size,
            score_thresh=rpn.score_thresh,
            loss_normalization="sampled",
            smooth_l1_beta=1.0 / 9.0,
            box_loss="smooth_l1",
        )
        return cls(ours).train(rpn.training)

    @classmethod
    def from_detector(cls, detector: GeneralizedRCNN, probe_size: int = 128) -> TorchvisionRPN:
        """:meth:`from_torchvision` of ``detector.rpn``, strides measured on ``detector.backbone``.

        ``probe_size``: side of the dry-run input, a multiple of the largest stride.
        """
        if isinstance(detector, GeneralizedRCNN) and isinstance(detector.rpn, TorchvisionRPN):
            raise TypeError(
                f"TorchvisionRPN.from_detector: this {type(detector).__name__}'s rpn is a TorchvisionRPN already "
                "(from_detector ran on it before, e.g. a notebook cell run twice); use detector.rpn as it is, or "
                "build the detector again to convert its torchvision RegionProposalNetwork"
            )
        if not isinstance(detector, GeneralizedRCNN) or not isinstance(detector.rpn, RegionProposalNetwork):
            raise TypeError(
                "TorchvisionRPN.from_detector: expected a torchvision detector with a "
                f"RegionProposalNetwork (e.g. FasterRCNN), got {type(detector).__name__}"
            )
        return cls.from_torchvision(detector.rpn, infer_strides(detector.backbone, probe_size))

    def forward(
        self,
        images: ImageList,
        features: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposal boxes per image ``[P, 4]`` (best first, no gradient, the features' dtype) and the losses."""
        if self.training and targets is None:
            raise ValueError(
                "TorchvisionRPN: targets are required in training mode (each with a 'boxes' entry), and this "
                "one is in training mode: a detector in eval mode calls its rpn without targets, and a module "
                "assigned to detector.rpn keeps its own mode, so call detector.eval() after replacing the RPN "
                "(or pass targets to train)"
            )
        feature_list = list(features.values())
        padded = images.tensors.shape[-2:]
        for level, (feature, stride) in enumerate(zip(feature_list, self.rpn.anchor_generator.strides)):
            expected = (-(-padded[0] // stride), -(-padded[1] // stride))
            if tuple(feature.shape[-2:]) != expected:
                raise ValueError(
                    f"TorchvisionRPN: feature level {level} ({list(features)[level]!r}) is "
                    f"{tuple(feature.shape[-2:])} on a {tuple(padded)} batch, expected {expected} for "
                    f"stride {stride}; the strides {self.rpn.anchor_generator.strides} do not fit the backbone"
                )
        proposals, losses = self.rpn(  # no sampling epoch: each step samples afresh, as torchvision's
            feature_list,
            images.image_sizes,
            targets=targets if self.training else None,
        )
        dtype = feature_list[0].dtype  # roi_align needs the features' dtype (float32 proposals fail a .double() model)
        boxes = [image_proposals[0].to(dtype) for image_proposals in proposals]
        return boxes, {_LOSS_KEYS[key]: value for key, value in losses.items()}
