"""Sliding-window evaluation of RPNModule (``RPNModule(sliding_window=...)``).

Shapes: ``B`` images of a batch, ``Hp x Wp`` a padded window batch, ``P`` proposals of an image.

Validation, test and predict propose on overlapping windows of each image
(:func:`~lightning_rpn.core.windows.sliding_window_proposals`, with the module's ``*_test``
settings), merged into the image's ``top_k`` best. Evaluation losses are then each window's
training loss, with targets from the gt boxes clipped to it under the data module's
``min_visibility`` and seeded per window (:class:`~lightning_rpn.core.window_targets.WindowTargets`),
averaged over the windows.

Progress: a 6000 x 4000 image is hundreds of windows and minutes on a CPU, inside one batch. The
trainer's callbacks with an ``on_sliding_windows`` hook (:class:`WindowProgress`; ``TextProgress``
has one) hear after each window batch how many of the batch's windows are done.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lightning.pytorch.trainer.states import TrainerStatus
from torch import Tensor

from lightning_rpn.core.window_targets import WindowTargets, mean_window_losses
from lightning_rpn.core.windows import Window, WindowProgressFn, sliding_window_proposals, window_grid
from lightning_rpn.data.batch import RPNBatch

if TYPE_CHECKING:
    from lightning_rpn.training.module import RPNModule

__all__ = ["WindowProgress", "window_losses", "window_proposals"]


@runtime_checkable
class WindowProgress(Protocol):
    """A trainer callback told, after each window batch of a running evaluation batch, that
    ``done`` of the batch's ``total`` windows (all its images) are through the network."""

    def on_sliding_windows(self, trainer: Any, pl_module: Any, done: int, total: int) -> None: ...


def _progress_per_image(module: RPNModule, batch: RPNBatch) -> list[WindowProgressFn | None]:
    """Per image of ``batch``, the ``progress`` of its ``sliding_window_proposals``: the batch's
    windows done so far, told to the running trainer's :class:`WindowProgress` callbacks
    (``None`` when there are none, e.g. ``predict_images``)."""
    trainer = module._trainer
    listeners = [] if trainer is None or trainer.state.status != TrainerStatus.RUNNING else [
        callback for callback in trainer.callbacks if isinstance(callback, WindowProgress)]
    if not listeners:
        return [None] * len(batch.image_sizes)
    config = module.sliding_window
    assert config is not None
    counts = [len(window_grid(size, config.size, config.overlap)) for size in batch.image_sizes]
    total = sum(counts)

    def tell(before: int, done: int, _image_total: int) -> None:
        for callback in listeners:
            callback.on_sliding_windows(trainer, module, before + done, total)

    return [partial(tell, sum(counts[:index])) for index in range(len(counts))]


def _propose_windows(
    module: RPNModule, images: Tensor, image_sizes: list[tuple[int, int]], windows: list[Window],
    targets: WindowTargets | None = None,
) -> list[tuple[Tensor, ...]]:
    """``(boxes, scores, logits)`` per window of a padded window batch (``sliding_window_proposals``'
    network); with ``targets``, the windows' losses are added to ``targets.losses``."""
    features = module.features(images)
    if targets is None:
        return module.rpn(features, image_sizes, need_proposals=True, proposal_logits=True)[0]
    window_targets, ids, keys = targets.for_windows(windows)
    proposals, losses = module.rpn(
        features, image_sizes, targets=window_targets, image_ids=ids, sampling_keys=keys,
        sampling_epoch=module.current_epoch, need_proposals=True, proposal_logits=True,
    )
    targets.losses.append((len(windows), losses))
    return proposals


def window_proposals(
    module: RPNModule, batch: RPNBatch, targets: list[WindowTargets] | None = None
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image of ``batch``, ``(boxes [P, 4], scores [P], logits [P])`` from its sliding windows
    (``module.sliding_window``), resized-image pixels; ``targets`` (one per image) collect the
    windows' losses."""
    config = module.sliding_window
    assert config is not None
    progress = _progress_per_image(module, batch)
    return [
        sliding_window_proposals(
            batch.images[index, :, :height, :width],
            partial(_propose_windows, module, targets=None if targets is None else targets[index]),
            config, config.top_k or module.rpn.post_nms_top_n["test"],
            module.rpn.nms_thresh, module.size_divisibility, progress[index],
        )
        for index, (height, width) in enumerate(batch.image_sizes)
    ]


def window_losses(
    module: RPNModule, batch: RPNBatch, min_visibility: float
) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Tensor], int]:
    """``(per image (boxes, scores), losses averaged over the windows, window count)`` of an
    evaluation batch; ``min_visibility`` is the training data's rule for cut boxes."""
    targets = [WindowTargets(gt, crowd, image_id, key, min_visibility) for gt, crowd, image_id, key in
               zip(batch.gt_boxes, batch.crowd_boxes, batch.image_ids, batch.sampling_keys or batch.image_ids)]
    proposals = [(boxes, scores) for boxes, scores, _ in window_proposals(module, batch, targets)]
    parts = [part for image in targets for part in image.losses]
    return proposals, mean_window_losses(parts), sum(count for count, _ in parts)
