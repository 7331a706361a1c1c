"""Export a trained proposal network (backbone + head + proposals) with ``torch.export``.

Shapes: ``L`` levels, ``A`` anchors per location, ``H x W`` the (padded) input image,
``H_l x W_l`` the feature size of level ``l``, ``N_l`` anchors of level ``l``, ``P`` proposals.

:class:`ProposalNetwork` runs the eager network's own functions on symbolic sizes: anchors from
:func:`~lightning_rpn.core.anchors.level_anchors` (what :class:`~lightning_rpn.core.anchors.AnchorGenerator`
builds and caches); for an :class:`~lightning_rpn.core.rpn.RPN` its head, scored by
:func:`~lightning_rpn.core.rpn.proposal_score_logits` (objectness, or with quality branches the
``proposal_score`` combination); for a :class:`~lightning_rpn.core.cascade.CascadeRPN` its stages
(:meth:`~lightning_rpn.core.cascade.CascadeRPN.predict`, whose adaptive convolution is a
``grid_sample`` and a matrix product, which trace with symbolic sizes), whose last-stage boxes
take the anchors' place; then candidates from
:func:`~lightning_rpn.core.proposals.proposal_candidates` and the image's proposals from
:func:`~lightning_rpn.core.proposals.select_image_proposals` with ``nms_method="per_level"``, the
form of the one NMS rule with no host sync (the eager CPU path computes the same rule with early
stopping, which needs host syncs). Only the evaluation settings (``pre_nms_top_n_test`` /
``post_nms_top_n_test``) are exported.

Sliding windows (an :class:`~lightning_rpn.training.module.RPNModule` with ``sliding_window``): the
program is the per-window network, and :func:`load_proposal_network` returns a
:class:`WindowedProposalNetwork` that cuts the image into windows and merges their proposals
with :func:`~lightning_rpn.core.windows.sliding_window_proposals`, the eager function. The windows
stay outside the graph because neither step has a graph form with dynamic sizes: the number
of windows is a Python-integer function of the image size (``torch.export`` would specialise
it to the example image), and the merge is a greedy suppression over a data-dependent set of
cross-window pairs (a Python loop). The per-window network has a bounded input (the window),
so windowed programs accept images of any size above ``min_image_size``.

Limitations:

- one image per call (``[1, 3, H, W]``); loop over images for a batch;
- ``H`` and ``W`` lie in ``[min_image_size, max_image_size]`` (checked when called; with
  sliding windows only the windows are bounded by ``max_image_size``), where
  ``min_image_size = 2 * max(size_divisibility, anchor_stride * largest stride)``: a coarsest
  anchor grid of one cell would be specialised by ``torch.export``. Any
  such size runs, with anchors laid out on the feature maps the backbone yields, as the eager
  RPN does; pad images to a multiple of ``size_divisibility`` as the data pipeline does (and
  pass the unpadded size as ``image_size``) to get what :class:`RPNModule` computes;
- the input dtype is fixed at export: uint8 pixels for an :class:`RPNModule` (normalised in the
  graph), the backbone's floating dtype for a ``(backbone, rpn)`` pair (fed to the backbone as
  is); the backbone runs in its parameters' dtype and memory format, as
  :meth:`RPNModule.normalize <lightning_rpn.training.module.RPNModule.normalize>` feeds it (half /
  bf16 models export too), and the boxes come back in the dtype the eager network returns;
- the program owns a copy of the weights, contiguous (so that ``torch.export.save`` stores each
  as one whole tensor) and not requiring grad: later changes to the model do not reach it;
- outputs match the eager network up to float rounding in the backbone, see
  ``tests/tools/test_export.py`` for the tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_rpn._files import torch_file_kind
from lightning_rpn.core.anchors import level_anchors
from lightning_rpn.core.backbone_interface import feature_levels
from lightning_rpn.core.cascade import CascadeRPN
from lightning_rpn.core.proposals import proposal_candidates, select_image_proposals
from lightning_rpn.core.rpn import RPN, proposal_score_logits
from lightning_rpn.core.windows import SlidingWindowConfig, Window, sliding_window_proposals

__all__ = ["ProposalNetwork", "WindowedProposalNetwork", "export_proposal_network", "load_proposal_network"]

EXPORTABLE = (RPN, CascadeRPN)
"""The proposal networks :class:`ProposalNetwork` runs."""

WINDOWS_FILE = "lightning_rpn/sliding_window.json"
"""Name of the window settings stored beside a windowed program (``torch.export.save`` extra file)."""


class ProposalNetwork(nn.Module):
    """Backbone + proposal network + proposal generation for one image, traceable by ``torch.export``.

    Args:
        backbone: ``forward(images [1, 3, H, W]) -> list`` of level features (or a dict).
        rpn: the trained :class:`~lightning_rpn.core.rpn.RPN` (any head, quality branches
            included) or :class:`~lightning_rpn.core.cascade.CascadeRPN`; its prediction layers,
            anchors, box coder and evaluation settings are used (the module shares its parameters).
        pixel_mean / pixel_std: ``[1, 3, 1, 1]`` normalisation applied to the images, cast to
            the backbone parameters' dtype, before the backbone; ``None`` feeds the images to the
            backbone unchanged (but for that cast).
        return_logits: also return the proposals' score logits (what the window merge ranks by).

    ``forward(images, image_size)`` with ``image_size`` an int64 ``[2]`` tensor ``(h, w)``, the
    size before padding, returns ``(boxes [P, 4], scores [P])`` (``+ logits [P]``), best first,
    float32 as the eager RPN returns them. ``min_image_size`` is the smallest side
    :func:`export_proposal_network` supports. The backbone input is brought to the memory format of
    the backbone's weights at construction (``channels_last`` for a default ``RPNModule``), as
    :meth:`RPNModule.normalize <lightning_rpn.training.module.RPNModule.normalize>` does, so that
    the program runs the same kernels whatever layout its own weights are stored in.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: RPN | CascadeRPN,
        pixel_mean: Tensor | None = None,
        pixel_std: Tensor | None = None,
        return_logits: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(rpn, EXPORTABLE):
            raise TypeError(
                f"ProposalNetwork: rpn must be a lightning_rpn RPN or CascadeRPN, got {type(rpn).__name__}"
            )
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("ProposalNetwork: give both pixel_mean and pixel_std, or neither")
        self.backbone = backbone
        self.rpn = rpn
        generator = rpn.anchor_generator
        self.strides = generator.strides
        self.offset = generator.offset
        self.anchor_stride = generator.anchor_stride
        divisibility = int(getattr(backbone, "size_divisibility", max(generator.strides)))
        # The coarsest anchor grid must have 2+ cells a side: torch.export specialises size 1.
        self.min_image_size = 2 * max(divisibility, generator.anchor_stride * max(generator.strides))
        for level, cell in enumerate(generator.cell_anchors):
            self.register_buffer(f"cell_anchors_{level}", cell.clone(), persistent=False)
        self.pre_nms_top_n = int(rpn.pre_nms_top_n["test"])
        self.post_nms_top_n = int(rpn.post_nms_top_n["test"])
        self.nms_thresh = float(rpn.nms_thresh)
        self.min_size = float(rpn.min_size)
        self.score_thresh = float(rpn.score_thresh)
        self.return_logits = return_logits
        self.memory_format = _weights_memory_format(backbone)
        self.normalize = pixel_mean is not None
        if pixel_mean is not None:
            self.register_buffer("pixel_mean", pixel_mean.detach().clone(), persistent=False)
            self.register_buffer("pixel_std", pixel_std.detach().clone(), persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The backbone parameters' floating dtype (float32 when it has none): what it is fed."""
        return next((p.dtype for p in self.backbone.parameters() if p.is_floating_point()), torch.float32)

    @property
    def input_dtype(self) -> torch.dtype:
        """The images' dtype: uint8 pixels when normalising, else the backbone's floating dtype."""
        return torch.uint8 if self.normalize else self.compute_dtype

    def forward(self, images: Tensor, image_size: Tensor) -> tuple[Tensor, ...]:
        features = feature_levels(self.backbone(self._backbone_input(images)), "export")
        anchors = [
            level_anchors(getattr(self, f"cell_anchors_{level}"), stride, feature.shape[-2:], self.offset,
                          self.anchor_stride)
            for level, (feature, stride) in enumerate(zip(features, self.strides))
        ]
        logits, deltas, anchors = self._level_predictions(features, anchors)
        boxes, logits, probs, valid, level_counts = proposal_candidates(
            logits, deltas, anchors, image_size[None], self.pre_nms_top_n, self.min_size, self.score_thresh,
            self.rpn.box_coder,
        )
        best = select_image_proposals(
            boxes[0], logits[0], valid[0], level_counts, self.nms_thresh, self.post_nms_top_n, "per_level"
        )
        if self.return_logits:
            return boxes[0, best], probs[0, best], logits[0, best]
        return boxes[0, best], probs[0, best]

    def _backbone_input(self, images: Tensor) -> Tensor:
        """``images`` as :meth:`RPNModule.normalize` gives them to the backbone: in its dtype (a
        bf16 backbone takes bf16), normalised in that dtype, in its memory format."""
        dtype = self.compute_dtype
        inputs = images.to(dtype)
        if self.normalize:
            inputs = (inputs - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)
        return inputs.contiguous(memory_format=self.memory_format)

    def _level_predictions(
        self, features: list[Tensor], anchors: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level the score logits ``[1, N_l]``, the deltas ``[1, N_l, 4]`` and the boxes they
        refine ``[N_l, 4]``: the anchors for an RPN, the last stage's input boxes for a cascade."""
        rpn = self.rpn
        if isinstance(rpn, CascadeRPN):
            return rpn.predict(features, anchors).image_levels(0)
        pred_objectness, pred_deltas, *rest = rpn.head(features)
        logits = proposal_score_logits(pred_objectness, rest[0] if rpn.quality else None, rpn.objectness,
                                       rpn.proposal_score)
        return logits, pred_deltas, anchors


class WindowedProposalNetwork(nn.Module):
    """Sliding-window proposals around an exported per-window network (see the module docstring).

    Args:
        window_network: ``(images [1, 3, h, w], image_size int64 [2]) -> (boxes, scores,
            logits)``, e.g. a loaded per-window program (a :class:`ProposalNetwork` with
            ``return_logits=True`` works too).
        config: window layout and merge (the model's ``sliding_window``).
        top_k: proposals kept per image after the merge.
        nms_thresh: merge threshold when ``config.merge_thresh`` is ``None``.
        size_divisibility: windows are zero padded to a multiple of this, as in a batch.

    ``forward(images [1, 3, H, W], image_size int64 [2])`` -> ``(boxes [P, 4], scores [P])``
    in image pixels, best first: :func:`~lightning_rpn.core.windows.sliding_window_proposals` on
    ``images[0, :, :h, :w]`` with the windows run one at a time, as the eager
    ``RPNModule(sliding_window=...)`` computes them.
    """

    def __init__(
        self,
        window_network: nn.Module,
        config: SlidingWindowConfig,
        top_k: int,
        nms_thresh: float,
        size_divisibility: int,
    ) -> None:
        super().__init__()
        self.window_network = window_network
        self.config = config
        self.top_k = int(top_k)
        self.nms_thresh = float(nms_thresh)
        self.size_divisibility = int(size_divisibility)

    def forward(self, images: Tensor, image_size: Tensor) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[:2] != (1, 3):
            raise ValueError(f"WindowedProposalNetwork: expected images [1, 3, H, W], got shape {tuple(images.shape)}")
        height, width = (int(side) for side in image_size.tolist())
        boxes, scores, _ = sliding_window_proposals(
            images[0, :, :height, :width], self._propose, self.config, self.top_k, self.nms_thresh,
            self.size_divisibility,
        )
        return boxes, scores

    def _propose(
        self, images: Tensor, image_sizes: list[tuple[int, int]], windows: Sequence[Window]
    ) -> list[tuple[Tensor, ...]]:
        """The window network on each window of a padded window batch (``windows`` unused: no losses)."""
        return [
            tuple(self.window_network(images[index : index + 1], torch.tensor(size, device=images.device)))
            for index, size in enumerate(image_sizes)
        ]


def _weights_memory_format(module: nn.Module) -> torch.memory_format:
    """``channels_last`` when some 4-D weight of ``module`` is stored channels-last (as
    ``RPNModule(channels_last=True)`` stores them), else ``contiguous_format``: the layout its
    convolutions run in eagerly."""
    channels_last = any(
        p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
        for p in module.parameters()
    )
    return torch.channels_last if channels_last else torch.contiguous_format


def _exported_copy(network: ProposalNetwork) -> ProposalNetwork:
    """An eval-mode copy of ``network`` for the program to own: contiguous weights (the
    ``channels_last`` ones make ``torch.export.save`` warn "No complete tensor found") that do
    not require grad (a loaded program's outputs would, and ``.numpy()`` would refuse them). The
    user's model is left as it is, modes included (only the copy is put in eval mode); the copy
    keeps ``network.memory_format`` for its input."""
    return deepcopy(network).eval().to(memory_format=torch.contiguous_format).requires_grad_(False)


def _proposal_network(model: object) -> tuple[ProposalNetwork, dict | None]:
    """The traceable network and the window settings (``None``: whole images)."""
    from lightning_rpn.training.module import RPNModule  # Lightning is only needed for this input type

    if isinstance(model, ProposalNetwork):
        return model, None
    if isinstance(model, RPNModule):
        config = model.sliding_window
        network = ProposalNetwork(model.backbone, model.rpn, model.pixel_mean, model.pixel_std,
                                  return_logits=config is not None)
        windows = None
        if config is not None:
            windows = {
                "config": asdict(config),
                "top_k": config.top_k or int(model.rpn.post_nms_top_n["test"]),
                "nms_thresh": float(model.rpn.nms_thresh),
                "size_divisibility": int(model.size_divisibility),
            }
        return network, windows
    if isinstance(model, (tuple, list)) and len(model) == 2 and isinstance(model[1], EXPORTABLE):
        return ProposalNetwork(*model), None
    raise TypeError(
        "export_proposal_network: expected an RPNModule, a (backbone, RPN) pair (or (backbone, CascadeRPN)) "
        f"or a ProposalNetwork, got {type(model).__name__}"
    )


def export_proposal_network(
    model: object,
    example_image_size: tuple[int, int],
    path: str | Path | None = None,
    *,
    max_image_size: int = 4096,
) -> torch.export.ExportedProgram:
    """Export ``model``'s evaluation-mode proposal network with a dynamic image size.

    Args:
        model: an :class:`~lightning_rpn.training.module.RPNModule` (uint8 input, normalised in the
            graph; any head: plain, with quality branches, or ``head="cascade"``; float32, or half
            / bf16 after ``.to(dtype)``), a ``(backbone, rpn)`` pair with an ``RPN`` or a
            ``CascadeRPN`` (float input in the backbone's dtype, fed to the backbone as is) or a
            :class:`ProposalNetwork`.
        example_image_size: ``(H, W)`` of the example input; any other size in range works
            afterwards.
        path: where to save the program (``torch.export.save``, e.g. ``"rpn.pt2"``); ``None``
            does not save.
        max_image_size: largest ``H`` and ``W`` the program accepts; the smallest is the
            network's ``min_image_size``.

    Returns the ``ExportedProgram``; ``program.module()(images [1, 3, H, W], image_size int64
    [2])`` gives ``(boxes [P, 4], scores [P])``. For an ``RPNModule`` with ``sliding_window``
    the program is the per-window network (it also returns the logits ``[P]``) and ``path``
    stores the window settings with it, so that :func:`load_proposal_network` gives a
    :class:`WindowedProposalNetwork`; the padded window must fit ``max_image_size``. The program
    runs an eval-mode copy of the model (weights contiguous, not requiring grad); the model itself
    and each of its submodules keep their mode, so training it afterwards trains as before.
    """
    network, windows = _proposal_network(model)
    smallest = network.min_image_size
    height, width = (int(s) for s in example_image_size)
    for name, side in (("height", height), ("width", width)):
        if not smallest <= side <= max_image_size:
            raise ValueError(
                f"export_proposal_network: example_image_size {name}={side} must lie in "
                f"[min_image_size, max_image_size] = [{smallest}, {max_image_size}]"
            )
    if windows is not None:
        size, divisibility = windows["config"]["size"], windows["size_divisibility"]
        padded = -(-size // divisibility) * divisibility
        if padded > max_image_size:
            raise ValueError(
                f"export_proposal_network: model.sliding_window.size={size} pads to {padded} "
                f"(size_divisibility {divisibility}), above max_image_size={max_image_size}"
            )
    network = _exported_copy(network)
    dim_h = torch.export.Dim("height", min=smallest, max=max_image_size)
    dim_w = torch.export.Dim("width", min=smallest, max=max_image_size)
    device = next(network.parameters()).device
    images = torch.zeros(1, 3, height, width, dtype=network.input_dtype, device=device)
    image_size = torch.tensor([height, width], dtype=torch.int64, device=device)
    with torch.no_grad():
        program = torch.export.export(
            network,
            (images, image_size),
            dynamic_shapes={"images": {2: dim_h, 3: dim_w}, "image_size": None},
        )
    if path is not None:
        extra = None if windows is None else {WINDOWS_FILE: json.dumps(windows)}
        torch.export.save(program, str(path), extra_files=extra)
    return program


def _check_program_file(path: Path) -> None:
    """A clear error for what is not a saved program, before ``torch.export.load`` prints its own
    warnings and a "corrupted file" message: a missing file, a Lightning checkpoint (an easy
    mix-up: both are zip archives), a truncated archive, anything else."""
    if not path.is_file():
        raise FileNotFoundError(f"load_proposal_network: {path} is no file (export_proposal_network writes one)")
    kind = torch_file_kind(path)
    if kind == "program":
        return
    if kind == "checkpoint":
        raise ValueError(
            f"load_proposal_network: {path} is a PyTorch checkpoint (a Lightning .ckpt), not an exported program; "
            f"export one with export_proposal_network(RPNModule.load_from_checkpoint(path), (H, W), 'rpn.pt2'), "
            f"or load the checkpoint with RPNModule.load_from_checkpoint"
        )
    if kind == "truncated_zip":
        raise ValueError(f"load_proposal_network: {path} is a truncated zip archive ({path.stat().st_size} bytes: a "
                         f"save or copy that did not finish); export or copy it again")
    raise ValueError(f"load_proposal_network: {path} is not a program export_proposal_network wrote "
                     f"({'an empty file' if kind == 'empty' else 'not a torch.export archive'})")


def load_proposal_network(path: str | Path) -> nn.Module:
    """Load a program saved by :func:`export_proposal_network` as a callable module.

    ``module(images [1, 3, H, W], image_size int64 [2])`` -> ``(boxes [P, 4], scores [P])``;
    a windowed program comes back as a :class:`WindowedProposalNetwork` around it. The weights
    do not require grad (loading makes them parameters that would), so the outputs convert with
    ``.numpy()``. A missing file is a ``FileNotFoundError``, a Lightning checkpoint or another
    file a ``ValueError`` saying what it is.
    """
    _check_program_file(Path(path))
    extra = {WINDOWS_FILE: ""}
    network = torch.export.load(str(path), extra_files=extra).module().requires_grad_(False)
    if not extra[WINDOWS_FILE]:
        return network
    windows = json.loads(extra[WINDOWS_FILE])
    return WindowedProposalNetwork(
        network,
        SlidingWindowConfig.from_mapping(windows["config"]),
        windows["top_k"],
        windows["nms_thresh"],
        windows["size_divisibility"],
    )
