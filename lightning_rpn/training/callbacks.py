"""Lightning callbacks: a recall table, recall curves, sample images with proposals, and ``last.ckpt``.

Shapes: ``B`` images of a batch, ``G`` gt boxes and ``P`` proposals of an image.

They read what the LightningModule exposes (``RPNModule`` does; a user's module can too):

* ``last_recall: dict[str, float]``: ``ProposalRecall.compute()`` as floats, set at the end of
  each validation / test epoch (empty before the first one);
* ``last_recall_curves``: ``ProposalRecall.curves()`` of that epoch;
* ``last_recall_step`` and ``last_recall_epoch`` (optional): the global step and epoch of the
  weights that gave ``last_recall`` (a loaded checkpoint's own, which Lightning restores only in
  ``fit``), so that a table printed later says which weights it describes;
* ``trained_counters`` (optional, :class:`~lightning_rpn.training.evaluated_weights.TrainedCounters`):
  the epoch and step the weights were trained to (a checkpoint's loaded outside ``fit``, or the
  last fit's), which date the recall curves, images and file names of an evaluation outside
  ``fit`` (without it, the trainer's counters do);
* ``validation_step`` / ``test_step`` return ``{"proposals": [(boxes [P, 4], scores [P]), ...]}``
  in the batch's (resized, unpadded) image pixels, best first, on a batch that is an
  ``RPNBatch`` (``images`` uint8 ``[B, 3, H, W]``, ``image_sizes``, ``image_ids``, ``gt_boxes``),
  a mapping with those field names, or a torchvision-style ``(images, targets)`` pair (float
  images in 0..1, targets with ``"boxes"``); ``ProposalImages`` skips any other batch with one
  warning.

Everything happens on global rank 0 only and never during the sanity check. Where things go,
per logger: ``WandbLogger`` gets W&B line plots and ``wandb.Image`` s with box overlays,
``TensorBoardLogger`` matplotlib figures and ``add_image_with_boxes``, any other logger (CSV,
...) or no logger CSV files and PNGs under its log directory (:mod:`.log_targets`).

One module per callback: :mod:`.recall_table`, :mod:`.recall_curves`, :mod:`.proposal_images`,
:mod:`.last_checkpoint` (``LastCheckpoint``: the final weights as ``last.ckpt``, whatever the
validation said), :mod:`.text_progress` (``TextProgress``: progress as plain lines, for logs
written to a file), :mod:`.rich_progress` (``RichProgress``: the configs' live bar);
this module names them all, as the shipped configs do (``lightning_rpn.training.callbacks.RecallTable``).
"""

from __future__ import annotations

from lightning_rpn.training.last_checkpoint import LastCheckpoint
from lightning_rpn.training.proposal_images import GT_COLOR, PROPOSAL_COLOR, ProposalImages
from lightning_rpn.training.recall_curves import RecallCurves, recall_curves_figure
from lightning_rpn.training.recall_table import RecallTable, recall_table
from lightning_rpn.training.rich_progress import RichProgress
from lightning_rpn.training.text_progress import TextProgress

__all__ = [
    "GT_COLOR", "LastCheckpoint", "PROPOSAL_COLOR", "ProposalImages", "RecallCurves", "RecallTable",
    "RichProgress", "TextProgress", "recall_curves_figure", "recall_table",
]
