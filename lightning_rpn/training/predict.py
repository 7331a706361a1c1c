"""Proposals for loose images (``RPNModule.predict_images``) and the map back to original pixels.

Shapes: ``P`` proposals of an image.

:func:`predict_images` runs loose images (paths, PIL images, arrays, tensors; converted by
:mod:`lightning_rpn.data.loose_images`) through the evaluation pipeline of
:class:`~lightning_rpn.training.datamodule.RPNDataModule` (resize, padding, collation) and the
module's ``predict_step``; :func:`to_original_coordinates` maps boxes from resized-image pixels
back to the original image, for ``predict_step`` and the recall of predictions. Images are
decoded a batch at a time, just before their batch runs: memory follows ``batch_size``, not the
length of the list (a 6000 x 4000 image is 70 MB decoded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_rpn.core.backbone_interface import evaluation_mode
from lightning_rpn.core.boxes import clip_boxes_to_image
from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.loose_images import ImageInput, as_hwc_uint8, is_single_image
from lightning_rpn.data.sample import DetectionSample, empty_boxes
from lightning_rpn.data.transforms import DetectionTransform, ResizePolicy

if TYPE_CHECKING:
    from lightning_rpn.training.module import RPNModule

__all__ = ["loose_image_sample", "predict_images", "to_original_coordinates"]

_OUTPUT_KEYS = ("boxes", "scores", "objectness_logits")


@torch.no_grad()
def predict_images(
    module: RPNModule,
    images: ImageInput | Sequence[ImageInput],
    resize: ResizePolicy | None = None,
    batch_size: int = 1,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """``module``'s proposals for ``images`` in their original pixels (see ``RPNModule.predict_images``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"predict_images: batch_size must be a positive int, got {batch_size!r}")
    single = is_single_image(images)
    items = [images] if single else list(images)  # type: ignore[arg-type]
    policy = resize if resize is not None else module.resize_policy or ResizePolicy()
    transform = DetectionTransform(resize=policy, train=False)
    collate = RPNCollate(size_divisibility=module.size_divisibility, assign_targets=False)

    results: list[dict[str, Tensor]] = []
    with evaluation_mode(module):  # a backbone the caller froze in eval mode stays so
        for start in range(0, len(items), batch_size):
            indices = range(start, min(start + batch_size, len(items)))
            batch = collate([loose_image_sample(items[index], index, transform) for index in indices]).to(module.device)
            for item in module.predict_step(batch, start // batch_size):
                results.append({key: item[key] for key in _OUTPUT_KEYS})
    return results[0] if single else results


def loose_image_sample(
    image: ImageInput, index: int, transform: DetectionTransform, caller: str = "predict_images"
) -> DetectionSample:
    """Image ``index`` of ``caller``'s images decoded (:func:`as_hwc_uint8`) and through the
    evaluation ``transform``, without boxes: what the model's evaluation pipeline collates."""
    return transform(DetectionSample(image=as_hwc_uint8(image, index, caller), boxes=empty_boxes(),
                                     image_id=index, source=f"{caller}[{index}]"))


def to_original_coordinates(
    boxes: Tensor, image_size: tuple[int, int], original_size: tuple[int, int]
) -> Tensor:
    """Map ``[P, 4]`` boxes from resized-image pixels back to the original image and clip."""
    scale_y = original_size[0] / image_size[0]
    scale_x = original_size[1] / image_size[1]
    scale = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    return clip_boxes_to_image(boxes * scale, original_size)
