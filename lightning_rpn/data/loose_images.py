"""Loose images for ``RPNModule.predict_images``: whatever image a user holds -> ``H x W x 3`` uint8 RGB.

A path (decoded like dataset files), a PIL image of any mode, an ``H x W [x C]`` array or a
``[C, H, W]`` tensor (torchvision's layout), uint8 in 0..255 or float in 0..1, grayscale or
RGBA (alpha dropped); a 4-D array or tensor is a batch.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightning_rpn.data.image_io import load_rgb_image, narrow_sixteen_bit_range, to_rgb_uint8

__all__ = ["ImageInput", "as_hwc_uint8", "is_single_image"]

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
"""What ``predict_images`` takes as one image (see there)."""


def is_single_image(images: object) -> bool:
    """Whether ``predict_images`` got one image rather than a sequence (or 4-D batch) of them."""
    if isinstance(images, (np.ndarray, Tensor)):
        return images.ndim != 4
    return isinstance(images, (str, os.PathLike, Image.Image))


def as_hwc_uint8(image: ImageInput, index: int, caller: str = "predict_images") -> np.ndarray:
    """Image ``index`` of ``caller``'s images as ``H x W x 3`` uint8 RGB (errors name both).

    Paths are decoded like dataset files; PIL images of any mode are converted like them;
    arrays are ``H x W [x C]`` and tensors ``[C, H, W]`` or ``H x W``, ``C`` 1, 3 or 4 (RGBA:
    alpha dropped), uint8 in 0..255 or float in 0..1.
    """
    where, shape = f"{caller}: image {index}", tuple(getattr(image, "shape", ()))
    if isinstance(image, (str, os.PathLike)):
        if os.path.isdir(image):
            raise ValueError(f"{where} is the folder {os.fspath(image)!r}; pass its image files "
                             "(lightning_rpn.data.ImageFolder(folder).files lists the ones the readers read), "
                             "or set data.predict_images to the folder")
        return load_rgb_image(image, image_id=index)
    if isinstance(image, Image.Image):
        reason = narrow_sixteen_bit_range(image)  # as a file of the same pixels warns
        if reason is not None:
            warnings.warn(f"{where}: {reason}", UserWarning, stacklevel=2)
        return to_rgb_uint8(image)
    if isinstance(image, Tensor):
        if image.dim() == 3:
            image = image.permute(1, 2, 0)  # CHW -> HWC
        if image.dtype == torch.bfloat16:  # numpy has no bfloat16
            image = image.float()
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(
            f"{where} is a {type(image).__name__}; expected a path, a PIL image, an H x W x 3 array "
            "or a [3, H, W] tensor"
        )
    layout = "[C, H, W]" if isinstance(image, Tensor) else "H x W x C"
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(
            f"{where} has shape {shape}; expected {layout} with C = 3 (1: gray, 4: RGBA) or H x W"
        )
    if np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if np.isfinite(array).all() else (np.nan, np.nan)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"{where} is a float {layout} image with values in [{low}, {high}]; float images must be "
                "in 0..1 (torchvision's convention); pass uint8 for 0..255"
            )
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"{where} has dtype {array.dtype}; expected uint8 (0..255) or float (0..1)")
    rgb = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]
    return np.ascontiguousarray(rgb)
