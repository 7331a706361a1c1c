"""Export a trained proposal network (backbone + head + proposals) with ``torch.export``.

Shapes: ``L`` levels, ``A`` anchors per location, ``H x W`` the (padded) input image,
``H_l x W_l`` the feature size of level ``l``, ``N_l`` anchors of level ``l``, ``P`` proposals.

The eager :class:`~lightning_rpn.rpn.RPN` is built for speed in Python: cached anchors, host
syncs and an early-stopping NMS loop. None of that can live in a graph with a dynamic image
size, so :class:`ProposalNetwork` recomputes the same steps in a traceable form: anchors from
the symbolic feature sizes (grid centres from :func:`~lightning_rpn.anchors.grid_centres`, as
:class:`~lightning_rpn.anchors.AnchorGenerator` computes them), then per level top-k, decode, clip, filter and
NMS, then the best ``post_nms_top_n`` of all levels, ordered as the eager RPN orders them
(by logit, ties by level, then by rank within the level). Only the evaluation settings
(``pre_nms_top_n_test`` / ``post_nms_top_n_test``) are exported.

Limitations:

- one image per call (``[1, 3, H, W]``); loop over images for a batch;
- ``H`` and ``W`` lie in ``[min_image_size, max_image_size]`` (checked when called), where
  ``min_image_size = 2 * max(size_divisibility, anchor_stride * largest stride)``: a coarsest
  anchor grid of one cell would be specialised by ``torch.export``. Any
  such size runs, with anchors laid out on the feature maps the backbone yields, as the eager
  RPN does; pad images to a multiple of ``size_divisibility`` as the data pipeline does (and
  pass the unpadded size as ``image_size``) to get what :class:`RPNModule` computes;
- the input dtype is fixed at export: uint8 pixels for an :class:`RPNModule` (normalised in the
  graph), float for a ``(backbone, rpn)`` pair (fed to the backbone as is);
- outputs match the eager RPN up to float rounding in the box decoding (``exp`` may round
  differently in vectorised and scalar code), see ``tests/test_export.py`` for the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import nms

from .anchors import grid_centres
from .head import objectness_logits
from .rpn import RPN

__all__ = ["ProposalNetwork", "export_proposal_network", "load_proposal_network"]


class ProposalNetwork(nn.Module):
    """Backbone + RPN head + proposal generation for one image, traceable by ``torch.export``.

    Args:
        backbone: ``forward(images [1, 3, H, W]) -> list`` of level features (or a dict).
        rpn: the trained :class:`~lightning_rpn.rpn.RPN`; its head, anchors, box coder and
            evaluation settings are used (the module shares the head's parameters).
        pixel_mean / pixel_std: ``[1, 3, 1, 1]`` normalisation applied to ``images.float()``
            before the backbone; ``None`` feeds the images to the backbone unchanged.

    ``forward(images, image_size)`` with ``image_size`` an int64 ``[2]`` tensor ``(h, w)``, the
    size before padding, returns ``(boxes [P, 4], scores [P])``, float32, best first.
    ``min_image_size`` is the smallest side :func:`export_proposal_network` supports.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: RPN,
        pixel_mean: Tensor | None = None,
        pixel_std: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(rpn, RPN):
            raise TypeError(f"ProposalNetwork: rpn must be a lightning_rpn.RPN, got {type(rpn).__name__}")
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("ProposalNetwork: give both pixel_mean and pixel_std, or neither")
        self.backbone = backbone
        self.head = rpn.head
        self.box_coder = rpn.box_coder
        self.objectness = rpn.objectness
        generator = rpn.anchor_generator
        self.anchor_stride = generator.anchor_stride
        divisibility = int(getattr(backbone, "size_divisibility", max(generator.strides)))
        # The coarsest anchor grid must have 2+ cells a side: torch.export specialises size 1.
        self.min_image_size = 2 * max(divisibility, generator.anchor_stride * max(generator.strides))
        self.spacing = tuple((float(generator.anchor_stride * s), generator.offset * s) for s in generator.strides)
        for level, cell in enumerate(generator.cell_anchors):
            self.register_buffer(f"cell_anchors_{level}", cell.clone(), persistent=False)
        self.pre_nms_top_n = int(rpn.pre_nms_top_n["test"])
        self.post_nms_top_n = int(rpn.post_nms_top_n["test"])
        self.nms_thresh = float(rpn.nms_thresh)
        self.min_size = float(rpn.min_size)
        self.score_thresh = float(rpn.score_thresh)
        self.normalize = pixel_mean is not None
        if pixel_mean is not None:
            self.register_buffer("pixel_mean", pixel_mean.detach().clone().float(), persistent=False)
            self.register_buffer("pixel_std", pixel_std.detach().clone().float(), persistent=False)

    def _anchors(self, level: int, height: int, width: int) -> Tensor:
        """``[H_l' * W_l' * A, 4]`` anchors in ``(y, x, anchor)`` order, as the eager generator."""
        cell = getattr(self, f"cell_anchors_{level}")
        n = self.anchor_stride
        grid_h, grid_w = (height + n - 1) // n, (width + n - 1) // n
        step, origin = (torch.tensor(v, dtype=torch.float32, device=cell.device) for v in self.spacing[level])
        xs = grid_centres(torch.arange(grid_w, dtype=torch.float32, device=cell.device), step, origin)
        ys = grid_centres(torch.arange(grid_h, dtype=torch.float32, device=cell.device), step, origin)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)
        return (centres + cell[None]).reshape(-1, 4)

    def forward(self, images: Tensor, image_size: Tensor) -> tuple[Tensor, Tensor]:
        inputs = (images.float() - self.pixel_mean) / self.pixel_std if self.normalize else images
        features = self.backbone(inputs)
        if isinstance(features, dict):
            features = list(features.values())
        pred_objectness, pred_deltas = self.head(list(features))
        height, width = image_size.to(torch.float32).unbind(0)
        limits = torch.stack((width, height, width, height))

        all_boxes, all_logits = [], []
        for level, (feature, obj, dlt) in enumerate(zip(features, pred_objectness, pred_deltas)):
            anchors = self._anchors(level, feature.shape[-2], feature.shape[-1])
            logits = (objectness_logits(obj) if self.objectness == "softmax" else obj)[0].float()
            k = torch.sym_min(self.pre_nms_top_n, logits.shape[0])
            logits, idx = logits.topk(k)
            boxes = self.box_coder.decode(dlt[0, idx], anchors[idx])
            boxes = torch.minimum(boxes.clamp(min=0), limits)
            side = boxes[:, 2:] - boxes[:, :2]
            valid = (side[:, 0] >= self.min_size) & (side[:, 1] >= self.min_size)
            valid = valid & (logits.sigmoid() >= self.score_thresh)
            keep = torch.nonzero(valid).squeeze(1)
            boxes, logits = boxes[keep], logits[keep]
            kept = nms(boxes, logits, self.nms_thresh).sort().values  # back to rank order
            all_boxes.append(boxes[kept])
            all_logits.append(logits[kept])
        boxes, logits = torch.cat(all_boxes), torch.cat(all_logits)
        best = logits.sort(descending=True, stable=True).indices[: self.post_nms_top_n]
        return boxes[best], logits[best].sigmoid()


