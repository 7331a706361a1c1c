"""lightning-rpn: train and evaluate Region Proposal Networks with PyTorch Lightning.

The public names are imported lazily, so that the pure-tensor pieces (anchors, box coding,
matching, sampling, loss, proposals) can be used in DataLoader workers or plain PyTorch code
without importing Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_rpn._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AnchorGenerator": "lightning_rpn.anchors",
    "BoxCoder": "lightning_rpn.box_coder",
    "match_anchors": "lightning_rpn.matching",
    "match_anchors_batched": "lightning_rpn.matching",
    "sample_anchors": "lightning_rpn.sampling",
    "sample_anchors_batched": "lightning_rpn.sampling",
    "AnchorTargetConfig": "lightning_rpn.targets",
    "assign_anchor_targets": "lightning_rpn.targets",
    "assign_batch_targets": "lightning_rpn.targets",
    "rpn_loss": "lightning_rpn.loss",
    "generate_proposals": "lightning_rpn.proposals",
    "RPNHead": "lightning_rpn.head",
    "RPN": "lightning_rpn.rpn",
    "ProposalRecall": "lightning_rpn.metrics",
    "RPNModule": "lightning_rpn.module",
    "RPNDataModule": "lightning_rpn.data.datamodule",
    "TorchvisionRPN": "lightning_rpn.torchvision_adapter",
    "SlidingWindowConfig": "lightning_rpn.windows",
    "sliding_window_proposals": "lightning_rpn.windows",
    "export_proposal_network": "lightning_rpn.export",
    "load_proposal_network": "lightning_rpn.export",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from lightning_rpn.anchors import AnchorGenerator
    from lightning_rpn.box_coder import BoxCoder
    from lightning_rpn.data.datamodule import RPNDataModule
    from lightning_rpn.export import export_proposal_network, load_proposal_network
    from lightning_rpn.head import RPNHead
    from lightning_rpn.loss import rpn_loss
    from lightning_rpn.matching import match_anchors, match_anchors_batched
    from lightning_rpn.metrics import ProposalRecall
    from lightning_rpn.module import RPNModule
    from lightning_rpn.proposals import generate_proposals
    from lightning_rpn.rpn import RPN
    from lightning_rpn.sampling import sample_anchors, sample_anchors_batched
    from lightning_rpn.targets import AnchorTargetConfig, assign_anchor_targets, assign_batch_targets
    from lightning_rpn.torchvision_adapter import TorchvisionRPN
    from lightning_rpn.windows import SlidingWindowConfig, sliding_window_proposals


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
