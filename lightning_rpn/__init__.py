"""lightning-rpn: train and evaluate Region Proposal Networks with PyTorch Lightning.

Layers as folders, arrows pointing down (``tests/test_layers.py`` checks them):
``core`` (pure torch) <- ``data`` <- ``evaluation`` <- ``training`` (Lightning) <- ``tools`` <-
``cli``. The public names are imported lazily, so that the core pieces (anchors, box coding,
matching, sampling, loss, proposals) can be used in DataLoader workers or plain PyTorch code
without importing Lightning. Module paths from before the folders (``lightning_rpn.module``,
``lightning_rpn.callbacks``, ...) still import (:mod:`lightning_rpn._compat`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_rpn._compat import install as _install_moved_paths
from lightning_rpn._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AnchorGenerator": "lightning_rpn.core.anchors",
    "BoxCoder": "lightning_rpn.core.box_coder",
    "match_anchors": "lightning_rpn.core.matching",
    "match_anchors_batched": "lightning_rpn.core.matching",
    "sample_anchors": "lightning_rpn.core.sampling",
    "sample_anchors_batched": "lightning_rpn.core.sampling",
    "AnchorConfig": "lightning_rpn.core.config",
    "AnchorTargetConfig": "lightning_rpn.core.config",
    "LossConfig": "lightning_rpn.core.config",
    "ProposalConfig": "lightning_rpn.core.config",
    "OptimConfig": "lightning_rpn.core.config",
    "assign_anchor_targets": "lightning_rpn.core.targets",
    "assign_batch_targets": "lightning_rpn.core.targets",
    "rpn_loss": "lightning_rpn.core.loss",
    "generate_proposals": "lightning_rpn.core.proposals",
    "RPNHead": "lightning_rpn.core.head",
    "RPN": "lightning_rpn.core.rpn",
    "ProposalRecall": "lightning_rpn.evaluation.metrics",
    "RPNModule": "lightning_rpn.training.module",
    "RPNDataModule": "lightning_rpn.training.datamodule",
    "TorchvisionRPN": "lightning_rpn.tools.torchvision_adapter",
    "SlidingWindowConfig": "lightning_rpn.core.windows",
    "sliding_window_proposals": "lightning_rpn.core.windows",
    "export_proposal_network": "lightning_rpn.tools.export",
    "load_proposal_network": "lightning_rpn.tools.export",
    "program_inputs": "lightning_rpn.tools.program_inputs",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from lightning_rpn.core.config import AnchorConfig, AnchorTargetConfig, LossConfig, OptimConfig, ProposalConfig
    from lightning_rpn.core.anchors import AnchorGenerator
    from lightning_rpn.core.box_coder import BoxCoder
    from lightning_rpn.core.head import RPNHead
    from lightning_rpn.core.loss import rpn_loss
    from lightning_rpn.core.matching import match_anchors, match_anchors_batched
    from lightning_rpn.core.proposals import generate_proposals
    from lightning_rpn.core.rpn import RPN
    from lightning_rpn.core.sampling import sample_anchors, sample_anchors_batched
    from lightning_rpn.core.targets import assign_anchor_targets, assign_batch_targets
    from lightning_rpn.core.windows import SlidingWindowConfig, sliding_window_proposals
    from lightning_rpn.evaluation.metrics import ProposalRecall
    from lightning_rpn.tools.export import export_proposal_network, load_proposal_network
    from lightning_rpn.tools.program_inputs import program_inputs
    from lightning_rpn.tools.torchvision_adapter import TorchvisionRPN
    from lightning_rpn.training.datamodule import RPNDataModule
    from lightning_rpn.training.module import RPNModule

_install_moved_paths()
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
