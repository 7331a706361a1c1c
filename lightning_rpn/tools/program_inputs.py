"""An exported proposal program's inputs from an original image, and its boxes back.

A program from :func:`~lightning_rpn.tools.export.export_proposal_network` takes an image as the
model's evaluation sees it: resized by the policy of the data it was trained on
(``RPNModule.resize_policy``, e.g. the shorter side to 800 px) and zero padded to a multiple of
its ``size_divisibility``, with the resized size beside it. ``RPNModule.predict_images`` does
that around the eager model; :func:`program_inputs` does it for a program, through the same
evaluation transform and collation, and :meth:`ProgramInputs.to_original` maps the program's
boxes back to the original image. An image given to the program at its original size, by a
model trained on resized images, gives other (worse) proposals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_rpn.data.collate import RPNCollate
from lightning_rpn.data.loose_images import ImageInput
from lightning_rpn.data.transforms import DetectionTransform, ResizePolicy
from lightning_rpn.training.predict import loose_image_sample, to_original_coordinates

__all__ = ["ProgramInputs", "program_inputs"]


@dataclass(frozen=True)
class ProgramInputs:
    """``program(inputs.images, inputs.image_size)``'s arguments for one image: ``images`` uint8
    ``[1, 3, H, W]`` (resized, zero padded), ``image_size`` int64 ``[2]`` (the resized ``(h, w)``),
    and the image's ``original_size`` ``(h, w)``."""

    images: Tensor
    image_size: Tensor
    original_size: tuple[int, int]

    def to_original(self, boxes: Tensor) -> Tensor:
        """The program's ``[P, 4]`` boxes in the original image's pixels, clipped to it."""
        height, width = (int(side) for side in self.image_size.tolist())
        return to_original_coordinates(boxes, (height, width), self.original_size)


def program_inputs(image: ImageInput, resize: ResizePolicy | None, size_divisibility: int) -> ProgramInputs:
    """The inputs of an exported program for ``image`` (a path, PIL image, ``H x W x 3`` array or
    ``[3, H, W]`` tensor, as ``predict_images`` takes), resized by ``resize`` (the model's
    ``resize_policy``; ``None`` keeps the size) and padded to a multiple of ``size_divisibility``
    (the model's ``size_divisibility``), as the model's own evaluation pipeline does."""
    if isinstance(size_divisibility, bool) or not isinstance(size_divisibility, int) or size_divisibility <= 0:
        raise ValueError(f"program_inputs: size_divisibility must be a positive int, got {size_divisibility!r}")
    sample = loose_image_sample(image, 0, DetectionTransform(resize=resize or ResizePolicy(), train=False),
                                caller="program_inputs")
    batch = RPNCollate(size_divisibility=size_divisibility, assign_targets=False)([sample])
    return ProgramInputs(batch.images, torch.tensor(batch.image_sizes[0], dtype=torch.int64), batch.original_sizes[0])