def _proposal_network(model: object) -> tuple[ProposalNetwork, torch.dtype]:
    """The traceable network and its input dtype."""
    from .module import RPNModule  # Lightning is only needed for this input type

    if isinstance(model, ProposalNetwork):
        return model, torch.uint8 if model.normalize else torch.float32
    if isinstance(model, RPNModule):
        return ProposalNetwork(model.backbone, model.rpn, model.pixel_mean, model.pixel_std), torch.uint8
    if isinstance(model, (tuple, list)) and len(model) == 2 and isinstance(model[1], RPN):
        return ProposalNetwork(*model), torch.float32
    raise TypeError(
        "export_proposal_network: expected an RPNModule, a (backbone, RPN) pair or a "
        f"ProposalNetwork, got {type(model).__name__}"
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
        model: an :class:`~lightning_rpn.module.RPNModule` (uint8 input, normalised in the
            graph), a ``(backbone, rpn)`` pair (float input, fed to the backbone as is) or a
            :class:`ProposalNetwork`.
        example_image_size: ``(H, W)`` of the example input; any other size in range works
            afterwards.
        path: where to save the program (``torch.export.save``, e.g. ``"rpn.pt2"``); ``None``
            does not save.
        max_image_size: largest ``H`` and ``W`` the program accepts; the smallest is the
            network's ``min_image_size``.

    Returns the ``ExportedProgram``; ``program.module()(images [1, 3, H, W], image_size int64
    [2])`` gives ``(boxes [P, 4], scores [P])``. The model is put in eval mode.
    """
    network, dtype = _proposal_network(model)
    smallest = network.min_image_size
    height, width = (int(s) for s in example_image_size)
    for name, side in (("height", height), ("width", width)):
        if not smallest <= side <= max_image_size:
            raise ValueError(
                f"export_proposal_network: example_image_size {name}={side} must lie in "
                f"[min_image_size, max_image_size] = [{smallest}, {max_image_size}]"
            )
    network.eval()
    if isinstance(model, nn.Module):
        model.eval()
    dim_h = torch.export.Dim("height", min=smallest, max=max_image_size)
    dim_w = torch.export.Dim("width", min=smallest, max=max_image_size)
    device = next(network.parameters()).device
    images = torch.zeros(1, 3, height, width, dtype=dtype, device=device)
    image_size = torch.tensor([height, width], dtype=torch.int64, device=device)
    with torch.no_grad():
        program = torch.export.export(
            network,
            (images, image_size),
            dynamic_shapes={"images": {2: dim_h, 3: dim_w}, "image_size": None},
        )
    if path is not None:
        torch.export.save(program, str(path))
    return program


def load_proposal_network(path: str | Path) -> nn.Module:
    """Load a program saved by :func:`export_proposal_network` as a callable module.

    ``module(images [1, 3, H, W], image_size int64 [2])`` -> ``(boxes [P, 4], scores [P])``.
    """
    return torch.export.load(str(path)).module()
